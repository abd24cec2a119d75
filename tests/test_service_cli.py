"""A shmq.Service seen from outside (issue 14): ``shmq ls``, ``stat`` and
``top`` show the service, its servers and its clients, read by name from
shared memory in any process; a SIGKILLed client shows as dead and ``shmq
gc`` collects its reply ring although live servers are attached to it.
Real processes: servers started with fork and spawn, clients in unrelated
``subprocess``es that attach by name, the CLI run as a user runs it."""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmq
from shmq import lowlevel as ll
from conftest import SESSION_TAG, session_entries, unique_name

START = [m for m in ("fork", "spawn") if m in mp.get_all_start_methods()]

#: an unrelated process: two clients of the service named argv[1]; a known
#: number of calls, a failure and a stream; then one call that the server
#: holds (in flight) until the file argv[2] exists.  Prints the clients'
#: names, then waits for stdin to close.
CLIENTS = textwrap.dedent(
    """
    import sys, shmq
    svc, other = shmq.Service.attach(sys.argv[1]), shmq.Service.attach(sys.argv[1])
    a, b = svc.client(), other.client()  # (one client per handle)
    for i in range(20):
        assert a.call(i, timeout=30) == 2 * i
    for i in range(10):
        assert b.call(i, timeout=30) == 2 * i
    try:
        b.call("boom", timeout=30)
    except shmq.RemoteError:
        pass
    assert list(b.stream(("count", 3), timeout=30)) == [3, 2, 1, "liftoff"]
    held = b.submit(("hold", sys.argv[2]))
    print(a.name, b.name, flush=True)
    sys.stdin.read()
    assert held.result(timeout=30) == "released"
    a.close(); b.close(); svc.close(); other.close()
    print("done", flush=True)
    """
)


def handler(x):
    """2x; "boom" fails; ("hold", path) waits for path."""
    if isinstance(x, str) and x == "boom":
        raise ValueError("boom")
    if isinstance(x, tuple) and x[0] == "hold":
        deadline = time.monotonic() + 60
        while not os.path.exists(x[1]) and time.monotonic() < deadline:
            time.sleep(0.005)
        return "released"
    return 2 * x


def streaming_handler(x):
    """``handler``, but ("count", 3) counts down in partial replies."""
    if isinstance(x, tuple) and x[0] == "count":
        return _countdown()
    return handler(x)


def _countdown():
    for i in (3, 2, 1):
        yield i
    return "liftoff"


def _serve(req):
    """One request by hand (``streaming_handler``)."""
    out = streaming_handler(req.payload)
    if hasattr(out, "__next__"):
        try:
            while True:
                req.send_partial(next(out))
        except StopIteration as end:
            out = end.value
    req.reply(out)


def shmq_cli(*args, timeout=60):
    res = subprocess.run([sys.executable, "-m", "shmq", *args], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return res.stdout


@contextlib.contextmanager
def service():
    svc = shmq.Service(name=unique_name("svc"))
    try:
        yield svc
    finally:
        svc.unlink()
        svc.close()


def _wait_until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.mark.parametrize("method", START)
def test_ls_stat_top_show_a_service_its_server_and_its_clients(method, tmp_path):
    """A service served by a worker process (fork / spawn), two clients in
    an unrelated process that attaches by name: every command shows the
    service's counters as its own statistics() reads them."""
    flag = tmp_path / "release"
    with service() as svc, svc.serve(_serve_one_by_one, workers=1, ctx=mp.get_context(method)) as serving:
        server = serving.processes[0].pid
        child = subprocess.Popen(
            [sys.executable, "-c", CLIENTS, svc.name, str(flag)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            a_name, b_name = child.stdout.readline().split()
            # the held call: taken by the server, not answered
            assert _wait_until(lambda: svc.statistics().in_flight == 1), svc.statistics()
            mine = svc.statistics()
            assert (mine.replied, mine.failed, mine.partials, mine.in_flight, mine.lost) == (31, 1, 3, 1, 0), mine
            assert mine.received == 33 and mine.queued == 0 and mine.servers == [server]
            assert [(x.pid, x.alive, x.replied, x.failed, x.in_flight) for x in mine.server_table] == [
                (server, True, 31, 1, 1)
            ]
            by_name = {c.name: c for c in mine.clients}
            assert set(by_name) == {a_name, b_name}
            assert (by_name[a_name].outstanding, by_name[a_name].sent) == (0, 20)
            assert (by_name[b_name].outstanding, by_name[b_name].sent) == (1, 13)
            assert all(c.alive and c.pid == child.pid and c.service == svc.name for c in mine.clients)

            # ls: the service, its clients under it (and their tables under them)
            out = shmq_cli("ls", "--prefix", svc.name)
            lines = out.splitlines()
            assert lines[0].split() == ["NAME", "KIND", "SIZE", "CREATOR", "ALIVE", "AGE", "PROCS", "INFO"], out
            row = lines[1]
            assert row.split()[:2] == [svc.name, "service"], out
            assert f"1 in flight, 0 queued; servers {server}; clients 2/2" in row, out
            clients = {line.split()[0]: line for line in lines if line.startswith("  shmq_") and ".b0" not in line}
            assert set(clients) == {a_name, b_name}, out
            assert "client" in clients[b_name] and "1 outstanding" in clients[b_name], out
            assert f"    {b_name}.b0" in out, out
            listing = json.loads(shmq_cli("ls", "--prefix", svc.name, "--json"))
            entries = {e["name"]: e for e in listing}
            s = entries[svc.name]
            assert s["kind"] == "service" and s["summary"]["servers"] == [server], s
            assert (s["summary"]["clients"], s["summary"]["clients_dead"], s["summary"]["in_flight"]) == (2, 0, 1)
            assert entries[b_name]["kind"] == "client" and entries[b_name]["service"] == svc.name
            assert entries[b_name]["summary"]["outstanding"] == 1 and not entries[b_name]["summary"]["dead"]

            # stat: the same counters as the service's own statistics()
            text = shmq_cli("stat", svc.name)
            assert f"service       {svc.name}: request ring 1.0 MiB" in text, text
            assert "33 received, 31 replied, 1 failed, 0 cancelled, 1 in flight, 0 lost; 3 partial replies" in text, text
            assert f"{server} (alive): 31 replied, 1 failed, 0 cancelled, 1 in flight" in text, text
            assert f"{b_name} (pid {child.pid}, alive): 1 outstanding, 13 sent, 0 resent" in text, text
            data = json.loads(shmq_cli("stat", svc.name, "--json"))
            assert data["type"] == "ServiceStatistics" and data["name"] == svc.name
            for key in ("received", "replied", "failed", "cancelled", "partials", "in_flight", "lost", "queued"):
                assert data[key] == getattr(mine, key), key
            assert data["servers"] == [server] and len(data["clients"]) == 2
            assert ll.read_statistics(svc.name).replied == 31  # the library reads the same, by name

            # a client by its own name
            text = shmq_cli("stat", b_name)
            assert f"client        of service {svc.name}: pid {child.pid} (alive)" in text, text
            assert "1 outstanding, 13 sent, 0 resent" in text, text
            assert json.loads(shmq_cli("stat", b_name, "--json"))["type"] == "ClientStatistics"

            # top: the service row with its clients under it
            frame = json.loads(shmq_cli("top", "--prefix", svc.name, "--json", "--iterations", "1", "--interval", "0.3"))
            seg = {e["name"]: e for e in frame["segments"]}
            assert seg[svc.name]["kind"] == "service" and not seg[svc.name]["dead"]
            assert seg[svc.name]["rates"]["verdict"] in ll_verdicts()
            assert seg[svc.name]["summary"]["in_flight"] == 1
            assert seg[b_name]["kind"] == "client" and not seg[b_name]["dead"]
            text = shmq_cli("top", "--prefix", svc.name, "--iterations", "1", "--interval", "0.3")
            header = next(line for line in text.splitlines() if line.startswith("NAME"))
            assert header.split()[-2:] == ["PROCS", "INFO"], text
            row = next(line for line in text.splitlines() if line.startswith(svc.name))
            assert row.split()[1] == "service" and "1 in flight" in row, text
            assert any(line.startswith(f"  {a_name}") and " client " in line for line in text.splitlines()), text
        finally:
            flag.touch()
            out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip().endswith("done"), out
        st = svc.statistics()
        assert (st.replied, st.in_flight, st.clients) == (32, 0, ()), st  # closed clients leave no ring
    assert not session_entries_of(svc.name)


def _serve_one_by_one(x):
    """For serve(): ``streaming_handler``."""
    return streaming_handler(x)


def ll_verdicts():
    from shmq._stats import VERDICTS

    return VERDICTS


def session_entries_of(name):
    return [e for e in session_entries() if name in e]


#: an unrelated client process: one call, prints its reply ring's name, waits.
ONE_CALL = textwrap.dedent(
    """
    import sys, shmq
    c = shmq.Service.attach(sys.argv[1]).client()
    print(c.name, flush=True)
    assert c.call(21, timeout=30) == 42
    print("called", flush=True)
    sys.stdin.read()
    """
)


def test_a_sigkilled_client_shows_dead_and_gc_collects_its_ring_while_its_server_lives():
    """The server (this process) is attached to the client's reply ring; the
    client is SIGKILLed: ls/stat/top say DEAD, and gc removes its reply ring
    and its table, not the service (which this process still serves)."""
    with service() as svc:
        with subprocess.Popen(
            [sys.executable, "-c", ONE_CALL, svc.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as child:
            try:
                name = child.stdout.readline().strip()
                req = svc.receive(timeout=30)  # (attaches the client's reply ring: a participant of it)
                _serve(req)
                assert child.stdout.readline().strip() == "called"
                assert os.getpid() in [p.pid for p in ll.read_statistics(name).replies.participants]
            finally:
                child.kill()
                child.wait(30)
        entries = {e["name"]: e for e in json.loads(shmq_cli("ls", "--prefix", svc.name, "--json"))}
        assert entries[name]["summary"]["dead"] is True and entries[svc.name]["summary"]["clients_dead"] == 1
        out = shmq_cli("ls", "--prefix", svc.name)
        assert f"DEAD: client {child.pid} died (shmq gc removes it)" in out, out
        assert "clients 0/1" in out, out
        frame = json.loads(shmq_cli("top", "--prefix", svc.name, "--json", "--iterations", "1", "--interval", "0.2"))
        seg = {e["name"]: e for e in frame["segments"]}
        assert seg[name]["dead"] is True and seg[f"{name}.b0"]["dead"] is True and seg[svc.name]["dead"] is False
        assert f"pid {child.pid}, DEAD" in shmq_cli("stat", svc.name)

        # gc: the client's ring and table go (this live process is attached to
        # the ring: a client's ring lives and dies with its client alone);
        # --prefix SERVICE takes in its clients, and keeps the live service
        dry = shmq_cli("gc", "--prefix", svc.name, "--dry-run")
        assert f"would remove client {name}" in dry and f"{name}.b0" in dry, dry
        assert svc.name + " " not in dry and "would remove 2 segment(s)" in dry, dry
        assert os.path.exists(f"/dev/shm/{name}")
        report = json.loads(shmq_cli("gc", "--prefix", svc.name, "--json"))
        assert sorted(g["name"] for g in report["removed"]) == [name, f"{name}.b0"], report
        assert not session_entries_of(f"_{child.pid}_")
        assert svc.statistics().clients == ()
        # the server forgets the client at its next sweep, without tripping over the missing names
        with pytest.raises(TimeoutError):
            svc.receive(timeout=shmq.service.PEER_SWEEP_INTERVAL + 0.2)
        assert svc._peers == {}
        assert shmq_cli("gc", "--prefix", svc.name, "--dry-run").strip().startswith("would remove 0 segment")
    assert not session_entries_of(svc.name)


def hang(x):
    time.sleep(60)


def test_a_server_killed_while_serving_shows_dead_and_its_call_as_lost():
    """The client counts the call its server took to its death (``lost``);
    the dead server stays in the table with its counters, not in flight."""
    with service() as svc, svc.serve(hang, workers=1, ctx=mp.get_context("fork")) as serving:
        pid = serving.processes[0].pid
        c = svc.client()
        fut = c.submit("x")
        assert _wait_until(lambda: svc.statistics().in_flight == 1)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(shmq.BrokenError):
            fut.result(timeout=10)
        st = svc.statistics()
        assert (st.lost, st.in_flight, st.servers) == (1, 0, []), st
        assert [(x.pid, x.alive, x.in_flight) for x in st.server_table] == [(pid, False, 0)]
        text = shmq_cli("stat", svc.name)
        assert "0 in flight, 1 lost" in text and f"dead: {pid}" in text, text
        c.close()


def test_cancelled_calls_are_counted_and_a_closed_server_keeps_its_counts():
    """Cancelled before a handler saw it, and cancelled while served: both
    count as cancelled; a server that closes folds its counters into the
    service's totals (nothing is lost when its entry goes)."""
    with service() as svc:
        c = svc.client()
        skipped = c.submit(1)
        assert skipped.cancel()  # not taken yet: the server skips it
        served = c.submit(2)
        server = shmq.Service.attach(svc.name)
        req = server.receive(timeout=10)  # (takes the cancelled one off the ring first, skips it)
        assert req.payload == 2
        assert served.cancel() and req.cancelled
        req.reply("too late")  # dropped
        st = svc.statistics()
        assert (st.cancelled, st.replied, st.in_flight, st.received) == (2, 0, 0, 2), st
        assert [(x.pid, x.cancelled) for x in st.server_table] == [(os.getpid(), 2)]
        server.close()  # the entry goes; its counts stay in the totals
        st = svc.statistics()
        assert (st.cancelled, st.server_table) == (2, ()), st
        c.close()


def test_attach_refuses_what_is_not_a_service():
    q = shmq.Queue(name=unique_name("notsvc"))
    try:
        with pytest.raises(shmq.LayoutError, match="not a service"):
            shmq.Service.attach(q.name)
    finally:
        q.close()
    with service() as svc:
        c = svc.client()
        with pytest.raises(shmq.LayoutError, match="reply ring"):
            shmq.Service.attach(c.name)
        c.close()


def test_top_on_a_terminal_cuts_the_info_column_before_the_names():
    from shmq._cli import MIN_INFO_WIDTH, _top_text

    def entry(name, kind, info, owner=None, service=None):
        return {"name": name, "kind": kind, "owner": owner, "dead": False, "procs_alive": 1, "procs": 1,
                "fill_ratio": 0.0, "rates": None, "info": info, "service": service}

    entries = [
        entry("shmq_tag_12345_service_nm", "service", "1 in flight, 0 queued; servers 101,102,103; clients 2/2"),
        entry("shmq_tag_12345_6789abcdef", "client", "1 outstanding, 0 replies unread",
              service="shmq_tag_12345_service_nm"),
    ]
    wide = _top_text(entries, "", 1.0)  # not a terminal: nothing cut
    assert "1 in flight, 0 queued; servers 101,102,103; clients 2/2" in wide and "  shmq_tag_12345_6789abcdef" in wide
    fixed = len(wide.splitlines()[2].split("INFO")[0])  # every column before INFO, at full width
    for width in (fixed + 60, fixed + MIN_INFO_WIDTH, fixed + MIN_INFO_WIDTH - 1, fixed - 5):
        text = _top_text(entries, "", 1.0, width=width)
        lines = text.splitlines()[2:]
        assert all(len(line) <= width for line in lines), (width, text)
        assert ("INFO" in lines[0]) == (width >= fixed + MIN_INFO_WIDTH), text
        if width >= fixed:
            assert "shmq_tag_12345_service_nm" in text and "  shmq_tag_12345_6789abcdef" in text, text  # names whole


def test_garbage_in_the_service_words_never_crashes_the_commands():
    """Every word the readers believe (the server table, a client's service
    name and request table) overwritten with garbage: ls, stat, top and gc
    still answer, without a traceback."""
    import random

    from shmq import _layout as L

    rnd = random.Random(14)
    with service() as svc, svc.serve(_serve_one_by_one, workers=1, ctx=mp.get_context("fork")):
        c = svc.client()
        assert c.call(1, timeout=30) == 2
        svc_words = svc._requests.segment.words
        reply_words = c._replies.segment.words
        table_words = c._table.words
        for _ in range(3):
            for w, lo, hi in (
                (svc_words, L.W_SV_SERVERS, L.DATA_OFFSET // L.WORD),
                (reply_words, L.W_RP_SERVICE, L.W_RP_SERVICE + L.RP_SERVICE_BYTES // L.WORD),
                (table_words, L.W_CL_RESENT, L.DATA_OFFSET // L.WORD + 64),
            ):
                for i in range(lo, hi):
                    w[i] = rnd.choice((0, -1, 1, 1 << 62, -(1 << 63), rnd.getrandbits(63)))
            for args in (("ls", "--prefix", svc.name), ("ls", "--prefix", svc.name, "--json"), ("stat", svc.name),
                         ("stat", svc.name, "--json"), ("stat", c.name),
                         ("top", "--prefix", svc.name, "--iterations", "1", "--interval", "0.1"),
                         ("gc", "--prefix", svc.name, "--dry-run")):
                shmq_cli(*args)  # (exit status 0, no traceback)
            svc.statistics()
        c.close()
    # a server that claims an entry in, and folds into, a garbage table still serves
    with service() as svc:
        words = svc._requests.segment.words
        for i in range(L.W_SV_FOLDS, L.DATA_OFFSET // L.WORD):
            words[i] = rnd.choice((-1, 1 << 62, (1 << 63) - 1, rnd.getrandbits(63)))
        with svc.serve(_serve_one_by_one, workers=2, ctx=mp.get_context("fork")):
            c = svc.client()
            assert [c.call(i, timeout=30) for i in range(10)] == [2 * i for i in range(10)]
            shmq_cli("stat", svc.name)
            c.close()
        svc.statistics()


def test_stat_interval_and_top_give_a_busy_service_s_call_rates():
    """Calls flowing: stat --interval and top measure calls in and answered
    per second (about equal: every call is answered), and each client's
    replies per second."""
    import threading

    with service() as svc, svc.serve(_serve_one_by_one, workers=1, ctx=mp.get_context("fork")):
        c = svc.client()
        stop = threading.Event()
        calls = [0]

        def caller():
            while not stop.is_set():
                assert c.call(1, timeout=30) == 2
                calls[0] += 1

        t = threading.Thread(target=caller, daemon=True)
        t.start()
        try:
            data = json.loads(shmq_cli("stat", svc.name, "--interval", "0.5", "--json"))
            r = data["rates"]
            assert r["messages_in_per_second"] > 100 and r["messages_out_per_second"] > 100, r
            assert abs(r["messages_in_per_second"] - r["messages_out_per_second"]) < 0.2 * r["messages_in_per_second"], r
            assert r["verdict"] in ll_verdicts()
            text = shmq_cli("stat", svc.name, "--interval", "0.3")
            assert "calls in " in text and "answered " in text and "verdict" in text, text
            frame = json.loads(shmq_cli("top", "--prefix", svc.name, "--json", "--iterations", "1", "--interval", "0.5"))
            seg = {e["name"]: e for e in frame["segments"]}
            assert seg[svc.name]["rates"]["messages_out_per_second"] > 100, seg[svc.name]
            assert seg[c.name]["rates"]["messages_in_per_second"] > 100, seg[c.name]  # replies written to it
        finally:
            stop.set()
            t.join(30)
        assert calls[0] > 0
        assert svc.statistics().replied == calls[0]
        c.close()


def test_a_server_s_result_pool_and_a_client_s_argument_pool_show_under_the_service():
    import numpy as np

    with service() as svc, svc.serve(_serve_one_by_one, workers=1, ctx=mp.get_context("spawn")) as serving:
        server = serving.processes[0].pid
        c = svc.client()
        a = np.arange(1 << 18, dtype=np.float64)
        assert np.array_equal(c.call(a, timeout=60), 2 * a)  # through both pools
        out = shmq_cli("ls", "--prefix", svc.name)
        lines = out.splitlines()
        assert lines[1].split()[:2] == [svc.name, "service"], out
        pool = next(line for line in lines if f"results of server {server}" in line)
        assert pool.startswith(f"  shmq_{SESSION_TAG}_{server}_") and pool.split()[1] == "pool", out
        assert any(line.startswith(f"    {c.name}.p ") and line.split()[1] == "pool" for line in lines), out
        listing = {e["name"]: e for e in json.loads(shmq_cli("ls", "--prefix", svc.name, "--json"))}
        assert listing[pool.split()[0]]["service"] == svc.name and listing[c.name]["service"] == svc.name
        c.close()


def test_a_server_beyond_the_table_counts_into_the_totals():
    """Every entry of the server table held by a live process: one more
    server counts in its own memory and adds to the totals every 0.1 s
    (and when it closes); nothing is lost."""
    from shmq import _layout as L
    from shmq import _platform as P

    with service() as svc:
        w = svc._requests.segment.words
        for i in range(L.SV_SERVERS):  # (this process, alive: not reusable)
            b = L.service_entry_word(i)
            w[b + L.SV_START_US] = P.my_start_us()
            w[b + L.SV_PID] = os.getpid()
        with svc.serve(_serve_one_by_one, workers=1, ctx=mp.get_context("fork")) as serving:
            c = svc.client()
            assert [c.call(i, timeout=30) for i in range(25)] == [2 * i for i in range(25)]
            assert _wait_until(lambda: svc.statistics().replied == 25), svc.statistics()
            st = svc.statistics()
            assert serving.processes[0].pid not in [x.pid for x in st.server_table]
            assert st.servers == [serving.processes[0].pid]
            assert c.call(0, timeout=30) == 0
        assert svc.statistics().replied == 26  # (the last one added when the worker closed)
        for i in range(L.SV_SERVERS):
            w[L.service_entry_word(i) + L.SV_PID] = 0
        c.close()

"""shmq.Service: what the first version's "Limits" section listed, each fixed
and pinned here -- partial replies only to clients that read them, result
slots of a client that died or closed come back to the server, a request
lost between a server's read and its record is sent again, the specific
exception classes -- plus the wire format the fast path relies on."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

import shmq
from shmq import _service_client as SC
from conftest import join_all


class _Svc:
    """A service unlinked (not just closed) when the block ends."""

    def __enter__(self):
        self.svc = shmq.Service()
        return self.svc

    def __exit__(self, *exc):
        self.svc.unlink()
        self.svc.close()


def _written(ring) -> int:
    return ring.statistics().messages_in


def chatty(n):
    for i in range(n):
        yield i
    return "end"


def big_result(x):
    return np.full(1 << 18, x, dtype=np.float64)  # 2 MiB: through a slot of the server's pool


def echo(x):
    return x


def quick_echo(x):
    return x


# -- partial replies go only to a client that reads them ------------------------------
def test_partials_are_not_sent_to_call_or_submit_but_are_to_stream():
    with _Svc() as svc:
        c = svc.client()
        fut = c.submit("x")
        req = svc.receive(timeout=5)
        assert not req.wants_partials
        for i in range(3):
            req.send_partial(i)  # a no-op: the client would drop them
        req.reply("done")
        assert fut.result(timeout=5) == "done"
        assert _written(c._replies) == 1  # only the reply (4 before: the partials travelled too)

        it = c.stream("y", timeout=5)
        holder = {}
        t = threading.Thread(target=lambda: holder.setdefault("items", list(it)))
        t.start()
        req = svc.receive(timeout=5)
        assert req.wants_partials
        for i in range(3):
            req.send_partial(i)
        req.reply("done")
        t.join(10)
        assert holder["items"] == [0, 1, 2, "done"]
        assert _written(c._replies) == 5


def test_a_generator_handler_sends_its_yields_only_to_stream():
    with _Svc() as svc, svc.serve(chatty, workers=1, ctx=mp.get_context("fork")):
        c = svc.client()
        assert c.call(50, timeout=10) == "end"
        assert c.submit(50).result(timeout=10) == "end"
        assert _written(c._replies) == 2
        assert list(c.stream(3, timeout=10)) == [0, 1, 2, "end"]


def test_send_partial_after_the_reply_raises():
    with _Svc() as svc:
        c = svc.client()
        fut = c.submit(1)
        req = svc.receive(timeout=5)
        req.reply(2)
        with pytest.raises(RuntimeError, match="already answered"):
            req.send_partial(3)
        with pytest.raises(RuntimeError, match="already answered"):
            req.reply(4)
        assert fut.result(timeout=5) == 2


# -- result slots sent to a client that is gone -----------------------------------------
def _hoarding_client(name, n, out, close):
    """Sends ``n`` requests for large results and never reads the replies;
    reports once they are all in its reply ring, then closes (``close``) or
    waits to be killed."""
    client = shmq.Service.attach(name).client()
    for i in range(n):
        client._submit(i, False, None)  # no delivery thread: the replies stay in the ring
    deadline = time.monotonic() + 30
    while client._replies.qsize() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    out.put((client.name, client._replies.qsize()))
    if close:
        client.close()
        out.put("closed")
        return
    time.sleep(60)  # (killed by the test; no Event: setting one a killed process waits on hangs)


@pytest.mark.parametrize("how", ["killed", "closed"])
def test_result_slots_of_a_gone_client_return_to_the_server(how):
    """The server's result pool has SC._POOL_SLOTS slots; a client holds
    them all in unread replies and then dies (or closes).  Another client's
    large call must still be served: before, the slots stayed taken until
    the server exited, and the call waited out its timeout."""
    ctx = mp.get_context("fork")
    with _Svc() as svc, svc.serve(big_result, workers=1, ctx=ctx):
        c = svc.client()
        assert c.call(1.0, timeout=10)[0] == 1.0  # the server's pool exists, one slot in use and back
        out = ctx.Queue()
        hoarder = ctx.Process(target=_hoarding_client, args=(svc.name, SC._POOL_SLOTS, out, how == "closed"))
        hoarder.start()
        try:
            hoarder_name, held = out.get(timeout=30)
            assert held == SC._POOL_SLOTS
            if how == "killed":
                os.kill(hoarder.pid, signal.SIGKILL)
            else:
                assert out.get(timeout=30) == "closed"
            t0 = time.monotonic()
            got = c.call(2.0, timeout=8)
            assert got[0] == 2.0 and got.nbytes == 8 << 18
            assert time.monotonic() - t0 < 3.0  # a peer sweep (1 s) and a pool reclaim (0.1 s), with margin
            assert [c.call(float(i), timeout=8)[0] for i in range(SC._POOL_SLOTS + 2)] == [
                float(i) for i in range(SC._POOL_SLOTS + 2)
            ]
            # and the server removed the dead client's names (its next peer sweep)
            deadline = time.monotonic() + 5
            while any(hoarder_name in n for n in os.listdir("/dev/shm")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not [n for n in os.listdir("/dev/shm") if hoarder_name in n]
        finally:
            if hoarder.is_alive():
                hoarder.kill()
            join_all([hoarder], 10)


# -- a request lost between a server's read and its record ------------------------------
def _thief(name, stole):
    """A 'server' that takes a request off the ring and dies before it
    records taking it (the window between try_read and TAKEN)."""
    svc = shmq.Service.attach(name)
    svc._register_server()
    rec = svc._requests.read(timeout=30)
    stole.put(len(rec))
    time.sleep(60)  # (killed by the test)


def counting_echo(x):
    return (x, os.getpid())


def test_a_request_lost_by_a_dying_server_is_sent_again_once():
    ctx = mp.get_context("fork")
    with _Svc() as svc:
        stole = ctx.Queue()
        thief = ctx.Process(target=_thief, args=(svc.name, stole))
        thief.start()
        try:
            c = svc.client()
            while thief.pid not in svc.servers():
                time.sleep(0.01)
            fut = c.submit("payload")  # not idempotent: sent again only because it was never served
            assert stole.get(timeout=30) > 0
            os.kill(thief.pid, signal.SIGKILL)
            join_all([thief], 10)
            with svc.serve(counting_echo, workers=1, ctx=ctx) as serving:
                t0 = time.monotonic()
                got, pid = fut.result(timeout=10)
                assert got == "payload" and pid == serving.processes[0].pid
                assert time.monotonic() - t0 < 1.5
                assert fut._retries == 1
                assert c.call("next", timeout=10)[0] == "next"
        finally:
            if thief.is_alive():
                thief.kill()
            join_all([thief], 10)


# -- the exception classes ----------------------------------------------------------------
def test_more_than_max_outstanding_requests_wait_for_a_free_entry():
    """Back-pressure, as for a full ring: the request waits (reading replies
    meanwhile) for one of the client's MAX_OUTSTANDING entries; its timeout
    bounds the wait (TimeoutError).  (Before: a bare ShmqError at once.)"""
    with _Svc() as svc:
        c = svc.client()
        futs = [c._submit(i, False, None) for i in range(SC.MAX_OUTSTANDING)]
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="outstanding"):
            c.submit("one too many", timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 1.0
        with pytest.raises(TimeoutError):
            c.call("one too many", timeout=0.2)
        assert futs[0].cancel()
        c._submit("room again", False, None)  # the cancelled request's entry is free
        c.close()
    with _Svc() as svc, svc.serve(quick_echo, workers=1, ctx=mp.get_context("fork")):
        c = svc.client()
        futs = [c.submit(i, timeout=30) for i in range(3 * SC.MAX_OUTSTANDING)]
        assert [f.result(timeout=30) for f in futs] == list(range(3 * SC.MAX_OUTSTANDING))


def _use_parents_client(client, out):
    try:
        client.call(1, timeout=1)
        out.put("no error")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put(type(exc).__name__)


def test_a_forked_child_using_its_parents_client_gets_closed_error():
    ctx = mp.get_context("fork")
    with _Svc() as svc:
        c = svc.client()
        out = ctx.Queue()
        child = ctx.Process(target=_use_parents_client, args=(c, out))
        child.start()
        assert out.get(timeout=30) == "ClosedError"
        join_all([child], 10)


# -- the wire format ----------------------------------------------------------------------
def test_records_are_payload_then_trailer_and_bad_records_are_dropped():
    with _Svc() as svc:
        c = svc.client()
        fut = c.submit({"k": [1, 2]})
        rec = svc._requests.read(timeout=5)
        name = c.name.encode()
        seq, entry, flags, nlen = SC._REQ.unpack_from(rec, len(rec) - SC._REQ.size)
        assert (seq, entry, flags, nlen) == (fut.seq, fut.entry, 0, len(name))
        assert rec[-SC._REQ.size - nlen : -SC._REQ.size] == name
        assert pickle.loads(rec) == {"k": [1, 2]}  # (pickle ignores the trailer)
        fut.cancel()
        # garbage in the request ring is dropped, not served, and the server goes on
        for junk in (b"", b"\x00", b"\x05abc", b"x" * 40 + bytes([200]), b"x" * 30 + SC._REQ.pack(1, 5, 0, 0)):
            svc._requests.write(junk)
        f2 = c.submit("after")
        req = svc.receive(timeout=5)
        assert req.payload == "after"
        req.reply("ok")
        assert f2.result(timeout=5) == "ok"


# -- statistics -------------------------------------------------------------------------
def napping_echo(x):
    if isinstance(x, float):
        time.sleep(x)
    return x


def test_service_and_client_statistics():
    with _Svc() as svc, svc.serve(napping_echo, workers=1, ctx=mp.get_context("fork")) as serving:
        c = svc.client()
        for i in range(9):
            assert c.call(i, timeout=10) == i
        assert c.call(0.05, timeout=10) == 0.05  # (the client surely waits for this one)
        st = c.statistics()
        assert (st.outstanding, st.sent, st.resent) == (0, 10, 0)
        assert st.replies.messages_in == 10 and st.replies.messages_used == 0
        assert st.replies.empty_waits >= 1  # (counted in the process, flushed by statistics())
        sv = svc.statistics()
        assert sv.servers == [serving.processes[0].pid]
        assert sv.requests.messages_in == 10 and sv.requests.messages_used == 0
        c.close()
        with pytest.raises(shmq.ClosedError):
            c.statistics()


def test_a_done_callback_may_close_the_client():
    """Callbacks run in the thread that pumps the replies, with the pump
    lock held; close() there must not wait for that lock forever."""
    with _Svc() as svc, svc.serve(echo, workers=1, ctx=mp.get_context("fork")):
        c = svc.client()
        closed = threading.Event()

        def close_it(_fut):
            c.close()
            closed.set()

        fut = c.submit(1)
        fut.add_done_callback(close_it)
        assert fut.result(timeout=10) == 1
        assert closed.wait(5) and c.closed


def test_fast_servers_killed_at_random_points_every_call_ends_once():
    """SIGKILL lands anywhere in a fast server's loop (often between its read
    of a request and its record of taking it): every call, idempotent or
    not, ends with its own reply or BrokenError, none waits past its
    timeout, and at most one call per kill fails."""
    import random

    rng = random.Random(os.getpid())
    ctx = mp.get_context("fork")
    with _Svc() as svc:
        c = svc.client()
        for round_ in range(6):
            with svc.serve(quick_echo, workers=2, ctx=ctx) as serving:
                futs = [c.submit((round_, i)) for i in range(300)]
                time.sleep(rng.uniform(0.0, 0.01))
                os.kill(serving.processes[0].pid, signal.SIGKILL)
                broken = 0
                for i, f in enumerate(futs):
                    try:
                        assert f.result(timeout=10) == (round_, i)
                    except shmq.BrokenError:
                        broken += 1
                assert broken <= 1, broken
                assert c.call(("after", round_), timeout=10) == ("after", round_)

"""The command line, run as a user would: a subprocess, real segments, real
output.  Every command here is limited to this session's names (``--prefix``)
so segments of other programs on the machine are neither shown nor touched."""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import shmq
from shmq import lowlevel as ll
from conftest import SESSION_TAG, unique_name
from shmq._stats import VERDICTS

SHM = "/dev/shm"
PREFIX = f"shmq_{SESSION_TAG}_"
CREATE_AND_WAIT = (
    "import shmq,sys; r=shmq.Ring.create(1 << 16, name=sys.argv[1] if len(sys.argv) > 1 else None); "
    "print(r.name, flush=True); sys.stdin.read()"
)


def shmq_cli(*args, timeout=60, check_clean=True, **kw):
    res = subprocess.run(
        [sys.executable, "-m", "shmq", *args], capture_output=True, text=True, timeout=timeout, **kw
    )
    if check_clean:
        assert "Traceback" not in res.stderr, res.stderr
    return res


def one_error_line(res, *fragments):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ring():
    r = shmq.Ring.create(1 << 16, name=unique_name("cli"))
    try:
        yield r
    finally:
        r.close()
        r.unlink()


@pytest.fixture
def foreign():
    """A file in /dev/shm with an shmq-like name that is not an shmq segment."""
    name = unique_name("frgn")
    path = os.path.join(SHM, name)
    long_path = path + "_longer_than_shmq_names_can_be"
    for p in (path, long_path):
        with open(p, "wb") as f:
            f.write(b"\x89SHMQ not really" + b"\0" * 8192)
    try:
        yield name
    finally:
        os.unlink(path)
        os.unlink(long_path)


def test_demo_still_works():
    res = shmq_cli("demo", "-n", "2000", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "moved 2,000 messages of 64 bytes" in res.stdout
    assert f"({ll.CORE} core)" in res.stdout  # which core ran (issue 12)


def test_console_script_is_installed():
    exe = shutil.which("shmq")
    if exe is None:
        pytest.skip("the shmq console script is not on PATH (package not installed)")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for command in ("ls", "stat", "top", "gc", "bench", "demo"):
        assert command in res.stdout


def test_ls_lists_segments_by_magic(ring, foreign):
    ring.write(b"hello")
    res = shmq_cli("ls", "--prefix", PREFIX)
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "SIZE", "CREATOR", "ALIVE", "AGE", "PROCS"]
    row = next(r.split() for r in rows if r.startswith(ring.name))
    assert row[1] == "ring" and row[2:4] == ["68.0", "KiB"]
    assert row[4] == str(os.getpid()) and row[5] == "yes" and row[7] == "1/1"
    assert foreign not in res.stdout

    data = json.loads(shmq_cli("ls", "--prefix", ring.name, "--json").stdout)
    assert [(d["name"], d["kind"], d["size_bytes"], d["creator_pid"], d["creator_alive"]) for d in data] == [
        (ring.name, "ring", 4096 + (1 << 16), os.getpid(), True)
    ]
    assert data[0]["age_seconds"] >= 0 and data[0]["participants"][0]["role"].startswith("creator")
    assert shmq_cli("ls", "--prefix", unique_name("none")).stdout.startswith("no shmq segments")


def test_stat_prints_one_snapshot(ring):
    for _ in range(3):
        ring.write(b"x" * 10)
    ring.read()
    res = shmq_cli("stat", ring.name)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(None, 1) for line in res.stdout.splitlines() if line.split()[0] in ("messages", "creator"))
    assert lines["messages"].strip() == "in 3, out 1, held 2"
    assert lines["creator"].strip() == f"{os.getpid()} (alive)"

    data = json.loads(shmq_cli("stat", ring.name, "--json").stdout)
    assert data["type"] == "RingStatistics"
    assert (data["messages_in"], data["messages_out"], data["capacity_bytes"]) == (3, 1, 1 << 16)
    assert data["participants"] == [{"pid": os.getpid(), "role": "creator+producer+consumer", "alive": True}]


def test_stat_interval_adds_rates_and_verdict(ring):
    data = json.loads(shmq_cli("stat", ring.name, "--interval", "0.2", "--json").stdout)
    assert data["rates"]["verdict"] == "idle"
    assert data["rates"]["interval_seconds"] >= 0.2
    text = shmq_cli("stat", ring.name, "--interval", "0.1").stdout
    assert "verdict" in text and "idle" in text


def test_errors_are_one_line_and_exit_1(foreign):
    one_error_line(shmq_cli("stat", unique_name("none")), "shmq stat:", "no shared memory named")
    one_error_line(shmq_cli("stat", foreign), "is not an shmq segment")
    one_error_line(shmq_cli("stat", "no/such"), "'name' must be")
    one_error_line(shmq_cli("top", "--interval", "0"), "--interval must be positive")
    one_error_line(shmq_cli("bench", "--only", "nosuch"), "no such benchmark")
    usage = shmq_cli("stat")
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_permission_denied_is_one_line(ring):
    path = os.path.join(SHM, ring.name)
    os.chmod(path, 0)
    try:
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m", "shmq"]
        res = subprocess.run(drop + ["stat", ring.name], capture_output=True, text=True, timeout=60)
        assert "Traceback" not in res.stderr
        one_error_line(res, "no permission to open shared memory")
        res = subprocess.run(drop + ["ls", "--prefix", ring.name], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and f"cannot read {ring.name}" in res.stderr
    finally:
        os.chmod(path, 0o600)


# -- top -----------------------------------------------------------------------


class Lines:
    """Read a subprocess's stdout line by line, with bounded waits."""

    def __init__(self, proc):
        self.q = queue.Queue()
        self.seen = []
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self.q.put(line)
        self.q.put(None)

    def until(self, predicate, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; output so far:\n{''.join(self.seen[-40:])}"
            line = self.q.get(timeout=left)
            assert line is not None, f"process ended; output:\n{''.join(self.seen[-40:])}"
            self.seen.append(line)
            if predicate(line):
                return line


def frames(text):
    return [f for f in text.split("shmq top ")[1:]]


def test_top_refreshes_with_rates_and_verdicts(ring):
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import shmq,sys; r=shmq.Ring.attach(sys.argv[1])\n"
            "for _ in range(100000):\n"
            "    r.write(b'm' * 100, timeout=30)\n"
            "    if sys.stdin.closed: break\n"
            "r.close()",
            ring.name,
        ],
        stdin=subprocess.PIPE,
    )
    try:
        res = shmq_cli("top", "--prefix", ring.name, "--iterations", "3", "--interval", "0.3")
    finally:
        writer.kill()
        writer.wait(30)
        writer.stdin.close()
    assert res.returncode == 0, res.stderr
    fs = frames(res.stdout)
    assert len(fs) == 3
    for f in fs:
        assert ring.name in f and "VERDICT" in f
    row = next(line for line in fs[-1].splitlines() if line.startswith(ring.name)).split()
    assert row[1] == "ring"
    assert row[-2] in VERDICTS
    # nobody reads: the writer fills the ring, then waits
    assert row[-2] == "consumer-bound"


def test_top_follows_queues_that_come_and_go_and_quits_on_ctrl_c():
    prefix = unique_name("top")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmq", "top", "--prefix", prefix, "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = Lines(proc)
        out.until(lambda line: "no shmq segments" in line)
        r = shmq.Ring.create(4096, name=prefix + "a")
        try:
            out.until(lambda line: line.startswith(r.name))
        finally:
            r.close()
            r.unlink()
        out.until(lambda line: "no shmq segments" in line)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()


# -- gc --------------------------------------------------------------------------


def _kill_leaving_zombie(name=None):
    """A creator that is SIGKILLed and not reaped yet: (its Popen, ring name)."""
    args = [sys.executable, "-c", CREATE_AND_WAIT] + ([name] if name else [])
    child = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    created = child.stdout.readline().strip()
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    return child, created


def _reap(child):
    child.wait(30)
    child.stdout.close()
    child.stdin.close()


def entries(name):
    return sorted(e for e in os.listdir(SHM) if name in e)


def test_gc_removes_what_a_sigkilled_creator_left_and_nothing_else():
    import posix_ipc

    child, dead = _kill_leaving_zombie()
    try:
        pid = child.pid
        assert dead.startswith(f"{PREFIX}{pid}_")
        prefix = f"{PREFIX}{pid}_"
        live = shmq.Ring.create(4096, name=f"{prefix}live")  # same prefix, live creator
        not_ours = os.path.join(SHM, f"{prefix}dead")  # shmq-like name, not a segment
        with open(not_ours, "wb") as f:
            f.write(b"x" * 8192)
        orphan = posix_ipc.Semaphore(f"/{prefix}beef-ne", posix_ipc.O_CREX, initial_value=0)
        orphan.close()
        mine = f"{PREFIX}{os.getpid()}_beef-nf"  # orphan-looking, but its pid is alive
        posix_ipc.Semaphore("/" + mine, posix_ipc.O_CREX, initial_value=0).close()
        try:
            assert len(entries(dead)) >= 3  # segment + its semaphores
            dry = shmq_cli("gc", "--prefix", prefix, "--dry-run")
            assert dry.returncode == 0, dry.stderr
            assert f"would remove ring {dead}" in dry.stdout
            assert f"creator {pid} is dead" in dry.stdout
            assert f"would remove semaphore {prefix}beef-ne" in dry.stdout
            assert "live" not in dry.stdout and f"{prefix}dead" not in dry.stdout
            assert len(entries(dead)) >= 3, "--dry-run removed something"

            res = shmq_cli("gc", "--prefix", prefix, "--json")
            assert res.returncode == 0, res.stderr
            removed = json.loads(res.stdout)["removed"]
            assert sorted((g["kind"], g["name"]) for g in removed) == [
                ("ring", dead),
                ("semaphore", f"{prefix}beef-ne"),
            ]
            assert entries(dead) == [] and entries(f"{prefix}beef") == []
            assert os.path.exists(os.path.join(SHM, live.name))
            assert os.path.exists(not_ours)
            assert live.statistics().creator_alive

            res = shmq_cli("gc", "--prefix", f"{PREFIX}{os.getpid()}_")
            assert res.returncode == 0 and os.path.exists(os.path.join(SHM, "sem." + mine))
        finally:
            os.unlink(not_ours)
            posix_ipc.unlink_semaphore("/" + mine)
            live.close()
            live.unlink()
    finally:
        _reap(child)
        for e in entries(dead):
            os.unlink(os.path.join(SHM, e))


def test_gc_keeps_a_dead_creators_ring_while_a_participant_lives():
    child, name = _kill_leaving_zombie(unique_name("gcp"))
    _reap(child)
    try:
        attached = shmq.Ring.attach(name)
        try:
            res = shmq_cli("gc", "--prefix", name)
            assert res.returncode == 0 and "removed 0 segment(s)" in res.stdout
            assert os.path.exists(os.path.join(SHM, name))
        finally:
            attached.close()
        res = shmq_cli("gc", "--prefix", name)
        assert f"removed ring {name}" in res.stdout
        assert entries(name) == []
    finally:
        for e in entries(name):
            os.unlink(os.path.join(SHM, e))


# -- bench -------------------------------------------------------------------------


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.mark.skipif(not os.path.isdir(BENCHMARKS), reason="no benchmarks/ next to the tests")
def test_bench_runs_a_script_and_prints_the_table():
    res = shmq_cli("bench", "--quick", "--only", "latency", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "VS MP.QUEUE" in res.stdout
    row = next(line for line in res.stdout.splitlines() if "median" in line and "shmq Ring" in line)
    assert row.split()[-1].endswith("x")
    rows = [json.loads(line) for line in shmq_cli("bench", "--quick", "--only", "latency", "--json").stdout.splitlines()]
    assert rows[0]["meta"]["python"] and "shmq" in rows[0]["meta"]["versions"]
    assert {r["transport"] for r in rows[1:]} >= {"shmq Ring", "mp.Queue", "os.pipe"}


@pytest.mark.skipif(not os.path.isdir(BENCHMARKS), reason="no benchmarks/ next to the tests")
def test_bench_plot(tmp_path):
    png = tmp_path / "sizes.png"
    res = shmq_cli("bench", "--quick", "--only", "sizes", "--plot", str(png), timeout=300)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        one_error_line(res, "--plot needs matplotlib")
        return
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- bad segments (issue 16, item 4) -------------------------------------------------

import struct  # noqa: E402

from shmq import _layout as L  # noqa: E402
from shmq._segment import Segment  # noqa: E402


def _header(version=L.LAYOUT_VERSION, kind=L.KIND_RING, size=L.DATA_OFFSET, magic=L.MAGIC):
    return magic + struct.pack("<qqq", version, kind, size)


#: case -> (file contents, whether the file carries shmq's magic)
BAD_SEGMENTS = {
    "other-layout-version": (_header(version=L.LAYOUT_VERSION + 1).ljust(L.DATA_OFFSET, b"\0"), True),
    "empty": (b"", False),
    "magic-only-8-bytes": (L.MAGIC, True),
    "half-a-header": (_header().ljust(L.DATA_OFFSET // 2, b"\0"), True),
    "wrong-magic": (_header(magic=b"\x89SHMQ\r\n\x01").ljust(L.DATA_OFFSET, b"\0"), False),
    "wrong-kind": (_header(kind=99).ljust(L.DATA_OFFSET, b"\0"), True),
    "size-word-larger-than-file": (_header(size=2 * L.DATA_OFFSET).ljust(L.DATA_OFFSET, b"\0"), True),
}


@pytest.mark.parametrize("case", sorted(BAD_SEGMENTS))
def test_a_bad_segment_is_reported_in_one_line_and_every_command_goes_on(case):
    contents, has_magic = BAD_SEGMENTS[case]
    prefix = unique_name("bad")
    bad = prefix + "x"
    path = os.path.join(SHM, bad)
    with open(path, "wb") as f:
        f.write(contents)
    child, dead = _kill_leaving_zombie(prefix + "d")
    live = shmq.Ring.create(4096, name=prefix + "g")
    try:

        def reported(res):
            lines = [line for line in res.stderr.splitlines() if bad in line]
            if has_magic:
                assert len(lines) == 1 and lines[0].startswith(f"shmq: cannot read {bad}: "), res.stderr
            else:
                assert lines == [], res.stderr  # not an shmq segment: not ours to mention

        res = shmq_cli("ls", "--prefix", prefix)
        assert res.returncode == 0, res.stderr
        assert live.name in res.stdout and dead in res.stdout and bad not in res.stdout
        reported(res)
        res = shmq_cli("ls", "--prefix", prefix, "--json")
        assert {d["name"] for d in json.loads(res.stdout)} == {live.name, dead}
        reported(res)

        one_error_line(shmq_cli("stat", bad), f"shmq stat: '{bad}'")
        assert shmq_cli("stat", live.name).returncode == 0

        res = shmq_cli("top", "--prefix", prefix, "--iterations", "1", "--interval", "0.1")
        assert res.returncode == 0 and live.name in res.stdout, res.stderr
        assert (f"cannot read {bad}" in res.stdout) == has_magic

        res = shmq_cli("gc", "--prefix", prefix, "--dry-run")
        assert res.returncode == 0, res.stderr
        assert f"would remove ring {dead}" in res.stdout and bad not in res.stdout
        reported(res)
        res = shmq_cli("gc", "--prefix", prefix)
        assert res.returncode == 0, res.stderr
        assert f"removed ring {dead}" in res.stdout and bad not in res.stdout
        reported(res)
        assert entries(dead) == [] and os.path.exists(path), "gc must remove the dead ring and never the bad file"
        assert os.path.exists(os.path.join(SHM, live.name))

        for attach in (
            lambda: Segment.attach(bad, L.KIND_RING, wait=0.05),
            lambda: shmq.Ring.attach(bad),
            lambda: shmq.Queue.attach(bad),
        ):
            with pytest.raises(shmq.LayoutError):
                attach()
    finally:
        _reap(child)
        live.close()
        live.unlink()
        os.unlink(path)
        for e in entries(prefix):
            os.unlink(os.path.join(SHM, e))


def test_the_reported_other_version_segment_no_longer_crashes_ls():
    """The exact reproduction of the report: `shmq ls` beside a layout-2 segment."""
    name = unique_name("relver")
    path = os.path.join(SHM, name)
    with open(path, "wb") as f:
        f.write(b"\x89SHMQ\r\n\x00" + struct.pack("<qqq", 2, 1, 4096) + bytes(4064))
    try:
        for args in (["ls"], ["gc", "--dry-run"], ["top", "--iterations", "1", "--interval", "0.1"]):
            res = shmq_cli(*args, "--prefix", name)
            assert res.returncode == 0, res.stderr
        res = shmq_cli("ls", "--prefix", name)
        assert res.stderr.strip() == f"shmq: cannot read {name}: '{name}' has shmq layout version 2, expected 1"
        assert res.stdout.startswith("no shmq segments")
    finally:
        os.unlink(path)


# -- gc and a queue's parts (issue 16, item 5) ----------------------------------------

QUEUE_WITH_LARGE_ITEM = (
    "import shmq,sys; q=shmq.Queue(name=sys.argv[1], zero_copy=False); q.put(b'L' * int(sys.argv[2])); "
    "print('put', flush=True); sys.stdin.read()"
)


def test_gc_keeps_a_queue_and_its_in_flight_blob_while_an_attacher_lives():
    qname = unique_name("gcq")
    large = 4 << 20  # bigger than the main ring: the side path, a blob
    child = subprocess.Popen(
        [sys.executable, "-c", QUEUE_WITH_LARGE_ITEM, qname, str(large)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    parts = []
    try:
        assert child.stdout.readline().strip() == "put"
        attacher = shmq.Queue.attach(qname)
        try:
            parts = [i for i in ll.list_segments(PREFIX) if i.creator_pid == child.pid and i.name != qname]
            assert {p.kind for p in parts} == {"blob", "queue-side"}, parts
            os.kill(child.pid, signal.SIGKILL)
            _reap(child)

            # the session's whole namespace: parts named unlike their queue are judged too
            for args in (["--dry-run"], []):
                res = shmq_cli("gc", "--prefix", PREFIX, *args)
                assert res.returncode == 0, res.stderr
                assert qname not in res.stdout and not any(p.name in res.stdout for p in parts), res.stdout
            for p in parts:
                assert os.path.exists(os.path.join(SHM, p.name)), f"gc removed {p.kind} {p.name} of a live queue"
            assert attacher.get(timeout=30) == b"L" * large
            # ls --prefix QUEUE shows the parts with it
            assert {i.name for i in ll.list_segments(qname) if i.owner == qname} == {p.name for p in parts} - {
                p.name for p in parts if p.kind == "blob"
            }
        finally:
            attacher.close()
        res = shmq_cli("gc", "--prefix", qname, "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert isinstance(out["timestamp"], float) and abs(out["timestamp"] - time.time()) < 60
        removed = {g["name"] for g in out["removed"]}
        assert qname in removed
        left = [e for e in os.listdir(SHM) if qname in e or any(p.name in e for p in parts)]
        assert left == [], left
    finally:
        if child.poll() is None:
            child.kill()
            _reap(child)
        for e in os.listdir(SHM):
            if qname in e or any(p.name in e for p in parts):
                os.unlink(os.path.join(SHM, e))


MAKE_PARTS = """
import sys, time
import shmq
from shmq import _layout as L, _platform as P
from shmq._segment import Segment
q = sys.argv[1]
main = shmq.Ring.create(4096, name=q)
side = shmq.Ring.create(4096, name=P.part_name(q, "s"))
main.segment.words[L.W_QUEUE_KIND] = L.QUEUE_KIND_QUEUE
side.segment.words[L.W_QUEUE_KIND] = L.QUEUE_KIND_SIDE
blob = Segment.create(L.KIND_BLOB, L.DATA_OFFSET + 4096, name=P.part_name(q, "b1f"))
blob.publish()
sems = [P.semaphore(P.part_name(q, "p") + s, True) for s in ("-rl", "-rb")]
print("made", flush=True)
sys.stdin.read()
"""


def test_gc_judges_parts_named_after_their_queue_by_the_queue_and_takes_their_semaphores():
    from shmq import _platform as P

    q = unique_name("gcp")[:20]
    child = subprocess.Popen([sys.executable, "-c", MAKE_PARTS, q], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "made"
        attacher = shmq.Ring.attach(q)  # a live participant of the queue's main ring
        os.kill(child.pid, signal.SIGKILL)
        _reap(child)
        made = entries(q)
        assert {f"{q}.s", f"{q}.b1f", f"sem.{q}.p-rl", f"sem.{q}.p-rb"} <= set(made), made
        try:
            assert ll.collect_garbage(q) == []
            assert entries(q) == made
            ls = shmq_cli("ls", "--prefix", q).stdout.splitlines()
            assert [line.split()[0] for line in ls[1:]] == [q, f"{q}.s", f"{q}.b1f"]
            assert ls[2].startswith("  ") and not ls[1].startswith(" ")  # parts under their queue
            # top agrees with gc: the blob of a dead producer lives with its queue
            frame = json.loads(shmq_cli("top", "--prefix", q, "--json", "--iterations", "1", "--interval", "0.1").stdout)
            assert {s["name"]: s["dead"] for s in frame["segments"]} == {q: False, f"{q}.s": False, f"{q}.b1f": False}
        finally:
            attacher.close()
        dry = ll.collect_garbage(q, dry_run=True)
        assert sorted((g.kind, g.name) for g in dry) == [
            ("blob", f"{q}.b1f"),
            ("queue", q),
            ("queue-side", f"{q}.s"),
            ("semaphore", f"{q}.p-rb"),
            ("semaphore", f"{q}.p-rl"),
        ]
        assert entries(q) == made
        assert sorted(g.name for g in ll.collect_garbage(q)) == sorted(g.name for g in dry)
        assert entries(q) == []
    finally:
        if child.poll() is None:
            child.kill()
            _reap(child)
        for e in entries(q):
            os.unlink(os.path.join(SHM, e))


# -- the command line as a new user meets it (issue 16, items 11 and 12) ---------------


def test_version_and_help_without_markup():
    res = shmq_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"shmq {shmq.__version__}"
    res = shmq_cli("--help")
    assert res.returncode == 0 and "`" not in res.stdout, res.stdout
    for command in ("ls", "stat", "top", "gc", "bench", "demo"):
        assert "`" not in shmq_cli(command, "--help").stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-n", "-5"], "argument -n/--count: must be at least 1, got -5"),
        (["-n", "0"], "argument -n/--count: must be at least 1, got 0"),
        (["-s", "-1"], "argument -s/--size: must be between 0 and"),
        (["-s", str(1 << 30)], "argument -s/--size: must be between 0 and"),
    ],
)
def test_demo_refuses_bad_counts_and_sizes_as_usage_errors(args, fragment):
    res = shmq_cli("demo", *args)
    assert res.returncode == 2 and "usage:" in res.stderr and fragment in res.stderr, res.stderr
    assert res.stdout == ""


def test_demo_times_only_the_stream_and_says_what_it_measured():
    res = shmq_cli("demo", "-n", "20000", timeout=120)
    assert res.returncode == 0, res.stderr
    first, measured = res.stdout.strip().splitlines()
    assert "moved 20,000 messages of 64 bytes" in first
    seconds = float(first.split(" in ")[1].split(" s:")[0])
    # Starting a process that imports shmq (what the spawned consumer does
    # before it is ready) takes longer than moving 20,000 small messages.
    startup = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import shmq"], check=True, timeout=60)
        startup.append(time.perf_counter() - t0)
    assert seconds < min(startup), (first, startup)
    for fact in ("1 consumer process", "start method spawn", "start-up not included", "Ring.write"):
        assert fact in measured, measured


def test_demo_with_messages_larger_than_the_default_ring_works():
    res = shmq_cli("demo", "-n", "20", "-s", "2000000", timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert "moved 20 messages of 2000000 bytes" in res.stdout


def test_stat_fill_bars_match_their_lines_and_json_has_a_wall_clock_time():
    with shmq.Ring.create(1024, max_messages=4, name=unique_name("fill")) as ring:
        try:
            for _ in range(2):
                ring.write(b"x" * 8)  # 2 of 4 records, 32 of 1024 bytes
            res = shmq_cli("stat", ring.name)
            assert res.returncode == 0, res.stderr
            lines = {line.split()[0]: line for line in res.stdout.splitlines()}
            assert "[###.......]  50%" in lines["messages"] or "[#####.....]  50%" in lines["messages"], lines
            assert "[..........]   3%" in lines["bytes"], lines["bytes"]
            before = time.time()
            data = json.loads(shmq_cli("stat", ring.name, "--json").stdout)
            assert before - 1 <= data["timestamp"] <= time.time() + 1
            data = json.loads(shmq_cli("ls", "--prefix", ring.name, "--json").stdout)
            assert abs(data[0]["timestamp"] - time.time()) < 30
        finally:
            ring.unlink()


def test_stat_of_a_queue_shows_its_parts():
    q = shmq.Queue(name=unique_name("stq"), zero_copy=False)
    try:
        q.put(b"L" * (4 << 20))  # a blob through the side ring
        res = shmq_cli("stat", q.name)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        k = next(k for k, line in enumerate(lines) if line.startswith("parts"))
        assert lines[k].split()[1] == "queue-side" and lines[k + 1].split()[0] == "blob", res.stdout
        assert lines[k].index("queue-side") == lines[k + 1].index("blob") == lines[0].index(q.name)
        data = json.loads(shmq_cli("stat", q.name, "--json").stdout)
        assert {p["kind"] for p in data["parts"]} == {"queue-side", "blob"}
        assert q.get(timeout=30) == b"L" * (4 << 20)
    finally:
        q.close()


def test_top_json_has_rates_in_the_first_frame_and_marks_dead_segments():
    child, dead = _kill_leaving_zombie(unique_name("topd"))
    prefix = dead[:-1]
    try:
        with shmq.Ring.create(1 << 16, name=prefix + "L", multi_consumer=False) as ring:
            try:
                ring.write(b"x" * 100)
                res = shmq_cli("top", "--prefix", prefix, "--json", "--iterations", "2", "--interval", "0.2")
                assert res.returncode == 0, res.stderr
                frames = [json.loads(line) for line in res.stdout.splitlines()]
                assert len(frames) == 2
                for frame in frames:
                    assert abs(frame["timestamp"] - time.time()) < 60 and frame["interval"] == 0.2
                    by_name = {s["name"]: s for s in frame["segments"]}
                    assert by_name[ring.name]["rates"]["verdict"] in VERDICTS  # the first frame too
                    assert not by_name[ring.name]["dead"]
                    assert by_name[dead]["dead"] and by_name[dead]["rates"] is None
                text = shmq_cli("top", "--prefix", prefix, "--iterations", "1", "--interval", "0.1").stdout
                dead_row = next(line for line in text.splitlines() if line.startswith(dead))
                assert "DEAD" in dead_row
                live_row = next(line for line in text.splitlines() if line.startswith(ring.name))
                assert live_row.split()[2] != "-"  # IN/s in the first frame
            finally:
                ring.unlink()
    finally:
        _reap(child)
        for e in entries(dead):
            os.unlink(os.path.join(SHM, e))


def test_top_cuts_no_column_when_not_a_terminal_and_fits_names_into_a_terminal():
    from shmq import _cli

    entry = {
        "name": "shmq_" + "n" * 19,
        "kind": "joinable-queue",
        "owner": None,
        "dead": False,
        "procs_alive": 10,
        "procs": 12,
        "fill_ratio": 0.5,
        "rates": ll.Rates("x", 1.0, 1234567.0, 1234567.0, 1e9, 1e9, 0.5, 0.5, 0.5, "consumer-bound"),
    }
    wide = _cli._top_text([entry], "", 1.0)
    row = wide.splitlines()[-1]
    assert len(row) > 80 and row.endswith("10/12") and entry["name"] in row
    narrow = _cli._top_text([entry], "", 1.0, width=100)
    row = narrow.splitlines()[-1]
    assert len(row) <= 100 and row.endswith("10/12") and "consumer-bound" in row


def test_bench_outside_a_source_checkout_says_what_to_do(tmp_path):
    import shutil as sh

    pkg = os.path.dirname(shmq.__file__)
    sh.copytree(pkg, tmp_path / "shmq", ignore=sh.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = shmq_cli("bench", "--quick", cwd=tmp_path, env=env)
    line = one_error_line(res, "not installed with the shmq package", "--dir")
    assert line.startswith("shmq bench: ")


def test_bench_shows_progress_and_peers_that_are_not_installed(tmp_path):
    """A stand-in suite: one script that reports one row, measured against a
    peer that is not installed here."""
    (tmp_path / "_harness.py").write_text("")
    (tmp_path / "bench_fake.py").write_text(
        "import json, sys\n"
        "print('  warm-up round done', file=sys.stderr, flush=True)\n"
        "print(json.dumps({'bench': 'fake', 'meta': {'python': '3'}}))\n"
        "print(json.dumps({'bench': 'fake', 'workload': '64 B', 'transport': 'shmq Ring', 'unit': 'msg/s',"
        " 'median': 1000.0, 'min': 900.0, 'max': 1100.0}))\n"
        "if False: import_module('faster_fifo', 'zmq', 'iceoryx2')  # names the peers: \"faster_fifo\" \"zmq\" \"iceoryx2\"\n"
    )
    res = shmq_cli("bench", "--dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "[1/1] running bench_fake.py" in res.stderr
    assert "[bench_fake.py]   warm-up round done" in res.stderr
    assert "[bench_fake.py] 64 B / shmq Ring: 1.00k msg/s" in res.stderr
    import importlib.util

    missing = [pip for mod, pip in (("faster_fifo", "faster-fifo"), ("zmq", "pyzmq"), ("iceoryx2", "iceoryx2"))
               if importlib.util.find_spec(mod) is None]
    for pip in missing:
        row = next(line for line in res.stdout.splitlines() if f" {pip} " in line + " ")
        assert "not installed" in row, res.stdout


def test_a_pure_producer_is_labelled_producer():
    q = shmq.Queue(name=unique_name("role"))
    code = (
        "import shmq, sys, numpy as np; q = shmq.Queue.attach(sys.argv[1]); "
        "q.put(1); q.put(np.zeros(100_000)); q.put(b'x' * (4 << 20)); print('put', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen([sys.executable, "-c", code, q.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "put"
        data = json.loads(shmq_cli("stat", q.name, "--json").stdout)
        roles = {p["pid"]: p["role"] for p in data["participants"]}
        assert roles[child.pid] == "producer", roles
        for _ in range(3):
            q.get(timeout=30)
        data = json.loads(shmq_cli("stat", q.name, "--json").stdout)
        assert {p["pid"]: p["role"] for p in data["participants"]}[os.getpid()] == "creator+consumer"
    finally:
        child.stdin.close()
        child.wait(30)
        child.stdout.close()
        q.close()


# -- topics and Latest -------------------------------------------------------

SUBSCRIBE_AND_COUNT = (
    "import shmq, sys; t = shmq.Topic.attach(sys.argv[1]); s = t.subscribe(); print('ready', flush=True)\n"
    "n = 0\n"
    "for msg in s:\n"
    "    n += 1\n"
    "    if n == int(sys.argv[2]): print('got', flush=True)\n"
    "print('total', n, flush=True)\n"
)


def _topic_with_two_subscribers(first):
    """A topic of this process and two subscriber processes attached by
    name that have each received ``first`` messages (and go on receiving
    until the stream ends, then print their total)."""
    topic = shmq.Topic(1 << 16, name=unique_name("tpc"))
    children = [
        subprocess.Popen([sys.executable, "-c", SUBSCRIBE_AND_COUNT, topic.name, str(first)],
                         stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        for _ in range(2)
    ]
    for c in children:
        assert c.stdout.readline().strip() == "ready"
    for i in range(first):
        topic.publish((i, "tick"), timeout=30)
    for c in children:
        assert c.stdout.readline().strip() == "got"
    return topic, children


def _end_topic(topic, children):
    """Close the topic (the stream ends), and the subscribers' totals."""
    topic.close()
    totals = []
    try:
        for c in children:
            line = c.stdout.readline().split()
            totals.append(int(line[1]) if line[:1] == ["total"] else line)
    finally:
        for c in children:
            if c.poll() is None and c.wait(30) is None:
                c.kill()
            c.stdout.close()
        topic.unlink()
    return totals


def test_stat_reads_a_live_topic_and_its_subscribers():
    topic, children = _topic_with_two_subscribers(50)
    try:
        res = shmq_cli("stat", topic.name, "--json")
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        mine = topic.statistics()
        assert data["type"] == "TopicStatistics"
        for field in ("name", "overflow", "capacity_bytes", "published", "held_messages", "held_bytes",
                      "publishers", "ended", "bytes_published", "creator_pid"):
            assert data[field] == getattr(mine, field), field
        assert data["published"] == 50 and data["publishers"] == 1 and data["ended"] is False
        subs = {s["pid"]: s for s in data["subscribers"]}
        assert set(subs) == {c.pid for c in children}
        for s in subs.values():
            assert (s["received"], s["lag_messages"], s["lag_bytes"], s["lost"]) == (50, 0, 0, 0)
        assert data["fill_ratio"] == 0.0
        roles = {p["pid"]: p["role"] for p in data["participants"]}
        assert all(roles[c.pid] == "consumer" for c in children), roles
        # the same snapshot from the library, by name, read-only
        by_name = ll.read_statistics(topic.name)
        assert isinstance(by_name, shmq.TopicStatistics)
        assert by_name.subscribers == mine.subscribers

        text = shmq_cli("stat", topic.name).stdout
        assert f"topic         {topic.name}: 64.0 KiB ring, overflow block" in text, text
        assert "published     50 messages" in text and "1 publisher handle open" in text, text
        for c in children:
            assert f"pid {c.pid}: lag 0 messages (0 B), received 50, lost 0" in text, text
    finally:
        assert _end_topic(topic, children) == [50, 50]


def test_top_shows_a_topic_s_publish_rate():
    topic, children = _topic_with_two_subscribers(1)
    stop = threading.Event()
    sent = [1]

    def publish():
        while not stop.is_set():
            topic.publish(("tick", sent[0]), timeout=30)
            sent[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=publish)
    t.start()
    try:
        res = shmq_cli("top", "--prefix", topic.name, "--json", "--iterations", "1", "--interval", "0.3")
        assert res.returncode == 0, res.stderr
        frame = json.loads(res.stdout)
        (seg,) = frame["segments"]
        assert (seg["name"], seg["kind"], seg["dead"]) == (topic.name, "topic", False)
        r = seg["rates"]
        assert r["messages_in_per_second"] > 0 and r["messages_out_per_second"] > 0, r
        assert r["bytes_in_per_second"] > 0 and r["verdict"] in VERDICTS
        text = shmq_cli("top", "--prefix", topic.name, "--iterations", "1", "--interval", "0.3").stdout
        row = next(line for line in text.splitlines() if line.startswith(topic.name))
        assert row.split()[1] == "topic" and row.split()[2] != "-", text
    finally:
        stop.set()
        t.join(30)
        assert _end_topic(topic, children) == [sent[0], sent[0]]


def test_stat_and_ls_read_a_latest():
    latest = shmq.Latest(4096, name=unique_name("lat"))
    try:
        latest.set({"gain": 2})
        latest.set({"gain": 3})
        data = json.loads(shmq_cli("stat", latest.name, "--json").stdout)
        assert data["type"] == "LatestStatistics"
        assert (data["version"], data["capacity_bytes"], data["waiters"]) == (2, 4096, 0)
        assert data["value_bytes"] == latest.statistics().value_bytes > 0
        assert "version       2, newest value" in shmq_cli("stat", latest.name).stdout
        listing = json.loads(shmq_cli("ls", "--prefix", latest.name, "--json").stdout)
        assert [(x["name"], x["kind"]) for x in listing] == [(latest.name, "latest")]
        frame = json.loads(shmq_cli("top", "--prefix", latest.name, "--json", "--iterations", "1",
                                    "--interval", "0.1").stdout)
        assert frame["segments"][0]["kind"] == "latest"
    finally:
        latest.close()
        latest.unlink()


# -- pipelines ---------------------------------------------------------------------------------
def _pipeline_slow(x):
    time.sleep(0.002)
    return x


def _pipeline_inc(x):
    return x + 1


def test_ls_stat_top_show_a_running_pipeline_s_stages():
    """A running shmq.Pipeline shows in ls as a pipeline with a row per
    stage, in stat with every stage's counters (and rates with --interval),
    and in top with a row per stage: items in/out per second, fill, busy."""
    import itertools

    pipe = (
        shmq.Pipeline(itertools.count(), start_method="fork")
        .map(_pipeline_inc)
        .map(_pipeline_slow, workers=2, max_in_flight=64)
    )
    stop = threading.Event()

    def consume():
        for _ in pipe:
            if stop.is_set():
                break

    with pipe:
        t = threading.Thread(target=consume, daemon=True)
        t.start()
        try:
            deadline = time.monotonic() + 10
            while pipe.name is None and time.monotonic() < deadline:
                time.sleep(0.01)
            name = pipe.name
            assert name and name.startswith(PREFIX)
            out = shmq_cli("ls", "--prefix", name).stdout
            lines = out.splitlines()
            assert lines[1].split()[:2] == [name, "pipeline"], out
            assert lines[2].split()[:2] == ["0:_pipeline_inc", "stage"], out
            assert lines[3].split()[0] == "1:_pipeline_slow" and lines[3].split()[-1] == "2/2", out
            listing = json.loads(shmq_cli("ls", "--prefix", name, "--json").stdout)
            assert listing[0]["kind"] == "pipeline"
            assert [x["name"] for x in listing[0]["pipeline"]["statistics"]["stages"]] == ["0:_pipeline_inc", "1:_pipeline_slow"]

            text = shmq_cli("stat", name).stdout
            assert "bottleneck" in text and "1:_pipeline_slow (map, 2/2 workers):" in text, text
            data = json.loads(shmq_cli("stat", name, "--json", "--interval", "0.6").stdout)
            assert data["type"] == "PipelineBoard" and data["kind"] == shmq.Pipeline.BOARD_KIND
            slow = data["statistics"]["stages"][1]
            assert slow["max_in_flight"] == 64 and slow["workers_alive"] == 2 and slow["items_in"] > 0
            assert data["stage_rates"][1]["items_in_per_second"] > 0
            assert data["stage_rates"][1]["busy_fraction"] > 0.3  # two workers sleeping in fn

            frame = json.loads(
                shmq_cli("top", "--prefix", name, "--json", "--iterations", "1", "--interval", "0.6").stdout
            )
            kinds = [(e["name"], e["kind"]) for e in frame["segments"]]
            assert kinds == [(name, "pipeline"), ("0:_pipeline_inc", "stage"), ("1:_pipeline_slow", "stage")]
            stage = frame["segments"][2]["stage"]
            assert stage["items_out_per_second"] > 0 and stage["bottleneck"] is True
            text = shmq_cli("top", "--prefix", name, "--iterations", "1", "--interval", "0.6").stdout
            row = [line for line in text.splitlines() if line.strip().startswith("1:_pipeline_slow")][0]
            assert "(bottleneck)" in row and "busy" in row, text
        finally:
            stop.set()
            t.join(10)
    assert not [e for e in os.listdir(SHM) if name in e]  # the board went with the pipeline


def test_ls_stat_top_read_no_latest_through_its_slot_pool(capsys):
    """shmq ls/stat/top tell a pipeline's board from an ordinary Latest
    without reading a slot value (a read takes a pool member entry, a
    reader entry and holds): 150 rounds of each leave the pool's hold words
    and member table as they were."""
    import numpy as np

    from shmq import _cli
    from shmq._platform import part_name

    latest = shmq.Latest(64 << 10, slot_size=1 << 20, slot_count=4, name=unique_name("lt"))
    try:
        latest.set(np.full((256, 1024), 7, np.uint8))  # a slot value, the newest throughout
        pool = ll.SlotPool.attach(part_name(latest.name, "p"))

        def pool_state():
            return pool.in_transit()[1], pool.statistics().members, latest.statistics().readers

        before = pool_state()
        for _ in range(150):
            assert _cli.main(["ls", "--prefix", latest.name]) == 0
            assert _cli.main(["ls", "--json", "--prefix", latest.name]) == 0
            assert _cli.main(["stat", latest.name]) == 0
        out = capsys.readouterr().out
        assert "pipeline" not in out and latest.name in out
        res = shmq_cli("top", "--json", "--prefix", latest.name, "--iterations", "150", "--interval", "0.01",
                       env=dict(os.environ))
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.splitlines()) == 150
        assert pool_state() == before  # no hold taken, no entry, no reader
        pool.close()
        # an ordinary Latest without a slot pool holding the same dict as a board is still one
        board = shmq.Latest(name=unique_name("bd"))
        try:
            value = {"kind": shmq.Pipeline.BOARD_KIND, "pid": 1}
            board.set(value)
            assert _cli._pipeline_board(board.name) == value
            assert _cli._pipeline_board(latest.name) is None
        finally:
            board.close()
            board.unlink()
    finally:
        latest.close()
        latest.unlink()

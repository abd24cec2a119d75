"""The compiled core (shmq._core) and the pure-Python core are one protocol.

- a process on one core and a process on the other share a ring, both ways,
  through wrap-around pads, with several producers at once;
- the Hypothesis state machine of test_ring_stateful, with rules for the C
  try_write/try_read and the Python ones interleaved on one ring;
- SIGKILL at every step of the C record moves (SHMQ_CORE_STOP_AT=N stops
  the process there with SIGSTOP), then the survivors' accounting;
- SHMQ_PURE=1 selects the pure-Python core, and shmq.lowlevel.CORE says which.

Everything but the CORE test is skipped when the extension is not built.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import types

import psutil
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

import shmq
import shmq.lowlevel
from shmq._ring import RingBuffer

from _core_helpers import wait_for
from test_ring_stateful import RingMachine, _identity_dumps, sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_C = shmq.lowlevel.CORE == "c"
needs_c = pytest.mark.skipif(not HAVE_C, reason="shmq._core is not built (or SHMQ_PURE is set)")
CHILD_TIMEOUT = 60


def _env(pure: bool, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("SHMQ_PURE", None)
    if pure:
        env["SHMQ_PURE"] = "1"
    return env


def _run(code: str, pure: bool, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=_env(pure, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _finish(p: subprocess.Popen) -> str:
    try:
        out, err = p.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("child hung")
    assert p.returncode == 0, err.decode()
    return out.decode()


def test_core_flag_follows_shmq_pure():
    code = "import shmq.lowlevel as l, shmq._ring as r; print(l.CORE, type(r.RingBuffer.try_read).__name__)"
    assert _finish(_run(code, True)).split() == ["python", "function"]
    try:
        import shmq._core  # noqa: F401
    except ImportError:
        expected = ["python", "function"]
    else:
        expected = ["c", "method_descriptor"]
    assert _finish(_run(code, False)).split() == expected


# A producer: writes records (producer id, i, filler up to a varying size)
# through try_write, retrying while full; prints which core it ran.
PRODUCER = r"""
import sys, time, shmq, shmq.lowlevel
name, pid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ring = shmq.lowlevel.RingBuffer.attach(name)
deadline = time.monotonic() + 50
for i in range(count):
    rec = b"%d,%d," % (pid, i)
    rec += b"x" * ((i * 37) % 90)
    while not ring.try_write(rec):
        assert time.monotonic() < deadline, "reader stalled"
ring.close()
print(shmq.lowlevel.CORE)
"""

# A consumer: reads ``count`` records through try_read, prints them.
CONSUMER = r"""
import sys, time, shmq, shmq.lowlevel
name, count = sys.argv[1], int(sys.argv[2])
ring = shmq.lowlevel.RingBuffer.attach(name)
deadline = time.monotonic() + 50
out = []
while len(out) < count:
    rec = ring.try_read()
    if rec is None:
        assert time.monotonic() < deadline, "writer stalled"
        continue
    out.append(rec.split(b",")[0] + b"," + rec.split(b",")[1])
ring.close()
print(shmq.lowlevel.CORE)
print(b" ".join(out).decode())
"""


def _check_record(rec: bytes) -> tuple:
    pid, i, fill = rec.split(b",")
    assert fill == b"x" * ((int(i) * 37) % 90), rec
    return int(pid), int(i)


@needs_c
@pytest.mark.parametrize("multi", [False, True], ids=["spsc", "mpmc"])
def test_python_writer_c_reader(multi):
    """A pure-Python process writes, this (C core) process reads; a small
    ring, so records wrap around the end of the data area (pads)."""
    ring = RingBuffer.create(512, multi_producer=multi, multi_consumer=multi)
    try:
        count = 3000
        p = _run(PRODUCER, True, ring.name, "1", str(count))
        got = []
        deadline = time.monotonic() + CHILD_TIMEOUT
        while len(got) < count:
            rec = ring.try_read()
            if rec is None:
                assert time.monotonic() < deadline and p.poll() in (None, 0), "writer stalled"
                continue
            got.append(_check_record(rec))
        assert _finish(p).strip() == "python"
        assert got == [(1, i) for i in range(count)]
        assert ring.try_read() is None and ring.qsize() == 0
    finally:
        ring.close()
        ring.unlink()


@needs_c
@pytest.mark.parametrize("multi", [False, True], ids=["spsc", "mpmc"])
def test_c_writer_python_reader(multi):
    ring = RingBuffer.create(512, multi_producer=multi, multi_consumer=multi)
    try:
        count = 3000
        p = _run(CONSUMER, True, ring.name, str(count))
        deadline = time.monotonic() + CHILD_TIMEOUT
        for i in range(count):
            rec = b"%d,%d," % (2, i) + b"x" * ((i * 37) % 90)
            while not ring.try_write(rec):
                assert time.monotonic() < deadline and p.poll() in (None, 0), "reader stalled"
        core, records = _finish(p).splitlines()
        assert core == "python"
        assert records.split() == ["2,%d" % i for i in range(count)]
        assert ring.qsize() == 0
    finally:
        ring.close()
        ring.unlink()


@needs_c
def test_producers_on_both_cores_share_a_ring():
    """Two C-core and two pure-Python producers write at once through the
    producer lock; this process (C) and a pure-Python consumer read at once
    through the consumer lock: every record arrives once, in order per
    producer."""
    ring = RingBuffer.create(1024)
    try:
        count = 2000
        producers = [_run(PRODUCER, pid % 2 == 0, ring.name, str(pid), str(count)) for pid in range(1, 5)]
        theirs = count  # the pure-Python consumer takes this many
        consumer = _run(CONSUMER, True, ring.name, str(theirs))
        mine = []
        deadline = time.monotonic() + CHILD_TIMEOUT
        while len(mine) < 4 * count - theirs:
            rec = ring.try_read()
            if rec is None:
                assert time.monotonic() < deadline, "producers stalled"
                continue
            mine.append(_check_record(rec))
        cores = sorted(_finish(p).strip() for p in producers)
        assert cores == ["c", "c", "python", "python"]
        core, records = _finish(consumer).splitlines()
        assert core == "python"
        theirs_got = [tuple(int(x) for x in r.split(",")) for r in records.split()]
        both = mine + theirs_got
        assert sorted(both) == [(pid, i) for pid in range(1, 5) for i in range(count)]
        for got in (mine, theirs_got):  # each reader sees each producer's records in order
            for pid in range(1, 5):
                seq = [i for p, i in got if p == pid]
                assert seq == sorted(seq)
        assert ring.try_read() is None and ring.qsize() == 0
    finally:
        ring.close()
        ring.unlink()


# A Queue user on either core: puts ``count`` tuples, or gets them.
QUEUE_USER = r"""
import pickle, sys, shmq, shmq.lowlevel
q = pickle.loads(bytes.fromhex(sys.argv[1]))
side, count = sys.argv[2], int(sys.argv[3])
if side == "put":
    for i in range(count):
        q.put((i, "x" * (i % 300), float(i)), timeout=30)
else:
    got = [q.get(timeout=30) for _ in range(count)]
    assert got == [(i, "x" * (i % 300), float(i)) for i in range(count)], got[:5]
q.close()
print(shmq.lowlevel.CORE)
"""


@needs_c
@pytest.mark.parametrize("putter_pure", [True, False], ids=["python-puts", "c-puts"])
def test_queue_across_cores(putter_pure):
    """A Queue (small ring: wrap-around pads) put on one core, got on the
    other, with this process between them holding the queue."""
    q = shmq.Queue(capacity_bytes=4096)
    try:
        name = pickle.dumps(q).hex()
        count = 3000
        putter = _run(QUEUE_USER, putter_pure, name, "put", str(count))
        getter = _run(QUEUE_USER, not putter_pure, name, "get", str(count))
        assert _finish(getter).strip() == ("c" if putter_pure else "python")
        assert _finish(putter).strip() == ("python" if putter_pure else "c")
        assert q.empty()
    finally:
        q.close()


class BothCoresMachine(RingMachine):
    """test_ring_stateful's machine with the Python try_write/try_read and
    put/get closures as extra rules: its write/read/put/get rules drive the C
    ones (the class's), these the specification, interleaved on one ring
    against one model."""

    @precondition(RingMachine.writable)
    @rule(n=sizes, h=st.integers(0, 1))
    def write_python(self, n, h):
        data = self.payload(n)
        ring = self.rings[h]
        if n > self.model.cap - 8:
            with pytest.raises(shmq.MessageTooLarge):
                RingBuffer._py_try_write(ring, data)
            return
        expected = self.model.write(data)
        assert RingBuffer._py_try_write(ring, data) == (expected in ("fits", "pad-then-fits")), expected

    @precondition(RingMachine.readable)
    @rule(h=st.integers(0, 1))
    def read_python(self, h):
        assert RingBuffer._py_try_read(self.rings[h]) == self.model.pop()

    @precondition(RingMachine.readable)
    @rule(h=st.integers(0, 1), max_items=st.integers(1, 5), max_bytes=st.sampled_from([1 << 62, 1, 20, 100]))
    def read_many_python(self, h, max_items, max_bytes):
        ring = self.rings[h]
        ring._read_many = types.MethodType(RingBuffer._py_read_many, ring)  # (try_read_many takes the lock)
        try:
            assert ring.try_read_many(max_items, max_bytes) == self.model.read_many(max_items, max_bytes)
        finally:
            del ring._read_many

    @precondition(RingMachine.writable)
    @rule(ns=st.lists(sizes, max_size=6), h=st.integers(0, 1))
    def write_many_python(self, ns, h):
        ring = self.rings[h]
        items = [self.payload(n) for n in ns]
        expected = self.model.write_many(items)
        ring._write_many = types.MethodType(RingBuffer._py_write_many, ring)  # (try_write_many takes the lock)
        try:
            if expected == "too-large":
                with pytest.raises(shmq.MessageTooLarge):
                    ring.try_write_many(items)
            else:
                assert ring.try_write_many(items) == expected
        finally:
            del ring._write_many

    def _py_closures(self, h):
        ring = self.rings[h]
        put = RingBuffer._py_encoding_writer(
            ring, _identity_dumps, 5, None, None, ring.max_payload,
            lambda owner, obj, data, block, timeout: "long",
            lambda owner, data, block, timeout: "full",
        )  # fmt: skip
        get = RingBuffer._py_decoding_reader(ring, bytes, None, lambda owner, data, block, timeout: data)
        return put, get

    @precondition(RingMachine.writable)
    @rule(n=sizes, h=st.integers(0, 1))
    def put_python(self, n, h):
        data = self.payload(n)
        put = self._py_closures(h)[0]
        if n > self.model.cap - 8:
            assert put(None, data) == "long"
            return
        expected = self.model.write(data)
        assert put(None, data) == (None if expected in ("fits", "pad-then-fits") else "full"), expected

    @precondition(RingMachine.readable)
    @rule(h=st.integers(0, 1))
    def get_python(self, h):
        assert self._py_closures(h)[1](None) == self.model.pop()


TestBothCoresMachine = needs_c(BothCoresMachine.TestCase)
TestBothCoresMachine.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# A process that runs the C moves with SHMQ_CORE_STOP_AT set: it writes
# records 0, 1, ... (or reads them), printing each one acknowledged, until
# the move stops it (SIGSTOP) at the step; the parent then SIGKILLs it.
MOVER = r"""
import sys, shmq.lowlevel
name, side = sys.argv[1], sys.argv[2]
assert shmq.lowlevel.CORE == "c"
ring = shmq.lowlevel.RingBuffer.attach(name)
for i in range(1000):
    if side == "w":
        assert ring.try_write(b"%d," % i + b"y" * 150), "full"
    elif side == "W":
        assert ring.try_write_many([b"%d," % i + b"y" * 150]) == 1, "full"
    elif side == "m":
        recs = ring.try_read_many(1)
        assert recs, "empty"
        i = int(recs[0].split(b",")[0])
    else:
        rec = ring.try_read()
        assert rec is not None, "empty"
        i = int(rec.split(b",")[0])
    print(i, flush=True)
"""
# Steps of RingCore_try_write (1-6), try_read (11-15), _read_many (21-22)
# and _write_many (31-33), see shmq/_core.c.
WRITE_STEPS = range(1, 7)
READ_STEPS = range(11, 16)
READ_MANY_STEPS = range(21, 23)  # _read_many (try_read_many of one record)
WRITE_MANY_STEPS = range(31, 34)  # _write_many (try_write_many of one record)


def _stopped(p: subprocess.Popen) -> bool:
    try:
        return psutil.Process(p.pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


@needs_c
@pytest.mark.parametrize("multi", [False, True], ids=["spsc", "mpmc"])
@pytest.mark.parametrize("step", [*WRITE_STEPS, *READ_STEPS, *READ_MANY_STEPS, *WRITE_MANY_STEPS])
def test_sigkill_at_every_step_of_the_c_moves(step, multi):
    """Killed at step ``step`` of a C record move (the first move that
    reaches it; the second write and the second read pass a pad): the survivors
    take over the lock within the recovery bound, and every acknowledged
    record is delivered once, in order; a record in flight at most once."""
    writing = step in WRITE_STEPS or step in WRITE_MANY_STEPS
    ring = shmq.Ring.create(512, multi_producer=multi, multi_consumer=multi)
    try:
        if not writing:  # records for the killed reader: the 3rd skips a pad
            for i in range(5):
                ring.write(b"%d," % i + b"y" * 150, timeout=5)
                if i < 2:
                    assert ring.read(timeout=5).startswith(b"%d," % i)
            preloaded = [2, 3, 4]
        else:
            ring.write(b"p" * 200)
            assert ring.read(timeout=5) == b"p" * 200  # so the second write pads
        side = "W" if step in WRITE_MANY_STEPS else "w" if writing else "m" if step in READ_MANY_STEPS else "r"
        p = _run(MOVER, False, ring.name, side, SHMQ_CORE_STOP_AT=str(step))
        try:
            wait_for(lambda: _stopped(p) or p.poll() is not None, timeout=CHILD_TIMEOUT, what="the step")
        finally:
            p.kill()
            out, err = p.communicate(timeout=CHILD_TIMEOUT)
        assert p.returncode == -signal.SIGKILL, err.decode()
        acked = [int(x) for x in out.split()]
        t0 = time.monotonic()
        rest = []
        while True:
            rec = ring.try_read()  # takes over a dead holder's consumer lock
            if rec is not None:
                rest.append(int(rec.split(b",")[0]))
            elif ring.empty():
                break
            assert time.monotonic() - t0 < 5, "cannot drain the ring"
        if writing:
            assert rest[: len(acked)] == acked and len(rest) <= len(acked) + 1, (acked, rest)
        else:
            taken = preloaded[: len(acked)]
            assert acked == taken
            # the record being read when killed: delivered to the child or left, not both
            assert rest in (preloaded[len(acked):], preloaded[len(acked) + 1:]), (acked, rest)
        # survivors continue (the producer lock taken over, with wrap-around)
        for i in range(10):
            assert ring.try_write(b"z%d" % i + b"q" * 100)
            assert ring.read(timeout=5) == b"z%d" % i + b"q" * 100
        assert time.monotonic() - t0 < 5
        assert ring.empty()
        c = ring.statistics()
        assert c.bytes_in == c.bytes_out
        assert abs(c.messages_in - c.messages_out) <= 1
        if multi:  # taking over a dead holder's lock repairs the counters
            assert c.messages_in == c.messages_out
    finally:
        ring.close()
        ring.unlink()

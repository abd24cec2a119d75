"""shmq._copy.copy_into: large copies split across helper threads.

Real threads, real shared memory: the destination is a Queue slot or a
SharedMemory-sized bytearray; nothing is mocked."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shmq
from shmq import _copy
from shmq._copy import PARALLEL_MIN_BYTES, copy_into

MIN = PARALLEL_MIN_BYTES
MULTI_CPU = len(os.sched_getaffinity(0)) > 1


def _random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("n", [0, 1, 4095, MIN - 1, MIN, MIN + 4097, 3 * MIN + 123])
def test_copies_every_byte_and_nothing_past_the_end(n):
    src = _random(n, n)
    dst = bytearray(b"\xee" * (n + 64))
    copy_into(memoryview(dst), memoryview(src))
    assert dst[:n] == src
    assert dst[n:] == b"\xee" * 64


def test_sources_of_any_format_copy_as_bytes():
    arr = np.arange(MIN // 4 + 3, dtype=np.float32).reshape(-1, 1)
    dst = bytearray(arr.nbytes)
    copy_into(memoryview(dst), memoryview(arr))
    assert bytes(dst) == arr.tobytes()


@pytest.mark.skipif(not MULTI_CPU, reason="helpers start only with a second CPU")
def test_a_large_copy_starts_named_daemon_helpers():
    copy_into(memoryview(bytearray(MIN)), memoryview(bytes(MIN)))
    helpers = [t for t in threading.enumerate() if t.name == "shmq-copy"]
    assert helpers and all(t.daemon for t in helpers)
    assert len(helpers) <= _copy.MAX_HELPERS


def test_copy_threads_1_keeps_copies_in_the_calling_thread():
    code = (
        "import threading; from shmq._copy import copy_into, PARALLEL_MIN_BYTES as M\n"
        "copy_into(memoryview(bytearray(2 * M)), memoryview(bytes(2 * M)))\n"
        "print(sum(t.name == 'shmq-copy' for t in threading.enumerate()))\n"
    )
    env = dict(os.environ, SHMQ_COPY_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_concurrent_copies_from_many_threads_are_each_exact():
    sources = [_random(MIN + 1000 * k, k) for k in range(4)]
    results: list = [None] * 4

    def work(k: int) -> None:
        dst = bytearray(len(sources[k]))
        for _ in range(3):
            copy_into(memoryview(dst), memoryview(sources[k]))
        results[k] = bytes(dst) == sources[k]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 4


def test_a_short_or_read_only_destination_raises_and_the_helpers_stay_usable():
    src = memoryview(_random(2 * MIN))
    with pytest.raises(ValueError):
        copy_into(memoryview(bytearray(MIN)), src)
    with pytest.raises(ValueError):
        copy_into(memoryview(bytes(2 * MIN)), src)  # read-only: the helper's part fails too
    dst = bytearray(2 * MIN)
    copy_into(memoryview(dst), src)
    assert dst == src


def _copy_in_child(conn) -> None:
    src = _random(2 * MIN, 7)
    dst = bytearray(2 * MIN)
    copy_into(memoryview(dst), memoryview(src))
    conn.send(dst == src)


def test_a_forked_child_gets_its_own_helpers():
    copy_into(memoryview(bytearray(2 * MIN)), memoryview(bytes(2 * MIN)))  # helpers running in the parent
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    p = ctx.Process(target=_copy_in_child, args=(child_end,))
    p.start()
    try:
        assert parent_end.poll(60), "the child's copy hung"
        assert parent_end.recv() is True
    finally:
        p.join(30)
    assert p.exitcode == 0


# Copies interrupted at random moments, in a child with a time limit (a hang
# fails the test instead of freezing the suite).  A thread interrupts the main
# thread now with a real SIGINT (which may land in any thread, or end a wait
# with EINTR), now with _thread.interrupt_main() (which never ends a wait);
# the handler raises only while copy_into runs.  After every interrupt no
# helper may be writing; every copy that returned normally wrote every byte.
_INTERRUPTED_COPIES = r"""
import _thread, faulthandler, mmap, os, random, signal, sys, threading, time
import numpy as np
from shmq import _copy
from shmq._copy import copy_into, PARALLEL_MIN_BYTES

faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)  # stacks, before the parent's limit
TARGET = int(sys.argv[1])
n = 4 * PARALLEL_MIN_BYTES
sources = [memoryview(bytes([v]) * n) for v in (1, 2)]
dst = mmap.mmap(-1, n)
view = np.frombuffer(dst, np.uint8)

class Interrupt(Exception):
    pass

armed = False
def handler(signum, frame):
    if armed:
        raise Interrupt
signal.signal(signal.SIGINT, handler)

stop = threading.Event()
def interrupter(rng=random.Random(16)):
    while not stop.is_set():
        time.sleep(rng.uniform(0, 0.012))
        if rng.random() < 0.5:
            os.kill(os.getpid(), signal.SIGINT)
        else:
            _thread.interrupt_main()
threading.Thread(target=interrupter, daemon=True).start()

interrupts = completed = 0
k = 0
while interrupts < TARGET:
    k += 1
    src = sources[k % 2]
    if k % 2:
        # The helper's half cold (pages to fault in), the caller's warm: the
        # caller waits for the helper, and interrupts land in that wait.
        dst.madvise(mmap.MADV_DONTNEED, n // 2, n // 2)
    try:
        armed = True
        copy_into(memoryview(dst), src)
        armed = False
        completed += 1
        assert (view[::4096] == k % 2 + 1).all(), "a copy that returned left bytes unwritten"
    except Interrupt:
        armed = False
        interrupts += 1
        assert not any(h.writing for h in _copy._helpers), "a helper writes after copy_into raised"
    assert not _copy._state_lock.locked()
stop.set()
assert _copy._helpers, "no helper thread ever ran"
# Black box: nothing writes into dst any more.
view[:] = 0
deadline = time.monotonic() + 0.05
while time.monotonic() < deadline:
    assert not view[::65536].any()
print("ok", interrupts, completed)
"""


@pytest.mark.skipif(not MULTI_CPU, reason="helpers start only with a second CPU")
def test_an_interrupted_copy_returns_only_after_every_helper_finished():
    env = {k: v for k, v in os.environ.items() if k != "SHMQ_COPY_THREADS"}
    try:
        res = subprocess.run(
            [sys.executable, "-c", _INTERRUPTED_COPIES, "400", "50"],
            env=env, capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"interrupted copies hung:\n{exc.stderr}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok 400 "), res.stdout


def test_large_arrays_through_a_queue_arrive_exact():
    q = shmq.Queue(maxsize=3)
    try:
        arrays = [np.frombuffer(_random(2 * MIN - 4 * k, k), np.uint32) for k in range(3)]
        for a in arrays:
            q.put(a, timeout=30)
        for a in arrays:
            got = q.get(timeout=30)
            assert np.array_equal(got, a)
            del got
    finally:
        q.close()
        q.unlink()


# -- how many threads a copy may use -------------------------------------------

_PINNED_COPIES = r"""
import os, sys, threading
from shmq import _copy
from shmq._copy import copy_into, PARALLEL_MIN_BYTES
n = 2 * PARALLEL_MIN_BYTES
dst, src = memoryview(bytearray(n)), memoryview(bytes(b"\x05") * n)
def helpers():
    return sum(t.name == "shmq-copy" for t in threading.enumerate())
if sys.argv[1] == "pinned":  # one CPU from the start: no helper is ever made
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for _ in range(5):
        copy_into(dst, src)
    print(helpers(), _copy.usable_threads())
elif sys.argv[1] == "follow":  # a helper whose mask went stale takes the caller's again
    copy_into(dst, src)
    mine = os.sched_getaffinity(0)
    threads = [t for t in threading.enumerate() if t.name == "shmq-copy"]
    for t in threads:
        os.sched_setaffinity(t.native_id, {max(mine)})
    before = [h.parts for h in _copy._helpers]
    for _ in range(200):  # until every helper has copied a part (the caller may take one first)
        copy_into(dst, src)
        if all(h.parts > b for h, b in zip(_copy._helpers, before)):
            break
    print(len(threads) >= 1, all(os.sched_getaffinity(t.native_id) == mine for t in threads))
else:  # helpers made with two CPUs, then the affinity shrinks: they sit idle
    copy_into(dst, src)
    made = helpers()
    copied = sum(h.parts for h in _copy._helpers)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for _ in range(5):
        copy_into(dst, src)
    print(made, sum(h.parts for h in _copy._helpers) - copied, _copy.usable_threads())
assert bytes(dst) == bytes(src)
"""


def _run_pinned(mode: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "SHMQ_COPY_THREADS"}
    res = subprocess.run(
        [sys.executable, "-c", _PINNED_COPIES, mode], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return [int(w == "True") if w in ("True", "False") else int(w) for w in res.stdout.split()]


def test_a_process_pinned_to_one_cpu_copies_without_helpers():
    assert _run_pinned("pinned") == [0, 1]


@pytest.mark.skipif(not MULTI_CPU, reason="needs a second CPU to take away")
def test_helpers_sit_idle_once_the_affinity_shrinks_to_one_cpu():
    made, copied_after, threads = _run_pinned("shrink")
    assert made >= 1 and copied_after == 0 and threads == 1


@pytest.mark.skipif(not MULTI_CPU, reason="needs a second CPU")
def test_helpers_run_on_the_callers_cpus():
    assert _run_pinned("follow") == [1, 1]


def test_usable_threads_follows_the_affinity_and_the_environment(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SHMQ_COPY_THREADS", raising=False)
    threads = _copy.usable_threads()
    quota = _copy._quota[1]  # what this machine's cgroup says, as just read
    expected = min(cpus if quota is None else max(1, min(cpus, int(quota))), _copy.MAX_HELPERS + 1)
    assert threads == expected
    monkeypatch.setenv("SHMQ_COPY_THREADS", "1")
    assert _copy.usable_threads() == 1
    monkeypatch.setenv("SHMQ_COPY_THREADS", "0")  # at least the caller
    assert _copy.usable_threads() == 1

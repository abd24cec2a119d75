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


@pytest.mark.skipif(not MULTI_CPU, reason="helpers start only with a second CPU")
def test_an_interrupted_copy_returns_only_after_every_helper_finished():
    n = 8 * MIN
    src = memoryview(bytes(b"\x01" * n))
    dst = bytearray(n)
    copy_into(memoryview(dst), src)  # helpers started
    interrupted = False
    timer = None
    try:
        for _ in range(200):
            timer = threading.Timer(0.001, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                for _ in range(20):
                    copy_into(memoryview(dst), src)
            except KeyboardInterrupt:
                interrupted = True
                break
            finally:
                timer.join(10)
    finally:
        if timer is not None:
            timer.cancel()
    assert interrupted
    # Nothing may write to dst any more: clear it and watch for a while.
    dst[:] = bytes(n)
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        assert not any(dst[k] for k in range(0, n, 1 << 20))
    assert not _copy._state_lock.locked()


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

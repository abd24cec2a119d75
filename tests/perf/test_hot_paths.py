"""Regression benchmarks of the per-message paths (one process unless said
otherwise; see conftest.py for how to run and compare)."""
import multiprocessing as mp
import pickle

import pytest

import shmq
from shmq.lowlevel import read_statistics

PAYLOAD = b"p" * 64
TUPLE = (7, 2.5, "shmq", b"xy")


@pytest.fixture(params=["spsc", "mpmc"])
def ring(request):
    multi = request.param == "mpmc"
    r = shmq.Ring.create(1 << 20, multi_producer=multi, multi_consumer=multi)
    try:
        yield r
    finally:
        r.close()
        r.unlink()


def test_write_read_64_bytes(benchmark, ring):
    write, read = ring.try_write, ring.try_read

    def op():
        write(PAYLOAD)
        return read()

    assert benchmark(op) == PAYLOAD


def test_blocking_write_read_64_bytes(benchmark, ring):
    write, read = ring.write, ring.read

    def op():
        write(PAYLOAD)
        return read()

    assert benchmark(op) == PAYLOAD


def test_write_many_read_many_256(benchmark, ring):
    batch = [PAYLOAD] * 256

    def op():
        ring.write_many(batch)
        return ring.read_many(256)

    assert len(benchmark(op)) == 256


def test_reserve_commit_peek_release(benchmark, ring):
    def op():
        view = ring.reserve(64)
        view[:] = PAYLOAD
        view.release()
        ring.commit()
        got = ring.peek()
        n = len(got)
        got.release()
        ring.release()
        return n

    assert benchmark(op) == 64


def test_pickled_tuple_through_ring(benchmark, ring):
    dumps, loads = pickle.dumps, pickle.loads

    def op():
        ring.write(dumps(TUPLE, 5))
        return loads(ring.read())

    assert benchmark(op) == TUPLE


def test_statistics_snapshot(benchmark, ring):
    assert benchmark(ring.statistics).name == ring.name


def test_statistics_by_name(benchmark, ring):
    assert benchmark(read_statistics, ring.name).name == ring.name


@pytest.mark.skipif(not hasattr(shmq, "Queue"), reason="shmq.Queue is not there yet")
def test_queue_put_get_small_tuple(benchmark):
    q = shmq.Queue()
    try:

        def op():
            q.put(TUPLE)
            return q.get()

        assert benchmark(op) == TUPLE
    finally:
        q.close()


def _drain(name, n):
    ring = shmq.Ring.attach(name)
    try:
        for _ in range(n):
            ring.read(timeout=60)
    finally:
        ring.close()


def test_two_process_throughput_100k(benchmark):
    """100,000 64-byte messages to another process (SPSC, one at a time)."""
    ctx = mp.get_context("fork")
    n = 100_000
    ring = shmq.Ring.create(1 << 20, multi_producer=False, multi_consumer=False)
    try:

        def setup():
            proc = ctx.Process(target=_drain, args=(ring.name, n))
            proc.start()
            return (proc,), {}

        def op(proc):
            write = ring.write
            for _ in range(n):
                write(PAYLOAD, 60)
            proc.join(120)
            assert proc.exitcode == 0

        benchmark.pedantic(op, setup=setup, rounds=5)
    finally:
        ring.close()
        ring.unlink()

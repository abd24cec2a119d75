"""Multi-process stress: producers send numbered, checksummed records of
random sizes (up to the ring's largest); consumers verify each one and report
what they got, in order.  Nothing may be lost, duplicated, torn, or reordered
within one producer.  Seeds are in the test ids."""
from __future__ import annotations

import multiprocessing as mp
import random
import time
from array import array

import pytest

import shmq

from _core_helpers import RECORD_HEADER, check_record, make_record
from conftest import join_all

DONE_TIMEOUT = 60.0
FORK = mp.get_context("fork")


def record_sizes(seed, count, max_payload):
    """Mostly small records, some medium, some as large as the ring allows."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.6:
            out.append(rng.randint(RECORD_HEADER.size, 64))
        elif r < 0.9:
            out.append(rng.randint(RECORD_HEADER.size, max_payload // 4))
        else:
            out.append(rng.randint(max_payload // 2, max_payload))
    return out


def produce(ring, producer, count, seed, conn):
    try:
        sizes = record_sizes(seed * 1000 + producer, count, ring.max_payload)
        rng = random.Random(seed + producer)
        seq = 0
        while seq < count:
            if rng.random() < 0.3:  # a batch
                k = min(count - seq, rng.randint(2, 8))
                ring.write_many([make_record(producer, seq + i, sizes[seq + i]) for i in range(k)], timeout=30)
                seq += k
            else:
                ring.write(make_record(producer, seq, sizes[seq]), timeout=30)
                seq += 1
        conn.send(("ok", count))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise
    finally:
        ring.close()


def consume(ring, remaining, seed, conn):
    """Read until every record of the run was received by some consumer."""
    got = array("q")
    try:
        rng = random.Random(seed)
        deadline = time.monotonic() + DONE_TIMEOUT
        while remaining.value > 0:
            if time.monotonic() > deadline:
                raise AssertionError("consumer gave up waiting for records")
            how = rng.random()
            try:
                if how < 0.4:
                    recs = [ring.read(timeout=0.05)]
                elif how < 0.8:
                    recs = ring.read_many(rng.randint(1, 16), timeout=0.05)
                else:
                    v = ring.peek()
                    if v is None:
                        continue
                    rec = bytes(v)
                    v.release()
                    ring.release()
                    recs = [rec]
            except shmq.Empty:
                continue
            for rec in recs:
                p, s = check_record(rec)
                got.append(p << 32 | s)
            with remaining.get_lock():
                remaining.value -= len(recs)
        conn.send(("ok", got))
    except BaseException as exc:
        conn.send(("error", repr(exc)))
        raise
    finally:
        ring.close()


def run(ctx, n_prod, n_cons, per_producer, capacity, seed, **ring_kw):
    ring = shmq.Ring.create(capacity, **ring_kw)
    procs, pipes = [], []
    try:
        remaining = ctx.Value("q", n_prod * per_producer)
        for p in range(n_prod):
            here, there = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=produce, args=(ring, p, per_producer, seed, there)))
            pipes.append(here)
        for c in range(n_cons):
            here, there = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=consume, args=(ring, remaining, seed * 100 + c, there)))
            pipes.append(here)
        for proc in procs:
            proc.start()
        results = []
        for here in pipes:
            assert here.poll(90), f"seed {seed}: a process sent no result"
            results.append(here.recv())
        join_all(procs, timeout=60)
        errors = [r[1] for r in results if r[0] != "ok"]
        assert not errors, f"seed {seed}: {errors}"
        assert [p.exitcode for p in procs] == [0] * len(procs)
        received = [r[1] for r in results[n_prod:]]
        verify(received, n_prod, per_producer, seed, single_consumer=n_cons == 1)
        stats = ring.statistics()
        assert stats.messages_in == stats.messages_out == n_prod * per_producer
        assert ring.empty() and ring.qsize() == 0
        return stats
    finally:
        join_all(procs, timeout=30)
        ring.close()
        ring.unlink()


def verify(received, n_prod, per_producer, seed, single_consumer):
    seen = set()
    for c, got in enumerate(received):
        last = [-1] * n_prod
        for key in got:
            p, s = key >> 32, key & 0xFFFFFFFF
            assert key not in seen, f"seed {seed}: duplicate record {p}:{s}"
            seen.add(key)
            if single_consumer:
                assert s == last[p] + 1, f"seed {seed}: producer {p} seq {s} after {last[p]}"
            else:
                assert s > last[p], f"seed {seed}: consumer {c} got producer {p} seq {s} after {last[p]}"
            last[p] = s
    missing = n_prod * per_producer - len(seen)
    assert missing == 0, f"seed {seed}: {missing} records lost"


SEED = 20240607


@pytest.mark.parametrize("seed", [SEED])
def test_one_to_one_spsc(ctx, seed):
    stats = run(ctx, 1, 1, 100000, 4096, seed, multi_producer=False, multi_consumer=False)
    assert stats.full_waits > 0 or stats.empty_waits > 0


@pytest.mark.parametrize("seed", [SEED + 1])
def test_four_to_four_mpmc(ctx, seed):
    run(ctx, 4, 4, 50000, 4096, seed)


@pytest.mark.parametrize("seed", [SEED + 2])
def test_four_to_one(seed):
    run(FORK, 4, 1, 50000, 2048, seed, multi_consumer=False)


@pytest.mark.parametrize("seed", [SEED + 3])
def test_one_to_four(seed):
    run(FORK, 1, 4, 100000, 2048, seed, multi_producer=False)


@pytest.mark.parametrize("seed", [SEED + 4])
def test_four_to_four_with_a_message_limit(seed):
    stats = run(FORK, 4, 4, 30000, 8192, seed, max_messages=5)
    assert stats.full_waits > 0

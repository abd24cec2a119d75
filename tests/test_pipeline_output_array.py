"""shmq.pipeline.output_array: a map stage builds its result in a slot of the
queue to the next stage (or to the parent) and returns it; it travels
without a copy.  Anything else -- outside a worker, small arrays, other
stages, a loan not returned, an item that raises or is retried, a worker
SIGKILLed while holding one -- falls back to ordinary behaviour, and the
slot comes back to its pool.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import shmq
from shmq import _pipeline_worker as W
from shmq._platform import part_name
from shmq._slots import SlotPool
from shmq.pipeline import output_array
from test_pipeline import assert_clean, worker_pids

pytestmark = pytest.mark.timeout(60)

N = (1 << 20) // 8  # 1 MiB of float64


def decode_into(i):
    out = output_array(N, np.float64)
    out[:] = float(i)
    return out


def add_one_into(a):
    # (a read-only view of the slot it came in -- or, when the stage before
    # found no free slot for 0.2 s, a private copy: see the ordered test)
    out = output_array(a.shape, a.dtype)
    np.add(a, 1.0, out=out)
    return out


def frames_into(i):
    out = output_array((120, 160, 4), np.uint8)  # 75 KiB
    out[:] = i % 256
    return out


def loans(pipe):
    return [s.total(W.S_LOANS) for s in pipe._stages]


def pool_stats(q):
    pool = SlotPool.attach(part_name(q.name, "p"))
    try:
        return pool.statistics()
    finally:
        pool.close()


def settled_pool_stats(q, within=1.0):
    """The pool's statistics once no slot is loaned, or after ``within``
    seconds (a worker lets go of its last loan just after putting its
    results, maybe after the caller got them)."""
    deadline = time.monotonic() + within
    st = pool_stats(q)
    while st.loaned and time.monotonic() < deadline:
        time.sleep(0.02)
        st = pool_stats(q)
    return st


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_results_built_in_slots_travel_without_a_copy(method):
    n = 40
    pipe = shmq.Pipeline(range(n), start_method=method).map(decode_into).map(add_one_into)
    with pipe:
        got = []
        for a in pipe:  # (each dropped at once: its slot goes back)
            assert a.shape == (N,) and a.dtype == np.float64 and not a.flags.writeable
            got.append(float(a[0]) if np.all(a == a[0]) else None)
        made = loans(pipe)
        st = pipe.statistics()
        pids = worker_pids(pipe)
    assert sorted(got) == [i + 1.0 for i in range(n)]
    assert made == [n, n], made  # every result went as the slot it was built in
    assert [(s.items_in, s.items_out) for s in st.stages] == [(n, n), (n, n)]
    assert_clean(pids)


def test_ordered_with_several_workers():
    """Ordered: results waiting for their turn in the parent hold their
    slots; when every slot is held so, a worker's output_array gets a plain
    array after 0.2 s (which is copied): slower, never stuck, never wrong."""
    n = 40
    pipe = shmq.Pipeline(range(n), start_method="fork").map(decode_into, workers=2).map(add_one_into, workers=2, ordered=True)
    with pipe:
        got = [float(a[0]) if np.all(a == a[0]) else None for a in pipe]
        made = loans(pipe)
    assert got == [i + 1.0 for i in range(n)]
    assert made[0] > 0 and made[1] > 0, made


def test_shapes_and_dtypes_come_back_as_made():
    """The caller keeps every output, so every slot of the queue's pool (8)
    stays held: the 9th and 10th output_array find none free and give plain
    arrays after 0.2 s, which travel as copies."""
    pipe = shmq.Pipeline(range(10), start_method="fork").map(frames_into)
    with pipe:
        got = {int(a[0, 0, 0]): a for a in pipe}
        made = loans(pipe)
    assert sorted(got) == list(range(10)) and made == [8]
    for i, a in got.items():
        assert a.shape == (120, 160, 4) and a.dtype == np.uint8 and (a == i).all()


def test_outside_a_worker_and_small_arrays_are_plain():
    a = output_array((4, 4), np.int32)
    assert type(a) is np.ndarray and a.flags.writeable and a.shape == (4, 4) and a.dtype == np.int32
    b = output_array(N)  # large, but outside a worker: plain too
    assert b.flags.writeable and b.flags.owndata


def small_into(i):
    out = output_array(16, np.float64)  # 128 bytes: travels inside its record
    out[:] = i
    return out


def test_small_arrays_in_a_worker_are_plain():
    with shmq.Pipeline(range(20), start_method="fork").map(small_into) as pipe:
        got = sorted(float(a[0]) for a in pipe)
        made = loans(pipe)
    assert got == [float(i) for i in range(20)] and made == [0]


def view_of_loan(i):
    out = output_array(N, np.float64)
    out[:] = i
    return out[::2]  # a view of it: copied as any array; the loan goes back


def sum_of_loan(i):
    out = output_array(N, np.float64)
    out[:] = i
    return float(out[0])  # not returned at all


def fail_odd_into(i):
    out = output_array(N, np.float64)
    out[:] = i
    if i % 2:
        raise ValueError(f"odd {i}")
    return out


_attempts = {}


def flaky_into(i):
    out = output_array(N, np.float64)
    out[:] = i
    n = _attempts[i] = _attempts.get(i, 0) + 1
    if i % 3 == 0 and n == 1:
        raise ConnectionError("first attempt fails")
    return out


def is_even_array(a):
    return int(a[0]) % 2 == 0


@pytest.mark.parametrize(
    "build,kw,want,loaned",
    [
        (view_of_loan, {}, list(range(30)), 0),
        (sum_of_loan, {}, list(range(30)), 0),
        (fail_odd_into, {"on_error": "skip"}, list(range(0, 30, 2)), 15),
        (fail_odd_into, {"on_error": "dead-letter"}, list(range(0, 30, 2)), 15),
        (flaky_into, {"on_error": "retry", "retries": 1}, list(range(30)), 30),
    ],
    ids=["view-returned", "not-returned", "raises-skip", "raises-dead-letter", "retried"],
)
def test_loans_not_sent_go_back_to_the_pool(build, kw, want, loaned):
    """30 items, more than the pool's 8 slots: a loan that is not sent must
    come back, or the pool runs dry (each later loan would then wait)."""
    pipe = shmq.Pipeline(range(30), start_method="fork").map(build, **kw).filter(lambda_free_filter)
    with pipe:
        it = iter(pipe)
        outs = [next(it) for _ in range(len(want))]
        # (every element: a slot given back while a view of it lived could be overwritten)
        got = sorted(int(x) if np.isscalar(x) else (int(x[0]) if (x == x[0]).all() else -1) for x in outs)
        del outs
        st = settled_pool_stats(pipe._queues[1])
        made = loans(pipe)
        assert list(it) == []
        pids = worker_pids(pipe)
    assert got == want
    assert made[0] == loaned
    assert st.loaned == 0, st  # no slot left loaned
    assert_clean(pids)


def lambda_free_filter(x):
    return True


KILL_FLAG = [""]


def die_holding_a_loan(i):
    out = output_array(N, np.float64)
    out[:] = i
    if i == 5 and not os.path.exists(KILL_FLAG[0]):
        open(KILL_FLAG[0], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would, with a slot loaned
    return out


def slow_first(a):
    time.sleep(0.005)  # the stage before runs short of slots: it reclaims the dead one's
    return float(a[0])


def test_a_worker_killed_holding_a_loan_gives_the_slot_back(tmp_path):
    KILL_FLAG[0] = str(tmp_path / "killed")
    n = 60
    pipe = shmq.Pipeline(range(n), start_method="fork").map(die_holding_a_loan).map(slow_first)
    with pipe:
        it = iter(pipe)
        got = sorted(next(it) for _ in range(n))
        st = settled_pool_stats(pipe._queues[1], within=2.0)
        crashes = pipe.statistics().stages[0].crashes
        assert list(it) == []
        pids = worker_pids(pipe)
    assert got == [float(i) for i in range(n)]
    assert crashes == 1
    assert st.loaned == 0 and st.reclaimed >= 1, st
    assert_clean(pids)

"""shmq.Pipeline with cheap items: runs of items travel as one CHUNK message.

While every stage's items are cheap, the feeder sends runs of consecutive
source items as one message, map stages pass a run on as one, and the parent
accounts for a run that comes back whole as one entry.  These tests check
that batching changes nothing the caller can see -- outputs, order,
statistics, back-pressure, latency of a sparse source -- and the faults of a
worker holding a run:

At-least-once, for outputs: a worker killed while holding runs has every item
of them fed again, one by one (fn may run twice for an item, so its side
effects happen at least once); each output still reaches the caller exactly
once (a second copy is dropped by its source position and counted in
``duplicates_dropped``).  A crash in a run charges no item an attempt (which
item of the run was in fn is not recorded); a crash of an item fed alone
charges it, so an item that kills every worker ends in the dead letters after
``retries`` charged attempts (``retries + 2`` crashes in all).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import shmq
from shmq import _pipeline_worker as W
from test_pipeline import accounted, assert_clean, worker_pids

pytestmark = pytest.mark.timeout(90)


def identity(x):
    return x


def square(x):
    return x * x


def wait_for_runs(holder, at, source):
    """Yields ``source``; at item ``at`` waits (up to 10 s) until the
    pipeline in ``holder`` sends runs into stage 0, so that the items after
    ``at`` travel in runs (cheap items are measured for 50 ms first)."""
    for x in source:
        if x == at:
            deadline = time.monotonic() + 10
            while holder[0]._chunk <= 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert holder[0]._chunk > 1, "the pipeline never sent runs"
        yield x


BLOCK = [-1, ""]  # item, flag file: fn blocks on that item once, for the test to kill its worker


def block_once(x):
    if x == BLOCK[0] and not os.path.exists(BLOCK[1]):
        open(BLOCK[1], "w").close()
        time.sleep(30)  # killed here
    return x * x


def test_worker_killed_holding_a_run_loses_and_duplicates_nothing(tmp_path):
    """SIGKILL a worker while an item of a run is in fn: every item of every
    run it held comes out exactly once, none is charged an attempt (so with
    retries=0 and dead letters, none is dead-lettered), and all were fed
    again (crash_retries)."""
    n = 300_000
    BLOCK[:] = [150_000, str(tmp_path / "blocked")]
    holder = []
    pipe = shmq.Pipeline(wait_for_runs(holder, 20_000, range(n)), start_method="fork")
    pipe.map(block_once, workers=2, on_error="dead-letter", retries=0).map(identity)
    holder.append(pipe)
    held = {}

    def kill_when_blocked():
        deadline = time.monotonic() + 30
        while not os.path.exists(BLOCK[1]) and time.monotonic() < deadline:
            time.sleep(0.002)
        stage = pipe._stages[0]  # (the flag is made in fn: its worker's row is written)
        for i, p in enumerate(stage.procs):
            row = stage.row(i)
            pairs = list(row[W.S_HELD : W.S_HELD + 2 * row[W.S_HELD_N]])
            ranges = list(zip(pairs[::2], pairs[1::2]))
            if any(first <= BLOCK[0] < first + count for first, count in ranges):
                held.update(pid=p.pid, ranges=ranges, current=ranges[row[W.S_CURRENT]])
                os.kill(p.pid, signal.SIGKILL)
                return

    killer = threading.Thread(target=kill_when_blocked, daemon=True)
    with pipe:
        it = iter(pipe)
        got = [next(it)]
        killer.start()
        got += list(it)
        killer.join(10)
        st = pipe.statistics()
        dead = pipe.dead_letters.qsize()
        pids = worker_pids(pipe)
    assert held, "the blocked worker was not found"
    first, count = held["current"]
    assert count > 1 and first <= BLOCK[0] < first + count, f"item {BLOCK[0]} was not in a run: {held}"
    assert len(got) == n and len(set(got)) == n and sorted(got) == [x * x for x in range(n)]
    assert dead == 0 and st.dead_letters == 0
    assert st.stages[0].crashes == 1 and st.with_output == n and accounted(st) == n and st.in_flight == 0
    assert st.crash_retries >= sum(c for _, c in held["ranges"])
    assert_clean(pids + [held["pid"]])


POISON = [-1]


def poison(x):
    if x == POISON[0]:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_poison_item_in_a_run_goes_to_dead_letters_after_retries():
    """An item that kills every worker, first met in a run: the run's crash
    charges no item, its items are fed again one by one, the poison item's
    next crashes are charged, and after ``retries`` it is a dead letter;
    every other item comes out exactly once."""
    n = 400_000
    POISON[0] = 250_000
    holder = []
    pipe = shmq.Pipeline(wait_for_runs(holder, 20_000, range(n)), start_method="fork")
    pipe.map(poison, workers=2, on_error="dead-letter", retries=2, max_in_flight=1024).map(square)
    holder.append(pipe)
    with pipe:
        got = list(pipe)
        st = pipe.statistics()
        letter = pipe.dead_letters.get(timeout=5)
        assert pipe.dead_letters.empty()
        pids = worker_pids(pipe)
    assert (letter.item, letter.exc_type, letter.attempts, letter.seqs) == (POISON[0], "WorkerDied", 3, (POISON[0],))
    assert len(got) == n - 1 and sorted(got) == [x * x for x in range(n) if x != POISON[0]]
    # one uncharged crash in the run, then three charged ones
    assert st.stages[0].crashes == 4, st
    assert st.dead_letters == 1 and st.with_output == n - 1 and accounted(st) == n
    assert_clean(pids)


def fail_every_100th(x):
    if x % 100 == 37:
        raise ValueError(f"bad {x}")
    return x


def test_failing_items_in_runs_are_dead_lettered_exactly():
    """Items raising inside runs: each is dead-lettered once, the rest of its
    run still comes out (the run is split around it), in source order."""
    n = 100_000
    with shmq.Pipeline(range(n), start_method="fork").map(
        fail_every_100th, on_error="dead-letter", ordered=True
    ).map(identity) as pipe:
        got = list(pipe)
        dead = []
        while not pipe.dead_letters.empty():
            dead.append(pipe.dead_letters.get(timeout=5))
        st = pipe.statistics()
    assert got == [x for x in range(n) if x % 100 != 37]
    assert sorted(d.item for d in dead) == list(range(37, n, 100))
    assert all(d.exc_type == "ValueError" and d.attempts == 1 for d in dead)
    assert st.dead_letters == n // 100 and st.with_output == n - n // 100 and accounted(st) == n


def test_outputs_are_counted_exactly_while_iterating():
    """Outputs are handed over in batches, but statistics().outputs counts
    the values the caller has taken, one by one."""
    with shmq.Pipeline(range(200_000), start_method="fork").map(identity).map(identity) as pipe:
        for k, _ in enumerate(pipe):
            if k in (0, 1, 12_345, 99_999, 150_001):
                assert pipe.statistics().outputs == k + 1
        st = pipe.statistics()
    assert st.outputs == 200_000 == st.with_output


def test_break_mid_batch_counts_only_the_outputs_taken():
    with shmq.Pipeline(range(100_000), start_method="fork").map(identity) as pipe:
        it = iter(pipe)
        for _ in range(5000):
            next(it)
        pipe.close()
        assert pipe.statistics().outputs == 5000
        assert list(it) == []  # nothing more after close


def test_ordered_runs_killed_keep_the_order(tmp_path):
    """Ordered pipeline of cheap items (runs) with a worker SIGKILLed a few
    times: the outputs are the source, in order, each exactly once."""
    from test_pipeline_crash import Killer, until_killed

    holder = []
    pipe = (
        shmq.Pipeline(until_killed(holder, 3, after=50_000), start_method="fork")
        .map(identity, workers=2, ordered=True)
        .map(square, workers=2)
    )
    killer = Killer(pipe, 5, kills=3)
    holder.append(killer)
    with pipe:
        it = iter(pipe)
        got = [next(it)]
        killer.start()
        got += list(it)
        killer.stop.set()
        killer.join(5)
        st = pipe.statistics()
        pids = worker_pids(pipe)
    n = st.source_items
    assert got == [x * x for x in range(n)]
    assert sum(s.crashes for s in st.stages) >= 1 and accounted(st) == n == st.with_output
    assert_clean(pids + killer.killed)


def test_cheap_items_grow_the_window_and_runs():
    """max_in_flight not given, every stage cheap, small items: the window
    grows (to 16384 per stage) and runs get long; a given max_in_flight
    stays as given."""
    from shmq.pipeline import _AUTO_MAX_IN_FLIGHT

    pipe = shmq.Pipeline(range(3_000_000), start_method="fork").map(identity).map(identity, max_in_flight=300)
    with pipe:
        for k, _ in enumerate(pipe):
            if pipe._stages[0].max_in_flight == _AUTO_MAX_IN_FLIGHT:
                break
        assert pipe._stages[0].max_in_flight == _AUTO_MAX_IN_FLIGHT, "the window did not grow"
        assert pipe._stages[1].max_in_flight == 300
        assert pipe._chunk == 150  # the smallest of the row of cheap stages: 300 // 2
        st = pipe.statistics()
        assert st.in_flight <= _AUTO_MAX_IN_FLIGHT + 300


def slow_square(x):
    time.sleep(0.001)
    return x * x


def test_slow_stage_keeps_the_default_window():
    with shmq.Pipeline(range(400), start_method="fork").map(identity).map(slow_square, workers=2) as pipe:
        got = sorted(pipe)
        assert [s.max_in_flight for s in pipe._stages] == [128, 128]
    assert got == [x * x for x in range(400)]


def test_sparse_source_items_are_not_held_back():
    """A source that makes one item every 20 ms: each comes out soon after it
    is made (the feeder sends it alone instead of waiting for a run)."""
    made = {}

    def sparse():
        for i in range(15):
            time.sleep(0.02)
            made[i] = time.monotonic()
            yield i

    latencies = []
    with shmq.Pipeline(sparse(), start_method="fork").map(identity).map(identity) as pipe:
        for out in pipe:
            latencies.append(time.monotonic() - made[out])
    latencies.sort()
    assert len(latencies) == 15
    assert latencies[7] < 0.1, latencies  # median; a run of 15 would wait 0.3 s


@pytest.mark.parametrize("seed", range(5))
def test_ledger_against_a_dict(seed):
    """The parent's ledger of items in flight (runs cut and split at random)
    agrees with a plain dict seq -> item at every step."""
    import random

    from shmq.pipeline import _MISSING, _Ledger

    rng = random.Random(seed)
    ledger, model = _Ledger(), {}
    nxt = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.2:  # a new run, or a single item
            n = rng.choice([1, 2, 5, 64])
            items = [f"i{nxt + k}" for k in range(n)]
            if n == 1:
                ledger.add(nxt, items[0])
            else:
                ledger.add_run(nxt, items)
            model.update(zip(range(nxt, nxt + n), items))
            nxt += n
        elif op < 0.5 and nxt:  # a result for a range: accounted only if one run holds it all
            first = rng.randrange(nxt)
            n = rng.randint(1, 8)
            whole = all(first + k in model for k in range(n))
            ok = ledger.pop_run(first, n)
            if ok:
                assert whole
                for k in range(n):
                    del model[first + k]
        elif op < 0.8 and nxt:
            seq = rng.randrange(nxt)
            assert ledger.pop(seq, _MISSING) == model.pop(seq, _MISSING)
        elif op < 0.9 and nxt:
            seq = rng.randrange(nxt)
            assert ledger.split(seq) in (True, False)
        elif nxt:
            seq = rng.randrange(nxt)
            assert (seq in ledger) == (seq in model)
            assert ledger.get(seq, _MISSING) == model.get(seq, _MISSING)
        assert len(ledger) == len(model)
    assert sorted(ledger.seqs()) == sorted(model)


def stuck_at_30000(x):
    if x == 30_000:
        time.sleep(1.5)  # the worker holds its runs meanwhile; runs pile up in its queue
    return x


def test_stage_in_flight_counts_items_not_messages():
    """Cheap stages pass runs (one message, many items).  Each stage's
    in_flight counts items: while stage 1 is stuck in fn (and the caller has
    taken every output), the stages' sum is the pipeline's items in flight."""
    n = 40_000
    pipe = shmq.Pipeline(range(n), start_method="fork").map(identity, max_in_flight=256).map(stuck_at_30000, max_in_flight=256)
    got = []
    with pipe:
        consumer = threading.Thread(target=lambda: got.extend(pipe), daemon=True)
        consumer.start()
        deadline = time.monotonic() + 10
        settled = stalled = None
        while time.monotonic() < deadline and consumer.is_alive():
            st = pipe.statistics()
            if st.outputs >= 25_000 and settled is not None and settled.outputs == st.outputs:
                stalled = st  # stage 1 is in fn on item 30000
                break
            settled = st
            time.sleep(0.1)
        chunk = pipe._chunk
        consumer.join(10)
    assert stalled is not None, "the stall was not seen"
    assert chunk > 1, "no runs"
    staged = [x.in_flight for x in stalled.stages]
    in_flight = stalled.in_flight
    assert in_flight - 2 <= sum(staged) <= in_flight, (staged, in_flight)
    assert staged[1] > 128, staged  # runs queued for stage 1 and held by it, counted by item
    assert sorted(got) == list(range(n))


def is_even(x):
    return x % 2 == 0


def pair(x):
    return [x, -x] if x % 3 else []


def sum_list(xs):
    return [x + 1 for x in xs]


@pytest.mark.parametrize("ordered", [False, True])
def test_runs_through_filter_flat_map_and_batches(ordered):
    """Cheap maps in runs around stages that take items one by one (filter,
    flat_map, batch/unbatch): same outputs, in order when asked."""
    n = 60_000
    pipe = (
        shmq.Pipeline(range(n), start_method="fork")
        .map(identity, ordered=ordered)
        .filter(is_even)
        .map(identity)
        .flat_map(pair)
        .batch(16)
        .map(sum_list)
        .unbatch()
        .map(identity)
    )
    with pipe:
        got = list(pipe)
        st = pipe.statistics()
    want = [y + 1 for x in range(n) if x % 2 == 0 for y in pair(x)]
    assert (got if ordered else sorted(got)) == (want if ordered else sorted(want))
    assert st.filtered == n // 2 and st.empty == len([x for x in range(0, n, 2) if x % 3 == 0])
    assert st.outputs == len(want) and st.in_flight == 0
    assert st.with_output + st.filtered + st.empty + st.merged == n

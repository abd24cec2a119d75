"""shmq.Pipeline crash recovery: workers SIGKILLed at random moments.

The contract: a killed worker is replaced; the items it held are fed again
(at-least-once processing, counted in ``crash_retries``) and every output
reaches the caller exactly once; an item that keeps killing its worker ends,
after ``retries`` attempts, in the dead letters (or raises WorkerDied).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import shmq
from test_pipeline import accounted, assert_clean, square, worker_pids

pytestmark = pytest.mark.timeout(90)


def busy_identity(x):
    time.sleep(0.003)
    return x


def poison_13(x):
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


class Killer(threading.Thread):
    """SIGKILLs a random worker of ``pipe`` every ``every`` seconds (seeded)."""

    def __init__(self, pipe, seed, kills, every=0.08):
        super().__init__(daemon=True)
        self.seed = seed
        self.pipe, self.rng, self.kills, self.every = pipe, random.Random(seed), kills, every
        self.killed = []
        self.stop = threading.Event()

    def run(self):
        while len(self.killed) < self.kills and not self.stop.wait(self.rng.uniform(0.3, 1.7) * self.every):
            pids = [p for p in worker_pids(self.pipe) if p]
            if pids:
                pid = self.rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass

    def __repr__(self):
        return f"Killer(seed={self.seed})"


def until_killed(holder, kills, after=20_000, limit=20_000_000):
    """0, 1, 2, ... until the Killer in ``holder`` has made ``kills`` kills,
    then ``after`` more: cheap items must not run out before the kills."""
    i = 0
    while i < limit:
        if len(holder[0].killed) >= kills:
            limit = min(limit, i + after)
        yield i
        i += 1


def run_with_kills(method, seed, n=600, kills=4, workers=(3, 2), first=busy_identity, max_in_flight=12, endless=False):
    holder = []
    pipe = (
        shmq.Pipeline(until_killed(holder, kills) if endless else range(n), start_method=method)
        .map(first, workers=workers[0], max_in_flight=max_in_flight)
        .map(square, workers=workers[1])
    )
    killer = Killer(pipe, seed, kills)
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
    assert_clean(pids + killer.killed)
    return got, st, killer


@pytest.mark.parametrize("method,seed", [("fork", 1), ("fork", 2), ("spawn", 3)])
def test_sigkill_random_worker_exactly_once(method, seed):
    got, st, killer = run_with_kills(method, seed, n=600 if method == "fork" else 300, kills=3)
    n = st.source_items
    assert killer.killed, "the killer found no worker to kill"
    assert len(got) == len(set(got)), f"duplicated outputs (seed {seed})"
    assert sorted(got) == [x * x for x in range(n)], f"lost outputs (seed {seed})"
    # a kill landing while the pipeline stops is not seen as a crash
    assert 1 <= sum(s.crashes for s in st.stages) <= len(killer.killed)
    assert st.with_output == n and accounted(st) == n and st.in_flight == 0
    # every item a dead worker held was fed again, and its old results dropped
    assert st.crash_retries >= 0 and st.duplicates_dropped <= st.crash_retries * 16


def cheap_identity(x):
    return x


@pytest.mark.parametrize("seed", [21, 22])
def test_sigkill_with_cheap_items_in_chunks_exactly_once(seed):
    """Cheap items travel in CHUNK messages (runs of consecutive items): a
    worker killed holding chunks loses none and duplicates none."""
    got, st, killer = run_with_kills(
        "fork", seed, kills=3, workers=(2, 2), first=cheap_identity, max_in_flight=256, endless=True
    )
    n = st.source_items
    assert len(got) == len(set(got)), f"duplicated outputs (seed {seed})"
    assert sorted(got) == [x * x for x in range(n)], f"lost outputs (seed {seed})"
    assert st.with_output == n and accounted(st) == n
    assert sum(s.crashes for s in st.stages) >= 1


def test_poison_item_goes_to_dead_letters_after_retries():
    t0 = time.monotonic()
    with shmq.Pipeline(range(30), start_method="fork").map(poison_13, workers=2, on_error="dead-letter", retries=2) as pipe:
        got = sorted(pipe)
        st = pipe.statistics()
        dead = pipe.dead_letters.get(timeout=5)
        assert pipe.dead_letters.empty()
        pids = worker_pids(pipe)
    assert time.monotonic() - t0 < 15
    assert got == [x for x in range(30) if x != 13]
    assert (dead.item, dead.stage, dead.exc_type, dead.attempts) == (13, "0:poison_13", "WorkerDied", 3)
    assert st.dead_letters == 1 and st.stages[0].dead_letters == 1 and st.stages[0].crashes == 3
    assert st.crash_retries >= 2 and accounted(st) == 30  # 13 twice, and items it held with it
    assert_clean(pids)


def test_poison_item_raises_worker_died_under_raise():
    with pytest.raises(shmq.WorkerDied, match=r"stage '0:poison_13': worker pid \d+ died \(exit code -9\) while holding source item #13, 2 times"):
        with shmq.Pipeline(range(30), start_method="fork").map(poison_13, retries=1) as pipe:
            list(pipe)


def test_poison_item_skipped():
    with shmq.Pipeline(range(20), start_method="fork").map(poison_13, on_error="skip", retries=0) as pipe:
        assert sorted(pipe) == [x for x in range(20) if x != 13]
        st = pipe.statistics()
    assert st.skipped == 1 and st.stages[0].crashes == 1 and accounted(st) == 20


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4, 10))
def test_sigkill_storm(seed):
    """Many kills, also between a worker's get and its status record (the
    stall detector must find those items)."""
    got, st, killer = run_with_kills("fork", seed, n=1500, kills=12, workers=(2, 2))
    n = st.source_items
    assert len(got) == len(set(got)) and sorted(got) == [x * x for x in range(n)]
    assert accounted(st) == n and st.with_output == n


def test_item_lost_with_a_killed_worker_is_found_and_fed_again():
    """A worker killed after taking an item from its queue but before
    recording it: the item is in no queue and no status row.  Simulated by
    taking a message from stage 0's queue by hand, then killing a worker: the
    stall detector must feed the item again."""
    with shmq.Pipeline(range(40), start_method="fork").map(busy_identity, workers=2).map(square) as pipe:
        it = iter(pipe)
        got = [next(it)]
        stolen = pipe._queues[0].get(timeout=5)  # (DATA, seq, item): now held by nobody
        os.kill(pipe._stages[1].procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        got += list(it)
        st = pipe.statistics()
    assert time.monotonic() - t0 < 5
    assert sorted(got) == [x * x for x in range(40)], stolen
    assert st.crash_retries >= 1 and accounted(st) == 40


def three_children(x):
    time.sleep(0.002)
    return [(x, 0), (x, 1), (x, 2)] if x % 4 else []


@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_in_ordered_flat_map_delivers_every_child_once(seed):
    """Children of a re-fed item that already arrived are dropped by their
    position; the order stays the source order."""
    n = 300
    pipe = (
        shmq.Pipeline(range(n), start_method="fork")
        .map(busy_identity, workers=2, ordered=True, max_in_flight=16)
        .flat_map(three_children, workers=2, max_in_flight=16)
    )
    killer = Killer(pipe, seed, kills=3)
    with pipe:
        it = iter(pipe)
        got = [next(it)]
        killer.start()
        got += list(it)
        killer.stop.set()
        killer.join(5)
        st = pipe.statistics()
    assert got == [(x, i) for x in range(n) if x % 4 for i in range(3)], f"seed {seed}"
    assert st.empty == n // 4 and st.with_output == n - n // 4 and accounted(st) == n
    assert 1 <= sum(s.crashes for s in st.stages) <= len(killer.killed)


def test_poison_item_in_an_ordered_pipeline_keeps_the_order():
    with shmq.Pipeline(range(40), start_method="fork").map(
        poison_13, workers=2, ordered=True, on_error="dead-letter", retries=1
    ) as pipe:
        got = list(pipe)
        st = pipe.statistics()
        assert pipe.dead_letters.get(timeout=5).item == 13
    assert got == [x for x in range(40) if x != 13]
    assert st.dead_letters == 1 and accounted(st) == 40


KILL_FLAG = [""]


def fail_some_and_die_once(x):
    if x % 10 == 3:
        raise ValueError(f"bad {x}")
    if x == 15_000 and not os.path.exists(KILL_FLAG[0]):
        open(KILL_FLAG[0], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_dead_letters_are_not_duplicated_by_a_crash(tmp_path):
    """Items dead-lettered by a worker that then dies holding them are fed
    again and fail again: the dead letters still hold each exactly once."""
    KILL_FLAG[0] = str(tmp_path / "killed")
    n = 20_000
    with shmq.Pipeline(range(n), start_method="fork").map(fail_some_and_die_once, on_error="dead-letter") as pipe:
        got = list(pipe)
        dead = []
        while not pipe.dead_letters.empty():
            dead.append(pipe.dead_letters.get(timeout=5).item)
        st = pipe.statistics()
    assert os.path.exists(KILL_FLAG[0])
    failing = [x for x in range(n) if x % 10 == 3]
    assert sorted(dead) == failing
    assert sorted(got) == [x for x in range(n) if x % 10 != 3]
    assert st.dead_letters == len(failing) == st.stages[0].dead_letters and accounted(st) == n

"""shmq.Pipeline back-pressure per stage: every stage holds at most its
``max_in_flight`` items -- queued for it plus held by its workers (results
waiting for room in the next stage included), counted by item also when
cheap items travel as runs -- so a slow stage slows everything before it, up
to the source, and an endless source runs in flat memory.

The stage's count is ``statistics().stages[k].in_flight``; the tests sample
it while the pipeline runs and check it never goes past the bound.
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

import shmq
from conftest import session_entries
from shmq import _pipeline_worker as W
from test_pipeline import assert_clean, worker_pids

pytestmark = pytest.mark.timeout(90)


def inc(x):
    return x + 1


def slow(x):
    time.sleep(0.002)
    return x


def double(x):
    return 2 * x


def stuck_now_and_then(x):
    if x % 5000 == 4999:
        time.sleep(0.2)  # runs pile up before this stage meanwhile
    return x


def slow_sink_stage(item):
    time.sleep(0.001)
    return item[0]


class Sampler(threading.Thread):
    """Iterates ``pipe`` into ``got`` while the test thread samples its
    statistics: the highest in_flight of every stage, with the bound the
    stage had at that moment."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe = pipe
        self.got = []

    def run(self):
        self.got.extend(self.pipe)

    def sample_until_done(self, timeout=60.0):
        pipe = self.pipe
        peaks = [0] * len(pipe._stages)
        over = []
        samples = 0
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            bounds = [s.max_in_flight for s in pipe._stages]
            st = pipe.statistics()
            after = [s.max_in_flight for s in pipe._stages]
            samples += 1
            for k, s in enumerate(st.stages):
                peaks[k] = max(peaks[k], s.in_flight)
                if s.in_flight > max(bounds[k], after[k]):
                    over.append((k, s.in_flight, bounds[k]))
            time.sleep(0.001)
        self.join(5)
        return peaks, over, samples


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_a_slow_stage_holds_at_most_its_max_in_flight(workers):
    """A cheap stage (runs of items) feeds a slow stage bounded at 4 items:
    the slow stage never holds more than 4, and the cheap stage never more
    than its own default bound (128) although its items travel in runs."""
    n = 1500
    pipe = (
        shmq.Pipeline(range(n), start_method="fork")
        .map(inc)
        .map(slow, workers=workers, max_in_flight=4)
        .map(double)
    )
    with pipe:
        sampler = Sampler(pipe)
        sampler.start()
        peaks, over, samples = sampler.sample_until_done()
        st = pipe.statistics()
        pids = worker_pids(pipe)
    assert sorted(sampler.got) == [2 * (x + 1) for x in range(n)]
    assert samples > 100
    assert not over, f"stages went past their bound: {over[:10]} (peaks {peaks})"
    assert peaks[1] >= 3, peaks  # (the slow stage was full: the bound did bind)
    assert [s.in_flight for s in st.stages] == [0, 0, 0]
    assert_clean(pids)


def test_runs_are_cut_to_a_small_max_in_flight():
    """Cheap stages with max_in_flight=64 pass runs (of up to 32 items); a
    stage stuck in fn for a while lets runs pile up before it only up to 64
    items (its queue alone would take 32 messages of 32 items)."""
    n = 30_000
    pipe = (
        shmq.Pipeline(range(n), start_method="fork")
        .map(inc, max_in_flight=64)
        .map(stuck_now_and_then, max_in_flight=64)
    )
    with pipe:
        sampler = Sampler(pipe)
        sampler.start()
        peaks, over, _ = sampler.sample_until_done()
        chunk = pipe._chunk
        pids = worker_pids(pipe)
    assert sorted(sampler.got) == [x + 1 for x in range(n)]
    assert chunk > 1, "no runs"
    assert not over, f"stages went past their bound: {over[:10]} (peaks {peaks})"
    assert peaks[1] > 32, peaks  # the stuck stage filled up (by item, not by message)
    assert_clean(pids)


def shm_bytes():
    total = 0
    for name in session_entries():
        try:
            total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def test_endless_source_with_a_slow_last_stage_runs_in_flat_memory():
    """An endless source of 256 KiB arrays (through the slot pools) and a
    slow last stage: after a warm-up the parent's RSS and the session's
    /dev/shm use stop growing, and the source stays a window ahead."""
    taken = [0]

    def endless():
        for i in itertools.count():
            taken[0] = i + 1
            yield (i, np.full(32 << 10, float(i)))  # 256 KiB

    proc = psutil.Process()
    pipe = (
        shmq.Pipeline(endless(), start_method="fork")
        .map(inc_first, workers=2, max_in_flight=16)
        .map(slow_sink_stage, max_in_flight=8)
    )
    with pipe:
        it = iter(pipe)
        got = 0
        t0 = time.monotonic()
        rss = []
        shm = []
        while time.monotonic() - t0 < 4.0:
            next(it)
            got += 1
            if got % 100 == 0:
                rss.append(proc.memory_info().rss)
                shm.append(shm_bytes())
        window = sum(s.max_in_flight for s in pipe._stages)
        assert taken[0] <= got + window + 1
        st = pipe.statistics()
        assert [s.in_flight <= s_.max_in_flight for s, s_ in zip(st.stages, pipe._stages)] == [True, True]
        pids = worker_pids(pipe)
    assert len(rss) >= 10, f"too few outputs ({got}) to judge"
    warm = len(rss) // 3
    assert max(rss[warm:]) - rss[warm] < 16 << 20, [r >> 20 for r in rss]
    assert max(shm[warm:]) <= shm[warm] + (1 << 20), [s >> 20 for s in shm]
    assert_clean(pids)


def inc_first(item):
    i, a = item
    return (i, a + 1.0)


KILL_AT = [-1]


def die_once_at(x):
    if x == KILL_AT[0] and not os.path.exists(KILL_FLAG[0]):
        open(KILL_FLAG[0], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.001)
    return x


KILL_FLAG = [""]


@pytest.mark.timeout(30)
def test_counts_lost_with_a_killed_worker_are_made_exact_again(tmp_path):
    """A worker killed between taking items off its queue and counting them
    leaves them counted in its stage for good: with as many lost as the
    stage's bound, nothing could enter it again.  After a crash the parent
    sets an empty, still stage's count back to 0.  (The lost count is made
    here by hand, as a kill at that instant would leave it.)"""
    KILL_AT[0] = 50
    KILL_FLAG[0] = str(tmp_path / "killed")
    n = 400
    pipe = shmq.Pipeline(range(n), start_method="fork").map(die_once_at, workers=2, max_in_flight=8)
    with pipe:
        it = iter(pipe)
        got = [next(it) for _ in range(100)]  # past the crash (item 50)
        assert pipe.statistics().stages[0].crashes == 1
        s = pipe._stages[0]
        # 8 items "taken and never counted": the stage looks full.  (The
        # parent's row of the table is written by this thread only.)
        s.words[s.workers * s.width + W.S_DONE] -= 8
        got += list(it)
        st = pipe.statistics()
        pids = worker_pids(pipe)
    assert sorted(got) == list(range(n))
    assert st.stages[0].in_flight == 0 and s.max_in_flight == 8
    assert_clean(pids)


def test_forkserver_workers_that_wait_are_not_orphans():
    """A worker started by the forkserver is the forkserver's child: waiting
    (for an item, or for room in the next stage) it must not take itself for
    an orphan and exit (it was then counted as a crash and replaced)."""

    def pausing():
        for i in range(10):
            time.sleep(0.005)  # (a sparse source: the feeder sends each item as it comes)
            yield i
        time.sleep(0.8)  # every worker waits for an item longer than its 0.5 s look at its parent
        yield from range(10, 20)

    pipe = shmq.Pipeline(pausing(), start_method="forkserver").map(inc, workers=2).map(slow, max_in_flight=2)
    with pipe:
        got = sorted(pipe)
        st = pipe.statistics()
        pids = worker_pids(pipe)
    assert got == [x + 1 for x in range(20)]
    assert [s.crashes for s in st.stages] == [0, 0] and st.crash_retries == 0
    assert_clean(pids)


@pytest.mark.parametrize("seed", [11, 12])
def test_random_kills_with_tight_bounds_lose_nothing_and_hang_not(seed):
    """Workers SIGKILLed at random while three producers share a stage's
    room of 6 items: every output exactly once, no stage ever past its bound
    when sampled, and every count back to 0 at the end."""
    from test_pipeline_crash import Killer

    n = 600
    pipe = (
        shmq.Pipeline(range(n), start_method="fork")
        .map(slow, workers=3, max_in_flight=6)
        .map(inc, workers=2, max_in_flight=6)
    )
    killer = Killer(pipe, seed, kills=3)
    with pipe:
        sampler = Sampler(pipe)
        sampler.start()
        killer.start()
        peaks, over, _ = sampler.sample_until_done()
        killer.stop.set()
        killer.join(5)
        st = pipe.statistics()
        pids = worker_pids(pipe)
    got = sampler.got
    assert killer.killed
    assert len(got) == len(set(got)) and sorted(got) == [x + 1 for x in range(n)]
    # (a kill leaves a count too high until the stage is next seen empty and
    # still; too low -- letting the stage hold more -- only for a kill in the
    # microseconds between a put and its count: see docs/pipelines.md)
    assert not over, f"stages went past their bound: {over[:10]} (peaks {peaks})"
    assert [s.in_flight for s in st.stages] == [0, 0]
    assert_clean(pids + killer.killed)

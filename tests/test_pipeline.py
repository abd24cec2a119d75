"""shmq.Pipeline: building, running, ordering, back-pressure, errors, stopping.

Real worker processes under fork, spawn and forkserver.  Every test checks at
its end that the workers are gone and that nothing of the session is left in
/dev/shm (``assert_clean``).  Crash recovery: tests/test_pipeline_crash.py.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmq
from conftest import session_entries

pytestmark = pytest.mark.timeout(60)


# -- stage functions (module level: spawn pickles them by name) -------------------------
def square(x):
    return x * x


def is_odd(x):
    return x % 2 == 1


def repeat_mod3(x):
    return [x] * (x % 3)


def slow_identity(x):
    time.sleep(0.002)
    return x


def very_slow(x):
    time.sleep(0.05)
    return x


def fail_on_7(x):
    if x == 7:
        raise KeyError(f"no key {x}")
    return x


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle me")


def fail_unpicklable(x):
    if x == 3:
        raise Unpicklable("odd one")
    return x


_calls = {}


def flaky(x):
    """Fails the first two calls for every multiple of 5 (per worker process)."""
    n = _calls[x] = _calls.get(x, 0) + 1
    if x % 5 == 0 and n <= 2:
        raise ConnectionError(f"flaky {x} call {n}")
    return x


_model = None
_init_calls = 0


def load_model():
    global _model, _init_calls
    _init_calls += 1
    _model = {"scale": 3}


def predict(x):
    return (os.getpid(), _init_calls, x * _model["scale"])


def bad_init():
    raise RuntimeError("model file missing")


def decode(i):
    return np.full((256, 256), i, dtype=np.float32)  # 256 KiB: through the slot pool


def shrink(a):
    return a[::2, ::2].copy()


def batch_sum(xs):
    return [x + 1 for x in xs]


# -- helpers -----------------------------------------------------------------------------------
def worker_pids(pipe):
    return [p.pid for s in pipe._stages for p in s.procs if p is not None]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def assert_clean(pids, within=2.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids) and not session_entries():
            return
        time.sleep(0.02)
    assert not [p for p in pids if alive(p)], "workers left running"
    assert not session_entries(), f"left in /dev/shm: {session_entries()}"


def accounted(st):
    return st.with_output + st.filtered + st.skipped + st.dead_letters + st.empty + st.merged + st.in_flight


# -- building and running ------------------------------------------------------------------------
def test_map_filter_every_start_method(ctx):
    method = ctx.get_start_method()
    pipe = shmq.Pipeline(range(200), start_method=method).map(square, workers=2).filter(is_odd)
    with pipe:
        got = list(pipe)
        pids = worker_pids(pipe)
        st = pipe.statistics()
    assert sorted(got) == [x * x for x in range(200) if x % 2]
    assert st.source_items == 200 and st.outputs == 100 and st.filtered == 100 and accounted(st) == 200
    assert [s.items_in for s in st.stages] == [200, 200] and st.stages[1].filtered == 100
    assert st.bottleneck in ("0:square", "1:is_odd")
    assert_clean(pids)


def test_ordered_across_filter_and_flat_map():
    pipe = (
        shmq.Pipeline(range(300), start_method="fork")
        .map(slow_identity, workers=3, ordered=True)
        .filter(is_odd, workers=2)
        .flat_map(repeat_mod3, workers=2)
    )
    with pipe:
        got = list(pipe)
        st = pipe.statistics()
    assert got == [y for x in range(300) if x % 2 for y in repeat_mod3(x)]
    assert st.empty == 50 and st.filtered == 150 and accounted(st) == 300


def test_ordered_window_bounds_memory():
    """ordered: the feeder never runs more than the window ahead of the
    oldest item not yet yielded, even when that item is slow."""
    taken = []

    def source():
        for i in range(200):
            taken.append(i)
            yield i

    pipe = shmq.Pipeline(source(), start_method="fork").map(slow_identity, workers=2, ordered=True, max_in_flight=8)
    with pipe:
        for i, out in enumerate(pipe):
            assert out == i
            assert len(taken) - i <= 8 + 1


def test_batch_and_unbatch():
    pipe = shmq.Pipeline(range(50), start_method="fork").batch(8).map(batch_sum, ordered=True).unbatch()
    with pipe:
        assert list(pipe) == [x + 1 for x in range(50)]
        st = pipe.statistics()
    assert st.with_output == 50 and accounted(st) == 50


def test_batch_without_unbatch_yields_lists():
    pipe = shmq.Pipeline(range(20), start_method="fork").batch(5, linger=0.01).map(sum, ordered=True)
    with pipe:
        got = list(pipe)
        st = pipe.statistics()
    assert sum(got) == sum(range(20)) and len(got) <= 20
    assert st.with_output + st.merged == 20 and accounted(st) == 20


def test_init_runs_once_per_worker():
    pipe = shmq.Pipeline(range(60), start_method="spawn").map(predict, workers=2, init=load_model)
    with pipe:
        got = list(pipe)
    assert sorted(v for _, _, v in got) == [3 * x for x in range(60)]
    assert {calls for _, calls, _ in got} == {1}


def test_numpy_arrays_through_the_slot_pool():
    pipe = shmq.Pipeline(range(40), start_method="forkserver").map(decode, workers=2).map(shrink)
    with pipe:
        got = sorted((int(a[0, 0]), a.shape) for a in pipe)
        pids = worker_pids(pipe)
    assert got == [(i, (128, 128)) for i in range(40)]
    assert_clean(pids)


def test_run_with_sink():
    seen = []
    with shmq.Pipeline(range(10), start_method="fork").map(square) as pipe:
        assert pipe.run(seen.append) == 10
    assert sorted(seen) == [x * x for x in range(10)]


def test_bad_arguments():
    p = shmq.Pipeline(range(3))
    with pytest.raises(ValueError, match=r"^'workers' must be a positive int, got 0$"):
        p.map(square, workers=0)
    with pytest.raises(ValueError, match=r"^'on_error' must be one of"):
        p.map(square, on_error="ignore")
    with pytest.raises(TypeError, match=r"^'fn' must be callable, got int$"):
        p.map(3)
    with pytest.raises(ValueError, match=r"^the pipeline has no stage"):
        list(p)
    p.close()


# -- back-pressure and endless sources ---------------------------------------------------------
def test_infinite_source_with_islice():
    taken = []

    def endless():
        for i in itertools.count():
            taken.append(i)
            yield i

    pipe = shmq.Pipeline(endless(), start_method="fork").map(square, workers=2).map(slow_identity)
    with pipe:
        got = list(itertools.islice(pipe, 300))
        pids = worker_pids(pipe)
        window = sum(s.max_in_flight for s in pipe._stages)
        assert len(got) == 300
        assert len(taken) <= 300 + window + 1  # the source ran at most one window ahead
    assert_clean(pids)


def test_slow_last_stage_slows_the_source():
    taken = []

    def source():
        for i in itertools.count():
            taken.append(i)
            yield i

    pipe = shmq.Pipeline(source(), start_method="fork").map(square, workers=2, max_in_flight=4).map(very_slow, max_in_flight=2)
    with pipe:
        it = iter(pipe)
        for _ in range(10):
            next(it)
        time.sleep(0.3)  # give the source every chance to run ahead
        assert len(taken) <= 10 + 4 + 2 + 1
        st = pipe.statistics()
        assert st.in_flight <= 6 and st.bottleneck == "1:very_slow"


# -- errors ----------------------------------------------------------------------------------------
def test_raise_gives_the_original_exception_and_stops():
    pipe = shmq.Pipeline(range(100), start_method="fork").map(fail_on_7, workers=2).map(square)
    t0 = time.monotonic()
    with pytest.raises(KeyError) as info:
        with pipe:
            for _ in pipe:
                pass
    pids = worker_pids(pipe) or []
    assert "no key 7" in str(info.value)
    assert "fail_on_7" in str(info.value.__cause__)  # the remote traceback
    assert any("0:fail_on_7" in n for n in getattr(info.value, "__notes__", ["0:fail_on_7"]))
    assert time.monotonic() - t0 < 10
    assert_clean(pids)


def test_unpicklable_exception_is_a_remote_error():
    with pytest.raises(shmq.RemoteError, match=r"Unpicklable: odd one") as info:
        with shmq.Pipeline(range(10), start_method="fork").map(fail_unpicklable) as pipe:
            list(pipe)
    assert info.value.type_name.endswith("Unpicklable") and "fail_unpicklable" in info.value.remote_traceback


def test_skip():
    with shmq.Pipeline(range(20), start_method="fork").map(fail_on_7, workers=2, on_error="skip") as pipe:
        got = sorted(pipe)
        st = pipe.statistics()
    assert got == [x for x in range(20) if x != 7]
    assert st.skipped == 1 and st.stages[0].skipped == 1 and accounted(st) == 20


def test_retry_then_success():
    with shmq.Pipeline(range(20), start_method="fork").map(flaky, on_error="retry", retries=2, backoff=0.001) as pipe:
        got = sorted(pipe)
        st = pipe.statistics()
    assert got == list(range(20))
    assert st.stages[0].retries == 8  # 0, 5, 10, 15: two retries each


def test_retry_exhausted_raises():
    with pytest.raises(ConnectionError, match=r"flaky 0 call 2"):
        with shmq.Pipeline(range(20), start_method="fork").map(flaky, on_error="retry", retries=1) as pipe:
            list(pipe)


def test_dead_letters_attach_by_name():
    with shmq.Pipeline(range(30), start_method="fork").map(fail_on_7, workers=2, on_error="dead-letter") as pipe:
        got = sorted(pipe)
        st = pipe.statistics()
        name = pipe.dead_letters.name
        code = (
            "import shmq; q = shmq.Queue.attach(%r); d = q.get(timeout=5); "
            "print(d.item, d.stage, d.exc_type, d.attempts, 'fail_on_7' in d.traceback, d.message); q.close()" % name
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:5] == ["7", "0:fail_on_7", "KeyError", "1", "True"]
    assert got == [x for x in range(30) if x != 7] and st.dead_letters == 1 and accounted(st) == 30


def test_init_failure_raises():
    with pytest.raises(RuntimeError, match=r"model file missing"):
        with shmq.Pipeline(range(5), start_method="fork").map(square, init=bad_init) as pipe:
            list(pipe)


def test_source_error_raises():
    def source():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match=r"^disk gone$"):
        with shmq.Pipeline(source(), start_method="fork").map(square) as pipe:
            list(pipe)


# -- stopping ------------------------------------------------------------------------------------
def test_close_mid_stream():
    pipe = shmq.Pipeline(itertools.count(), start_method="fork").map(slow_identity, workers=2).map(square)
    it = iter(pipe)
    assert [next(it) for _ in range(5)] is not None
    pids = worker_pids(pipe)
    assert pids and all(alive(p) for p in pids)
    t0 = time.monotonic()
    pipe.close()
    assert time.monotonic() - t0 < 2.0
    assert_clean(pids)
    pipe.close()  # idempotent
    with pytest.raises(ValueError, match=r"^a pipeline runs once$"):
        iter(pipe)


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import itertools, sys, time
    import shmq

    def slow(x):
        time.sleep(0.01)
        return x

    if __name__ == "__main__":
        pipe = shmq.Pipeline(itertools.count(), start_method=sys.argv[1]).map(slow, workers=2).map(slow)
        for i, out in enumerate(pipe):
            if i == 3:
                print(" ".join(str(p.pid) for s in pipe._stages for p in s.procs), flush=True)
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_ctrl_c_stops_everything(tmp_path, method):
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    with subprocess.Popen(
        [sys.executable, str(script), method], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ
    ) as proc:
        try:
            line = proc.stdout.readline()
            pids = [int(p) for p in line.split()]
            assert len(pids) == 3, line
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            _, err = proc.communicate(timeout=10)
            assert time.monotonic() - t0 < 3.0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert_clean(pids)


def pid_after_sleep(x):
    time.sleep(0.03)
    return os.getpid()


def test_slow_items_are_shared_among_workers():
    """A worker takes many cheap items at once, but slow ones one at a time:
    every worker of a slow stage gets a share."""
    with shmq.Pipeline(range(24), start_method="fork").map(pid_after_sleep, workers=3) as pipe:
        t0 = time.monotonic()
        pids = list(pipe)
        elapsed = time.monotonic() - t0
    counts = sorted(pids.count(p) for p in set(pids))
    # taken in runs, one worker would get them all (see the worker's take_now)
    assert len(counts) == 3 and counts[0] >= 2, counts
    assert elapsed < 24 * 0.03  # faster than one worker alone (ideal: a third of it)


PROGRESS_SCRIPT = textwrap.dedent(
    """
    import time
    import shmq

    def slow(x):
        time.sleep(0.01)
        return x

    if __name__ == "__main__":
        with shmq.Pipeline(range(100), start_method="fork", progress=True).map(slow, workers=2) as pipe:
            assert sorted(pipe) == list(range(100))
    """
)


def test_progress_line_on_a_terminal(tmp_path):
    import pty

    script = tmp_path / "progress.py"
    script.write_text(PROGRESS_SCRIPT)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, str(script)], stderr=slave, timeout=30, env=os.environ)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert "0:slow: " in text and "busy" in text and "| out " in text


def returns_a_lock(x):
    import threading

    return threading.Lock() if x == 4 else x


def test_an_output_that_does_not_pickle_raises_in_the_caller():
    with pytest.raises(TypeError, match=r"lock"):
        with shmq.Pipeline(range(10), start_method="fork").map(returns_a_lock, workers=2) as pipe:
            list(pipe)


def test_a_stage_that_cannot_start_leaves_nothing():
    pipe = shmq.Pipeline(range(5), start_method="spawn").map(square).map(lambda x: x)
    with pytest.raises(Exception, match=r"(?i)pickle|lambda"):
        list(pipe)
    pids = worker_pids(pipe)
    pipe.close()
    assert_clean(pids)


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import itertools, sys, time
    import shmq

    def inc(x):
        return x + 1

    if __name__ == "__main__":
        pipe = shmq.Pipeline(itertools.count(), start_method="fork").map(inc, workers=2).map(inc)
        it = iter(pipe)
        next(it)
        print(" ".join(str(p.pid) for s in pipe._stages for p in s.procs), flush=True)
        time.sleep(60)  # the queues fill up: every worker blocks in put
    """
)


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    tag = "o" + os.urandom(2).hex()
    env = dict(os.environ, SHMQ_NAME_TAG=tag)  # its leaked segments are ours to remove
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            pids = [int(p) for p in proc.stdout.readline().split()]
            assert len(pids) == 3
            time.sleep(0.2)  # let them block
            proc.kill()
            proc.wait(5)
            deadline = time.monotonic() + 3.0
            while any(alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not [p for p in pids if alive(p)], "orphaned workers still running"
        finally:
            for p in locals().get("pids", []):
                if alive(p):
                    os.kill(p, signal.SIGKILL)
            for entry in os.listdir("/dev/shm"):
                if f"shmq_{tag}_" in entry:
                    os.unlink(os.path.join("/dev/shm", entry))


def always_fails(x):
    raise ValueError(f"bad {x}" + "!" * 200)


def test_full_dead_letters_stop_the_pipeline():
    pipe = shmq.Pipeline(range(500), start_method="fork", dead_letters_capacity_bytes=4096)
    with pytest.raises(shmq.Full, match=r"dead letters queue .* is full"):
        with pipe.map(always_fails, on_error="dead-letter"):
            list(pipe)

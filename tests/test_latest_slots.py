"""shmq.Latest with a slot pool: large arrays travel zero-copy; a slot is
freed only when no reader holds a view of it and a newer value replaced it;
setters never wait; nothing torn, also when setters or readers are SIGKILLed."""
from __future__ import annotations

import gc
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmq
from shmq import _layout as L

from conftest import join_all, unique_name

FRAME = (1080, 1920, 3)  # 6 MiB of uint8
MIB = 1 << 20
_made = []


def _latest(*args, **kwargs):
    latest = shmq.Latest(*args, **kwargs)
    _made.append(latest)
    return latest


@pytest.fixture(autouse=True)
def _unlink_made():
    yield
    while _made:
        _made.pop().unlink()


def _frame(k, shape=(256, 1024)):
    """An array every byte of which says k (a torn one would not)."""
    return np.full(shape, k % 251, np.uint8)


def _check_frame(k, a):
    assert a.min() == a.max() == k % 251, f"torn or reused value {k}"


def _in_use(latest):
    return latest.statistics().slots_in_use


def _slot_message(latest):
    """True if the newest value travels through slots (not pickled into the cell)."""
    got = latest._cell.try_read()
    return got is not None and got[1][0] == 0


# -- one process ----------------------------------------------------------------
def test_arrays_are_read_only_zero_copy_views():
    latest = _latest(64 << 10, slot_size=8 * MIB, slot_count=4)
    frame = np.random.default_rng(1).integers(0, 255, FRAME, dtype=np.uint8)
    assert latest.set(frame) == 1 and _slot_message(latest)
    a, b = latest.get(), latest.get()
    assert a.shape == FRAME and a.dtype == np.uint8 and np.array_equal(a, frame)
    assert np.shares_memory(a, b)  # two gets of one version: the same slot
    assert not np.shares_memory(a, frame)
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1
    copy = np.array(a)
    copy[0, 0, 0] ^= 1  # np.array() copies: private and writable
    assert latest.statistics().value_bytes < 1024  # the cell holds the slot message only

    value = {"frame": frame, "meta": {"t": 1.5}, "parts": [np.arange(100_000.0), (np.ones(20_000),)],
             "small": np.arange(10)}
    version = latest.set(value)
    got_version, got = latest.get_versioned()
    assert got_version == version
    assert np.array_equal(got["frame"], frame) and not got["frame"].flags.writeable
    assert got["meta"] == {"t": 1.5}
    assert got["parts"][0][99_999] == 99_999.0 and not got["parts"][0].flags.writeable
    assert got["parts"][1][0].sum() == 20_000.0 and not got["parts"][1][0].flags.writeable
    assert np.array_equal(got["small"], np.arange(10))  # under 64 KiB: pickled in the cell
    again = latest.get()
    assert np.shares_memory(got["frame"], again["frame"])
    assert np.shares_memory(got["parts"][0], again["parts"][0])

    assert latest.set({"no": "arrays"}) == version + 1 and not _slot_message(latest)
    assert latest.get() == {"no": "arrays"}
    del a, b, got, again
    latest.close()


def test_slots_return_once_replaced_and_no_view_is_left():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    for k in range(20):  # nobody keeps a view: the setter needs two slots
        latest.set(_frame(k))
        _check_frame(k, latest.get())
        assert _in_use(latest) <= 2
    views = [(k, latest.get()) for k in [19]]
    for k in range(20, 23):  # a view of each: they stay in use
        latest.set(_frame(k))
        views.append((k, latest.get()))
    assert _in_use(latest) == 4
    for k, v in views:
        _check_frame(k, v)
    del views, v
    gc.collect()
    latest.set(_frame(23))  # the setter takes the released slots back (all
    assert _in_use(latest) <= 2  # but the one of value 22, freed at its next set)
    latest.close()


def test_setter_falls_back_to_pickling_when_readers_hold_every_slot():
    latest = _latest(512 << 10, slot_size=MIB, slot_count=2)
    latest.set(_frame(1))
    v1 = latest.get()
    latest.set(_frame(2))
    v2 = latest.get()  # every slot is held by a view now
    assert _in_use(latest) == 2
    t0 = time.monotonic()
    version = latest.set(_frame(3))  # does not wait: pickled into the cell
    assert time.monotonic() - t0 < 0.5
    assert not _slot_message(latest)
    v3 = latest.get()
    _check_frame(3, v3)
    assert v3.flags.writeable  # a private copy, as any pickle gives
    # a value whose pickle does not fit either: Full, nothing set
    with pytest.raises(shmq.Full, match="no free slot"):
        latest.set(_frame(4, (1000, 1024)))
    assert latest.version == version
    _check_frame(1, v1)
    _check_frame(2, v2)
    del v1, v2
    latest.set(_frame(5))  # slots again
    assert _slot_message(latest)
    _check_frame(5, latest.get())
    # more arrays than slots: pickled as well
    latest.set([_frame(6, (100, 1024)) for _ in range(3)])
    assert not _slot_message(latest)
    # an array larger than slot_size stays in the pickle (MessageTooLarge if that cannot fit)
    with pytest.raises(shmq.MessageTooLarge):
        latest.set(_frame(7, (2, MIB)))
    latest.close()


def test_a_closed_setters_value_stays_readable_and_its_slots_return():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    other = shmq.Latest.attach(latest.name)
    for k in range(1, 4):
        other.set(_frame(k))
    other.close()  # gives its holds back, the newest value's too
    view = latest.get()
    _check_frame(3, view)
    for k in range(4, 8):  # this setter holds value 3 first, then frees the closed one's slots
        latest.set(_frame(k))
        _check_frame(k, latest.get())
    _check_frame(3, view)
    del view
    t0 = time.monotonic()
    k = 8
    while _in_use(latest) > 2:  # the closed member's last slot: the janitor, within 1 s
        assert time.monotonic() - t0 < 1.0, f"{_in_use(latest)} slots in use"
        latest.set(_frame(k))
        k += 1
        time.sleep(0.01)
    latest.close()


def test_reader_entries_are_freed_by_close_and_by_collection():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    latest.set(_frame(1))
    # more handles than entries, one at a time (each takes a pool member
    # too, reused once it closed: see test_short_lived_readers_...)
    for _ in range(L.L_READERS + 8):
        other = shmq.Latest.attach(latest.name)
        _check_frame(1, other.get())
        other.close()
    assert latest.statistics().readers == 0
    other = shmq.Latest.attach(latest.name)
    _check_frame(1, other.get())
    assert latest.statistics().readers == 1
    with pytest.warns(ResourceWarning):  # (unclosed: the segments say so)
        del other
        gc.collect()
    assert latest.statistics().readers == 0
    latest.close()


def test_views_outlive_their_closed_handle():
    # In a child: a crash would kill the interpreter, not the test session.
    code = textwrap.dedent(
        """
        import gc, numpy as np, shmq
        latest = shmq.Latest(64 << 10, slot_size=1 << 20, slot_count=2)
        reader = shmq.Latest.attach(latest.name)
        latest.set({"a": np.full((512, 512), 3.0, np.float32)})
        value = reader.get()
        mine = latest.get()["a"]
        reader.close()
        latest.unlink(); latest.close()
        gc.collect()
        print(float(value["a"].sum()), float(mine.sum()))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(3.0 * 512 * 512)] * 2


def test_statistics_pickling_and_shmq_stat():
    latest = _latest(64 << 10, name=unique_name("ls"), slot_size=MIB, slot_count=3)
    latest.set(_frame(1))
    stats = latest.statistics()
    assert (stats.slot_size, stats.slot_count, stats.slots_in_use, stats.version) == (MIB, 3, 1, 1)
    other = pickle.loads(pickle.dumps(latest))  # attaches by name, pool too
    view = other.get()
    assert np.shares_memory(view, other.get())  # (each handle maps the pool at its own address)
    assert other.statistics().readers >= 1
    other.set(_frame(2))  # another handle sets: it holds value 1 until nobody pins it
    _check_frame(2, latest.get())
    _check_frame(1, view)
    done = subprocess.run([sys.executable, "-m", "shmq", "stat", latest.name], env=dict(os.environ),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert latest.name in done.stdout
    del view
    other.close()
    latest.close()


def test_a_reader_maps_the_pool_only_when_a_value_travels_through_it():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=2)
    latest.set({"small": 1})
    other = shmq.Latest.attach(latest.name)
    assert other.get() == {"small": 1}
    assert other._pool is None and latest.statistics().readers == 0
    latest.set(_frame(1))
    _check_frame(1, other.get())
    assert other._pool is not None and latest.statistics().readers == 1
    other.close()
    latest.close()


def test_bad_slot_arguments():
    with pytest.raises(ValueError, match="'slot_size'"):
        shmq.Latest(slot_size=0)
    with pytest.raises(ValueError, match="'slot_count'"):
        shmq.Latest(slot_size=MIB, slot_count=0)


def test_reading_threads_and_a_setting_thread():
    import threading

    latest = _latest(64 << 10, slot_size=MIB, slot_count=6)
    latest.set({"k": 0, "a": _frame(0)})
    stop = threading.Event()
    errors = []

    def read():
        try:
            while not stop.is_set():
                v = latest.get()
                _check_frame(v["k"], v["a"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for k in range(1, 300):
        latest.set({"k": k, "a": _frame(k)})
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors
    latest.close()


# -- other processes ----------------------------------------------------------------
def _child_reader(latest, results):
    version, value = latest.wait(newer_than=0, timeout=30)
    a = value["frame"]
    results.put((version, value["k"], int(a[0, 0, 0]), int(a.min()), int(a.max()), a.flags.writeable,
                 a.shape))
    latest.close()


def test_readers_in_children(ctx):
    latest = _latest(64 << 10, slot_size=8 * MIB, slot_count=4)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child_reader, args=(latest, results)) for _ in range(2)]
    for p in procs:
        p.start()
    latest.set({"k": 5, "frame": np.full(FRAME, 5, np.uint8)})
    outs = [results.get(timeout=60) for _ in procs]
    join_all(procs)
    assert outs == [(1, 5, 5, 5, 5, False, FRAME)] * 2
    latest.close()


def test_unrelated_process_attaches_by_name():
    latest = _latest(64 << 10, slot_size=8 * MIB, slot_count=4)
    latest.set({"k": 1, "frame": np.full(FRAME, 1, np.uint8)})
    script = textwrap.dedent(
        f"""
        import numpy as np, shmq
        latest = shmq.Latest.attach({latest.name!r})
        v = latest.get()
        print(v["k"], int(v["frame"].sum() // v["frame"].size), v["frame"].flags.writeable, flush=True)
        version, v = latest.wait(newer_than=1, timeout=30)
        a = v["frame"]
        print(version, v["k"], int(a.min()), int(a.max()), np.shares_memory(a, latest.get()["frame"]), flush=True)
        latest.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=dict(os.environ), text=True)
    try:
        assert proc.stdout.readline().split() == ["1", "1", "False"]
        latest.set({"k": 2, "frame": np.full(FRAME, 2, np.uint8)})
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == ["2", "2", "2", "2", "True"]
    assert proc.returncode == 0
    latest.close()


def _sampler(name, done, counts, keep):
    """Reads until ``done``; keeps the last ``keep`` values and re-checks them."""
    latest = shmq.Latest.attach(name)
    kept = []
    n = 0
    try:
        while not done.is_set():
            v = latest.get()
            _check_frame(v["k"], v["a"])
            kept.append(v)
            if len(kept) > keep:
                kept.pop(0)
            for old in kept:
                _check_frame(old["k"], old["a"])
            n += 1
    except Exception as exc:
        counts.put(repr(exc))
        raise
    counts.put(n)
    latest.close()


def test_slots_return_while_a_reader_samples(ctx):
    """1000 versions through 4 slots while a reader keeps one view: the
    setter never blocks, never fails, and every kept view stays whole."""
    latest = _latest(1 * MIB, slot_size=MIB, slot_count=4)
    latest.set({"k": 0, "a": _frame(0)})
    done, counts = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_sampler, args=(latest.name, done, counts, 1))
    p.start()
    pool = latest._pool
    allocations0 = pool.statistics().allocations
    slowest = 0.0
    try:
        deadline = time.monotonic() + 30
        while latest.statistics().readers == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        for k in range(1, 1001):
            t0 = time.monotonic()
            latest.set({"k": k, "a": _frame(k)})
            slowest = max(slowest, time.monotonic() - t0)
    finally:
        done.set()
    reads = counts.get(timeout=60)
    join_all([p])
    assert isinstance(reads, int), reads
    through_slots = pool.statistics().allocations - allocations0
    assert reads > 0
    assert slowest < 0.5, f"a set took {slowest:.3f} s"
    # pickled only when the reader was descheduled while it pinned a value three sets old
    assert through_slots >= 900, f"only {through_slots} of 1000 values went through slots"
    gc.collect()
    latest.set({"k": 1001, "a": _frame(1001)})
    assert _in_use(latest) <= 2  # the reader's views died with it
    latest.close()


def _keep_views(name, ready, count):
    latest = shmq.Latest.attach(name)
    views = []
    for _ in range(count):
        version, value = latest.wait(newer_than=len(views) and views[-1][0], timeout=30)
        views.append((version, value))
        ready.put(version)
    time.sleep(60)  # holding them until killed


def test_reader_sigkilled_holding_views(ctx):
    latest = _latest(1 * MIB, slot_size=MIB, slot_count=4)
    ready = ctx.Queue()
    p = ctx.Process(target=_keep_views, args=(latest.name, ready, 3))
    p.start()
    for k in range(1, 4):
        latest.set(_frame(k))
        assert ready.get(timeout=60) == k
    latest.set(_frame(4))
    assert _in_use(latest) == 4  # three views in the reader, the newest value
    os.kill(p.pid, signal.SIGKILL)
    join_all([p])
    t0 = time.monotonic()
    k = 5
    while True:  # the setter needs slots now: it gets them back within 1 s
        latest.set(_frame(k))
        k += 1
        if _slot_message(latest) and _in_use(latest) <= 2:
            break
        assert time.monotonic() - t0 < 1.0, f"slots of the dead reader not back after 1 s ({_in_use(latest)} in use)"
        time.sleep(0.01)
    _check_frame(k - 1, latest.get())
    latest.close()


def _pin_and_die(name):
    latest = shmq.Latest.attach(name)
    cell = latest._cell
    cell.pin(latest._reader_entry(cell), latest.version)  # as if killed inside get()
    os.kill(os.getpid(), signal.SIGKILL)


def test_reader_sigkilled_while_pinning(ctx):
    latest = _latest(1 * MIB, slot_size=MIB, slot_count=3)
    latest.set(_frame(1))
    p = ctx.Process(target=_pin_and_die, args=(latest.name,))
    p.start()
    join_all([p])
    assert any(pin == 1 for *_, pin in latest._cell.pins())
    t0 = time.monotonic()
    k = 2
    while True:  # value 1 stays held while pinned; the dead pin goes within 1 s
        latest.set(_frame(k))
        _check_frame(k, latest.get())
        k += 1
        if not latest._cell.pins() and _in_use(latest) <= 2:
            break
        assert time.monotonic() - t0 < 1.0, "the dead reader's pin still holds its value after 1 s"
        time.sleep(0.01)
    latest.close()


def _set_and_die(name, k):
    latest = shmq.Latest.attach(name)
    latest.set(_frame(k))
    os.kill(os.getpid(), signal.SIGKILL)  # its holds of value k die with it


def test_a_dead_setters_newest_value_stays_readable(ctx):
    """The newest value's setter died: no live process holds its slots, and
    the pool's janitor (run inside this setter's pool calls) would free them
    while it is still the value readers get.  This setter holds them first."""
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    latest.set(_frame(1))
    view = latest.get()  # value 1's slot stays out: this process's pool calls run the janitor
    p = ctx.Process(target=_set_and_die, args=(latest.name, 2))
    p.start()
    join_all([p])
    end = time.monotonic() + 0.5  # a few RECLAIM_INTERVALs
    while time.monotonic() < end:
        with pytest.raises(shmq.MessageTooLarge):  # calls into the pool (its janitor), then sets nothing:
            latest.set(np.zeros(2 * MIB, np.uint8))  # larger than a slot, and than the cell
        _check_frame(2, latest.get())
    latest.set(_frame(3))
    _check_frame(3, latest.get())
    _check_frame(1, view)
    latest.close()


def _send_and_die(name):
    latest = shmq.Latest.attach(name)
    latest._ensure_pool()
    latest._codec.encode(_frame(9), timeout=0)  # a slot filled and marked sent...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and killed before set() holds it


def test_a_slot_a_setter_was_killed_between_sending_and_holding_comes_back(ctx):
    latest = _latest(64 << 10, slot_size=MIB, slot_count=3)
    p = ctx.Process(target=_send_and_die, args=(latest.name,))
    p.start()
    join_all([p])
    assert _in_use(latest) == 1  # sent, never held by anybody
    views = []
    for k in (1, 2):  # values 1 and 2 keep the two other slots
        latest.set(_frame(k))
        views.append(latest.get())
    t0 = time.monotonic()
    latest.set(_frame(3))  # needs the third slot: the orphan
    assert _slot_message(latest), "the dead setter's slot did not come back"
    assert time.monotonic() - t0 < 1.0
    views.append(latest.get())
    for k, view in enumerate(views, 1):
        _check_frame(k, view)
    latest.close()


def _set_forever(name, first, size):
    latest = shmq.Latest.attach(name)
    rng = random.Random(first)
    k = first
    while True:
        latest.set({"k": k, "a": _frame(k, (rng.choice(size), 1024))})
        k += 1


def test_no_torn_read_when_setters_are_sigkilled_on_the_slot_path(ctx):
    """Two setters of slot values (128 KiB .. 1 MiB) are SIGKILLed at
    random points while this process reads and keeps views: every value
    read is whole and stays whole, the version never goes back, after each
    kill the value is the last complete one, and the dead setters' slots
    come back."""
    latest = _latest(2 * MIB, slot_size=MIB, slot_count=8)  # (a fallback pickle fits the cell)
    latest.set({"k": 0, "a": _frame(0)})
    rng = random.Random(4321)
    last_version = 0
    kept = []
    first = 1
    for round_ in range(4):
        procs = [ctx.Process(target=_set_forever, args=(latest.name, first + j * 100_000_000, (128, 512, 1024)))
                 for j in range(2)]
        for p in procs:
            p.start()
        start_version = latest.version
        deadline = time.monotonic() + 30
        while latest.version < start_version + 10:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        kill_at = time.monotonic() + rng.uniform(0.0, 0.1)
        while time.monotonic() < kill_at:
            version, value = latest.get_versioned()
            assert version >= last_version
            last_version = version
            _check_frame(value["k"], value["a"])
            kept = (kept + [value])[-3:]
            for old in kept:
                _check_frame(old["k"], old["a"])
        for p in rng.sample(procs, 2):
            os.kill(p.pid, signal.SIGKILL)
        join_all(procs)
        version, value = latest.get_versioned()
        assert version >= last_version
        last_version = version
        _check_frame(value["k"], value["a"])
        for old in kept:
            _check_frame(old["k"], old["a"])
        first = value["k"] + 1_000_000_000
        # this process sets between rounds: it adopts the dead setter's value first
        latest.set({"k": first - 1, "a": _frame(first - 1)})
        _check_frame(first - 1, latest.get()["a"])
        for old in kept:
            _check_frame(old["k"], old["a"])
    kept, value = [], None
    gc.collect()
    # The dead setters' slots (loaned mid-write, held for their values, sent
    # but never held) come back when this setter needs them: 7 values kept
    # and one being written take all 8 slots.
    t0 = time.monotonic()
    for k in range(7):
        latest.set({"k": k, "a": _frame(k)})
        assert _slot_message(latest), f"value {k} was pickled: {_in_use(latest)} slots in use"
        kept.append(latest.get())
    assert time.monotonic() - t0 < 1.0
    for old in kept:
        _check_frame(old["k"], old["a"])
    latest.close()


# -- a model: whatever readers keep, every view stays whole ---------------------------
class LatestSlotsMachine(RuleBasedStateMachine):
    """Sets (slot values, small values), gets (keeping the views or not),
    drops of views, a second handle that sets and closes: each kept view
    keeps its bytes, set never blocks or fails (the cell fits a fallback),
    and slots in use never exceed the views kept + the handles' values."""

    def __init__(self):
        super().__init__()
        self.latest = shmq.Latest(2 * MIB, slot_size=256 << 10, slot_count=3)
        self.other = None
        self.k = 0
        self.newest = None
        self.kept = []

    def teardown(self):
        self.kept = []
        if self.other is not None:
            self.other.close()
        self.latest.unlink()
        self.latest.close()

    def _set(self, handle, large):
        self.k += 1
        value = {"k": self.k, "a": _frame(self.k, (200, 1024))} if large else {"k": self.k, "a": None}
        t0 = time.monotonic()
        version = handle.set(value)
        assert time.monotonic() - t0 < 0.5
        assert version == handle.version
        self.newest = self.k

    @rule(large=st.booleans())
    def set(self, large):
        self._set(self.latest, large)

    @rule(large=st.booleans())
    def set_through_other(self, large):
        if self.other is None:
            self.other = shmq.Latest.attach(self.latest.name)
        self._set(self.other, large)

    @precondition(lambda self: self.other is not None)
    @rule()
    def close_other(self):
        self.other.close()
        self.other = None

    @precondition(lambda self: self.newest is not None)
    @rule(keep=st.booleans())
    def get(self, keep):
        value = self.latest.get()
        assert value["k"] == self.newest
        if value["a"] is not None:
            _check_frame(value["k"], value["a"])
        if keep:
            self.kept.append(value)

    @precondition(lambda self: self.kept)
    @rule(data=st.data())
    def drop(self, data):
        self.kept.pop(data.draw(st.integers(0, len(self.kept) - 1)))

    @invariant()
    def views_whole(self):
        for v in self.kept:
            if v["a"] is not None:
                _check_frame(v["k"], v["a"])


TestLatestSlotsModel = LatestSlotsMachine.TestCase
TestLatestSlotsModel.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])


# -- short-lived readers and the pool's member table ---------------------------
# Every handle that reads a slot value takes one of the pool's member entries
# (2 * L_READERS of them).  A reader that closed or exited with its holds given
# back leaves nothing to keep: its entry is reused at once, even while the
# value it read stays the newest (its slot in flight) for ever.
def _members_in_use(latest):
    """Pool member entries of live processes (those of dead ones stay listed
    until they are reused or the janitor frees them)."""
    return sum(alive for _, alive in latest._ensure_pool().statistics().members)


def test_short_lived_readers_never_fill_the_pool_member_table():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    latest.set(_frame(1))  # the newest value throughout
    assert latest._pool.max_members == 2 * L.L_READERS < 300
    for _ in range(300):
        other = shmq.Latest.attach(latest.name)
        _check_frame(1, other.get())  # (nothing kept)
        other.close()
        assert _members_in_use(latest) <= 2
    _check_frame(1, latest.get())
    assert latest.statistics().readers <= 1
    latest.close()


def _read_once(name, close):
    other = shmq.Latest.attach(name)
    _check_frame(1, other.get())
    if close:
        other.close()
    # else: the process exits with the handle open (its holds given back:
    # the value died), as a process that forgot close() or was killed


def test_short_lived_reader_processes_never_fill_the_pool_member_table(ctx):
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    latest.set(_frame(1))
    # Readers in this process first, then more processes than the table has
    # entries left (fork: one at a time; spawn and forkserver start slowly:
    # a few dozen, eight at a time).
    for _ in range(110):
        other = shmq.Latest.attach(latest.name)
        _check_frame(1, other.get())
        other.close()
    n, batch = (140, 1) if ctx.get_start_method() == "fork" else (24, 8)
    for k in range(0, n, batch):
        procs = [ctx.Process(target=_read_once, args=(latest.name, (k + j) % 2 == 0)) for j in range(batch)]
        for p in procs:
            p.start()
        join_all(procs)
        assert [p.exitcode for p in procs] == [0] * batch, f"reader {k} failed"
    assert _members_in_use(latest) <= 2 + batch
    other = shmq.Latest.attach(latest.name)  # and this process still reads
    _check_frame(1, other.get())
    other.close()
    latest.close()


def test_short_lived_readers_of_an_unrelated_process_never_fill_the_table():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    latest.set(_frame(1))
    script = textwrap.dedent(
        f"""
        import os, shmq
        def read(close=True):
            other = shmq.Latest.attach({latest.name!r})
            a = other.get()
            assert a.min() == a.max() == 1 and not a.flags.writeable
            del a
            if close:
                other.close()
        for _ in range(150):
            read()
        for k in range(150):  # processes of their own, half of them leaving without close()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    read(close=k % 2 == 0)
                    code = 0
                finally:
                    os._exit(code)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, k
        print("ok", flush=True)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                         env=dict(os.environ))
    assert res.returncode == 0 and res.stdout.split() == ["ok"], res.stderr[-2000:]
    assert _members_in_use(latest) <= 2
    latest.close()


def test_a_closed_readers_views_keep_their_slot_and_entry():
    latest = _latest(64 << 10, slot_size=MIB, slot_count=4)
    latest.set(_frame(1))
    reader = shmq.Latest.attach(latest.name)
    view = reader.get()
    reader.close()  # the view outlives it: its hold (and pool entry) stay
    for k in range(300):  # other readers come and go meanwhile...
        other = shmq.Latest.attach(latest.name)
        _check_frame(1 if k <= 150 else k, other.get())
        other.close()
        if k >= 150:  # ...and newer values replace value 1
            latest.set(_frame(k + 1))
    _check_frame(1, view)  # its slot was never freed nor written again
    assert _in_use(latest) >= 2 and _members_in_use(latest) >= 2
    del view
    gc.collect()
    k = 1000
    t0 = time.monotonic()
    while _in_use(latest) > 2:  # now it comes back
        assert time.monotonic() - t0 < 1.0, f"{_in_use(latest)} slots in use"
        latest.set(_frame(k))
        k += 1
        time.sleep(0.01)
    assert _members_in_use(latest) <= 2
    latest.close()


# The same path in a topic: a late subscriber reads a held slot message from
# the oldest record while the publisher publishes nothing more.
def _subscribe_once(name):
    topic = shmq.Topic.attach(name)
    sub = topic.subscribe(start="oldest")
    _check_frame(1, sub.receive(timeout=30))
    sub.close()
    topic.close()


def test_short_lived_topic_subscribers_never_fill_the_pool_member_table():
    import multiprocessing as mp

    topic = shmq.Topic(1 << 20, slot_size=MIB, slot_count=4, name=unique_name("tp"))
    try:
        topic.publish(_frame(1))  # held for the ring, the publisher idle
        fork = mp.get_context("fork")
        for k in range(140):
            p = fork.Process(target=_subscribe_once, args=(topic.name,))
            p.start()
            join_all([p])
            assert p.exitcode == 0, f"subscriber {k} failed"
        pool = shmq.lowlevel.read_statistics(shmq._platform.part_name(topic.name, "p"))
        assert len(pool.members) <= 2
    finally:
        topic.close()
        topic.unlink()


def _receive_once(name, results):
    rx = shmq.ReceiveChannel.attach(name)
    a = rx.receive(timeout=30)
    results.put(int(a[0, 0]))
    del a
    rx.close()


def test_short_lived_channel_receivers_never_fill_the_pool_member_table():
    import multiprocessing as mp

    tx, rx = shmq.open_channel(1 << 16, slot_size=MIB, slot_count=2, max_members=8, name=unique_name("ch"))
    fork = mp.get_context("fork")
    results = fork.SimpleQueue()
    try:
        for k in range(40):  # five times the entries, the sender alive throughout
            tx.send(_frame(k), timeout=10)
            p = fork.Process(target=_receive_once, args=(tx.name, results))
            p.start()
            join_all([p])
            assert p.exitcode == 0 and results.get() == k % 251, f"receiver {k} failed"
    finally:
        tx.unlink()
        tx.close()
        rx.close()

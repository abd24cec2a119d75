"""The topic's fast paths: flat-tuple records, the C moves against their
Python specification (shmq._broadcast, shmq.topic), processes on different
cores sharing one topic, lazy cursor stores, and the subscriber's bell."""
from __future__ import annotations

import collections
import math
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

import shmq
from shmq import _broadcast as B
from shmq import _layout as L
from shmq import topic as T

from conftest import join_all
from test_topic import TopicModel, _made, _topic, _unlink_made  # noqa: F401  (the fixture unlinks)

C = B._core
needs_c = pytest.mark.skipif(C is None, reason="the compiled core is not built (or SHMQ_PURE is set)")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
flat_tuples = st.lists(scalars, max_size=12).map(tuple)


def _same(a, b):
    """Equal item by item, with the same types (NaN equal to NaN, bit for bit)."""
    assert type(a) is type(b) is tuple and len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if type(x) is float:
            assert struct.pack("<d", x) == struct.pack("<d", y)
        else:
            assert x == y


# -- flat tuples --------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(flat_tuples)
def test_flat_tuples_round_trip_and_both_cores_write_the_same_bytes(obj):
    data = T._pack_flat(obj)
    assert data is not None and data[0] == T._FLAT
    _same(T._unpack_flat(data), obj)
    if C is not None:
        assert C.pack_flat(obj) == data
        _same(C.unpack_flat(data), obj)


Point = collections.namedtuple("Point", "x y")


class MyInt(int):
    pass


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2],  # not a tuple
        Point(1, 2),  # a tuple subclass: pickle keeps the class
        (1, (2, 3)),  # nested
        (1 << 63,),  # past int64
        (-(1 << 63) - 1,),
        (MyInt(3),),  # an int subclass
        ("\udc80",),  # a lone surrogate (pickle keeps it)
        (bytearray(b"x"),),
        (1.5j,),
        tuple(range(256)),  # more than 255 items
        {"a": 1},
    ],
    ids=repr,
)
def test_what_is_not_a_flat_tuple_is_pickled(obj):
    assert T._pack_flat(obj) is None
    if C is not None:
        assert C.pack_flat(obj) is None
    topic = _topic(1 << 16)
    sub = topic.subscribe()
    topic.publish(obj)
    got = sub.receive(timeout=5)
    assert got == obj and type(got) is type(obj)
    if isinstance(obj, tuple) and obj:
        assert [type(x) for x in got] == [type(x) for x in obj]
    sub.close(), topic.close()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x01", "not a flat"),
        (b"\x02\x00", "not a flat"),
        (b"\x01\x01", "truncated"),
        (b"\x01\x01i\x00", "truncated"),
        (b"\x01\x01s\x05\x00\x00\x00ab", "truncated"),
        (b"\x01\x01Q", "unknown item kind"),
        (b"\x01\x00N", "after its last item"),
    ],
)
def test_a_malformed_flat_record_raises_value_error(data, match):
    unpackers = [T._unpack_flat] + ([C.unpack_flat] if C is not None else [])
    for unpack in unpackers:
        with pytest.raises(ValueError, match=match):
            unpack(data)


def test_flat_tuples_are_the_c_cores_records():
    topic = _topic(1 << 16)
    sub = topic.subscribe()
    topic.publish((1, "abc", 1.5))
    start = topic._w[L.W_T_TAIL] - B.record_size(len(T._pack_flat((1, "abc", 1.5))))
    at = L.TOPIC_DATA_OFFSET + start + L.T_RECORD_HEADER
    assert topic._segment.buf[at] == (T._FLAT if C is not None else 0x80)
    assert sub.receive(timeout=5) == (1, "abc", 1.5)
    sub.close(), topic.close()


# -- the Python moves against the C ones, on one topic ------------------------------
@needs_c
class MixedMovesModel(TopicModel):
    """TopicModel, plus rules that publish and receive through the Python
    specification (BroadcastRing._py_try_write via py_publishing_writer,
    Cursor._py_try_read, the Python Receiver) next to the C moves the
    handles use, on the same topic and cursors."""

    def _py_publisher(self):
        topic = self.topic
        shared = topic._shared
        ring = shared.ring

        def py_try_write(data, lock, gate):
            return B.BroadcastRing._py_try_write(ring, data, lock, gate)

        class Spec:  # the Python closure, over the Python try_write
            words, drop_oldest, max_payload = ring.words, ring.drop_oldest, ring.max_payload
            try_write = staticmethod(py_try_write)

        return B.py_publishing_writer(
            Spec, shared.lock, T._dumps, 5, T._pack_flat,
            lambda: ring.wake_subscribers(shared.not_empty_sem),
            lambda obj, timeout, data: topic._publish(obj, timeout, data),
        )  # fmt: skip

    @rule(size=st.integers(0, 300))
    def publish_py(self, size):
        i = len(self.published)
        msg = (i, b"m" * size)
        try:
            self._py_publisher()(msg, 0)
        except shmq.Full:
            assert not self.drop
            assert any(idx < len(self.published) for _, idx, _ in self.subs.values())
            return
        self.published.append(size)

    @precondition(lambda self: self.subs)
    @rule(data=st.data())
    def receive_py(self, data):
        key = data.draw(st.sampled_from(sorted(self.subs)))
        entry = self.subs[key]
        sub, idx, _ = entry
        receiver = B.PyReceiver(sub._cursor, T._loads, T._unpack_flat, sub._receive_slow, shmq.EndOfChannel)
        # the Python move on the C cursor (its fields are the C members)
        receiver.cursor = type("PyCursor", (), {"try_read": lambda _self: B.Cursor._py_try_read(sub._cursor)})()
        try:
            i, body = receiver(0)
        except shmq.Empty:
            assert idx == len(self.published) or (self.drop and sub.lost > entry[2])
            entry[1] = len(self.published)
            entry[2] = sub.lost
            return
        assert body == b"m" * self.published[i]
        if self.drop:
            assert i >= idx and sub.lost - entry[2] == i - idx
        else:
            assert i == idx and sub.lost == 0
        entry[1], entry[2] = i + 1, sub.lost


TestMixedMoves = MixedMovesModel.TestCase
TestMixedMoves.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)


# -- processes on different cores -----------------------------------------------------
MESSAGES = [(i, "abc", 1.5, None, True, b"\x00" * (i % 5)) if i % 3 else {"i": i} for i in range(3000)]


def _core_env(pure):
    env = dict(os.environ)
    env.pop("SHMQ_PURE", None)
    if pure:
        env["SHMQ_PURE"] = "1"
    return env


@needs_c
@pytest.mark.parametrize("child_pure", [True, False], ids=["pure-child", "c-child"])
def test_a_subscriber_on_either_core_gets_what_a_c_publisher_sent(child_pure):
    topic = _topic(4096)  # small: pads and wraps, and the publisher waits
    script = textwrap.dedent(
        f"""
        import shmq, shmq._broadcast as B
        topic = shmq.Topic.attach({topic.name!r})
        with topic.subscribe() as sub:
            print(B.CORE, flush=True)
            got = list(sub)
        expect = [(i, "abc", 1.5, None, True, b"\\x00" * (i % 5)) if i % 3 else {{"i": i}} for i in range(3000)]
        print(got == expect, sub.lost, flush=True)
        topic.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=_core_env(child_pure))
    try:
        assert proc.stdout.readline().strip() == (b"python" if child_pure else b"c")
        for msg in MESSAGES:
            topic.publish(msg, timeout=30)
        topic.close()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == [b"True", b"0"]


@needs_c
def test_a_c_subscriber_gets_what_a_pure_publisher_sent():
    topic = _topic(4096)
    sub = topic.subscribe()
    script = textwrap.dedent(
        f"""
        import shmq, shmq._broadcast as B
        assert B.CORE == "python"
        topic = shmq.Topic.attach({topic.name!r})
        for i in range(3000):
            topic.publish((i, "abc", 1.5, None, True, b"\\x00" * (i % 5)) if i % 3 else {{"i": i}}, timeout=30)
        topic.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=_core_env(True))
    try:
        first = sub.receive(timeout=60)
        topic.close()
        got = [first] + list(sub)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert got == MESSAGES
    sub.close()


# -- the handles' fast paths ----------------------------------------------------------
def test_nothing_is_delivered_after_close_even_to_an_iterator_taken_before():
    topic = _topic(4096)
    sub = topic.subscribe()
    it = iter(sub)
    topic.publish((1,))
    assert next(it) == (1,)
    topic.publish((2,))
    sub.close()
    with pytest.raises(shmq.ClosedError):
        next(it)
    with pytest.raises(shmq.ClosedError):
        sub.receive()
    topic.close()
    with pytest.raises(shmq.ClosedError):
        topic.publish((3,))


def test_receive_checks_its_timeout_even_on_the_fast_path():
    topic = _topic(4096)
    sub = topic.subscribe()
    topic.publish(1)
    with pytest.raises(ValueError):
        sub.receive(timeout=-1)
    with pytest.raises(TypeError):
        sub.receive(timeout="soon")
    assert sub.receive(timeout=0) == 1 and sub.receive_nowait.__self__ is sub
    with pytest.raises(shmq.Empty):
        sub.receive(timeout=0.0)
    sub.close(), topic.close()


def test_a_subscription_dropped_without_close_frees_its_entry():
    """The fast paths call back through weak references: no cycle keeps a
    dropped subscription (and its gating cursor) alive until a GC run."""
    import gc

    topic = _topic(4096)
    sub = topic.subscribe()
    assert len(topic.statistics().subscribers) == 1
    gc.disable()
    try:
        del sub
        assert len(topic.statistics().subscribers) == 0
    finally:
        gc.enable()
    topic.close()


def test_a_subscriber_that_caught_up_holds_nobody_back():
    """Cursor stores are lazy, but a subscriber that read everything there
    was has stored its cursor: the publisher can fill the whole ring."""
    topic = _topic(1024)
    sub = topic.subscribe()
    size = B.record_size(len(T._encode((0, "x"))))
    n = 1024 // size
    for rnd in range(3):
        for i in range(n):
            topic.publish((i, "x"), timeout=0)
        with pytest.raises(shmq.Full):
            topic.publish((n, "x"), timeout=0)
        assert sub.statistics().lag_messages == n and topic.statistics().subscribers[0].lag_messages == n
        assert [sub.receive(timeout=0)[0] for _ in range(n)] == list(range(n))
        assert topic.statistics().subscribers[0].lag_bytes == 0
    sub.close(), topic.close()


def test_a_reader_stores_its_cursor_every_sixteenth_of_the_ring():
    topic = _topic(1 << 18)
    sub = topic.subscribe()
    for i in range(3000):
        topic.publish((i, "payload"), timeout=0)
    entry = L.topic_sub_word(sub._cursor.entry)
    w = topic._w
    stored = [w[entry + L.TS_CURSOR]]
    for _ in range(2999):
        sub.receive(timeout=0)
        if w[entry + L.TS_CURSOR] != stored[-1]:
            stored.append(w[entry + L.TS_CURSOR])
    steps = [b - a for a, b in zip(stored, stored[1:])]
    assert steps and all(s >= (1 << 18) // 16 for s in steps[:-1])
    assert len(stored) < 3000 // 10  # batched, not once per record
    sub.receive(timeout=0)
    assert w[entry + L.TS_CURSOR] == w[L.W_T_TAIL]  # read everything: stored
    sub.close(), topic.close()


def _publish_inherited(topic, results):
    try:
        topic.publish((99, "from the child"), timeout=30)
        results.put(topic.statistics().publishers)
    except BaseException as exc:  # pragma: no cover - reported to the parent
        results.put(repr(exc))


def test_a_forked_child_publishing_through_the_parents_handle_counts_itself():
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    topic = _topic(4096)
    sub = topic.subscribe()
    topic.publish((1, "parent"))  # the parent's fast path is bound
    results = ctx.Queue()
    p = ctx.Process(target=_publish_inherited, args=(topic, results))
    p.start()
    assert results.get(timeout=60) == 2  # the child counted itself (then exits: atexit closes it)
    join_all([p])
    topic.close()
    assert list(sub) == [(1, "parent"), (99, "from the child")]
    sub.close()


# -- the subscriber's bell ------------------------------------------------------------
def test_a_waiter_that_takes_another_subscribers_post_hands_it_on():
    """B was counted by a publisher (its flag cleared, one post made); C
    announced after that scan and took the post.  C must hand it on."""
    topic = _topic(4096)
    b, c = topic.subscribe(), topic.subscribe()
    shared = topic._shared
    sem = shared.not_empty_sem
    b._bell.announce(), c._bell.announce()
    topic._w[L.topic_sub_word(b._cursor.entry) + L.TS_WAITING] = 0  # the publisher's scan counted B ...
    sem.release()  # ... and posted once
    assert c._bell.sleep(1.0) is False  # C: not its post
    assert b._bell.sleep(0.5) is True  # B gets it
    assert c._bell.sleep(0.01) is False  # nothing left over
    c._bell.withdraw()
    b.close(), c.close(), topic.close()


def test_subscribers_in_threads_all_wake_promptly():
    """Four subscribers sleep on one semaphore; every publish reaches every
    one of them well within a slice (a lost wake-up costs SLICE_SECONDS)."""
    topic = _topic(1 << 16)
    subs = [topic.subscribe() for _ in range(4)]
    late = []

    def reader(sub):
        for k in range(30):
            t0 = time.monotonic()
            msg = sub.receive(timeout=10)
            if time.monotonic() - t0 > 0.5 * T.SLICE_SECONDS and msg[1] - t0 < 0.5 * T.SLICE_SECONDS:
                late.append(msg[0])

    threads = [threading.Thread(target=reader, args=(s,)) for s in subs]
    for t in threads:
        t.start()
    for k in range(30):
        time.sleep(0.005)
        topic.publish((k, time.monotonic()))
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert late == []
    for s in subs:
        s.close()
    topic.close()


def test_nan_survives_a_topic():
    topic = _topic(4096)
    sub = topic.subscribe()
    topic.publish((math.nan, -0.0, math.inf))
    got = sub.receive(timeout=5)
    assert math.isnan(got[0]) and str(got[1]) == "-0.0" and got[2] == math.inf
    sub.close(), topic.close()


@pytest.mark.parametrize("word, value", [(0, 1 << 40), (0, -3)], ids=["huge-record", "odd-pad"])
def test_a_corrupt_record_is_a_broken_error_on_either_core(word, value):
    topic = _topic(4096)
    sub = topic.subscribe()
    topic.publish((1, "abc"))
    at = (L.TOPIC_DATA_OFFSET + topic._w[L.W_T_TAIL] - B.record_size(len(T._encode((1, "abc"))))) // L.WORD
    topic._w[at + word] = value
    with pytest.raises(shmq.BrokenError, match="is corrupt"):
        sub.receive(timeout=0)
    with pytest.raises(shmq.BrokenError, match="is corrupt"):
        B.Cursor._py_try_read(sub._cursor)
    sub.close(), topic.close()


@pytest.mark.parametrize("which", ["wake_subscribers", "_py_wake_subscribers"])
def test_wake_subscribers_posts_once_per_flag_and_never_piles_up(which):
    from shmq import _platform as P

    topic = _topic(4096)
    subs = [topic.subscribe() for _ in range(3)]
    shared = topic._shared
    w, sem = topic._w, shared.not_empty_sem
    wake = getattr(shared.ring, which)
    for s in subs[:2]:
        s._bell.announce()
    wake(sem)
    assert P.sem_value(sem) == 2 and w[L.W_T_SUB_WAITING] == 0
    assert [w[L.topic_sub_word(s._cursor.entry) + L.TS_WAITING] for s in subs] == [0, 0, 0]
    subs[2]._bell.announce()
    wake(sem)  # one flag, two posts nobody took: none added
    assert P.sem_value(sem) == 2
    while sem.acquire(False):
        pass
    for s in subs:
        s.close()
    topic.close()


def test_a_corrupt_tail_is_a_broken_error_for_the_publisher():
    topic = _topic(4096)
    topic.publish(1)
    good = topic._w[L.W_T_TAIL]
    topic._w[L.W_T_TAIL] = -(1 << 62)
    with pytest.raises(shmq.BrokenError, match="TAIL out of range"):
        topic.publish(2)
    topic._w[L.W_T_TAIL] = good
    topic.publish(3, timeout=1)  # the lock was released
    topic.close()


def test_lowest_cursor_on_both_cores():
    topic = _topic(4096)
    ring = topic._shared.ring
    assert ring.lowest_cursor() == B.BroadcastRing._py_lowest_cursor(ring) == -1
    a = topic.subscribe()
    for i in range(10):
        topic.publish(i)
    b = topic.subscribe()
    a.receive(timeout=0)
    a.receive(timeout=0)
    assert ring.lowest_cursor() == B.BroadcastRing._py_lowest_cursor(ring) == a._cursor._stored
    a.close()
    assert ring.lowest_cursor() == B.BroadcastRing._py_lowest_cursor(ring) == topic._w[L.W_T_TAIL]
    b.close(), topic.close()


def test_publish_and_receive_take_their_arguments_by_keyword():
    topic = _topic(4096)
    sub = topic.subscribe()
    topic.publish(obj=(1, "a"), timeout=1)
    topic.publish({"b": 2}, timeout=None)
    assert sub.receive(timeout=1) == (1, "a") and sub.receive(timeout=None) == {"b": 2}
    with pytest.raises(TypeError):
        topic.publish()
    with pytest.raises(TypeError):
        topic.publish(1, 2, 3)
    with pytest.raises(TypeError):
        sub.receive(1, 2)
    sub.close(), topic.close()


def test_a_loop_over_a_subscription_nobody_else_holds_keeps_it():
    """``for msg in topic.subscribe()``: the loop holds the only reference;
    the subscription must stay (and gate) until the loop is gone."""
    import gc

    topic = _topic(4096)
    got = []
    sub_iter = iter(topic.subscribe())  # what a for statement holds
    topic.publish("first")
    for msg in sub_iter:
        gc.collect()
        assert len(topic.statistics().subscribers) == 1  # still subscribed, still gating
        got.append(msg)
        if msg == "second":
            break
        topic.publish("second")
    assert got == ["first", "second"]
    del sub_iter, msg
    gc.collect()
    assert len(topic.statistics().subscribers) == 0  # loop gone: entry freed
    topic.close()


def test_iteration_holds_the_subscription():
    topic = _topic(4096)
    it = iter(topic.subscribe())
    import gc

    gc.collect()
    assert len(topic.statistics().subscribers) == 1
    topic.publish(7)
    assert next(it) == 7
    del it
    gc.collect()
    assert len(topic.statistics().subscribers) == 0
    topic.close()


def test_a_receive_kept_after_its_subscription_was_dropped_is_closed():
    import gc

    topic = _topic(4096)
    receive = topic.subscribe().receive
    gc.collect()
    assert len(topic.statistics().subscribers) == 0  # dropped: entry freed ...
    topic.publish(1)
    with pytest.raises(shmq.ClosedError):  # ... and nothing read through it
        receive(timeout=0)
    topic.close()


# A publisher process on the C core with SHMQ_CORE_STOP_AT set: it publishes
# 0, 1, ... printing each one acknowledged, until the publish move stops it
# (SIGSTOP) at the step; the test then SIGKILLs it there.
PUBLISHER = r"""
import sys, shmq, shmq._broadcast as B
assert B.CORE == "c"
topic = shmq.Topic.attach(sys.argv[1])
for i in range(1000):
    topic.publish((i, "x" * 150), timeout=5)
    print(i, flush=True)
"""


def _stopped(pid):
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


@needs_c
@pytest.mark.parametrize("drop", [False, True], ids=["block", "drop-oldest"])
@pytest.mark.parametrize("step", [41, 42, 43, 44])
def test_sigkill_at_every_step_of_the_c_publish_move(step, drop):
    """Killed at step ``step`` of broadcast_write (41 lock held, 42 OLDEST
    moved, 43 record and NEXT_SEQ written but not TAIL, 44 TAIL published,
    lock not yet released; the child's first publish evicts): the
    other publisher takes the lock over within a second, the subscriber
    gets every acknowledged message once and in order, the one in flight at
    most once, then the survivor's, with no phantom loss (the recovery
    recounts NEXT_SEQ); the stream then ends as broken, naming the dead."""
    topic = _topic(1024, overflow="drop-oldest" if drop else "block")
    sub = topic.subscribe()
    pre = [("pre", i, "y" * 150) for i in range(5)]  # 5 x 184 of the 1024 bytes, read:
    for msg in pre:  # the child's first publish pads, wraps and evicts the first
        topic.publish(msg)
    assert [sub.receive(timeout=5) for _ in pre] == pre
    env = _core_env(False)
    env["SHMQ_CORE_STOP_AT"] = str(step)
    p = subprocess.Popen([sys.executable, "-c", PUBLISHER, topic.name], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (_stopped(p.pid) or p.poll() is not None):
            assert time.monotonic() < deadline, "the child never reached the step"
            time.sleep(0.005)
    finally:
        p.kill()
        out, err = p.communicate(timeout=60)
    assert p.returncode == -9, err.decode()
    acked = [int(x) for x in out.split()]
    t0 = time.monotonic()
    topic.publish(("after", 0), timeout=5)  # takes the dead holder's lock over
    assert time.monotonic() - t0 < 1.5
    got = []
    while True:
        try:
            msg = sub.receive(timeout=0)
        except shmq.Empty:
            break
        got.append(msg)
    mine = [m[0] for m in got if isinstance(m[0], int)]
    assert mine[: len(acked)] == acked and len(mine) <= len(acked) + 1, (acked, got)
    assert got[-1] == ("after", 0) and sub.lost == 0
    for i in range(1, 30):  # survivors continue, wrapping the ring
        topic.publish(("after", i), timeout=5)
        assert sub.receive(timeout=5) == ("after", i)
    assert sub.lost == 0
    topic.close()
    with pytest.raises(shmq.BrokenError, match=str(p.pid)):
        sub.receive(timeout=5)
    sub.close()

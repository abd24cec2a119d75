"""shmq.Topic: broadcast to every subscriber, back-pressure or drop-oldest,
dead subscribers stop gating, end of stream as in channels."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shmq
from shmq import _layout as L

from conftest import join_all, unique_name

SHM = "/dev/shm"
_made = []


def _topic(*args, **kwargs):
    """shmq.Topic, unlinked at the end of the test (creators unlink at exit,
    after the session's leak check)."""
    topic = shmq.Topic(*args, **kwargs)
    _made.append(topic.name)
    return topic


@pytest.fixture(autouse=True)
def _unlink_made():
    yield
    from shmq import _platform

    while _made:
        _platform.shm_unlink(_made.pop())


def _wait_for(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _payload(i):
    """A message whose content is derived from its number: torn = detectable."""
    return (i, bytes([i % 251]) * (i % 97))


def _check(msg):
    i, body = msg
    assert body == bytes([i % 251]) * (i % 97), f"torn message {i}"
    return i


# -- one process ----------------------------------------------------------------
def test_every_subscriber_gets_every_message_once():
    with _topic(8192) as topic:
        subs = [topic.subscribe() for _ in range(3)]
        for i in range(200):
            topic.publish(_payload(i))  # 3 subscribers x 200 > ring: they must read as it goes
            for s in subs:
                assert _check(s.receive(timeout=5)) == i
        st_ = topic.statistics()
        assert st_.published == 200 and st_.publishers == 1 and len(st_.subscribers) == 3
        assert all(s.lag_messages == 0 and s.lost == 0 and s.received == 200 for s in st_.subscribers)
        for s in subs:
            s.close()
        topic.unlink()


def test_start_oldest_sees_history_and_next_does_not():
    topic = _topic(4096)
    for i in range(5):
        topic.publish(i)
    late = topic.subscribe(start="oldest")
    fresh = topic.subscribe()
    topic.publish(5)
    assert [late.receive_nowait() for _ in range(6)] == list(range(6))
    assert fresh.receive_nowait() == 5
    with pytest.raises(shmq.Empty):
        fresh.receive_nowait()
    late.close(), fresh.close(), topic.close()


def test_end_of_stream_and_closed_handles():
    topic = _topic(4096)
    sub = topic.subscribe()
    topic.publish("a")
    topic.publish("b")
    topic.close()
    topic.close()  # idempotent
    assert list(sub) == ["a", "b"]
    for _ in range(2):  # persistent
        with pytest.raises(shmq.EndOfChannel):
            sub.receive(timeout=1)
    with pytest.raises(shmq.ClosedError):
        topic.publish("c")
    sub.close()
    with pytest.raises(shmq.ClosedError):
        sub.receive()
    with pytest.raises(ValueError):  # ClosedError is a ValueError
        sub.receive_nowait()


def test_a_publisher_attached_after_the_end_is_refused():
    topic = _topic(4096)
    other = shmq.Topic.attach(topic.name)
    topic.close()
    with pytest.raises(shmq.BrokenError, match="has ended"):
        other.publish(1)
    other.close()


def test_block_mode_gates_on_the_slowest_and_close_releases():
    topic = _topic(1024)
    fast, slow = topic.subscribe(), topic.subscribe()
    n = 0
    with pytest.raises(shmq.Full):
        while True:
            topic.publish(n, timeout=0)
            fast.receive_nowait()
            n += 1
    assert n > 10
    assert slow.statistics().lag_messages == n and slow.lost == 0
    t0 = time.monotonic()
    with pytest.raises(shmq.Full):
        topic.publish("x", timeout=0.2)
    assert time.monotonic() - t0 >= 0.19  # it really waited
    slow.close()  # no longer holds the publisher back
    topic.publish("x", timeout=0)
    assert fast.receive_nowait() == "x"
    fast.close(), topic.close()


def test_drop_oldest_counts_lost_exactly():
    topic = _topic(2048, overflow="drop-oldest")
    assert topic.overflow == "drop-oldest"
    sub = topic.subscribe()
    for i in range(1000):
        topic.publish(_payload(i), timeout=0)  # never waits
    held = topic.statistics().held_messages
    assert sub.statistics().lag_messages == held < 1000  # what is still there to read
    got = []
    while True:
        try:
            got.append(_check(sub.receive_nowait()))
        except shmq.Empty:
            break
    assert got == list(range(got[0], 1000))
    assert sub.lost == got[0] == 1000 - len(got)
    assert sub.statistics().lag_messages == 0
    assert topic.statistics().subscribers[0].lost == sub.lost
    sub.close(), topic.close()


def test_repair_recounts_after_a_publisher_died_in_the_lock():
    """A publisher killed between its sequence-number store and its TAIL
    store leaves NEXT_SEQ one ahead; the lock's recoverer recounts it from
    the records, so subscribers count no phantom loss."""
    topic = _topic(2048, overflow="drop-oldest")
    sub = topic.subscribe()
    for i in range(100):
        topic.publish(i)
    w = topic._w
    good = (w[L.W_T_NEXT_SEQ], w[L.W_T_OLDEST_SEQ])
    w[L.W_T_NEXT_SEQ] += 1  # what the dead publisher left
    topic._ring.repair()
    assert (w[L.W_T_NEXT_SEQ], w[L.W_T_OLDEST_SEQ]) == good
    topic.publish("next")
    drained = []
    while True:
        try:
            drained.append(sub.receive_nowait())
        except shmq.Empty:
            break
    assert drained[-1] == "next" and len(drained) + sub.lost == 101
    sub.close(), topic.close()


def test_corrupt_header_raises_instead_of_crashing():
    topic = _topic(4096)
    topic._w[L.W_T_CAPACITY] = 12345
    with pytest.raises(shmq.BrokenError, match="corrupt header"):
        _attach_fresh(topic.name)
    topic._w[L.W_T_CAPACITY] = 4096
    topic.close()


def _attach_fresh(name):
    """Attach in a fresh process-local attachment (not the cached one)."""
    from shmq import topic as T

    T._attachments.pop(name, None)
    return shmq.Topic.attach(name)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"^'overflow' must be 'block' or 'drop-oldest', got 'x'$"):
        _topic(overflow="x")
    with pytest.raises(ValueError, match="'capacity_bytes' must be a multiple of 8"):
        _topic(1001)
    with pytest.raises(TypeError, match="'capacity_bytes' must be an int"):
        _topic(1.5)
    topic = _topic(1024)
    with pytest.raises(ValueError, match=r"^'start' must be 'next' or 'oldest', got 'first'$"):
        topic.subscribe("first")
    with pytest.raises(shmq.MessageTooLarge):
        topic.publish(b"x" * 600)
    sub = topic.subscribe()
    with pytest.raises(TypeError):
        pickle.dumps(sub)
    with pytest.raises(ValueError):
        sub.receive(timeout=-1)
    with pytest.raises(shmq.LayoutError):
        shmq.Latest.attach(topic.name)
    sub.close(), topic.close()


def test_pickles_as_name_and_unlinks():
    topic = _topic(4096, name=unique_name("tp"))
    copy = pickle.loads(pickle.dumps(topic))
    assert copy.name == topic.name and copy is not topic
    sub = copy.subscribe()
    topic.publish(1)
    assert sub.receive(timeout=5) == 1
    sub.close(), copy.close()
    topic.unlink()
    assert not os.path.exists(os.path.join(SHM, topic.name))
    topic.close()
    with pytest.raises(FileNotFoundError):
        shmq.Topic.attach(topic.name)


def test_too_many_subscribers():
    topic = _topic(4096)
    subs = [topic.subscribe() for _ in range(L.T_SUBSCRIBERS)]
    with pytest.raises(shmq.TooManyMembers):
        topic.subscribe()
    subs.pop().close()
    subs.append(topic.subscribe())
    for s in subs:
        s.close()
    topic.close()


# -- the model --------------------------------------------------------------------
class TopicModel(RuleBasedStateMachine):
    """The broadcast ring's cursors against a list of what was published."""

    @initialize(drop=st.booleans())
    def setup(self, drop):
        self.topic = _topic(1024, overflow="drop-oldest" if drop else "block")
        self.drop = drop
        self.published = []  # message numbers
        self.subs = {}  # id -> [subscription, next expected index in published, lost]
        self.next_id = 0

    def teardown(self):
        for sub, *_ in self.subs.values():
            sub.close()
        self.topic.unlink()
        self.topic.close()

    @rule(size=st.integers(0, 300))
    def publish(self, size):
        i = len(self.published)
        msg = (i, b"m" * size)
        try:
            self.topic.publish(msg, timeout=0)
        except shmq.Full:
            assert not self.drop
            # only a subscriber that is behind may hold the publisher back
            assert any(idx < len(self.published) for _, idx, _ in self.subs.values())
            return
        self.published.append(size)

    @precondition(lambda self: len(self.subs) < 5)
    @rule(oldest=st.booleans())
    def subscribe(self, oldest):
        sub = self.topic.subscribe("oldest" if oldest else "next")
        if oldest:
            held = self.topic.statistics().held_messages
            start = len(self.published) - held
        else:
            start = len(self.published)
        self.subs[self.next_id] = [sub, start, 0]
        self.next_id += 1

    @precondition(lambda self: self.subs)
    @rule(data=st.data())
    def receive(self, data):
        key = data.draw(st.sampled_from(sorted(self.subs)))
        entry = self.subs[key]
        sub, idx, _ = entry
        try:
            i, body = sub.receive_nowait()
        except shmq.Empty:
            assert idx == len(self.published) or (self.drop and sub.lost > entry[2])
            entry[1] = len(self.published)
            entry[2] = sub.lost
            return
        assert body == b"m" * self.published[i]
        if self.drop:
            assert i >= idx
            assert sub.lost - entry[2] == i - idx
        else:
            assert i == idx and sub.lost == 0
        entry[1], entry[2] = i + 1, sub.lost

    @precondition(lambda self: self.subs)
    @rule(data=st.data())
    def close(self, data):
        key = data.draw(st.sampled_from(sorted(self.subs)))
        self.subs.pop(key)[0].close()

    @invariant()
    def stats_agree(self):
        if not hasattr(self, "topic"):
            return
        s = self.topic.statistics()
        assert s.published == len(self.published)
        assert len(s.subscribers) == len(self.subs)
        assert sum(x.lost for x in s.subscribers) == sum(sub.lost for sub, *_ in self.subs.values())


TestTopicModel = TopicModel.TestCase
TestTopicModel.settings = settings(
    max_examples=60, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)


# -- processes ----------------------------------------------------------------------
def _subscriber(topic, results, slow):
    sub = topic.subscribe()
    got = []
    try:
        for msg in sub:
            got.append(_check(msg))
            if slow:
                time.sleep(0.0005)
        results.put(("end", got, sub.lost))
    except shmq.BrokenError as exc:
        results.put(("broken", got, str(exc)))
    sub.close()
    topic.close()


def test_broadcast_to_child_processes(ctx):
    topic = _topic(16384)
    results = ctx.Queue()
    procs = [ctx.Process(target=_subscriber, args=(topic, results, k == 0)) for k in range(3)]
    for p in procs:
        p.start()
    _wait_for(lambda: len(topic.statistics().subscribers) == 3, what="3 subscribers")
    n = 2000
    for i in range(n):
        topic.publish(_payload(i), timeout=30)
    topic.close()
    outs = [results.get(timeout=60) for _ in procs]
    join_all(procs)
    for kind, got, lost in outs:
        assert kind == "end" and got == list(range(n)) and lost == 0


def _drop_subscriber(name, results):
    topic = shmq.Topic.attach(name)
    _subscriber(topic, results, True)


def test_drop_oldest_across_processes_loses_nothing_uncounted(ctx):
    topic = _topic(2048, overflow="drop-oldest")
    results = ctx.Queue()
    p = ctx.Process(target=_drop_subscriber, args=(topic.name, results))
    p.start()
    _wait_for(lambda: len(topic.statistics().subscribers) == 1, what="the subscriber")
    n = 3000
    for i in range(n):
        topic.publish(_payload(i))
    topic.close()
    kind, got, lost = results.get(timeout=60)
    join_all([p])
    assert kind == "end"
    assert got == sorted(set(got))  # in order, never twice
    assert len(got) + lost == n  # every message received or counted lost
    assert got[-1] == n - 1


def _stuck_subscriber(name):
    topic = shmq.Topic.attach(name)
    sub = topic.subscribe()  # noqa: F841 (kept: a collected subscription closes)
    while True:
        time.sleep(1)


def test_sigkilled_subscriber_stops_gating_within_a_second(ctx):
    topic = _topic(1024)
    p = ctx.Process(target=_stuck_subscriber, args=(topic.name,))
    p.start()
    _wait_for(lambda: len(topic.statistics().subscribers) == 1, what="the subscriber")
    with pytest.raises(shmq.Full):
        for i in range(1000):
            topic.publish(i, timeout=0)
    os.kill(p.pid, signal.SIGKILL)
    t0 = time.monotonic()
    topic.publish("after", timeout=5)
    assert time.monotonic() - t0 < 1.0
    join_all([p])
    assert topic.statistics().subscribers == ()
    topic.close()


def _publish_forever(topic):
    k = 0
    while True:
        topic.publish(_payload(k))
        k += 1


def test_sigkilled_publisher_breaks_the_stream_after_the_drain(ctx):
    topic = _topic(4096)
    sub = topic.subscribe()
    p = ctx.Process(target=_publish_forever, args=(topic,))
    p.start()
    got = [_check(sub.receive(timeout=60))]
    topic.close()  # the child is a counted publisher now: it has published
    got += [_check(sub.receive(timeout=60)) for _ in range(50)]
    os.kill(p.pid, signal.SIGKILL)
    join_all([p])
    with pytest.raises(shmq.BrokenError, match=f"publisher process {p.pid} died") as info:
        while True:
            got.append(_check(sub.receive(timeout=10)))
    assert "died without closing" in str(info.value)
    assert got == list(range(len(got)))  # every committed message, in order, once
    with pytest.raises(shmq.BrokenError):  # persistent
        sub.receive(timeout=0)
    sub.close()


def _tagged_publisher(topic, tag):
    k = 0
    while True:
        topic.publish((tag, k, bytes([k % 251]) * (k % 500)))
        k += 1


def test_killed_publisher_does_not_stop_the_other(ctx):
    """Two publishers; one is SIGKILLed at a random point (perhaps holding the
    producer lock): the other goes on within a second, per-publisher order
    holds, nothing is torn or repeated, and the end is BrokenError."""
    import random

    topic = _topic(8192)
    sub = topic.subscribe()
    procs = [ctx.Process(target=_tagged_publisher, args=(topic, tag)) for tag in (0, 1)]
    for p in procs:
        p.start()
    seen = {0: [], 1: []}

    def take(timeout=30):
        tag, k, body = sub.receive(timeout=timeout)
        assert body == bytes([k % 251]) * (k % 500)
        seen[tag].append(k)
        return tag

    while not (seen[0] and seen[1]):
        take()
    topic.close()  # both children publish: they hold the stream now
    for _ in range(random.randrange(50, 400)):
        take()
    os.kill(procs[0].pid, signal.SIGKILL)
    join_all([procs[0]])
    before = len(seen[1])
    t0 = time.monotonic()
    while len(seen[1]) < before + 20:  # the survivor goes on
        take()
    assert time.monotonic() - t0 < 1.5
    os.kill(procs[1].pid, signal.SIGKILL)
    join_all([procs[1]])
    with pytest.raises(shmq.BrokenError, match="died without closing"):
        while True:
            take(timeout=10)
    for tag in (0, 1):
        assert seen[tag] == list(range(len(seen[tag])))
    sub.close()


def test_publisher_child_that_exits_normally_ends_the_stream(ctx):
    topic = _topic(4096)
    sub = topic.subscribe()
    p = ctx.Process(target=_publish_some, args=(topic, 100))
    p.start()
    first = sub.receive(timeout=60)
    topic.close()
    got = [first] + list(sub)  # EndOfChannel once the child has exited
    join_all([p])
    assert got == list(range(100))
    sub.close()


def _publish_some(topic, n):
    for i in range(n):
        topic.publish(i)
    # no close: a normal exit closes the handle


def test_unrelated_process_subscribes_by_name():
    topic = _topic(4096)
    script = textwrap.dedent(
        f"""
        import shmq
        topic = shmq.Topic.attach({topic.name!r})
        with topic.subscribe() as sub:
            print(sum(sub), sub.lost, flush=True)
        topic.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        _wait_for(lambda: len(topic.statistics().subscribers) == 1, what="the subprocess")
        for i in range(500):
            topic.publish(i, timeout=30)
        topic.close()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == [str(sum(range(500))).encode(), b"0"]


def test_unrelated_publisher_that_exits_without_close_ends_the_stream():
    """atexit closes a plain process's publisher handles: EndOfChannel, not BrokenError."""
    topic = _topic(4096)
    sub = topic.subscribe()
    script = textwrap.dedent(
        f"""
        import shmq
        topic = shmq.Topic.attach({topic.name!r})
        for i in range(10):
            topic.publish(i)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    try:
        first = sub.receive(timeout=60)
        topic.close()
        rest = list(sub)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [first] + rest == list(range(10))
    sub.close()


def test_nothing_left_in_dev_shm():
    topic = _topic(4096, name=unique_name("gone"))
    sub = topic.subscribe()
    topic.publish(1)
    name = topic.name
    sub.close()
    topic.unlink()
    topic.close()
    left = [n for n in os.listdir(SHM) if name in n]
    assert left == []


# -- large arrays through the slot pool --------------------------------------------

import numpy as np  # noqa: E402

from shmq import _platform as P  # noqa: E402
from shmq import lowlevel as ll  # noqa: E402

MIB16 = 16 << 20


def _pool_free(topic):
    return ll.read_statistics(P.part_name(topic.name, "p")).free


def _slots_come_back(topic, count, what, timeout=30.0):
    """Publish ticks (each publish takes back what subscribers are done
    with) until the pool has ``count`` free slots."""
    _wait_for(lambda: topic.publish(("tick",)) or _pool_free(topic) == count, timeout=timeout, what=what)


ARRAY_SUBSCRIBER = textwrap.dedent(
    """
    import sys, numpy as np, shmq
    topic = shmq.Topic.attach(sys.argv[1])
    sub = topic.subscribe()
    print("ready", flush=True)
    got = [sub.receive(timeout=60) for _ in range(3)]
    ok = True
    for k, msg in enumerate(got[:2]):
        ok &= msg.shape == (2 << 20,) and not msg.flags.writeable and not msg.flags.owndata
        ok &= float(msg[0]) == k and float(msg[-1]) == k
    d = got[2]
    ok &= sorted(d) == ["a", "b", "n"] and d["n"] == 7
    ok &= not d["a"].flags.writeable and not d["b"].flags.writeable
    ok &= int(d["a"][-1]) == 3 and d["b"].shape == (1024, 1024)
    print("ok" if ok else "BAD", flush=True)
    mode = sys.stdin.readline().strip()
    if mode == "drop":
        del got, d, msg
        print("dropped", flush=True)
    elif mode == "unread":   # receive nothing more: two array messages stay unread
        print("waiting", flush=True)
    sys.stdin.readline()
    sub.close()
    """
)


def _array_children(topic, n=2):
    kids = [subprocess.Popen([sys.executable, "-c", ARRAY_SUBSCRIBER, topic.name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(n)]
    for k in kids:
        assert k.stdout.readline().strip() == "ready"
    return kids


def _publish_three_arrays(topic):
    for k in range(2):
        topic.publish(np.full(2 << 20, k, dtype=np.float64), timeout=30)  # 16 MiB each
    topic.publish({"a": np.full(MIB16 // 8, 3, dtype=np.int64), "b": np.zeros((1024, 1024), np.uint8), "n": 7},
                  timeout=30)


def _finish(kids, topic):
    try:
        for k in kids:
            try:
                k.stdin.close()
            except BrokenPipeError:  # (a killed child)
                pass
        for k in kids:
            k.wait(30)
    finally:
        for k in kids:
            if k.poll() is None:
                k.kill()
                k.wait(10)
            k.stdout.close()
        topic.close()
        topic.unlink()


def test_arrays_reach_two_subscriber_processes_zero_copy_and_the_slots_come_back():
    topic = shmq.Topic(1 << 20, name=unique_name("tar"), slot_size=MIB16, slot_count=6)
    kids = _array_children(topic)
    try:
        _publish_three_arrays(topic)
        for k in kids:
            assert k.stdout.readline().strip() == "ok"
        # 4 slots in flight (the dict has two arrays), each written once for both subscribers
        assert _pool_free(topic) == 2
        for k in kids:
            k.stdin.write("drop\n")
            k.stdin.flush()
            assert k.stdout.readline().strip() == "dropped"
        _slots_come_back(topic, 6, "the slots to come back once both subscribers dropped their views")
    finally:
        _finish(kids, topic)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(topic.name)]


def test_views_keep_their_slot_until_the_last_one_is_gone():
    topic = shmq.Topic(1 << 16, name=unique_name("tvw"), slot_size=1 << 20, slot_count=2)
    a, b = topic.subscribe(), topic.subscribe()
    try:
        topic.publish(np.arange(100_000, dtype=np.float64))
        x, y = a.receive(), b.receive()
        half = x[::2]
        del x
        topic.publish(("tick",))
        assert _pool_free(topic) == 1  # y and half still look at it
        del y
        topic.publish(("tick",))
        assert _pool_free(topic) == 1
        assert half[1] == 2.0
        del half
        topic.publish(("tick",))
        assert _pool_free(topic) == 2
        assert [a.receive(0), a.receive(0), a.receive(0)] == [("tick",)] * 3
    finally:
        a.close()
        b.close()
        topic.close()
        topic.unlink()


def test_a_subscriber_that_closes_with_unread_arrays_gives_their_slots_back():
    topic = shmq.Topic(1 << 16, name=unique_name("tcl"), slot_size=1 << 20, slot_count=3)
    fast, idle = topic.subscribe(), topic.subscribe()
    try:
        for k in range(3):
            topic.publish(np.full(50_000, k, dtype=np.float64))
            assert fast.receive(0)[0] == k  # views dropped at once
        topic.publish(("tick",))
        assert fast.receive(0) == ("tick",)
        assert _pool_free(topic) == 0  # `idle` has not read them
        with pytest.raises(shmq.Full):
            topic.publish(np.zeros(50_000), timeout=0.2)
        idle.close()
        topic.publish(np.full(50_000, 9.0), timeout=5)  # took the slots back while it waited
        assert fast.receive(0)[0] == 9.0
        _slots_come_back(topic, 3, "every slot free")
    finally:
        fast.close()
        idle.close()
        topic.close()
        topic.unlink()


def test_drop_oldest_arrays_a_subscriber_lost_give_their_slots_back():
    topic = shmq.Topic(1024, name=unique_name("tdr"), slot_size=1 << 20, slot_count=3, overflow="drop-oldest")
    slow = topic.subscribe()
    try:
        for k in range(3):
            topic.publish(np.full(50_000, k, dtype=np.float64))
        for k in range(100):  # overwrite the array records
            topic.publish(("small", k))
        assert _pool_free(topic) == 0  # still gated by the slow cursor
        msg = slow.receive(0)
        assert msg[0] == "small" and slow.lost >= 3
        _slots_come_back(topic, 3, "the lost arrays' slots")
    finally:
        slow.close()
        topic.close()
        topic.unlink()


def test_a_subscriber_killed_holding_views_and_unread_arrays_gives_the_slots_back():
    topic = shmq.Topic(1 << 20, name=unique_name("tkl"), slot_size=MIB16, slot_count=6)
    kids = _array_children(topic, 1)
    try:
        _publish_three_arrays(topic)
        topic.publish(np.ones(MIB16 // 8))  # a fourth array it will never read
        assert kids[0].stdout.readline().strip() == "ok"
        kids[0].stdin.write("unread\n")
        kids[0].stdin.flush()
        assert kids[0].stdout.readline().strip() == "waiting"
        assert _pool_free(topic) == 1
        os.kill(kids[0].pid, signal.SIGKILL)
        kids[0].wait(10)
        t0 = time.monotonic()
        _slots_come_back(topic, 6, "the killed subscriber's slots", timeout=5)
        assert time.monotonic() - t0 < 1.5
    finally:
        _finish(kids, topic)


def _publish_arrays(topic, n):
    for k in range(n):
        topic.publish({"k": k, "frame": np.full((512, 512, 3), k, np.uint8)}, timeout=30)
    topic.close()


def test_a_child_process_publishes_arrays(ctx):
    topic = shmq.Topic(1 << 16, name=unique_name("tch"), slot_size=1 << 20, slot_count=4)
    sub = topic.subscribe()
    try:
        p = ctx.Process(target=_publish_arrays, args=(topic, 6))
        p.start()
        got = []
        for _ in range(6):
            msg = sub.receive(timeout=30)
            frame = msg["frame"]
            assert not frame.flags.writeable and frame.shape == (512, 512, 3)
            assert int(frame[0, 0, 0]) == int(frame[-1, -1, -1]) == msg["k"]
            got.append(msg["k"])
            del msg, frame  # the child waits for slots: 4 of them for 6 messages
        assert got == list(range(6))
        join_all([p])
        assert p.exitcode == 0
    finally:
        sub.close()
        topic.close()
        topic.unlink()

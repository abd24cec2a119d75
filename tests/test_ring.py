"""Unit tests of RingBuffer / Ring: record sizes, wrap-around, limits,
batches, in-place records, state queries, timeouts, counters, lifetime,
pickling, Ctrl-C, and threads sharing a ring."""
from __future__ import annotations

import array
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shmq
from shmq import _layout as L
from shmq import _platform as P
from shmq._ring import RingBuffer
from shmq._sync import RobustLock

from _core_helpers import read_line, thread_is_in, wait_for
from conftest import join_all

MODES = {
    "spsc": dict(multi_producer=False, multi_consumer=False),
    "mpsc": dict(multi_producer=True, multi_consumer=False),
    "mpmc": dict(multi_producer=True, multi_consumer=True),
}
BLOB = os.urandom(1 << 16)


def payload(n, salt=0):
    start = (n * 131 + salt * 977) % (len(BLOB) - n) if n < len(BLOB) else 0
    return BLOB[start : start + n]


@pytest.fixture(params=list(MODES))
def mode(request):
    return request.param


@pytest.fixture
def make():
    """Ring factory; closes and unlinks everything it made."""
    made = []

    def factory(capacity=256, cls=shmq.Ring, **kw):
        r = cls.create(capacity, **kw)
        made.append(r)
        return r

    yield factory
    for r in made:
        r.close()
        r.unlink()


def positions(r):
    c = r.statistics()
    return c.bytes_in, c.bytes_out


def raw_word(r, offset):
    """The int64 at ``offset`` bytes into the data area."""
    return r.segment.words[(L.DATA_OFFSET + offset) // 8]


# -- record sizes, wrap-around and pads --------------------------------------------
def test_every_record_size_round_trips(make, mode):
    r = make(256, **MODES[mode])
    assert r.max_payload == 248
    for salt in range(3):  # three passes start each size at different offsets
        for n in range(0, r.max_payload + 1):
            data = payload(n, salt)
            tail, head = positions(r)
            if not r.try_write(data):
                # A record never wraps.  One longer than the room left at the end
                # of the data area waits for the reader to consume the pad that
                # fills that room, even in an otherwise empty ring.
                room = r.capacity_bytes - tail % r.capacity_bytes
                assert tail == head and (n + 15) // 8 * 8 > room
                assert r.qsize() == 0 and positions(r)[0] == tail + room  # the pad
                assert r.try_read() is None  # consumes the pad
                assert r.try_write(data)
            assert r.qsize() == 1
            assert r.try_read() == data
            assert r.empty() and r.qsize() == 0 and r.try_read() is None
        assert r.try_write(b"s" * (salt * 8 + 3)) and r.read() == b"s" * (salt * 8 + 3)


def test_every_record_size_with_a_reader_thread(make, mode):
    r = make(256, **MODES[mode])
    sizes = list(range(0, r.max_payload + 1)) * 2
    got = []
    t = threading.Thread(target=lambda: got.extend(r.read(timeout=30) for _ in sizes))
    t.start()
    try:
        for i, n in enumerate(sizes):
            r.write(payload(n, i), timeout=30)
    finally:
        t.join(60)
    assert not t.is_alive()
    assert got == [payload(n, i) for i, n in enumerate(sizes)]


def test_wrap_around_with_a_pad_record(make, mode):
    r = make(128, **MODES[mode])
    for _ in range(3):
        r.write(b"a" * 24)  # 32 ring bytes each
    assert r.read() == b"a" * 24 and r.read() == b"a" * 24
    assert positions(r) == (96, 64)
    r.write(b"b" * 40)  # needs 48 bytes, only 32 left at the end: pad, then offset 0
    assert raw_word(r, 96) == -32  # the pad record's header
    assert raw_word(r, 0) == 40  # the record's header, at the start of the data area
    assert positions(r) == (96 + 32 + 48, 64)
    assert r.qsize() == 2 and r.bytes_used() == 32 + 32 + 48
    assert r.read() == b"a" * 24
    assert r.read() == b"b" * 40  # the reader skips the pad
    assert positions(r) == (176, 176) and r.empty()


@pytest.mark.parametrize("how", ["read", "read_many", "peek"])
def test_readers_skip_pads(make, mode, how):
    r = make(128, **MODES[mode])
    r.write(b"x" * 80)  # 88 ring bytes
    assert r.read() == b"x" * 80
    r.write(b"y" * 40)  # 48 bytes > 40 left: pad + record at 0
    r.write(b"z")
    if how == "read":
        got = [r.read(), r.read()]
    elif how == "read_many":
        got = r.read_many(10)
    else:
        got = []
        for _ in range(2):
            v = r.peek()
            got.append(bytes(v))
            v.release()
            r.release()
    assert got == [b"y" * 40, b"z"]
    assert r.empty() and r.qsize() == 0


def test_write_many_pads_too(make, mode):
    r = make(128, **MODES[mode])
    r.write(b"x" * 80)
    assert r.read() == b"x" * 80
    assert r.try_write_many([b"p" * 40, b"q" * 8]) == 2
    assert raw_word(r, 88) == -40
    assert r.read_many() == [b"p" * 40, b"q" * 8]


def test_try_write_is_not_fooled_by_a_stale_head(make, mode):
    # The producer caches HEAD.  A write that must pad must not fail because
    # the cached value is old while the reader has long made room.
    r = make(128, **MODES[mode])
    assert r.try_write(b"") and r.read() == b""
    assert r.try_write(b"a" * 56)  # 64 ring bytes at offset 8
    assert not r.try_write(b"b" * 64)  # really full (56 free): the producer re-reads HEAD (8)
    assert r.read() == b"a" * 56  # empty now, HEAD at 72; the producer's copy says 8
    # 64 ring bytes, 56 left at the end: pad 56 + record 64 = 120 <= 128
    assert r.try_write(b"c" * 56)
    assert r.read() == b"c" * 56 and r.empty()


def test_arbitrary_bytes_like_objects(make):
    r = make(1024)
    items = [
        bytearray(b"bytearray"),
        memoryview(b"0123456789")[2:7],
        memoryview(b"0123456789")[::2],  # not contiguous
        array.array("i", [1, 2, 3]),
        np.arange(12, dtype=np.float64).reshape(3, 4),
        b"",
    ]
    for it in items:
        r.write(it)
    assert r.read() == b"bytearray"
    assert r.read() == b"23456"
    assert r.read() == b"02468"
    assert r.read() == array.array("i", [1, 2, 3]).tobytes()
    assert r.read() == np.arange(12, dtype=np.float64).tobytes()
    assert r.read() == b""
    with pytest.raises(TypeError):
        r.write("text is not bytes")
    assert r.empty()


# -- MessageTooLarge ------------------------------------------------------------------
@pytest.mark.parametrize("state", ["empty", "full"])
def test_message_too_large_is_raised_at_once(make, mode, state):
    r = make(256, **MODES[mode])
    if state == "full":
        while r.try_write(b"f" * 40):
            pass
    used = r.bytes_used()
    big = b"x" * (r.max_payload + 1)
    calls = [
        lambda: r.try_write(big),
        lambda: r.write_nowait(big),
        lambda: r.write(big),
        lambda: r.write(big, timeout=30),
        lambda: r.try_write_many([big]),
        lambda: r.write_many([big], timeout=30),
        lambda: r.write_many([big]),
        lambda: r.reserve(r.max_payload + 1),
        lambda: r.write(bytearray(big), timeout=30),
        lambda: r.write(np.zeros(r.max_payload + 1, dtype=np.uint8), timeout=30),
    ]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(shmq.MessageTooLarge, match=f"{r.max_payload + 1} bytes") as info:
            call()
        assert time.monotonic() - t0 < 1.0, "MessageTooLarge came after a wait"
        assert isinstance(info.value, ValueError)
    assert r.bytes_used() == used
    # and the lock, if any, was released: the ring still works
    while r.try_read() is not None:
        pass
    r.write(b"ok", timeout=5)
    assert r.read(timeout=5) == b"ok"


def test_message_too_large_after_other_records_in_a_batch(make, mode):
    r = make(256, **MODES[mode])
    big = b"x" * (r.max_payload + 1)
    assert r.try_write_many([b"a", b"b", big, b"c"]) == 2  # a prefix, then stop
    t0 = time.monotonic()
    with pytest.raises(shmq.MessageTooLarge):
        r.write_many([b"d", big, b"e"], timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert r.read_many() == [b"a", b"b", b"d"]  # the records before it were written
    # the same after the batch had to wait for room first
    while r.try_write(b"f" * 40):
        pass
    reader = threading.Thread(target=lambda: [r.read(timeout=10) for _ in range(3)])
    t0 = time.monotonic()
    reader.start()
    try:
        with pytest.raises(shmq.MessageTooLarge):
            r.write_many([b"g" * 40, b"h", big], timeout=30)
    finally:
        reader.join(30)
    assert time.monotonic() - t0 < 10


def test_largest_record_fits_exactly(make, mode):
    r = make(256, **MODES[mode])
    r.write(b"m" * r.max_payload, timeout=5)
    assert r.full() and r.bytes_used() == 256
    assert not r.try_write(b"")
    assert r.read() == b"m" * r.max_payload
    v = r.reserve(r.max_payload)
    assert v is not None and len(v) == r.max_payload
    v[:] = b"n" * r.max_payload
    v.release()
    r.commit()
    assert r.read() == b"n" * r.max_payload


# -- max_messages ----------------------------------------------------------------
def test_max_messages_limit(make, mode):
    r = make(1024, max_messages=3, **MODES[mode])
    assert r.max_messages == 3
    for i in range(3):
        assert not r.full()
        r.write_nowait(b"%d" % i)
    assert r.full() and r.qsize() == 3 and r.bytes_used() == 48
    assert not r.try_write(b"")
    assert not r.can_write(0)
    with pytest.raises(shmq.Full):
        r.write_nowait(b"x")
    with pytest.raises(shmq.Full):
        r.write(b"x", timeout=0.05)
    assert r.reserve(1) is None
    assert r.try_write_many([b"x", b"y"]) == 0
    assert r.read() == b"0"
    assert not r.full()
    with pytest.raises(shmq.Full):
        r.write_many([b"3", b"4"], timeout=0.05)
    assert r.qsize() == 3  # "3" was written before the timeout
    assert r.read_many() == [b"1", b"2", b"3"]
    assert r.try_write_many([b"a", b"b", b"c", b"d"]) == 3
    assert r.statistics().fill_ratio == 1.0


def test_create_validates_arguments():
    with pytest.raises(TypeError, match="'capacity_bytes'"):
        RingBuffer.create(1024.0)
    with pytest.raises(TypeError, match="'capacity_bytes'"):
        RingBuffer.create(True)
    with pytest.raises(ValueError, match="'capacity_bytes'"):
        RingBuffer.create(L.MIN_CAPACITY - 1)
    with pytest.raises(ValueError, match="'max_messages'"):
        RingBuffer.create(1024, max_messages=-1)
    with pytest.raises(ValueError, match="'max_messages'"):
        RingBuffer.create(1024, max_messages=1.5)


def test_capacity_is_rounded_up_to_words(make):
    r = make(100)
    assert r.capacity_bytes == 104 and r.max_payload == 96


# -- batches ---------------------------------------------------------------------------
def test_partial_batches(make, mode):
    r = make(256, **MODES[mode])
    items = [b"%03d" % i + b"." * 20 for i in range(20)]  # 32 ring bytes each
    assert r.try_write_many(items) == 8  # a prefix: as many as fit
    assert r.try_write_many(iter(items)) == 0  # any iterable
    assert r.try_read_many(3) == items[:3]
    assert r.try_read_many(max_bytes=1) == items[3:4]  # at least one record
    assert r.try_read_many(max_bytes=40) == items[4:6]
    assert r.try_write_many(x for x in items[8:]) == 6  # 6 records were read
    assert r.read_many(100, timeout=1) == items[6:14]
    assert r.try_read_many() == [] and r.try_write_many([]) == 0
    with pytest.raises(shmq.Empty):
        r.read_many(timeout=0.05)
    r.write_many(items[:3], timeout=1)
    assert r.read_many(timeout=1) == items[:3]


def test_write_many_partial_then_full(make, mode):
    r = make(256, **MODES[mode])
    items = [bytes([i]) * 24 for i in range(10)]
    t0 = time.monotonic()
    with pytest.raises(shmq.Full):
        r.write_many(items, timeout=0.1)
    assert 0.09 < time.monotonic() - t0 < 5
    assert r.read_many() == items[:8]


def test_read_many_rejects_zero_items(make):
    r = make(256)
    r.write(b"a")
    with pytest.raises(ValueError, match="'max_items'"):
        r.read_many(0, timeout=1)
    assert r.read_many(1) == [b"a"]


def test_write_many_and_read_many_across_threads(make, mode):
    r = make(512, **MODES[mode])
    items = [payload(i % 200, i) for i in range(3000)]
    got = []

    def consume():
        while len(got) < len(items):
            got.extend(r.read_many(37, timeout=30))

    t = threading.Thread(target=consume)
    t.start()
    try:
        for i in range(0, len(items), 50):
            r.write_many(items[i : i + 50], timeout=30)
    finally:
        t.join(60)
    assert got == items


# -- reserve / commit / abort ----------------------------------------------------------------
def test_reserve_commit_abort(make, mode):
    r = make(256, **MODES[mode])
    v = r.reserve(10)
    assert isinstance(v, memoryview) and len(v) == 10 and not v.readonly
    v[:5] = b"hello"
    assert r.empty() and r.qsize() == 0  # nothing visible before commit
    v.release()
    r.commit(5)
    assert r.read() == b"hello"
    v = r.reserve(10)
    v[:] = b"0123456789"
    v.release()
    r.commit()  # as reserved
    assert r.read() == b"0123456789"
    v = r.reserve(30)
    v.release()
    r.abort()
    assert r.empty() and r.statistics().messages_in == 2
    r.abort()  # nothing open: a no-op
    v = r.reserve(0)
    r.commit()
    assert r.read() == b""
    r.write(b"after")
    assert r.read() == b"after"


def test_reserve_misuse(make, mode):
    r = make(256, **MODES[mode])
    with pytest.raises(RuntimeError, match="without reserve"):
        r.commit()
    v = r.reserve(8)
    with pytest.raises(RuntimeError, match="still open"):
        r.reserve(8)
    with pytest.raises(ValueError, match="'nbytes'"):
        r.commit(9)
    with pytest.raises(ValueError, match="'nbytes'"):
        r.commit(-1)
    v.release()
    r.commit(8)
    with pytest.raises(ValueError):
        r.reserve(-1)
    assert r.read() == bytes(8)


def test_reserve_and_peek_are_not_interchangeable(make, mode):
    # commit()/abort() after peek(), or release() after reserve(), must not
    # move TAIL/HEAD or release the other side's lock.
    r = make(256, **MODES[mode])
    r.write(b"first")
    v = r.peek()
    before = r.statistics()
    with pytest.raises(RuntimeError):
        r.commit()
    r.abort()  # no reserved record: nothing to do
    after = r.statistics()
    assert (after.bytes_in, after.bytes_out, after.messages_in, after.messages_out) == (
        before.bytes_in, before.bytes_out, before.messages_in, before.messages_out)
    assert bytes(v) == b"first"
    v.release()
    r.release()
    v = r.reserve(4)
    with pytest.raises(RuntimeError):
        r.release()
    assert r.statistics().bytes_out == before.bytes_out + 16
    v[:] = b"abcd"
    v.release()
    r.commit()
    assert r.read() == b"abcd"
    if r.multi_producer:
        assert P.sem_value(r._plock._sem) == 1
    if r.multi_consumer:
        assert P.sem_value(r._clock._sem) == 1


def test_reserve_and_peek_on_one_handle_at_once(make, mode):
    r = make(256, **MODES[mode])
    r.write(b"queued")
    w = r.reserve(3)
    p = r.peek()
    assert bytes(p) == b"queued"
    w[:] = b"new"
    w.release()
    p.release()
    r.commit()
    r.release()
    assert r.read() == b"new" and r.empty()


def test_reserve_returns_none_when_full(make, mode):
    r = make(128, **MODES[mode])
    r.write(b"x" * 120)
    assert r.full()
    assert r.reserve(8) is None
    assert r.reserve(0) is None
    r.read()
    assert r.reserve(120) is not None
    r.abort()


def test_reserve_holds_the_producer_lock(make):
    r = make(256)  # multi-producer
    other = shmq.Ring.attach(r.name)
    try:
        v = r.reserve(4)
        done = threading.Event()
        t = threading.Thread(target=lambda: (other.write(b"second", timeout=30), done.set()))
        t.start()
        try:
            wait_for(lambda: thread_is_in(t, RobustLock._acquire_slow), what="the writer to wait for the lock")
            assert not done.is_set()  # blocked behind the open reservation
            v[:] = b"1st!"
            v.release()
            r.commit()
            assert done.wait(30)
        finally:
            t.join(30)
        assert r.read_many() == [b"1st!", b"second"]
    finally:
        other.close()


# -- peek / release ------------------------------------------------------------------------
def test_peek_release(make, mode):
    r = make(256, **MODES[mode])
    assert r.peek() is None
    r.write(b"one")
    r.write(b"two")
    v = r.peek()
    assert v.readonly and bytes(v) == b"one"
    with pytest.raises(TypeError):
        v[0] = 0
    assert r.qsize() == 2 and not r.empty()  # the record stays until release
    with pytest.raises(RuntimeError, match="still open"):
        r.peek()
    v.release()
    r.release()
    assert r.qsize() == 1
    with pytest.raises(RuntimeError, match="without peek"):
        r.release()
    assert r.read() == b"two"
    assert r.peek() is None


def test_peek_blocks_other_consumers(make):
    r = make(256)  # multi-consumer
    other = shmq.Ring.attach(r.name)
    try:
        r.write(b"a")
        r.write(b"b")
        v = r.peek()
        got = []
        t = threading.Thread(target=lambda: got.append(other.read(timeout=30)))
        t.start()
        try:
            wait_for(lambda: thread_is_in(t, RobustLock._acquire_slow), what="the reader to wait for the lock")
            assert got == []
            assert bytes(v) == b"a"
            v.release()
            r.release()
        finally:
            t.join(30)
        assert got == [b"b"]
    finally:
        other.close()


# -- qsize / empty / full -------------------------------------------------------------------
def test_state_queries_are_exact(make, mode):
    r = make(128, **MODES[mode])
    expected = []

    def check():
        assert r.qsize() == len(expected)
        assert r.empty() == (not expected)
        assert r.bytes_used() == positions(r)[0] - positions(r)[1]
        assert r.full() == (r.capacity_bytes - r.bytes_used() < 8)
        assert r.can_read() == (not r.empty())

    check()
    for i in range(7):
        r.write_nowait(b"%02d" % i)  # 16 ring bytes
        expected.append(b"%02d" % i)
        check()
    r.write_nowait(b"77")
    expected.append(b"77")
    check()
    assert r.full() and not r.can_write(0)
    for _ in range(3):
        assert r.read() == expected.pop(0)
        check()
    assert r.can_write(40) and not r.can_write(41)
    r.write(b"z" * 40)
    expected.append(b"z" * 40)
    check()
    while expected:
        assert r.read() == expected.pop(0)
        check()
    assert repr(r).startswith("<Ring ")


# -- timeouts ----------------------------------------------------------------------------
def test_read_timeout(make, mode):
    r = make(256, **MODES[mode])
    for timeout in (0, 0.01, 0.2):
        t0 = time.monotonic()
        with pytest.raises(shmq.Empty) as info:
            r.read(timeout=timeout)
        elapsed = time.monotonic() - t0
        assert timeout <= elapsed < timeout + 1.0
        assert isinstance(info.value, __import__("queue").Empty)
    with pytest.raises(shmq.Empty):
        r.read_nowait()
    with pytest.raises(shmq.Empty):
        r.read_many(timeout=0.01)


def test_write_timeout(make, mode):
    r = make(256, **MODES[mode])
    while r.try_write(b"x" * 24):
        pass
    for timeout in (0, 0.01, 0.2):
        t0 = time.monotonic()
        with pytest.raises(shmq.Full) as info:
            r.write(b"y", timeout=timeout)
        elapsed = time.monotonic() - t0
        assert timeout <= elapsed < timeout + 1.0
        assert isinstance(info.value, __import__("queue").Full)
    with pytest.raises(shmq.Full):
        r.write_nowait(b"y")


@pytest.mark.parametrize("state", ["ready", "blocked"])
def test_negative_timeout_is_a_value_error(make, state):
    r = make(256)
    if state == "ready":
        r.write(b"x")  # a read could complete, a write too
    else:
        while r.try_write(b"x" * 24):
            pass
    for call in (
        lambda: r.read(timeout=-1),
        lambda: r.read_many(timeout=-0.5),
        lambda: r.write(b"y", timeout=-1),
        lambda: r.write_many([b"y"], timeout=-1),
    ):
        before = r.statistics()
        with pytest.raises(ValueError, match="'timeout'"):
            call()
        assert r.statistics().messages_in == before.messages_in
        assert r.statistics().messages_out == before.messages_out
    if state == "blocked":
        while r.try_read() is not None:
            pass


def test_timeout_is_for_the_whole_call(make):
    # The writer waits, a reader frees room that is not enough (the record
    # must also pad), the writer waits again: still one deadline.
    r = make(128)
    r.write(b"s" * 8)  # 16 ring bytes at 0
    r.write(b"L" * 72)  # 80 ring bytes at 16: tail at 96, 32 left at the end
    timeout = 1.5
    t0 = time.monotonic()

    def free_a_little():
        wait_for(lambda: r.segment.words[L.W_PRODUCER_WAITING], what="the writer to sleep")
        wait_for(lambda: time.monotonic() > t0 + timeout * 0.75, what="3/4 of the timeout")
        assert r.read() == b"s" * 8

    t = threading.Thread(target=free_a_little)
    t.start()
    try:
        with pytest.raises(shmq.Full):
            r.write(b"w" * 40, timeout=timeout)  # 48 ring bytes
        elapsed = time.monotonic() - t0
    finally:
        t.join(30)
    assert timeout <= elapsed < timeout + 0.6, elapsed


class Trigger(threading.Thread):
    """CPython test_queue's trigger thread, without the sleep: it acts once
    the blocked call has raised the ring's waiting flag (it is about to sleep)."""

    def __init__(self, ring, word, fn):
        super().__init__()
        self.ring, self.word, self.fn = ring, word, fn
        self.started = threading.Event()
        self.error = None

    def run(self):
        try:
            wait_for(lambda: self.ring.segment.words[self.word] == 1, what="the call to block")
            self.started.set()
            self.fn()
        except BaseException as exc:  # pragma: no cover - reported by the test
            self.error = exc


def do_blocking_test(block_func, trigger):
    trigger.start()
    try:
        result = block_func()
        assert trigger.started.is_set(), f"blocking function {block_func!r} appeared not to block"
        return result
    finally:
        trigger.join(30)
        assert not trigger.is_alive() and trigger.error is None, trigger.error


def test_blocking_calls_really_block(make, mode):
    r = make(128, **MODES[mode])
    other = shmq.Ring.attach(r.name)
    try:
        got = do_blocking_test(
            lambda: r.read(timeout=30), Trigger(r, L.W_CONSUMER_WAITING, lambda: other.write(b"wake"))
        )
        assert got == b"wake"
        got = do_blocking_test(
            lambda: r.read_many(timeout=None), Trigger(r, L.W_CONSUMER_WAITING, lambda: other.write(b"up"))
        )
        assert got == [b"up"]
        assert positions(r)[0] % 32 == 0
        for _ in range(4):
            r.write(b"f" * 24)  # 32 ring bytes each
        assert r.full()
        do_blocking_test(
            lambda: r.write(b"g", timeout=30), Trigger(r, L.W_PRODUCER_WAITING, lambda: other.read())
        )
        do_blocking_test(
            lambda: r.write_many([b"h" * 8, b"i"], timeout=None),  # "h" fits at once, "i" waits
            Trigger(r, L.W_PRODUCER_WAITING, lambda: other.read()),
        )
        assert r.read_many() == [b"f" * 24, b"f" * 24, b"g", b"h" * 8, b"i"]
        c = r.statistics()
        assert c.empty_waits >= 2 and c.full_waits >= 2
    finally:
        other.close()


# -- counters and statistics --------------------------------------------------------------
def test_counters_and_statistics(make, mode):
    r = make(256, **MODES[mode])
    s = r.statistics()
    assert (s.messages_in, s.messages_out, s.bytes_in, s.bytes_out, s.bytes_used) == (0, 0, 0, 0, 0)
    assert s.capacity_bytes == 256 and s.name == r.name and s.fill_ratio == 0.0
    assert s.creator_pid == os.getpid() and s.creator_alive
    sizes = [0, 1, 7, 8, 9, 100]
    for n in sizes:
        r.write(b"c" * n)
    ring_bytes = sum((n + 15) // 8 * 8 for n in sizes)
    c = r.statistics()
    assert c.messages_in == 6 and c.bytes_in == ring_bytes == c.bytes_used
    assert c.messages_out == 0 and c.bytes_out == 0
    r.read()
    r.read()
    s = r.statistics()
    assert s.messages_in == 6 and s.messages_out == 2 and s.messages_used == 4
    assert s.bytes_out == 8 + 16 and s.bytes_used == ring_bytes - 24
    assert s.peak_bytes >= ring_bytes - 24
    assert s.fill_ratio == pytest.approx(s.bytes_used / 256)
    assert len(r.read_many()) == 4
    with pytest.raises(shmq.Empty):
        r.read_many(timeout=0.01)
    s = r.statistics()
    assert s.messages_out == 6 and s.empty_waits == 1 and s.empty_wait_seconds >= 0.009
    while r.try_write(b"x" * 50):
        pass
    assert r.statistics().peak_bytes >= 256 - 64
    with pytest.raises(shmq.Full):
        r.write(b"y" * 100, timeout=0.01)
    s = r.statistics()
    assert s.full_waits == 1 and s.full_wait_seconds >= 0.009
    # any attached handle reads the same shared counters
    other = shmq.Ring.attach(r.name)
    try:
        o = other.statistics()
        assert (o.messages_in, o.messages_out, o.bytes_in, o.full_waits) == (
            s.messages_in,
            s.messages_out,
            s.bytes_in,
            s.full_waits,
        )
        # The creator wrote and read here, so its entry carries both roles;
        # `other` has only attached.
        roles = sorted(p.role for p in o.participants)
        assert roles == ["attached", "creator+producer+consumer"]
    finally:
        other.close()
    with pytest.raises(Exception):
        s.messages_in = 0  # frozen


# -- lifetime ----------------------------------------------------------------------------
def test_use_after_close_raises_closed_error(make, mode):
    r = make(256, **MODES[mode])
    r.write(b"x")
    r.close()
    assert r.closed
    r.close()  # idempotent
    assert "closed" in repr(r)
    calls = [
        lambda: r.write(b"x"),
        lambda: r.write_nowait(b"x"),
        lambda: r.write_many([b"x"]),
        lambda: r.try_write(b"x"),
        lambda: r.try_write_many([b"x"]),
        lambda: r.read(),
        lambda: r.read_nowait(),
        lambda: r.read_many(),
        lambda: r.try_read(),
        lambda: r.try_read_many(),
        lambda: r.reserve(1),
        lambda: r.commit(),
        lambda: r.abort(),
        lambda: r.peek(),
        lambda: r.release(),
        lambda: r.qsize(),
        lambda: r.empty(),
        lambda: r.full(),
        lambda: r.bytes_used(),
        lambda: r.can_write(1),
        lambda: r.can_read(),
        lambda: r.statistics(),
        lambda: r.participants(),
        lambda: r.creator_alive(),
        lambda: pickle.dumps(r),
    ]
    for call in calls:
        with pytest.raises(shmq.ClosedError, match="closed"):
            call()
    assert issubclass(shmq.ClosedError, ValueError)
    other = shmq.Ring.attach(r.name)  # the ring itself is still there
    try:
        assert other.read() == b"x"
    finally:
        other.close()


def test_close_with_an_open_reservation_or_peek_releases_the_locks(make):
    r = make(256)
    other = shmq.Ring.attach(r.name)
    try:
        other.write(b"kept")
        v = other.reserve(8)
        p = other.peek()
        v.release()
        p.release()
        other.close()
        # neither lock is left held by a closed handle
        r.write(b"more", timeout=5)
        assert r.read(timeout=5) == b"kept"
        assert r.read(timeout=5) == b"more"
    finally:
        other.close()


def test_context_manager(make):
    r = make(256)
    with shmq.Ring.attach(r.name) as other:
        other.write(b"x")
    assert other.closed
    assert r.read() == b"x"


def test_unlinked_ring_keeps_working_for_open_handles(make):
    r = make(256)
    other = shmq.Ring.attach(r.name)
    try:
        r.unlink()
        with pytest.raises(FileNotFoundError):
            shmq.Ring.attach(r.name)
        other.write(b"still works")
        assert r.read(timeout=5) == b"still works"
        with pytest.raises(shmq.BrokenError):
            r.segment.check_exists()
    finally:
        other.close()


# -- pickling -------------------------------------------------------------------------------
def test_pickling_gives_an_attached_handle(make, mode):
    r = make(256, **MODES[mode])
    clone = pickle.loads(pickle.dumps(r))
    try:
        assert type(clone) is shmq.Ring and clone is not r
        assert clone.name == r.name and not clone.segment.is_creator
        assert (clone.multi_producer, clone.multi_consumer) == (r.multi_producer, r.multi_consumer)
        clone.write(b"via clone")
        assert r.read() == b"via clone"
    finally:
        clone.close()
    rb = RingBuffer.create(128)
    try:
        rb2 = pickle.loads(pickle.dumps(rb))
        assert type(rb2) is RingBuffer
        rb2.close()
    finally:
        rb.close()
        rb.unlink()


def _echo(ring):
    ring.write(ring.read(timeout=30) + b" back")
    ring.close()


def test_ring_passed_to_a_process(make, ctx):
    r = make(256)
    p = ctx.Process(target=_echo, args=(r,))
    p.start()
    try:
        r.write(b"there")
        join_all([p])
        assert p.exitcode == 0
        assert r.read(timeout=10) == b"there back"
    finally:
        join_all([p])


# -- Ctrl-C --------------------------------------------------------------------------------
BLOCKED_CHILD = """
import signal, sys, shmq

def on_term(signum, frame):
    sys.exit("terminated")  # the usual graceful-shutdown handler

signal.signal(signal.SIGTERM, on_term)
r = shmq.Ring.attach(sys.argv[1])
print("ready", flush=True)
try:
    if sys.argv[2] == "read":
        r.read()
    else:
        r.write(b"z" * 100)
except (KeyboardInterrupt, SystemExit) as exc:
    print("interrupted", type(exc).__name__, flush=True)
    r.close()
    sys.exit(0)
print("returned?!", flush=True)
sys.exit(3)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("op", ["read", "write"])
def test_signals_interrupt_a_blocked_call(make, op, sig):
    # Ctrl-C raises KeyboardInterrupt in a process blocked in read()/write();
    # so does any exception a signal handler raises (SystemExit from SIGTERM).
    r = make(128)
    if op == "write":
        r.write(b"f" * 100)
    word = L.W_CONSUMER_WAITING if op == "read" else L.W_PRODUCER_WAITING
    with subprocess.Popen(
        [sys.executable, "-c", BLOCKED_CHILD, r.name, op], stdout=subprocess.PIPE, bufsize=0
    ) as proc:
        try:
            assert read_line(proc.stdout) == b"ready\n"
            wait_for(lambda: r.segment.words[word] == 1, what="the child to block")
            t0 = time.monotonic()
            proc.send_signal(getattr(signal, sig))
            expected = "KeyboardInterrupt" if sig == "SIGINT" else "SystemExit"
            assert read_line(proc.stdout, timeout=10) == f"interrupted {expected}\n".encode()
            assert time.monotonic() - t0 < 5
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# -- threads sharing a ring ------------------------------------------------------------------
def test_threads_share_a_multi_producer_multi_consumer_ring(make):
    r = make(1024)
    n_prod, n_cons, per = 4, 3, 1500
    received = [[] for _ in range(n_cons)]
    errors = []
    handles = [r, shmq.Ring.attach(r.name)]  # one shared handle, and a second one

    def produce(p):
        h = handles[p % 2]
        try:
            for i in range(per):
                rec = b"%d:%d:" % (p, i) + payload(i % 300, p)
                if i % 3 == 0:
                    h.write(rec, timeout=30)
                elif i % 3 == 1:
                    h.write_many([rec], timeout=30)
                else:
                    # reserve/commit on a handle shared by threads: one open
                    # record per handle, so use a handle of our own
                    own = local_handles[p]
                    while True:
                        v = own.reserve(len(rec))
                        if v is not None:
                            break
                        wait_for(lambda: own.can_write(len(rec)), timeout=30, interval=0.0005)
                    v[:] = rec
                    v.release()
                    own.commit()
        except BaseException as exc:
            errors.append(exc)

    def consume(c):
        h = handles[c % 2]
        total = n_prod * per
        try:
            while sum(map(len, received)) < total:
                try:
                    got = h.read_many(16, timeout=0.05) if c % 2 else [h.read(timeout=0.05)]
                except shmq.Empty:
                    continue
                received[c].extend(got)
        except BaseException as exc:
            errors.append(exc)

    local_handles = [shmq.Ring.attach(r.name) for _ in range(n_prod)]
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(n_prod)]
    threads += [threading.Thread(target=consume, args=(c,)) for c in range(n_cons)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
    finally:
        for h in local_handles + handles[1:]:
            h.close()
    assert not errors, errors
    seen = {}
    for c, recs in enumerate(received):
        last = {}
        for rec in recs:
            p, i, body = rec.split(b":", 2)
            p, i = int(p), int(i)
            assert body == payload(i % 300, p), "torn record"
            assert (p, i) not in seen, "duplicate"
            seen[(p, i)] = c
            assert last.get(p, -1) < i, "reordered within one producer"
            last[p] = i
    assert len(seen) == n_prod * per
    assert r.empty() and r.qsize() == 0
    assert P.sem_value(r._plock._sem) == 1 and P.sem_value(r._clock._sem) == 1


def test_the_queue_closures_raise_closed_error_after_close(make, mode):
    """encoding_writer/decoding_reader's closures (shmq.Queue's put and get)
    outlive the handle: after close() they raise ClosedError, not a
    released-memoryview ValueError, and leave no lock held."""
    r = make(256, **MODES[mode])
    other = shmq.Ring.attach(r.name)
    try:
        def refuse(*args):
            raise AssertionError(args)

        put = other.encoding_writer(pickle.dumps, 5, None, refuse, other.max_payload, refuse, refuse)
        get = other.decoding_reader(pickle.loads, refuse, lambda owner, data, block, timeout: data)
        assert put(None, "kept") is None
        other.close()
        for call in (lambda: put(None, "lost"), lambda: get(None)):
            with pytest.raises(shmq.ClosedError, match="closed"):
                call()
        r.write(b"more", timeout=5)  # neither lock was left held
        assert pickle.loads(r.read(timeout=5)) == "kept"
        assert r.read(timeout=5) == b"more"
    finally:
        other.close()

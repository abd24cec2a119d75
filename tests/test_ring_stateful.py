"""A Hypothesis state machine drives a ring (two handles on one ring) and
checks every answer against a model: a deque of records and pads with the
ring's byte positions.  The model states the protocol exactly: where a pad
goes, when a write fails, what each read returns, what every counter says.

Every shape of the record logic that tools/gen_ring.py writes is a rule here
(try_write, try_write_many, reserve/commit, the Queue's put closure; try_read,
try_read_many, peek/release, the Queue's get closure), so a change that makes
one shape differ from the protocol fails this test."""
from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shmq

PAD = None  # a pad entry in the model: (PAD, size)


def need(n):
    return (n + 15) & ~7


class RingModel:
    """The ring as the protocol defines it."""

    def __init__(self, cap, max_messages, multi_consumer):
        self.cap = cap
        self.maxm = max_messages
        # On a multi-consumer ring a writer that must pad an empty ring takes
        # the consumer lock for a moment and skips its own pad; a lock-free
        # reader could be about to read that pad, so there the pad stays.
        self.skips_own_pad = multi_consumer
        self.tail = self.head = 0
        self.entries = deque()  # (payload bytes, ring bytes) or (PAD, ring bytes)
        self.msgs_in = self.msgs_out = 0

    @property
    def free(self):
        return self.cap - (self.tail - self.head)

    @property
    def records(self):
        return sum(1 for e in self.entries if e[0] is not PAD)

    def msgs_full(self):
        return bool(self.maxm) and self.msgs_in - self.msgs_out >= self.maxm

    def _pad(self):
        room = self.cap - self.tail % self.cap
        if self.skips_own_pad and self.tail == self.head:  # nothing unread
            self.head += room
        else:
            self.entries.append((PAD, room))
        self.tail += room
        return room

    def place(self, n):
        """Where a record of n bytes goes: 'fits', 'pad-then-fits',
        'pad-only' (a pad is published, the record is not), 'full', 'too-large'."""
        if n > self.cap - 8:
            return "too-large"
        k = need(n)
        if k > self.free or self.msgs_full():
            return "full"
        room = self.cap - self.tail % self.cap
        if k <= room:
            return "fits"
        if self.skips_own_pad and self.tail == self.head:
            return "pad-then-fits"
        return "pad-then-fits" if room + k <= self.free else "pad-only"

    def write(self, data):
        where = self.place(len(data))
        if where in ("too-large", "full"):
            return where
        if where != "fits":
            self._pad()
            if where == "pad-only":
                return where
        self.append(data, self.tail)
        return where

    def append(self, data, pos):
        assert pos == self.tail
        self.entries.append((bytes(data), need(len(data))))
        self.tail += need(len(data))
        self.msgs_in += 1

    def write_many(self, items):
        """A batch is writes until one does not go in (a pad it leaves stays);
        a record that can never fit stops it, or raises if it comes first."""
        count = 0
        for data in items:
            where = self.write(data)
            if where == "too-large" and not count:
                return where
            if where not in ("fits", "pad-then-fits"):
                break
            count += 1
        return count

    def pop(self):
        """Remove the oldest record (and a pad before it); None if there is
        none (a lone pad is consumed)."""
        while self.entries:
            data, size = self.entries.popleft()
            self.head += size
            if data is not PAD:
                self.msgs_out += 1
                return data
        return None

    def read_many(self, max_items, max_bytes):
        out, nbytes = [], 0
        while self.entries and len(out) < max_items and nbytes < max_bytes:
            data, size = self.entries.popleft()
            self.head += size
            if data is not PAD:
                self.msgs_out += 1
                out.append(data)
                nbytes += len(data)
        return out

    def front(self):
        """What peek() sees: the oldest record, after a pad it skips; a pad
        with nothing behind it is consumed.  Returns the record or None."""
        if self.entries and self.entries[0][0] is PAD and len(self.entries) == 1:
            self.head += self.entries.popleft()[1]
            return None
        for data, _ in self.entries:
            if data is not PAD:
                return data
        return None


def _identity_dumps(obj, protocol, buffer_callback=None):
    return obj


def closures(ring):
    """The ring's encoding_writer and decoding_reader (shmq.Queue's put and
    get), with records as their own encoding: ``put(record)`` -> None if
    written, "full", or "long" (longer than the ring can hold); ``get()`` ->
    the record or None."""
    put = ring.encoding_writer(
        _identity_dumps, 5, None, None, ring.max_payload,
        lambda owner, obj, data, block, timeout: "long",
        lambda owner, data, block, timeout: "full",
    )
    get = ring.decoding_reader(bytes, None, lambda owner, data, block, timeout: data)
    return (lambda rec: put(None, rec)), (lambda: get(None))


sizes = st.one_of(
    st.integers(0, 24),
    st.integers(0, 256),
    st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 55, 56, 57, 63, 64]),
)


class RingMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.rings = []
        self.serial = 0

    @initialize(
        cap=st.sampled_from([64, 72, 96, 128, 200]),
        maxm=st.sampled_from([0, 0, 0, 1, 2, 5]),
        multi_producer=st.booleans(),
        multi_consumer=st.booleans(),
    )
    def create(self, cap, maxm, multi_producer, multi_consumer):
        ring = shmq.Ring.create(
            cap, max_messages=maxm, multi_producer=multi_producer, multi_consumer=multi_consumer
        )
        self.rings = [ring, shmq.Ring.attach(ring.name)]
        self.closures = [closures(r) for r in self.rings]
        self.model = RingModel(ring.capacity_bytes, maxm, multi_consumer)
        self.reserved = None  # (handle, n, position) of an open reserve()
        self.peeked = None  # (handle, record) of an open peek()

    def teardown(self):
        for r in self.rings[1:]:
            r.close()
        if self.rings:
            self.rings[0].close()
            self.rings[0].unlink()

    def payload(self, n):
        self.serial += 1
        return bytes((self.serial * 7 + i) % 251 for i in range(n))

    def writable(self):
        return self.rings and self.reserved is None

    def readable(self):
        return self.rings and self.peeked is None

    # -- producer side -----------------------------------------------------
    @precondition(writable)
    @rule(n=sizes, h=st.integers(0, 1))
    def write(self, n, h):
        data = self.payload(n)
        ring = self.rings[h]
        if n > self.model.cap - 8:
            with pytest.raises(shmq.MessageTooLarge):
                ring.try_write(data)
            return
        expected = self.model.write(data)
        assert ring.try_write(data) == (expected in ("fits", "pad-then-fits")), expected

    @precondition(writable)
    @rule(n=sizes, h=st.integers(0, 1))
    def put(self, n, h):
        data = self.payload(n)
        put = self.closures[h][0]
        if n > self.model.cap - 8:
            assert put(data) == "long"
            return
        expected = self.model.write(data)
        assert put(data) == (None if expected in ("fits", "pad-then-fits") else "full"), expected

    @precondition(writable)
    @rule(ns=st.lists(sizes, max_size=6), h=st.integers(0, 1))
    def write_many(self, ns, h):
        items = [self.payload(n) for n in ns]
        expected = self.model.write_many(items)
        if expected == "too-large":
            with pytest.raises(shmq.MessageTooLarge):
                self.rings[h].try_write_many(items)
        else:
            assert self.rings[h].try_write_many(items) == expected

    @precondition(writable)
    @rule(n=sizes, h=st.integers(0, 1))
    def reserve(self, n, h):
        ring = self.rings[h]
        where = self.model.place(n)
        if where == "too-large":
            with pytest.raises(shmq.MessageTooLarge):
                ring.reserve(n)
            return
        view = ring.reserve(n)
        if where in ("full", "pad-only"):
            assert view is None
            if where == "pad-only":
                self.model._pad()
            return
        assert view is not None and len(view) == n and not view.readonly
        if where == "pad-then-fits":
            self.model._pad()
        view[:] = self.payload(n)
        self.reserved = (ring, n, bytes(view), self.model.tail)
        view.release()

    @precondition(lambda self: self.rings and self.reserved is not None)
    @rule(data=st.data())
    def commit(self, data):
        ring, n, content, pos = self.reserved
        k = data.draw(st.one_of(st.none(), st.integers(0, n)))
        ring.commit(k)
        self.model.append(content if k is None else content[:k], pos)
        self.reserved = None

    @precondition(lambda self: self.rings and self.reserved is not None)
    @rule()
    def abort(self):
        self.reserved[0].abort()
        self.reserved = None

    # -- consumer side -----------------------------------------------------
    @precondition(readable)
    @rule(h=st.integers(0, 1))
    def read(self, h):
        assert self.rings[h].try_read() == self.model.pop()

    @precondition(readable)
    @rule(h=st.integers(0, 1))
    def get(self, h):
        assert self.closures[h][1]() == self.model.pop()

    @precondition(readable)
    @rule(h=st.integers(0, 1), max_items=st.integers(1, 5), max_bytes=st.sampled_from([1 << 62, 1, 20, 100]))
    def read_many(self, h, max_items, max_bytes):
        assert self.rings[h].try_read_many(max_items, max_bytes) == self.model.read_many(max_items, max_bytes)

    @precondition(readable)
    @rule(h=st.integers(0, 1))
    def peek(self, h):
        ring = self.rings[h]
        expected = self.model.front()
        view = ring.peek()
        if expected is None:
            assert view is None
            return
        assert view is not None and view.readonly and bytes(view) == expected
        view.release()
        self.peeked = (ring, expected)

    @precondition(lambda self: self.rings and self.peeked is not None)
    @rule()
    def release(self):
        ring, expected = self.peeked
        ring.release()
        assert self.model.pop() == expected
        self.peeked = None

    # -- what both handles report at every step ------------------------------
    @invariant()
    def counters_agree(self):
        if not self.rings:
            return
        m = self.model
        for ring in self.rings:
            c = ring.statistics()
            assert (c.bytes_in, c.bytes_out) == (m.tail, m.head)
            assert (c.messages_in, c.messages_out) == (m.msgs_in, m.msgs_out)
            assert c.bytes_used == m.tail - m.head == ring.bytes_used()
            assert ring.qsize() == m.records
            assert ring.empty() == (m.tail == m.head)
            assert ring.can_read() == (m.tail != m.head)
            assert ring.full() == (m.msgs_full() or m.free < 8)
            if self.reserved is None:
                for n in (0, 8, 30, m.cap - 8):
                    assert ring.can_write(n) == (need(n) <= m.free and not m.msgs_full())


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

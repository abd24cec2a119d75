"""Words written by a peer are not trusted: a table of corrupt values over
every word of a ring's kind header (and the length words of records and
pads in its data area).

Each case runs in a child process with a time limit: the parent builds a
ring that has wrapped around (so stale, already consumed records lie in its
data area), overwrites one word, and a forked child attaches by name and
writes, reads, reads in batches, peeks, and uses the Queue's put/get
closures, each with a short timeout.  The child must end every operation by
returning data, raising a ShmqError subclass (LayoutError at attach,
CorruptError, Full/Empty on timeout), never hang, never crash, and never
deliver a record the parent consumed before, nor one record twice.
"""
from __future__ import annotations

import multiprocessing as mp
import random
import time
import traceback

import pytest

import shmq
from shmq import _layout as L

from conftest import join_all

CTX = mp.get_context("fork")
CAP = 256
TIMEOUT = 0.02  # seconds, for every blocking operation of the child
CHILD_LIMIT = 20.0  # seconds a child may take (all its operations: well under 1 s)
OP_LIMIT = TIMEOUT + 1.0  # seconds one operation may take: its timeout holds
MODES = {
    "mpmc": dict(multi_producer=True, multi_consumer=True),
    "spsc": dict(multi_producer=False, multi_consumer=False),
}
HUGE = (1 << 63) - 1


def item(seq: int) -> bytes:
    """Record ``seq``: unique, of varying size (boundaries differ each lap)."""
    return b"item%05d:" % seq + bytes([65 + seq % 26]) * (seq * 7 % 41)


def build(name_holder: list, mode: str = "mpmc") -> tuple:
    """A ring that has wrapped, with three unread records.  Returns (ring,
    the records the parent consumed)."""
    ring = shmq.Ring.create(CAP, **MODES[mode])
    name_holder.append(ring)
    consumed = set()
    seq = 0
    while ring.statistics().bytes_in < 3 * CAP:
        ring.write(item(seq), timeout=1)
        seq += 1
        consumed.add(ring.read(timeout=1))
    for _ in range(3):
        ring.write(item(seq), timeout=1)
        seq += 1
    return ring, consumed


def _child(name: str, conn) -> None:
    """Attach and use the ring; send (outcomes, records delivered, failure)."""
    outcomes, delivered, failure = [], [], None
    try:
        try:
            ring = shmq.Ring.attach(name)
        except shmq.ShmqError as exc:
            conn.send(([("attach", type(exc).__name__, 0.0)], [], None))
            return
        put = ring.encoding_writer(
            lambda obj, protocol, buffer_callback=None: obj, 5, None, None, ring.max_payload,
            lambda *a: "long", lambda *a: "full",
        )
        get = ring.decoding_reader(bytes, None, lambda owner, data, block, timeout: data)

        def peek():
            view = ring.peek()
            if view is None:
                return None
            data = bytes(view)
            view.release()
            ring.release()
            return data

        ops = [
            ("read", lambda: [ring.read(timeout=TIMEOUT)]),
            ("write", lambda: ring.write(b"child-write", timeout=TIMEOUT)),
            ("read_many", lambda: ring.read_many(4, timeout=TIMEOUT)),
            ("peek", lambda: [peek()]),
            ("write_many", lambda: ring.write_many([b"child-many-%d" % i for i in range(3)], timeout=TIMEOUT)),
            ("get", lambda: [get(None)]),
            ("put", lambda: put(None, b"child-put")),
            ("read_many", lambda: ring.read_many(8, timeout=TIMEOUT)),
            ("reserve", lambda: ring.reserve(8)),
        ]
        for what, op in ops:
            t0 = time.monotonic()
            try:
                result = op()
            except shmq.ShmqError as exc:
                outcomes.append((what, type(exc).__name__, time.monotonic() - t0))
                continue
            if what == "reserve" and result is not None:
                result.release()
                ring.abort()
            elif isinstance(result, list):
                delivered += [r for r in result if r is not None]
            outcomes.append((what, "ok", time.monotonic() - t0))
        ring.close()
    except BaseException:
        failure = traceback.format_exc()
    conn.send((outcomes, delivered, failure))


def run_case(ring, consumed, where):
    here, there = CTX.Pipe(duplex=False)
    p = CTX.Process(target=_child, args=(ring.name, there))
    p.start()
    there.close()
    got = here.poll(CHILD_LIMIT)
    if not got:
        p.kill()
    join_all([p], timeout=30)
    assert got, f"{where}: the child hung (killed after {CHILD_LIMIT} s)"
    outcomes, delivered, failure = here.recv()
    assert failure is None, f"{where}: the child raised a non-shmq exception:\n{failure}"
    assert p.exitcode == 0, f"{where}: the child died with exit code {p.exitcode}"
    again = [r for r in delivered if r in consumed]
    assert not again, f"{where}: records consumed before were delivered again: {again[:3]}"
    mine = [r for r in delivered if r.startswith(b"item")]
    assert len(mine) == len(set(mine)), f"{where}: a record was delivered twice: {mine}"
    slow = [(what, round(seconds, 2)) for what, _, seconds in outcomes if seconds > OP_LIMIT]
    assert not slow, f"{where}: operations ran past their timeout: {slow}"
    return [(what, outcome) for what, outcome, _ in outcomes]


HEADER_WORDS = range(L.W_KIND_HEADER, L.W_RING_HEADER_END)


def values(original: int) -> list:
    rng = random.Random(original * 31 + 7)
    out = [0, -1, HUGE, -HUGE - 1, original + 1, original - 1, CAP + 1, rng.randrange(-(1 << 40), 1 << 40)]
    return list(dict.fromkeys(v for v in out if v != original))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("word", HEADER_WORDS, ids=lambda w: f"w{w}")
def test_a_corrupt_header_word_never_hangs_crashes_or_redelivers(word, mode):
    made = []
    try:
        for value in values(build(made, mode)[0].segment.words[word]):
            ring, consumed = build(made, mode)
            ring.segment.words[word] = value
            run_case(ring, consumed, f"word {word} = {value} ({mode})")
    finally:
        for ring in made:
            ring.close()
            ring.unlink()


def _record_words(ring):
    """Byte positions of the length words of the unread records (and pads)."""
    w = ring.segment.words
    head, tail = w[L.W_HEAD], w[L.W_TAIL]
    out = []
    while head < tail:
        pos = L.DATA_OFFSET + head % CAP
        out.append(pos >> 3)
        n = w[pos >> 3]
        head += -n if n < 0 else (n + 15) & -8
    return out


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_corrupt_record_length_never_hangs_crashes_or_redelivers(which):
    made = []
    try:
        for k in range(8):
            ring, consumed = build(made)
            words = _record_words(ring)
            word = words[0] if which == "first" else words[-1]
            original = ring.segment.words[word]
            value = values(original)[k % len(values(original))] if k < 7 else original + 8
            ring.segment.words[word] = value
            run_case(ring, consumed, f"{which} record's length {original} -> {value}")
    finally:
        for ring in made:
            ring.close()
            ring.unlink()


def test_a_corrupt_pad_never_hangs_crashes_or_redelivers():
    """A pad record's length word, with one record after it."""
    made = []
    try:
        for value in (0, -1, -8, 8, -(CAP + 8), HUGE, -HUGE - 1):
            ring = shmq.Ring.create(CAP)
            made.append(ring)
            ring.write(b"a" * 150)
            assert ring.read() == b"a" * 150
            ring.write(b"b" * 150)  # pads the last 96 bytes, then starts the area
            w = ring.segment.words
            pad = (L.DATA_OFFSET + 160) >> 3
            assert w[pad] == -(CAP - 160)
            w[pad] = value
            run_case(ring, {b"a" * 150}, f"pad -96 -> {value}")
    finally:
        for ring in made:
            ring.close()
            ring.unlink()


def test_corrupt_indices_raise_corrupt_error_at_once():
    """The outcomes, not only "no hang": HEAD past TAIL, TAIL beyond the
    capacity, a record running past TAIL -- CorruptError, also a BrokenError."""
    assert issubclass(shmq.CorruptError, shmq.BrokenError)
    made = []
    try:
        for word, value in ((L.W_HEAD, HUGE), (L.W_TAIL, 0), (L.W_TAIL, HUGE), (L.W_HEAD, -8)):
            ring, consumed = build(made)
            ring.segment.words[word] = value
            outcomes = dict(run_case(ring, consumed, f"word {word} = {value}"))
            assert outcomes["read"] == outcomes["read_many"] == outcomes["get"] == "CorruptError", outcomes
            assert outcomes["write"] == "CorruptError", outcomes
        ring, consumed = build(made)
        first = _record_words(ring)[0]
        ring.segment.words[first] = CAP * 2
        outcomes = dict(run_case(ring, consumed, "length 2 * capacity"))
        assert outcomes["read"] == "CorruptError", outcomes
    finally:
        for ring in made:
            ring.close()
            ring.unlink()


@pytest.mark.parametrize("value", [0, -1, 8, 63, 1 << 40, CAP + 1, CAP * 2])
def test_attach_checks_the_capacity(value):
    ring = shmq.Ring.create(CAP)
    try:
        ring.segment.words[L.W_CAPACITY] = value
        with pytest.raises(shmq.LayoutError, match="CAPACITY"):
            shmq.Ring.attach(ring.name)
    finally:
        ring.close()
        ring.unlink()


@pytest.mark.parametrize("word, value", [(L.W_MAX_MESSAGES, -1), (L.W_FLAGS, -1), (L.W_FLAGS, 4)])
def test_attach_checks_max_messages_and_flags(word, value):
    ring = shmq.Ring.create(CAP)
    try:
        ring.segment.words[word] = value
        with pytest.raises(shmq.LayoutError):
            shmq.Ring.attach(ring.name)
    finally:
        ring.close()
        ring.unlink()

"""The worker side of :class:`shmq.pipeline.Pipeline`: one process of one stage.

A worker takes messages from its stage's input queue, runs the stage's
function and puts the results on the next stage's queue (the last stage's go
to the parent).  It never talks to the parent through a pipe: what the parent
needs to know -- which source items the worker holds right now, and its
counters -- it writes into the worker's row of the stage's *status table*, a
shared ``RawArray`` of int64 words the parent reads (also after the worker is
killed: that is how a crashed worker's items are retried).

Messages are ``(kind, tags, value)`` tuples:

``kind``
    DATA (a value), CHUNK (``tags`` is the first seq of consecutive whole
    items, ``value`` the list of their values: how the feeder sends runs of
    source items, and how a map stage passes them on), HOLE (``value`` says why no value: filtered, skipped,
    dead-lettered, an empty flat_map, merged into a batch) or ERROR (a stage
    raised under ``on_error="raise"``; ``value`` describes the exception).
``tags``
    where the value came from: an int ``seq`` (source item number) for a
    whole item; a tuple of keys ``(seq, sub, weight)`` for a part of one
    (flat_map gives each of ``n`` children ``weight/n`` and a longer ``sub``
    path, which orders them); a list of tags for a batch (one per element).
    The parent completes a source item when the weights it got for it sum to 1.
"""
from __future__ import annotations

import linecache
import os
import pickle
import random
import signal
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, List, Optional, Tuple

from ._errors import Empty, Full, ShmqError

__all__ = ("StageSpec", "DeadLetter", "worker_main", "seqs_of", "keys_of", "current_worker", "unwrap")

DATA, HOLE, ERROR, CHUNK = 0, 1, 2, 3
LOANED = 4  # (worker side only) a result built in a slot of the next queue: put as the bare array (see put_loan)
# why a message carries no value
FILTERED, SKIPPED, DEAD, EMPTY, MERGED = 1, 2, 3, 4, 5
END = None  # put on an input queue once per worker when the pipeline ends

# One row of the status table per worker (int64 words).
S_STATE = 0  # 0 idle, 1 holding the seqs below
S_HELD_N = 1
S_IN = 2  # messages taken
S_OUT = 3  # messages put (data)
S_FILTERED = 4
S_SKIPPED = 5
S_DEAD = 6
S_RETRIES = 7  # calls of fn repeated after an exception (on_error="retry")
S_BUSY_NS = 8  # time spent in fn
S_ERRORS = 9  # exceptions raised by fn
S_PID = 10
S_CURRENT = 11  # index of the held range in fn now (-1: charge every held item)
S_SUB = 12  # index in that range of the item in fn now (a CHUNK's element; -1: not recorded)
S_CHUNK_OUT = 13  # set by the parent: longest CHUNK the next stage takes well (<= 1: none)
S_PUT = 14  # items put on the next queue, as the next stage's S_IN counts them (a run: its length; else 1)
S_DONE = 15  # items taken and finished (their results put): they left the stage
S_RESERVED = 16  # items this worker is about to put on the next queue (see _Worker.put_bounded)
S_LOANS = 17  # results put as the slot they were built in (output_array): no copy
S_HELD = 18  # the held items: (first seq, count) pairs
ROW_FIXED = S_HELD
# A stage's table has one more row, written by the parent only:
P_BOUND = 0  # the stage's max_in_flight now (items; its producers wait for room under it)
P_WAITING = 1  # set by a producer waiting for room in the stage; its workers then post to its room queue
# and its S_DONE word, which the parent adds to after a crash (items that left the
# stage with a killed worker, or were lost between a queue and a row): see stage_in_flight.

INIT_FAILED_EXIT = 71  # exit code of a worker whose init= raised: not restarted


@dataclass(frozen=True)
class DeadLetter:
    """One item a stage gave up on, as found in ``Pipeline.dead_letters``."""

    #: The item as the stage received it (for a crashed worker: the source item).
    item: Any
    #: Name of the stage that failed.
    stage: str
    #: Name of the exception class (``"WorkerDied"`` for a killed worker).
    exc_type: str
    #: ``str()`` of the exception.
    message: str
    #: The remote traceback, formatted ("" for a killed worker).
    traceback: str
    #: How many times the item was tried at that stage.
    attempts: int
    #: Source sequence number(s) of the item.
    seqs: Tuple[int, ...] = ()


@dataclass(frozen=True)
class StageSpec:
    """What a worker needs to know about its stage (pickled to spawn children)."""

    name: str
    kind: str  # "map", "filter", "flat_map", "batch", "unbatch"
    fn: Optional[Callable[..., Any]]
    init: Optional[Callable[[], Any]]
    on_error: str
    retries: int
    backoff: float
    batch_size: int
    linger: float
    take: int  # messages taken from the queue at once
    held_capacity: int  # (seq, count) ranges a row can record
    workers: int = 1  # processes of the stage (rows of its status table, the parent's besides)


def row_width(held_capacity: int) -> int:
    """int64 words of one row of a status table."""
    return ROW_FIXED + 2 * held_capacity


def stage_in_flight(entered: Callable[[], int], words: Any, width: int, workers: int, tries: int = 4) -> int:
    """Items in a stage now: those put on its queue (``entered()``: what the
    stage before put, or the feeder) less those its workers finished
    (``S_DONE`` of every row, the parent's included).  Both only grow; a
    reading of the finished count before and after ``entered()`` that agree
    means no item left in between, so the difference was exact at that
    instant (else it is read again; the last reading may count items that
    left meanwhile, never fewer than were there)."""
    span = (workers + 1) * width
    done = sum(words[S_DONE:span:width])
    while True:
        n = entered()
        again = sum(words[S_DONE:span:width])
        tries -= 1
        if again == done or tries <= 0:
            return n - done
        done = again


def keys_of(tags: Any) -> List[tuple]:
    """Every ``(seq, sub, weight)`` key of ``tags``, flattened."""
    if type(tags) is int:
        return [(tags, (), 1)]
    if type(tags) is list:
        out: List[tuple] = []
        for t in tags:
            out.extend(keys_of(t))
        return out
    return list(tags)


def seqs_of(tags: Any) -> List[int]:
    if type(tags) is int:
        return [tags]
    return [k[0] for k in keys_of(tags)]


def _split(tags: Any, n: int) -> Tuple[List[Any], List[Any]]:
    """Tags of ``n`` children of a message, and the tags left over (keys of a
    batch besides the first, which become MERGED holes)."""
    keys = keys_of(tags)
    seq, sub, w = keys[0]
    w = Fraction(w) / n
    return [((seq, sub + (i,), w),) for i in range(n)], (tuple(keys[1:]) if len(keys) > 1 else None)


def _format_exception(exc: BaseException, seen: Optional[set] = None) -> List[str]:
    """``traceback.format_exception(exc)`` without the ``^^^`` marks under
    the failing expressions: those cost ~150 us per exception on 3.11 (a
    compile per frame), which a stage where 1% of cheap items fail under
    on_error="dead-letter" paid for every one of them.  (An ExceptionGroup's
    members are named by its message line, without their tracebacks.)"""
    seen = set() if seen is None else seen
    seen.add(id(exc))
    out: List[str] = []
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        out += _format_exception(cause, seen)
        out.append("\nThe above exception was the direct cause of the following exception:\n\n")
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        out += _format_exception(context, seen)
        out.append("\nDuring handling of the above exception, another exception occurred:\n\n")
    tb = exc.__traceback__
    if tb is not None:
        out.append("Traceback (most recent call last):\n")
        while tb is not None:
            code = tb.tb_frame.f_code
            out.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}\n')
            line = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            if line:
                out.append(f"    {line}\n")
            tb = tb.tb_next
    out += traceback.format_exception_only(type(exc), exc)
    return out


def _describe(stage: str, exc: BaseException) -> tuple:
    """A picklable description of ``exc``: (stage, pickled exc or None, type name, message, traceback)."""
    tb = "".join(_format_exception(exc))
    try:
        blob = pickle.dumps(exc, 5)
        pickle.loads(blob)
    except Exception:
        blob = None
    return (stage, blob, type(exc).__qualname__, str(exc), tb)


class _Worker:
    def __init__(
        self,
        spec: StageSpec,
        index: int,
        inq: Any,
        outq: Any,
        status: Any,
        parent_pid: int,
        next_stage: Optional[tuple] = None,
        room: Any = None,
    ) -> None:
        self.spec = spec
        self.parent_pid = parent_pid
        self.inq = inq
        self.outq = outq
        words = memoryview(status).cast("B").cast("q")
        width = row_width(spec.held_capacity)
        self.row = words[index * width : (index + 1) * width]
        self.words = words  # the whole table: the other workers' S_PUT and S_RESERVED (see credit)
        self.width = width
        self.span = spec.workers * width
        self.room = room  # the stage's room queue: a token when it frees room and a producer waits
        self.waiting_at = self.span + P_WAITING
        self.bound_at = self.span + P_BOUND
        self.next_words: Any = None  # the next stage's table (None: the next hop is the parent)
        if next_stage is not None:
            nstatus, nwidth, nworkers, self.next_room = next_stage
            self.next_words = memoryview(nstatus).cast("B").cast("q")
            self.next_width = nwidth
            self.next_span = (nworkers + 1) * nwidth
            self.next_bound_at = nworkers * nwidth + P_BOUND
            self.next_waiting_at = nworkers * nwidth + P_WAITING
        self.fence = threading.Lock()
        self.loans: dict = {}  # id(array) -> weakref of an array output_array made here, while it lives

    # -- results built in the next queue's slots (output_array) ------------
    def loan_output(self, shape: Any, dtype: Any, nbytes: int) -> Any:
        """A writable array of ``shape`` and ``dtype`` living in a free slot
        of the next queue's pool (see ``Queue.loan_array``), in a raw loan
        ``TRAILER`` bytes longer: the item's tags are written there when
        the array is put (put_loan), so that it travels as the bare loan, the
        one thing a queue puts without a copy.  A plain array when the loan
        cannot be had (no pool, a slot too small...): it is then copied, as
        any result.  Waits for a free slot as long as the parent lives."""
        import numpy as np

        if self.spec.kind != "map":
            return np.empty(shape, dtype)
        while True:
            try:
                raw = self.outq.loan_array((nbytes + TRAILER,), np.uint8, timeout=0.5)
                break
            except Full:
                if parent_gone(self.parent_pid):
                    os._exit(0)
            except (ShmqError, ValueError, TypeError):
                return np.empty(shape, dtype)
        # The array's base is a _LoanHolder, not the loan: numpy would make
        # an array over the loan (or a view of one) hold the loan's own base,
        # and the loan (whose death gives its slot back) could die while the
        # array or a view of it lives.
        array = np.asarray(_LoanHolder(raw, shape, dtype))
        key = id(array)
        loans = self.loans
        loans[key] = weakref.ref(array, lambda ref, key=key: loans.pop(key, None))
        return array

    def is_loan(self, value: Any) -> bool:
        ref = self.loans.get(id(value))
        return ref is not None and ref() is value

    def put_loan(self, tags: Any, array: Any) -> bool:
        """Put ``array`` (made by loan_output) as the item ``tags``'s result,
        without a copy; False (nothing put) if its tags do not fit the
        trailer: the caller puts it as any result."""
        raw = array.base.raw
        dtype = array.dtype
        meta = pickle.dumps((tags, dtype.str if dtype.fields is None and dtype.subdtype is None else dtype, array.shape), 5)
        end = raw.nbytes - 4
        if len(meta) > TRAILER - 4:
            return False
        raw[end - len(meta) : end] = memoryview(meta)
        raw[end:] = memoryview(len(meta).to_bytes(4, "little"))
        if raw.base is not None:  # (else no slot was free: a private array, which put copies)
            self.row[S_LOANS] += 1
        self.put_bounded([(LOANED, tags, raw)])
        self.row[S_OUT] += 1
        return True

    # -- status table --------------------------------------------------
    def hold(self, msgs: list) -> Tuple[List[int], int]:
        """Record the items of ``msgs`` as held.  Returns, per message, the
        index of its range in the row (-1: several ranges), and the number
        of items."""
        row = self.row
        cap = self.spec.held_capacity
        n = 0
        items = 0
        where: List[int] = []
        for m in msgs:
            t = m[1]
            if type(t) is int:
                count = len(m[2]) if m[0] == CHUNK else 1
                if n < cap:
                    row[S_HELD + 2 * n] = t
                    row[S_HELD + 2 * n + 1] = count
                    where.append(n)
                else:
                    where.append(-1)
                n += 1
                items += count
            else:
                where.append(-1)
                for seq in seqs_of(t):
                    if n < cap:
                        row[S_HELD + 2 * n] = seq
                        row[S_HELD + 2 * n + 1] = 1
                    n += 1
                items += 1
        # (a range past the row's capacity is not recorded: after a crash the
        # parent's stall detector finds its items)
        row[S_HELD_N] = min(n, cap)
        row[S_STATE] = 1
        return where, items

    # -- calling fn under the stage's error policy ------------------------
    def call(self, value: Any, tags: Any, out: list) -> Any:
        """fn(value), or _FAILED after putting a hole or an error in ``out``."""
        try:
            return self.spec.fn(value)
        except Exception as exc:
            return self.failed(value, tags, out, exc)

    def failed(self, value: Any, tags: Any, out: list, exc: Exception) -> Any:
        """fn(value) raised ``exc`` once: retry it, or put a hole or an error
        in ``out`` as the stage's on_error says."""
        spec = self.spec
        attempts = 1
        while True:
            self.row[S_ERRORS] += 1
            if spec.on_error == "retry" and attempts <= spec.retries:
                self.row[S_RETRIES] += 1
                # The failed call's frames (and what they hold: an array
                # from output_array, with its slot) go before the next try.
                exc.__traceback__ = None
                if spec.backoff:
                    time.sleep(spec.backoff * (2 ** (attempts - 1)))
                attempts += 1
                try:
                    return spec.fn(value)
                except Exception as again:
                    exc = again
                    continue
            if spec.on_error == "skip":
                self.row[S_SKIPPED] += 1
                out.append((HOLE, tags, SKIPPED))
            elif spec.on_error == "dead-letter":
                # The letter travels with the hole: the parent puts it in the
                # dead letters once, whatever how often the item was re-fed.
                d = _describe(spec.name, exc)
                self.row[S_DEAD] += 1
                letter = DeadLetter(value, spec.name, d[2], d[3], d[4], attempts, tuple(seqs_of(tags)))
                out.append((HOLE, tags, (DEAD, letter)))
            else:  # "raise", and "retry" once its retries are spent
                out.append((ERROR, tags, _describe(spec.name, exc)))
            return _FAILED

    def map_chunk(self, msg: tuple, out: list) -> None:
        """A CHUNK through a map stage: CHUNKs out; an item that fails is
        treated alone under on_error, the runs around it stay CHUNKs.

        ``list.extend(map(fn, ...))`` runs fn with no Python step per item
        (about half the cost of a loop storing the index for a cheap fn);
        when fn raises, the results so far are kept and their count is the
        failing item's index.  Which item of the run is in fn is therefore
        not recorded (S_SUB = -1): a worker killed in a run has its items fed
        again one by one, none charged an attempt (see Pipeline._supervise)."""
        first, values = msg[1], msg[2]
        fn = self.spec.fn
        self.row[S_SUB] = -1
        n = len(values)
        start = 0
        while start < n:
            res: list = []
            try:
                res.extend(map(fn, values[start:] if start else values))
            except Exception as exc:
                j = start + len(res)
                self.emit_run(first + start, res, out)
                r = self.failed(values[j], first + j, out, exc)
                if r is not _FAILED:
                    out.append((DATA, first + j, r))
                start = j + 1
                continue
            self.emit_run(first + start, res, out)
            return

    def emit_run(self, first: int, res: list, out: list) -> None:
        """Results of consecutive items: CHUNKs as long as the next stage
        takes them (the parent sets the length in S_CHUNK_OUT)."""
        if self.loans:  # results built in slots (output_array) leave one by one, uncopied
            kept = []
            for k, r in enumerate(res):
                if self.is_loan(r) and self.put_loan(first + k, r):
                    continue
                kept.append((first + k, r))
            for seq, r in kept:
                out.append((DATA, seq, r))
            return
        if len(res) <= 1:
            if res:
                out.append((DATA, first, res[0]))
            return
        limit = self.row[S_CHUNK_OUT]
        if limit >= len(res):
            out.append((CHUNK, first, res))
        elif limit > 1:
            for k in range(0, len(res), limit):
                out.append((CHUNK, first + k, res[k : k + limit]))
        else:  # the next stage is slow: one item per message, for its workers to share
            for k, r in enumerate(res):
                out.append((DATA, first + k, r))

    def process(self, msg: tuple, out: list) -> None:
        kind, tags, value = msg
        if kind == CHUNK:  # any stage but map: item by item
            for k, v in enumerate(value):
                self.row[S_SUB] = k
                self.process((DATA, tags + k, v), out)
            return
        if kind != DATA:
            out.append(msg)  # holes and errors pass through
            return
        what = self.spec.kind
        if what == "map":
            r = self.call(value, tags, out)
            if r is not _FAILED:
                out.append((DATA, tags, r))
        elif what == "filter":
            r = self.call(value, tags, out)
            if r is not _FAILED:
                if r:
                    out.append(msg)
                else:
                    self.row[S_FILTERED] += 1
                    out.append((HOLE, tags, FILTERED))
        elif what == "flat_map":
            r = self.call(value, tags, out)
            if r is _FAILED:
                return
            try:
                children = list(r)
            except Exception as exc:  # the iterable itself raised
                out.append((ERROR, tags, _describe(self.spec.name, exc)))
                return
            if not children:
                out.append((HOLE, tags, EMPTY))
                return
            child_tags, rest = _split(tags, len(children))
            for t, c in zip(child_tags, children):
                out.append((DATA, t, c))
            if rest:
                out.append((HOLE, rest, MERGED))
        elif what == "unbatch":
            if type(tags) is list and len(tags) == len(value):
                for t, v in zip(tags, value):
                    out.append((DATA, t, v))
                return
            children = list(value)
            if not children:
                out.append((HOLE, tags, EMPTY))
                return
            child_tags, rest = _split(tags, len(children))
            for t, c in zip(child_tags, children):
                out.append((DATA, t, c))
            if rest:
                out.append((HOLE, rest, MERGED))
        else:  # pragma: no cover - batch is handled by run_batch
            raise AssertionError(what)

    def send(self, q: Any, obj: Any) -> None:
        """``q.put(obj)``, waiting for room as long as the parent lives (a
        worker of a killed parent exits instead of waiting forever)."""
        while True:
            try:
                q.put(obj, timeout=0.5)
                return
            except Full:
                if parent_gone(self.parent_pid):
                    os._exit(0)

    def send_many(self, q: Any, objs: list) -> None:
        """``q.put_many(objs)``, likewise.  A put_many that times out part-way
        leaves its first items put: they are put again, and the parent drops
        the second copies (counted in duplicates_dropped)."""
        while True:
            try:
                q.put_many(objs, timeout=0.5)
                return
            except Full:
                if parent_gone(self.parent_pid):
                    os._exit(0)

    # -- the next stage's bound ---------------------------------------------
    def credit(self) -> int:
        """Items the next stage may still take now: its bound (P_BOUND, set
        by the parent) less the items in it -- what this stage's workers put
        on its queue or are about to (S_PUT, S_RESERVED), less what its
        workers finished (S_DONE).  Read reservations before puts (a worker
        adds to S_PUT before it clears S_RESERVED) and the finished count
        first: a reading may count too many, never too few."""
        nw = self.next_words
        done = sum(nw[S_DONE : self.next_span : self.next_width])
        words, span, width = self.words, self.span, self.width
        reserved = sum(words[S_RESERVED:span:width])
        put = sum(words[S_PUT:span:width])
        return nw[self.next_bound_at] - (put + reserved - done)

    def put_bounded(self, out: list) -> None:
        """Put ``out`` on the next queue, never taking the next stage past
        its ``max_in_flight`` items: put what fits (a run is cut to fit),
        wait for the rest.  Adds to S_PUT what was put.

        Workers of one stage share the next stage's room: each writes what
        it is about to put in its S_RESERVED, then (after a fence) reads the
        room again with every reservation counted, and backs off if it went
        past.  Two workers racing both see the other's reservation (or one
        sees both), so together they never go past the bound."""
        row = self.row
        if self.next_words is None:  # the parent takes anything (its window bounds it)
            self.put_out(out)
            row[S_PUT] += sum(len(o[2]) if o[0] == CHUNK else 1 for o in out)
            return
        alone = self.spec.workers == 1
        i = 0
        while i < len(out):
            room = self.credit()
            need = 1
            if room > 0:
                part, n, i_next, rest = _fitting(out, i, room, whole=self.next_words[self.next_bound_at] // 2)
                if not part:
                    part = None  # (a run waiting for room for all of it)
                    need = len(out[i][2])
                if part is not None and not alone:
                    row[S_RESERVED] = n
                    with self.fence:  # (a locked instruction: our store is seen before our loads)
                        pass
                    if self.credit() < 0:  # another worker took the room first
                        row[S_RESERVED] = 0
                        part = None
                if part is not None:
                    self.put_out(part)
                    row[S_PUT] += n
                    row[S_RESERVED] = 0
                    if rest is not None:
                        out[i_next] = rest
                    i = i_next
                    continue
            if parent_gone(self.parent_pid):
                os._exit(0)
            self.wait_for_room(_ROOM_WAIT, need)

    def wait_for_room(self, timeout: float, need: int = 1) -> None:
        """Wait (up to ``timeout`` seconds) until the next stage may have
        room: its workers post a token to its room queue when they finish
        items while a producer has said it waits (P_WAITING).  A token may
        be stale or missed (the flag is cleared by whoever posts): the
        caller reads the room again after any wait, and the timeout bounds
        a missed one."""
        self.next_words[self.next_waiting_at] = 1
        if self.credit() >= need:  # (freed between our reading and the flag)
            return
        try:
            self.next_room.get(timeout=timeout * (0.5 + random.random()))
        except Empty:
            pass

    def freed(self) -> None:
        """Items of this stage finished: wake a producer waiting for room."""
        words = self.words
        if words[self.waiting_at] and self.room is not None:
            words[self.waiting_at] = 0
            try:
                self.room.put_nowait(None)
            except Full:
                pass

    def put_out(self, out: list) -> None:
        """Put ``out`` on the next queue as it is (no bound)."""
        if not out:
            return
        if out[0][0] == LOANED:  # (always alone: see put_loan)
            try:
                self.send(self.outq, out[0][2])
            except Exception:  # (not expected: then as any result, copied)
                self.put_each([unwrap(out[0][2])])
            return
        try:
            if len(out) == 1:
                self.send(self.outq, out[0])
            else:
                self.send_many(self.outq, out)  # pickles all first: an error puts none
        except Exception:
            self.put_each(out)

    def put_each(self, out: list) -> None:
        """Put ``out`` one by one; a message that cannot be put (its value
        does not pickle) becomes an ERROR for the parent to raise."""
        for o in out:
            try:
                self.send(self.outq, o)
            except Exception as exc:
                self.send(self.outq, (ERROR, o[1], _describe(self.spec.name, exc)))

    # -- loops ------------------------------------------------------------
    def run(self, parent_pid: int) -> None:
        spec = self.spec
        row = self.row
        inq, outq = self.inq, self.outq
        take = spec.take
        take_now = 1
        fn = spec.fn
        is_map = spec.kind == "map"
        perf_ns = time.perf_counter_ns
        loans = self.loans
        from queue import Empty

        while True:
            try:
                msgs = inq.get_many(take_now, timeout=0.5) if take_now > 1 else [inq.get(timeout=0.5)]
            except Empty:
                if parent_gone(parent_pid):
                    return  # orphaned: the parent is gone
                continue
            slotted = False
            for i, m in enumerate(msgs):
                if type(m) is not tuple and m is not None:
                    msgs[i] = unwrap(m)  # a result built in a slot: (DATA, tags, the array)
                    slotted = True
            ended = False
            if END in msgs:
                ended = True
                msgs = [m for m in msgs if m is not END]
            if msgs:
                where, n_items = self.hold(msgs)
                row[S_IN] += n_items
                out: list = []
                t0 = perf_ns()
                if is_map:
                    # the common case inline: no call per item but fn's
                    i = 0
                    for m in msgs:
                        row[S_CURRENT] = where[i]
                        i += 1
                        kind = m[0]
                        if kind == DATA:
                            try:
                                r = fn(m[2])
                            except Exception as exc:
                                r = self.failed(m[2], m[1], out, exc)
                                if r is _FAILED:
                                    continue
                            # A result built in a slot (output_array) leaves
                            # at once: a worker holds one such slot at a time.
                            if not (loans and self.is_loan(r) and self.put_loan(m[1], r)):
                                out.append((DATA, m[1], r))
                            r = None
                        elif kind == CHUNK:
                            self.map_chunk(m, out)
                        else:
                            out.append(m)
                else:
                    for i, m in enumerate(msgs):
                        row[S_CURRENT] = where[i]
                        self.process(m, out)
                busy = perf_ns() - t0
                row[S_BUSY_NS] += busy
                # Take many cheap items at once, but a slow item alone: a
                # worker must not sit on a run of them while the others idle.
                per_item = busy // max(1, n_items)
                # (starting at 1 and doubling: the first run may be slow too)
                if per_item < 20_000:
                    take_now = min(take, 2 * take_now)
                else:
                    take_now = min(take, 4) if per_item < 200_000 else 1
                # ... and at most half the stage's bound in items (runs count
                # their items): the rest of it is room for the stage before
                # to put into while this worker is busy.
                half = self.words[self.bound_at] // 2
                if n_items > half and take_now > 1:
                    take_now = max(1, take_now * half // n_items)
                if slotted:  # (each holds a slot of a pool of 8 until dropped: take few)
                    take_now = min(take_now, 2)
                n_data = 0
                for o in out:
                    if o[0] == DATA:
                        n_data += 1
                    elif o[0] == CHUNK:
                        n_data += len(o[2])
                self.put_bounded(out)
                row[S_OUT] += n_data
                row[S_DONE] += n_items
                row[S_STATE] = 0
                self.freed()
            # Let go of this round's items before waiting for the next: an
            # array in a slot (taken in, or made by output_array and not
            # returned) goes back to its pool only once nothing refers to it.
            msgs = out = m = o = None  # type: ignore[assignment]
            if ended:
                return

    def run_batch(self, parent_pid: int) -> None:
        """Group DATA messages by ``batch_size``; a partial batch leaves
        after ``linger`` seconds without a new message."""
        spec = self.spec
        row = self.row
        inq, outq = self.inq, self.outq
        from queue import Empty

        tags: list = []
        values: list = []
        pending: list = []  # the messages held, for the status table

        def flush() -> None:
            if values:
                self.put_bounded([(DATA, list(tags), list(values))])
                row[S_OUT] += 1
            row[S_DONE] += len(pending)
            tags.clear()
            values.clear()
            pending.clear()
            row[S_STATE] = 0
            self.freed()

        while True:
            try:
                msg = inq.get(timeout=spec.linger if values else 0.5)
            except Empty:
                if values:
                    flush()
                elif parent_gone(parent_pid):
                    return
                continue
            if msg is END:
                flush()
                return
            if type(msg) is not tuple:
                msg = unwrap(msg)
            if msg[0] == CHUNK:
                parts = [(DATA, msg[1] + k, v) for k, v in enumerate(msg[2])]
            elif msg[0] != DATA:
                row[S_IN] += 1
                self.put_bounded([msg])
                row[S_DONE] += 1
                self.freed()
                continue
            else:
                parts = [msg]
            row[S_IN] += len(parts)
            row[S_CURRENT] = -1
            for part in parts:
                pending.append(part)
                self.hold(pending)
                tags.append(part[1])
                values.append(part[2])
                if len(values) >= spec.batch_size:
                    flush()


_FAILED = object()
#: Seconds a producer waits for a token of the next stage's room queue before
#: it reads the room again (a token is missed when another producer took it).
_ROOM_WAIT = 0.002


class _LoanHolder:
    """What an array made by ``output_array`` is over: the raw loan (kept
    alive while the array or any view of it lives), described through the
    array interface.  (numpy stops a view's chain of bases at an object
    that is not an array.)"""

    __slots__ = ("raw", "__array_interface__")

    def __init__(self, raw: Any, shape: tuple, dtype: Any) -> None:
        self.raw = raw
        self.__array_interface__ = {
            "data": (raw.__array_interface__["data"][0], False),
            "shape": shape,
            "typestr": dtype.str,
            "descr": dtype.descr,
            "version": 3,
        }
_CURRENT: List[Any] = [None]  # the _Worker of this process (set by worker_main)
#: Bytes after a result built in a slot (output_array) for its tags and
#: description: (pickled (tags, dtype, shape), its length as 4 bytes).
TRAILER = 1024


def parent_gone(parent_pid: int) -> bool:
    """True once the pipeline's process ``parent_pid`` is gone.  (Not just
    ``os.getppid() != parent_pid``: a worker started by the forkserver is
    the forkserver's child, and would take itself for an orphan.)"""
    if os.getppid() == parent_pid:
        return False
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # (a pid reused by another user's process)
        return True
    return False


def current_worker() -> Any:
    """The worker of this process (None outside a pipeline's worker)."""
    return _CURRENT[0]


def unwrap(raw: Any) -> tuple:
    """The message a bare array received from a queue stands for: a result
    built in a slot (see _Worker.put_loan), ``(DATA, tags, array)`` where
    the array is a read-only view of the slot (kept while it lives)."""
    import numpy as np

    end = raw.nbytes - 4
    n = int.from_bytes(bytes(raw[end:]), "little")
    tags, dtype, shape = pickle.loads(bytes(raw[end - n : end]))
    dtype = np.dtype(dtype)
    count = 1
    for d in shape:
        count *= d
    return (DATA, tags, raw[: count * dtype.itemsize].view(dtype).reshape(shape))


def _fitting(out: list, i: int, room: int, messages: int = 1 << 62, whole: int = 0) -> Tuple[list, int, int, Any]:
    """The messages of ``out`` from ``i`` holding at most ``room`` items
    (``room`` >= 1), at most ``messages`` of them: ``(part, items, next i,
    rest)``; a run that does not fit whole is cut, and ``rest`` (else None)
    is what is left of it, to put in ``out[next i]`` -- unless it has at
    most ``whole`` items: it then waits for room for all of them (``part``
    may then be empty), so that runs are not cut in crumbs at the edge of
    the room (each crumb is a message, and the parent's accounting of a
    run that comes back in pieces costs more than a whole one's)."""
    part: list = []
    n = 0
    while i < len(out) and n < room and len(part) < messages:
        o = out[i]
        if o[0] == CHUNK and n + len(o[2]) > room:
            if len(o[2]) <= whole:
                break
            cut = room - n
            values = o[2]
            part.append((CHUNK, o[1], values[:cut]) if cut > 1 else (DATA, o[1], values[0]))
            rest = values[cut:]
            return part, room, i, ((CHUNK, o[1] + cut, rest) if len(rest) > 1 else (DATA, o[1] + cut, rest[0]))
        n += len(o[2]) if o[0] == CHUNK else 1
        part.append(o)
        i += 1
    return part, n, i, None


def worker_main(
    spec: StageSpec,
    index: int,
    inq: Any,
    outq: Any,
    status: Any,
    parent_pid: int,
    next_stage: Optional[tuple] = None,
    room: Any = None,
) -> None:
    """Entry point of a worker process.  ``next_stage``: ``(status table,
    row width, workers, room queue)`` of the stage after this one (None for
    the last); ``room``: this stage's room queue."""
    # Ctrl-C goes to the whole process group: the parent handles it and
    # stops the workers; a worker must not die half-way through a put.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = _Worker(spec, index, inq, outq, status, parent_pid, next_stage, room)
    _CURRENT[0] = w
    w.row[S_PID] = os.getpid()
    if spec.init is not None:
        try:
            spec.init()
        except BaseException as exc:
            w.send(outq, (ERROR, (), _describe(spec.name, exc)))
            w.row[S_PUT] += 1  # (an item for the next stage's count)
            sys.stdout.flush()
            os._exit(INIT_FAILED_EXIT)
    if spec.kind == "batch":
        w.run_batch(parent_pid)
    else:
        w.run(parent_pid)

"""Pipeline: stages of worker processes connected by shmq queues.

``Pipeline(source).map(f, workers=4).filter(g).map(h)`` builds a chain of
stages; iterating it (or ``run()``) starts every stage's worker processes and
streams the source through them.  Guide: docs/pipelines.md.

How it works
    Stage ``k`` reads the shmq Queue ``q[k]`` and writes to ``q[k+1]``; the
    last stage writes to an output queue the parent reads.  A thread of the
    parent feeds the source into ``q[0]``, numbering every item (its *seq*)
    and keeping it until the item is *accounted for*: the parent has received,
    for that seq, an output or a hole (filtered, skipped, dead-lettered...),
    flat_map children included (their weights sum to 1).  Items never go
    through a pipe or through the parent between stages; numpy arrays travel
    through the queues' slot pools.  Runs of cheap items travel as one CHUNK
    message (see ``_tune_chunks``), are accounted for as one entry of the
    parent's ledger (``_Ledger``) when they come back whole, and reach the
    caller through ``itertools.chain`` (no Python step per item).

Back-pressure
    Every stage holds at most its ``max_in_flight`` items (queued for it and
    held by its workers): each worker counts in its row of the status table
    the items it put on the next queue and the items it finished, and puts
    only what the next stage has room for (``_Worker.put_bounded``; the
    feeder likewise for stage 0), waiting on the next stage's *room queue*,
    where that stage's workers post a token when they free room for a
    waiting producer.  The feeder also stops at a window of
    ``sum(max_in_flight)`` seqs in flight (in source order when the pipeline
    is ordered), so an endless source runs in flat memory.

Results built in slots
    ``output_array`` (called by a map stage's function) loans a slot of the
    next queue, with room at its end for the item's tags; a returned loan is
    put as the bare array (the one thing a queue puts without a copy), which
    the receiver recognises as a non-tuple message (``_pipeline_worker.unwrap``).

Crash recovery (at-least-once, deduplicated)
    A worker writes the seqs it holds ((first, count) ranges) and which one
    is in fn into its row of its stage's status table (shared int64 words)
    before working, and clears the state after putting its results: a few
    stores per message.  The parent checks its
    workers every 50 ms; a dead one is replaced, and every seq its row holds
    is fed again from the parent's copy of the source item (``attempts`` is
    counted; past ``retries`` it is given up under the stage's
    ``on_error``; a run in fn charges none, and its items are fed again one
    by one).  A worker killed between taking an item and recording it
    loses it from every queue: after a crash the parent watches for a stall
    (every queue empty, every worker idle, items still in flight) and feeds
    those items again.  Results of the first attempt that still arrive are
    dropped by (seq, position), so every output is delivered exactly once.

Seeing it
    While iterated, the parent puts its statistics on a board (a Latest,
    ``Pipeline.name``) every 0.25 s, which ``shmq ls/stat/top`` read.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import multiprocessing as mp
import os
import pickle
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional

from . import _pipeline_worker as W
from ._errors import Empty, Full, RemoteError, WorkerDied
from ._pipeline_stats import PipelineStatistics, StageStatistics
from ._pipeline_worker import DeadLetter
from .queue import ZERO_COPY_THRESHOLD, Queue
from .topic import Latest

__all__ = ("Pipeline", "StageStatistics", "PipelineStatistics", "DeadLetter", "output_array")

ON_ERROR = ("raise", "skip", "retry", "dead-letter")
_MISSING = object()
_DATA = W.DATA
_CHUNK = W.CHUNK
_CHEAP_NS = 20_000  # a map whose items take less than this (mean) gets them in CHUNKs
_CHECK_EVERY = 0.05  # seconds between looks at the workers
_FIRST_CHECKS = 10  # ... but the first ones come every _CHECK_EVERY / 10: cheap items get runs at once
_STALL_SECONDS = 0.3  # no progress for this long after a crash: look for lost items
_JOIN_SECONDS = 1.5
#: Items a stage holds at most, unless told (``max(128, 4 * workers)``): the
#: queues must cover the time a sleeping process takes to wake up, else small
#: items crawl (2 stages of trivial functions on a loaded 2-core machine:
#: 16 -> 17k items/s, 64 -> 55k, 128 -> 120-145k, 1024 -> 125-300k).  Bytes
#: stay bounded whatever the count: arrays go through a pool of 8 slots, other
#: large items through the queue's side path (64 MiB).
DEFAULT_MAX_IN_FLIGHT = 128
#: Default size of the dead letters queue's ring (reserved in /dev/shm at
#: once: about ten thousand records with their tracebacks).
DEAD_LETTERS_CAPACITY_BYTES = 16 << 20
_FEED_RUN = 64  # source items taken and put at once, at most, unless in CHUNKs (then 4 CHUNKs)
_TAKE_MAX = 64  # messages a worker takes at once, at most
_BOARD_EVERY = 0.25  # seconds between statistics published on the board (for shmq ls/stat/top)
_BOARD_CAPACITY_BYTES = 64 << 10  # (10 stages: 1.7 KB pickled)
_SPARSE_SECONDS = 0.001  # the source made the feeder wait this long: it sends items one by one
#: While every stage is a map of cheap items (< _CHEAP_NS each) and the
#: source's items pickle to at most _SMALL_ITEM_BYTES, a stage whose
#: max_in_flight was not given gets _AUTO_MAX_IN_FLIGHT, and CHUNKs grow to
#: _MAX_CHUNK items: the parent then keeps at most 4 MiB of source items per
#: stage.  Measured (1M items, 2 stages of trivial functions, 2 cores):
#: window 4096 / CHUNK 512 -> 3.8-4.4M items/s, 8192 / 1024 -> 4.3-4.7M,
#: 16384 / 2048 -> 4.4-5.7M (Pool.imap, chunksize 512 -> 1.8-1.9M, 32768 -> 2.8-2.9M).
_AUTO_MAX_IN_FLIGHT = 16384
_MAX_CHUNK = 2048
_SMALL_ITEM_BYTES = 256


def _pickles_small(items: list) -> bool:
    """True if ``items`` pickle to at most _SMALL_ITEM_BYTES each on average."""
    buffers: list = []  # (large buffers out of band: counted, not copied)
    try:
        nbytes = len(pickle.dumps(items, 5, buffer_callback=buffers.append))
        nbytes += sum(b.raw().nbytes for b in buffers)
    except Exception:
        return False
    return nbytes <= _SMALL_ITEM_BYTES * len(items)


def output_array(shape: Any, dtype: Any = float) -> Any:
    """A new writable numpy array of ``shape`` and ``dtype`` for a map
    stage's function to fill and return as its result.

    Inside a worker of a map stage, the array lives in a free slot of the
    queue to the next stage (or to the parent), and returning it -- the
    array itself, not a view of it or a container holding it -- sends it
    there without a copy: the next stage (or your loop) gets a read-only
    view of that slot, which goes back to its pool once that view is
    dropped.  It waits for a free slot when all are taken (back-pressure).
    Everywhere else -- outside a worker, in a filter or flat_map stage, for
    arrays under 64 KiB (``shmq.ZERO_COPY_THRESHOLD``), or when the queue's
    slots are too small for it -- it is ``numpy.empty(shape, dtype)``, which
    travels as any result (copied once into a slot).

    An array that is not returned (the item raised, was retried, the
    function returned something else) gives its slot back when it is
    dropped; a worker killed while holding one gives it back too (the
    queue reclaims it within about 0.1 s).  See docs/pipelines.md."""
    import numpy as np

    worker = W.current_worker()
    if worker is None:
        return np.empty(shape, dtype)
    dt = np.dtype(dtype)
    dims = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    nbytes = dt.itemsize
    for d in dims:
        nbytes *= d
    if nbytes < ZERO_COPY_THRESHOLD or dt.hasobject:
        return np.empty(dims, dt)
    return worker.loan_output(dims, dt, nbytes)


class _Stage:
    def __init__(self, spec: W.StageSpec, workers: int, ordered: bool, max_in_flight: int, start_method: Optional[str]):
        self.spec = spec
        self.workers = workers
        self.ordered = ordered
        self.max_in_flight = max_in_flight  # now (grows while auto and cheap)
        self.base_max_in_flight = max_in_flight
        self.auto = False  # max_in_flight was not given: it may grow (see Pipeline._tune_chunks)
        self.chunk = 1
        self.start_method = start_method
        self.procs: List[Any] = []
        self.status: Any = None
        self.width = W.row_width(spec.held_capacity)
        self.words: Any = None
        self.crashes = 0
        self.crash_retries = 0
        self.crash_skipped = 0
        self.quiet_since: Optional[tuple] = None  # (counters, since when) while empty and still (see Pipeline._resync)

    def row(self, i: int) -> Any:
        return self.words[i * self.width : (i + 1) * self.width]

    def total(self, field: int) -> int:
        return sum(self.words[i * self.width + field] for i in range(self.workers))


class _Item:
    """Accounting of a source item beyond "in flight": made only for items
    that arrive in parts (flat_map, batches, holes) or were fed again."""

    __slots__ = ("attempts", "weight", "seen", "parts", "has_data", "reason")

    def __init__(self) -> None:
        self.attempts = 0
        self.weight: Any = 0
        self.seen: Optional[set] = None
        self.parts: Optional[list] = None
        self.has_data = False
        self.reason = 0


class _Ledger:
    """The source items in flight (taken, not yet accounted for), by seq.

    A run of items fed as one CHUNK stays one entry (``runs[first]``): a
    result covering part of it cuts that part out (the rest stays runs), and
    only a crash splits a run into single ``items``.  So the parent's work
    per item is a few C-level list operations while results come back in
    runs: the pipeline's throughput for cheap items depends on it.
    """

    __slots__ = ("items", "runs", "starts", "count")

    def __init__(self) -> None:
        self.items: Dict[int, Any] = {}  # seq -> source item
        self.runs: Dict[int, list] = {}  # first seq -> the run's source items
        self.starts: List[int] = []  # firsts of runs, sorted (some may be gone from runs)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, seq: int, item: Any) -> None:
        self.items[seq] = item
        self.count += 1

    def add_run(self, first: int, items: list) -> None:
        self.runs[first] = items
        self.starts.append(first)  # new runs come in source order: stays sorted
        self.count += len(items)

    def _find(self, seq: int) -> Optional[tuple]:
        """``(first, run)`` of the run holding ``seq``, or None.  (Only the
        rightmost start <= seq can be it: live runs never overlap, and a
        start left behind inside a live run would be that run's own.)"""
        i = bisect.bisect_right(self.starts, seq) - 1
        if i < 0:
            return None
        first = self.starts[i]
        run = self.runs.get(first)
        if run is None or seq >= first + len(run):
            return None
        return first, run

    def pop_run(self, first: int, n: int) -> bool:
        """Account for the ``n`` items from ``first`` if one run holds them
        all (the common case: a whole run, back as it was fed)."""
        run = self.runs.get(first)
        if run is not None and len(run) == n:
            del self.runs[first]
            self.count -= n
        elif self.cut(first, n) is None:
            return False
        if len(self.starts) > 2 * len(self.runs) + 64:
            self.starts = sorted(self.runs)
        return True

    def cut(self, first: int, n: int) -> Optional[list]:
        """Take the ``n`` items from ``first`` out of the run holding them
        all (what is left of it stays runs); None if no run does."""
        found = self._find(first)
        if found is None:
            return None
        start, run = found
        lo = first - start
        hi = lo + n
        if hi > len(run):
            return None
        if lo == 0 and hi == len(run):
            del self.runs[start]
            self.count -= n
            return run
        taken = run[lo:hi]
        if lo:
            self.runs[start] = run[:lo]
        else:
            del self.runs[start]
        if hi < len(run):
            self.runs[first + n] = run[hi:]
            bisect.insort(self.starts, first + n)
        self.count -= n
        return taken

    def split(self, seq: int) -> bool:
        """Split the run holding ``seq`` into single items; False if none does."""
        found = self._find(seq)
        if found is None:
            return False
        first, run = found
        del self.runs[first]
        self.items.update(zip(range(first, first + len(run)), run))
        return True

    def __contains__(self, seq: int) -> bool:
        return seq in self.items or self._find(seq) is not None

    def get(self, seq: int, default: Any = None) -> Any:
        item = self.items.get(seq, _MISSING)
        if item is not _MISSING:
            return item
        found = self._find(seq)
        return default if found is None else found[1][seq - found[0]]

    def pop(self, seq: int, default: Any) -> Any:
        item = self.items.pop(seq, _MISSING)
        if item is not _MISSING:
            self.count -= 1
            return item
        taken = self.cut(seq, 1)
        return default if taken is None else taken[0]

    def seqs(self) -> List[int]:
        """Every seq in flight (splitting every run)."""
        for first in list(self.runs):
            self.split(first)
        return list(self.items)


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild(desc: tuple) -> BaseException:
    """The exception a worker described (see _pipeline_worker._describe)."""
    stage, blob, type_name, message, tb = desc
    exc: Optional[BaseException] = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(type_name, f"{message}\n\nRemote traceback:\n{tb}", tb, stage)
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb}"""')
    if hasattr(exc, "add_note"):
        exc.add_note(f"raised in pipeline stage {stage!r}; remote traceback:\n{tb}")
    return exc


class Pipeline:
    """``Pipeline(source, *, start_method=None, progress=False, dead_letters_name=None,
    dead_letters_capacity_bytes=16 MiB)``

    A chain of stages over ``source`` (any iterable, consumed lazily by a
    thread of this process).  Add stages with :meth:`map`, :meth:`filter`,
    :meth:`flat_map`, :meth:`batch`, :meth:`unbatch` (each returns the
    pipeline), then iterate it or call :meth:`run`.  Use it as a context
    manager, or call :meth:`close`, to stop it early and free its queues.
    ``start_method`` is the default of every stage; ``progress=True`` prints
    a line of statistics to stderr every half second when it is a terminal.
    """

    def __init__(
        self,
        source: Iterable[Any],
        *,
        start_method: Optional[str] = None,
        progress: bool = False,
        dead_letters_name: Optional[str] = None,
        dead_letters_capacity_bytes: int = DEAD_LETTERS_CAPACITY_BYTES,
    ) -> None:
        self._source = source
        self._start_method = start_method
        self._progress = progress
        self._dead_name = dead_letters_name
        self._dead_bytes = dead_letters_capacity_bytes
        self._stages: List[_Stage] = []
        self._seqs_per_msg = 1
        self._state = "new"  # new, running, done, closed
        self._queues: List[Queue] = []
        self._rooms: List[Queue] = []  # per stage: tokens for a producer waiting for room in it
        self._deadq: Optional[Queue] = None
        self._gen: Optional[Iterator[Any]] = None
        # accounting (main thread, and the feeder under _cond)
        self._cond = threading.Condition()
        self._inflight = _Ledger()  # seq -> source item, until accounted for
        self._meta: Dict[int, _Item] = {}  # seq -> its accounting, for the few that need one
        self._done: Dict[int, tuple] = {}  # ordered: first seq -> (seqs, values) finished, waiting for their turn
        self._retry: Deque[int] = deque()  # seqs to feed again, one by one
        self._retry_runs: Deque[tuple] = deque()  # (first, count): runs to feed again whole
        self._next_seq = 0
        self._next_emit = 0
        self._exhausted = False
        self._feeding = False
        self._putting = False  # the feeder is putting on stage 0's queue and has not counted it yet
        self._feed_error: Optional[BaseException] = None
        self._error: Optional[BaseException] = None
        self._stop = False
        self._feeder: Optional[threading.Thread] = None
        self._fates = [0] * 6  # index: a hole reason; 0: with output
        self._fed_items = 0  # items put on stage 0's queue (as its workers' S_IN counts them)
        self._outputs = 0  # values handed to the caller, the whole of the batch being handed included
        self._handing: Optional[tuple] = None  # that batch: (its iterator, whose length hint is the values not yet taken; the list)
        self._small_source = False  # the source's items pickle small (sampled): the window may grow
        self._dups = 0
        self._started = 0.0
        self._suspect = False
        self._crashed = False  # a worker died: the stages' counts are checked when they go quiet (_resync)
        self._stall_since: Optional[float] = None
        self._late: List[Any] = []
        self._board: Optional[Latest] = None  # the statistics for shmq ls/stat/top (see name)
        self._board_at = 0.0
        self._board_name: Optional[str] = None
        self._dead_by_stage: Dict[str, int] = {}  # ordered outputs released by a give-up in _supervise

    # -- building --------------------------------------------------------------
    def _add(
        self,
        kind: str,
        fn: Optional[Callable[..., Any]],
        workers: int,
        ordered: bool,
        max_in_flight: Optional[int],
        init: Optional[Callable[[], Any]],
        on_error: str,
        retries: int,
        backoff: float,
        start_method: Optional[str],
        name: Optional[str],
        batch_size: int = 0,
        linger: float = 0.0,
    ) -> "Pipeline":
        if self._state != "new":
            raise ValueError("stages cannot be added to a pipeline that has started")
        if fn is not None and not callable(fn):
            raise TypeError(f"'fn' must be callable, got {type(fn).__name__}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"'workers' must be a positive int, got {workers!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"'on_error' must be one of {', '.join(map(repr, ON_ERROR))}; got {on_error!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"'retries' must be an int >= 0, got {retries!r}")
        if not isinstance(backoff, (int, float)) or backoff < 0:
            raise ValueError(f"'backoff' must be a number >= 0, got {backoff!r}")
        auto = max_in_flight is None
        if auto:
            max_in_flight = max(DEFAULT_MAX_IN_FLIGHT, 4 * workers)
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < workers:
            raise ValueError(f"'max_in_flight' must be an int >= workers ({workers}), got {max_in_flight!r}")
        spm = self._seqs_per_msg
        take = 1 if (spm > 1 or kind == "batch") else max(1, min(_TAKE_MAX, max_in_flight // (2 * workers)))
        held = take * spm * (batch_size if kind == "batch" else 1)
        label = name or f"{len(self._stages)}:{kind if fn is None else getattr(fn, '__name__', kind)}"
        spec = W.StageSpec(label, kind, fn, init, on_error, retries, float(backoff), batch_size, linger, take, held, workers)
        stage = _Stage(spec, workers, ordered, max_in_flight, start_method or self._start_method)
        stage.auto = auto and kind == "map"
        self._stages.append(stage)
        if kind == "batch":
            self._seqs_per_msg = spm * batch_size
        return self

    def map(
        self,
        fn: Callable[[Any], Any],
        workers: int = 1,
        ordered: bool = False,
        max_in_flight: Optional[int] = None,
        *,
        init: Optional[Callable[[], Any]] = None,
        on_error: str = "raise",
        retries: int = 2,
        backoff: float = 0.0,
        start_method: Optional[str] = None,
        name: Optional[str] = None,
    ) -> "Pipeline":
        """Add a stage of ``workers`` processes passing on ``fn(item)``.

        ``ordered=True``: the pipeline yields in source order.
        ``max_in_flight``: the most items the stage holds (queued for it and
        held by its workers; the stage before waits for room), and its share
        of the pipeline's window (the feeder keeps at most the sum of the
        shares in flight); default ``max(128, 4 * workers)``, raised to
        16384 while every stage is a map of cheap items and the items are
        small (see docs/pipelines.md, "Runs of cheap items").  ``fn`` may
        build its result with :func:`output_array` to pass it on without a
        copy.  ``init()`` runs once in
        every worker before its first item.  ``on_error``: ``"raise"`` stops
        the pipeline and re-raises the exception in the caller; ``"skip"``
        drops the item; ``"retry"`` calls ``fn`` again up to ``retries`` times
        (sleeping ``backoff * 2**k`` seconds), then raises; ``"dead-letter"``
        puts a :class:`DeadLetter` in :attr:`dead_letters`.  An item whose
        worker is killed is fed again up to ``retries`` times, then treated
        by ``on_error`` (raising :class:`shmq.WorkerDied`).  ``start_method``:
        ``"fork"``, ``"spawn"`` or ``"forkserver"`` (default: the pipeline's,
        else multiprocessing's default)."""
        return self._add("map", fn, workers, ordered, max_in_flight, init, on_error, retries, backoff, start_method, name)

    def filter(
        self,
        fn: Callable[[Any], Any],
        workers: int = 1,
        ordered: bool = False,
        max_in_flight: Optional[int] = None,
        *,
        init: Optional[Callable[[], Any]] = None,
        on_error: str = "raise",
        retries: int = 2,
        backoff: float = 0.0,
        start_method: Optional[str] = None,
        name: Optional[str] = None,
    ) -> "Pipeline":
        """Add a stage passing on the items for which ``fn(item)`` is true
        (arguments as :meth:`map`)."""
        return self._add("filter", fn, workers, ordered, max_in_flight, init, on_error, retries, backoff, start_method, name)

    def flat_map(
        self,
        fn: Callable[[Any], Iterable[Any]],
        workers: int = 1,
        ordered: bool = False,
        max_in_flight: Optional[int] = None,
        *,
        init: Optional[Callable[[], Any]] = None,
        on_error: str = "raise",
        retries: int = 2,
        backoff: float = 0.0,
        start_method: Optional[str] = None,
        name: Optional[str] = None,
    ) -> "Pipeline":
        """Add a stage passing on every element of ``fn(item)`` (an iterable,
        collected into a list per item; arguments as :meth:`map`)."""
        return self._add("flat_map", fn, workers, ordered, max_in_flight, init, on_error, retries, backoff, start_method, name)

    def batch(self, n: int, *, linger: float = 0.05, max_in_flight: Optional[int] = None, name: Optional[str] = None) -> "Pipeline":
        """Add a stage (one process) grouping items into lists of ``n``; a
        shorter list leaves after ``linger`` seconds without a new item."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"'n' must be a positive int, got {n!r}")
        if linger <= 0:
            raise ValueError(f"'linger' must be > 0, got {linger!r}")
        mif = max_in_flight if max_in_flight is not None else max(16, 2 * n)
        return self._add("batch", None, 1, False, mif, None, "raise", 0, 0.0, None, name, batch_size=n, linger=linger)

    def unbatch(self, *, max_in_flight: Optional[int] = None, name: Optional[str] = None) -> "Pipeline":
        """Add a stage (one process) passing on every element of each list.
        A list as long as the batch it came from gives every element back its
        own source position; any other iterable is split like a flat_map."""
        return self._add("unbatch", None, 1, False, max_in_flight, None, "raise", 0, 0.0, None, name)

    #: ``kind`` of the value on a pipeline's board (how ``shmq`` tells it from other Latests).
    BOARD_KIND = "shmq.pipeline"

    @property
    def name(self) -> Optional[str]:
        """The name of the pipeline's *board* (None before it starts): a
        :class:`shmq.Latest` where the running pipeline puts its statistics
        every 0.25 s as a dict (``"kind": "shmq.pipeline"``, ``"statistics"``:
        :meth:`statistics` as a dict, each stage with ``max_in_flight``,
        ``busy_seconds``, ``workers_alive`` and its input ``queue``).
        ``shmq ls`` shows it as a pipeline with a row per stage,
        ``shmq stat NAME`` its stages, ``shmq top`` a row per stage with
        items in/out per second, fill and busy fraction.  Removed when the
        pipeline stops."""
        return self._board_name

    # -- the dead letters ---------------------------------------------------------
    @property
    def dead_letters(self) -> Queue:
        """The shmq Queue of :class:`DeadLetter` records (another process may
        ``shmq.Queue.attach(pipe.dead_letters.name)``).  It lives until
        :meth:`close`.  The parent posts every letter, once per item; when
        the queue is full (``dead_letters_capacity_bytes``) the pipeline
        stops with :class:`shmq.Full`."""
        if self._deadq is None:
            if self._state == "closed":
                raise ValueError("the pipeline is closed")
            self._deadq = Queue(capacity_bytes=self._dead_bytes, name=self._dead_name)
        return self._deadq

    # -- running --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self._gen is not None or self._state != "new":
            raise ValueError("a pipeline runs once")
        self._gen = self._run()
        # _run yields batches of outputs; chain hands their values out with
        # no Python step per value (statistics() counts them exactly through
        # the batch iterator's length hint)
        return itertools.chain.from_iterable(self._gen)

    def run(self, sink: Optional[Callable[[Any], Any]] = None) -> int:
        """Run the pipeline to its end, calling ``sink(out)`` for every output
        (if given).  Returns the number of outputs."""
        n = 0
        for out in self:
            if sink is not None:
                sink(out)
            n += 1
        return n

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the pipeline (if running): its workers are terminated and its
        queues, the dead letters included, removed.  Idempotent."""
        if self._state == "closed":
            return
        gen, self._gen = self._gen, None
        if gen is not None:
            gen.close()  # runs _run's finally: the workers stop
        self._shutdown(graceful=False)
        if self._deadq is not None:
            self._deadq.close()
            self._deadq = None
        self._state = "closed"

    # -- the run ------------------------------------------------------------------------
    def _start(self) -> None:
        if not self._stages:
            raise ValueError("the pipeline has no stage: add one with map(), filter(), ...")
        self._state = "running"
        self._started = time.monotonic()
        self._ordered = any(s.ordered for s in self._stages)
        self._window = sum(s.max_in_flight for s in self._stages)
        self._chunk = 1  # items per CHUNK message into stage 0 (see _tune_chunks)
        self.dead_letters  # made now: its name is known before the first item
        try:
            self._board = Latest(_BOARD_CAPACITY_BYTES)
            self._board_name = self._board.name
            for s in self._stages:
                qsize = max(1, s.max_in_flight - s.workers * s.spec.take)
                self._queues.append(Queue(qsize))
            self._queues.append(Queue(max(64, self._stages[-1].max_in_flight)))
            # One per stage: its workers post a token when they free room
            # while a producer waits for it (see _Worker.wait_for_room).
            self._rooms = [Queue(4, capacity_bytes=4096, zero_copy=False) for _ in self._stages]
            for s in self._stages:  # (every table first: a worker gets the next stage's)
                ctx = mp.get_context(s.start_method)
                s.ctx = ctx
                s.status = ctx.RawArray("q", (s.workers + 1) * s.width)  # (the last row: the parent's)
                s.words = memoryview(s.status).cast("B").cast("q")
                s.words[s.workers * s.width + W.P_BOUND] = s.max_in_flight
                s.procs = [None] * s.workers
            for k, s in enumerate(self._stages):
                for i in range(s.workers):
                    self._spawn(k, i)
        except BaseException:
            self._shutdown(graceful=False)
            raise
        self._feeder = threading.Thread(target=self._feed, name="shmq-pipeline-feeder", daemon=True)
        self._feeder.start()
        self._publish(time.monotonic())

    def _spawn(self, k: int, i: int) -> None:
        s = self._stages[k]
        nxt = self._stages[k + 1] if k + 1 < len(self._stages) else None
        p = s.ctx.Process(
            target=W.worker_main,
            args=(
                s.spec,
                i,
                self._queues[k],
                self._queues[k + 1],
                s.status,
                os.getpid(),
                None if nxt is None else (nxt.status, nxt.width, nxt.workers, self._rooms[k + 1]),
                self._rooms[k],
            ),
            name=f"shmq-pipeline-{s.spec.name}-{i}",
            daemon=True,
        )
        p.start()
        s.procs[i] = p

    def _feed(self) -> None:
        """The feeder thread: source items (and items to retry) into q[0].

        It takes ``run`` source items at once (one lock round, one put_many),
        as CHUNKs of ``self._chunk`` while stage 0 takes them (see
        _tune_chunks).  ``run`` doubles while the source gives its items
        at once and drops back to 1 when the source made it wait: a sparse
        stream's items leave one by one, as soon as each is made."""
        q0 = self._queues[0]
        cond = self._cond
        it = iter(self._source)
        ledger = self._inflight
        DATA, CHUNK = W.DATA, W.CHUNK
        perf = time.perf_counter
        run = 1
        fed = 0
        try:
            while not self._stop:
                msgs: list = []
                with cond:
                    while not self._stop:
                        while self._retry_runs and len(msgs) < _FEED_RUN:
                            first, n = self._retry_runs.popleft()
                            whole = ledger.runs.get(first)
                            if whole is not None and len(whole) == n:
                                msgs.append((CHUNK, first, whole))
                                continue
                            for seq in range(first, first + n):  # (partly accounted for meanwhile)
                                item = ledger.get(seq, _MISSING)
                                if item is not _MISSING:
                                    msgs.append((DATA, seq, item))
                        while self._retry and len(msgs) < _FEED_RUN:
                            seq = self._retry.popleft()
                            item = ledger.get(seq, _MISSING)
                            if item is not _MISSING:
                                msgs.append((DATA, seq, item))
                        room = 0 if self._exhausted else self._room()
                        if msgs or room:
                            break
                        cond.wait(0.1)
                    else:
                        return
                    self._feeding = True
                if not msgs:
                    chunk = self._chunk
                    free = max(1, q0.maxsize - q0.qsize())
                    # (stage 0's own bound is waited for in _put_all, run by run)
                    want = max(1, min(room, run, free * chunk))
                    if want > chunk:  # whole runs only: a crumb would be a message of its own
                        want -= want % chunk
                    t0 = perf()
                    items = list(itertools.islice(it, want))
                    if perf() - t0 > _SPARSE_SECONDS:
                        run = 1
                    elif len(items) == want:
                        run = min(2 * run, max(_FEED_RUN, 4 * chunk))
                    if fed % 16 == 0 and items:
                        self._small_source = _pickles_small(items)
                    fed += 1
                    with cond:
                        if not items:
                            self._exhausted = True
                        first = self._next_seq
                        self._next_seq = first + len(items)
                        if len(items) > 1 and chunk > 1:
                            # runs of consecutive items in one message (a map
                            # stage passes them on as one; others split them)
                            for k in range(0, len(items), chunk):
                                part = items[k : k + chunk] if len(items) > chunk else items
                                if len(part) > 1:
                                    ledger.add_run(first + k, part)
                                    msgs.append((CHUNK, first + k, part))
                                else:
                                    ledger.add(first + k, part[0])
                                    msgs.append((DATA, first + k, part[0]))
                        else:
                            for k, item in enumerate(items):
                                ledger.add(first + k, item)
                                msgs.append((DATA, first + k, item))
                self._put_all(q0, msgs)
                self._feeding = False
        except BaseException as exc:  # the source raised
            self._feed_error = exc
            self._feeding = False

    def _stage0_room(self) -> int:
        """Items stage 0 may still take (its max_in_flight less what it
        holds: the feeder is the only one to put on its queue)."""
        s = self._stages[0]
        span = (s.workers + 1) * s.width
        return s.max_in_flight - (self._fed_items - sum(s.words[W.S_DONE : span : s.width]))

    def _put_all(self, q0: Queue, msgs: list) -> None:
        """Put ``msgs`` on stage 0's queue, as its room admits (a run is cut
        to fit, see _pipeline_worker._fitting), until done or stopped."""
        i = 0
        need = 1  # items of room waited for
        while i < len(msgs) and not self._stop:
            room = self._stage0_room()
            # (and no more messages than the queue has room for: a put_many
            # that times out part-way is put again whole, its first items twice)
            free = q0.maxsize - q0.qsize()
            if room < need:
                s = self._stages[0]
                s.words[s.workers * s.width + W.P_WAITING] = 1
                if self._stage0_room() < need:
                    try:
                        self._rooms[0].get(timeout=W._ROOM_WAIT)
                    except Empty:
                        pass
                continue
            # (no room for a message: put one, which waits in the queue's put)
            part, n, i_next, rest = W._fitting(msgs, i, room, max(1, free), whole=self._stages[0].max_in_flight // 2)
            if not part:  # a run waiting for room for all of it
                need = len(msgs[i][2])
                continue
            need = 1
            self._putting = True  # (until counted: see _resync)
            while not self._stop:
                try:
                    if len(part) == 1:
                        q0.put(part[0], timeout=0.1)
                    else:
                        # Full part-way: the puts before it stay, and are put
                        # again below; the parent drops the second results.
                        q0.put_many(part, timeout=0.5)
                    break
                except Full:
                    continue
            else:
                self._putting = False
                return
            self._fed_items += n
            self._putting = False
            if rest is not None:
                msgs[i_next] = rest
            i = i_next

    def _room(self) -> int:
        """How many more source items the window admits now."""
        if self._ordered:
            return max(0, self._window - (self._next_seq - self._next_emit))
        return max(0, self._window - self._inflight.count)

    def _run(self) -> Iterator[Iterator[Any]]:
        """The run: yields iterators over batches of outputs (see __iter__)."""
        self._start()
        out = self._queues[-1]
        ledger = self._inflight
        last_check = time.monotonic()
        checks = 0
        finished = False
        try:
            while True:
                try:
                    msgs = out.get_many(256, timeout=_CHECK_EVERY)
                except Empty:
                    msgs = ()
                if msgs:
                    for i, m in enumerate(msgs):
                        if type(m) is not tuple:  # a result built in a slot (output_array)
                            msgs[i] = W.unwrap(m)
                    emit: list = []
                    with self._cond:
                        if self._ordered or self._meta:
                            for m in msgs:
                                self._receive(m, emit)
                        else:
                            # the common case inline: whole items' values,
                            # a run fed as one CHUNK and back whole at once
                            done = 0
                            for m in msgs:
                                kind = m[0]
                                if kind == _CHUNK:
                                    values = m[2]
                                    if ledger.pop_run(m[1], len(values)):
                                        done += len(values)
                                        emit.extend(values)
                                        continue
                                    seq = m[1]
                                    for v in values:
                                        if ledger.pop(seq, _MISSING) is _MISSING:
                                            self._dups += 1
                                        else:
                                            done += 1
                                            emit.append(v)
                                        seq += 1
                                elif kind == _DATA and type(m[1]) is int:
                                    if ledger.pop(m[1], _MISSING) is _MISSING:
                                        self._dups += 1
                                    else:
                                        done += 1
                                        emit.append(m[2])
                                else:
                                    self._receive(m, emit)
                            self._fates[0] += done
                        self._cond.notify()
                    self._stall_since = None
                    if emit:
                        yield self._hand(emit)
                now = time.monotonic()
                if now - last_check >= (_CHECK_EVERY if checks > _FIRST_CHECKS else _CHECK_EVERY / 10):
                    last_check = now
                    checks += 1
                    self._supervise(now)
                    if self._late:
                        late, self._late = self._late, []
                        yield self._hand(late)
                if self._error is not None:
                    raise self._error
                if self._feed_error is not None:
                    raise self._feed_error
                if self._exhausted and not ledger.count and not self._done and not self._feeding:
                    break
            finished = True
        finally:
            if self._handing is not None:  # stopped with a batch not all taken: the rest is not handed
                it, values = self._handing
                self._outputs -= it.__length_hint__()
                values.clear()
                self._handing = None
            self._shutdown(graceful=finished)
            if getattr(self, "_last_progress", 0.0):
                self._last_progress = time.monotonic()
                sys.stderr.write("\n")  # keep the last progress line
            if self._state == "running":
                self._state = "done"

    def _hand(self, values: list) -> Iterator[Any]:
        """An iterator over ``values`` for the caller, counted as outputs."""
        self._outputs += len(values)
        it = iter(values)
        self._handing = (it, values)
        return it

    # -- accounting -------------------------------------------------------------
    def _receive(self, msg: tuple, emit: list) -> None:
        kind, tags, value = msg
        if kind == W.ERROR:
            if self._error is None:
                self._error = _rebuild(value)
            return
        if kind == W.CHUNK:
            n = len(value)
            if self._inflight.pop_run(tags, n):  # a whole run, none of it seen before
                self._fates[0] += n
                if self._ordered:
                    self._done[tags] = (n, value)
                    self._release(emit)
                else:
                    emit.extend(value)
                return
            for k, v in enumerate(value):
                self._receive((W.DATA, tags + k, v), emit)
            return
        letter = None
        if kind == W.HOLE and type(value) is tuple:  # (DEAD, the letter)
            value, letter = value
        inflight = self._inflight
        owner_given = kind != W.DATA
        for seq, sub, w in W.keys_of(tags):
            if seq not in inflight:
                self._dups += 1
                continue
            rec = self._meta_of(seq)
            if rec.seen is None:
                rec.seen = set()
            if sub in rec.seen:
                self._dups += 1
                continue
            if letter is not None:  # the first copy of this hole: post its letter once
                if not self._post(letter):
                    return
                letter = None
            rec.seen.add(sub)
            rec.weight += w
            if not owner_given:
                owner_given = True
                rec.has_data = True
                if self._ordered:
                    if rec.parts is None:
                        rec.parts = []
                    rec.parts.append((sub, value))
                else:
                    emit.append(value)
            elif not rec.reason:
                rec.reason = value if kind == W.HOLE else W.MERGED
            if rec.weight >= 1:
                self._complete(seq, emit)

    def _meta_of(self, seq: int) -> _Item:
        rec = self._meta.get(seq)
        if rec is None:
            rec = self._meta[seq] = _Item()
        return rec

    def _complete(self, seq: int, emit: list) -> None:
        self._inflight.pop(seq, None)
        rec = self._meta.pop(seq)
        self._fates[0 if rec.has_data else rec.reason] += 1
        if not self._ordered:
            return
        parts = rec.parts or []
        if len(parts) > 1:
            parts.sort(key=lambda p: p[0])
        self._done[seq] = (1, [v for _, v in parts])
        self._release(emit)

    def _release(self, emit: list) -> None:
        """Ordered: move the finished items next in source order to ``emit``."""
        done = self._done
        nxt = self._next_emit
        while nxt in done:
            n, values = done.pop(nxt)
            emit.extend(values)
            nxt += n
        self._next_emit = nxt

    def _give_up(self, seq: int, stage: _Stage, reason: str) -> None:
        """An item crashed its workers too often: treat it by the stage's on_error."""
        if seq not in self._inflight:
            return
        rec = self._meta_of(seq)
        mode = stage.spec.on_error
        if mode in ("raise", "retry"):
            if self._error is None:
                self._error = WorkerDied(
                    f"stage {stage.spec.name!r}: {reason} while holding source item #{seq}, "
                    f"{rec.attempts} times (retries={stage.spec.retries})"
                )
            return
        if mode == "dead-letter":
            assert self._deadq is not None
            letter = DeadLetter(self._inflight.get(seq), stage.spec.name, "WorkerDied", reason, "", rec.attempts, (seq,))
            if not self._post(letter):
                return
            why = W.DEAD
        else:
            stage.crash_skipped += 1
            why = W.SKIPPED
        emit: list = []
        rec.weight = 1
        if not rec.has_data:
            rec.reason = why
        self._complete(seq, emit)
        self._late.extend(emit)

    def _post(self, letter: DeadLetter) -> bool:
        """Put ``letter`` in the dead letters; False (and the pipeline's
        error set) if they are full: the parent never waits here."""
        assert self._deadq is not None
        try:
            self._deadq.put_nowait(letter)
        except Full:
            if self._error is None:
                self._error = Full(
                    f"the dead letters queue {self._deadq.name!r} is full: read pipe.dead_letters while the "
                    "pipeline runs, or give Pipeline() a larger dead_letters_capacity_bytes"
                )
            return False
        self._dead_by_stage[letter.stage] = self._dead_by_stage.get(letter.stage, 0) + 1
        return True

    def _retry_or_give_up(self, seq: int, stage: _Stage, reason: str, charge: bool = True) -> None:
        if seq not in self._inflight:
            return
        rec = self._meta_of(seq)
        rec.attempts += charge
        if rec.attempts > stage.spec.retries:
            self._give_up(seq, stage, reason)
            return
        stage.crash_retries += 1
        self._retry.append(seq)

    def _supervise(self, now: float) -> None:
        if self._stop:
            return
        with self._cond:
            for k, s in enumerate(self._stages):
                for i, p in enumerate(s.procs):
                    if p is None or p.exitcode is None:
                        continue
                    if p.exitcode == W.INIT_FAILED_EXIT:
                        if self._error is None and now - self._started > 5.0:
                            self._error = RemoteError("init", "init= failed", "", s.spec.name)
                        continue
                    row = s.row(i)
                    pairs = list(row[W.S_HELD : W.S_HELD + 2 * row[W.S_HELD_N]]) if row[W.S_STATE] else []
                    ranges = list(zip(pairs[::2], pairs[1::2]))
                    # A worker records which of the (first seq, count) ranges
                    # it holds is in fn (S_CURRENT; -1: it cannot tell, every
                    # item is charged an attempt), and which item of that
                    # range (S_SUB).  Only that item is charged; the others
                    # are fed again free: a run not in fn as the run it was,
                    # so the stage still gets it as one message.  A run in fn
                    # whose item is unknown (S_SUB -1: see
                    # _Worker.map_chunk) charges none, and its items are fed
                    # again one by one, so that a next crash tells the culprit.
                    cur = row[W.S_CURRENT]
                    culprit = in_fn = None
                    if 0 <= cur < len(ranges):
                        in_fn = cur
                        first, count = ranges[cur]
                        sub = row[W.S_SUB]
                        culprit = first + (0 if count == 1 else sub if 0 <= sub < count else -(1 << 62))
                    row[W.S_STATE] = 0
                    row[W.S_HELD_N] = 0
                    # What it took and had not finished left the stage (it
                    # is fed again from the source); what it was about to
                    # put is taken as not put (a put whose S_PUT it did not
                    # count yet lets the next stage hold that many more until
                    # _resync, after which the counts are exact again).
                    row[W.S_DONE] = row[W.S_IN]
                    row[W.S_RESERVED] = 0
                    s.crashes += 1
                    self._suspect = True
                    self._crashed = True
                    reason = f"worker pid {p.pid} died (exit code {p.exitcode})"
                    runs = self._inflight.runs
                    seen: set = set()
                    for j, (first, count) in enumerate(ranges):
                        run = runs.get(first)
                        if count > 1 and j != in_fn and culprit is not None and run is not None and len(run) == count:
                            s.crash_retries += count
                            self._retry_runs.append((first, count))
                            continue
                        for seq in range(first, first + count):
                            if seq not in seen:
                                seen.add(seq)
                                self._inflight.split(seq)  # (its items go one by one from now on)
                                self._retry_or_give_up(seq, s, reason, charge=culprit is None or seq == culprit)
                    self._spawn(k, i)
            if self._suspect:
                self._look_for_lost(now)
            if self._crashed:
                self._resync(now)
            self._tune_chunks()
            self._cond.notify()
        if now - self._board_at >= _BOARD_EVERY:
            self._publish(now)
        if self._progress:
            self._show_progress(now)

    def _publish(self, now: float) -> None:
        """Put the statistics on the board (see :attr:`name`)."""
        board = self._board
        if board is None:
            return
        self._board_at = now
        st = self.statistics()
        stages = []
        for k, (s, x) in enumerate(zip(self._stages, st.stages)):
            d = dataclasses.asdict(x)
            d["max_in_flight"] = s.max_in_flight
            d["busy_seconds"] = s.total(W.S_BUSY_NS) / 1e9 if s.words is not None else 0.0
            d["workers_alive"] = sum(1 for p in s.procs if p is not None and p.exitcode is None)
            d["queue"] = self._queues[k].name if k < len(self._queues) else None
            stages.append(d)
        value = dataclasses.asdict(st)
        value["stages"] = stages
        try:
            board.set(
                {
                    "kind": self.BOARD_KIND,
                    "pid": os.getpid(),
                    "taken_at": time.time(),
                    "dead_letters_queue": self._deadq.name if self._deadq is not None else None,
                    "statistics": value,
                }
            )
        except Exception:  # (a pipeline of thousands of stages: no board rather than no pipeline)
            pass

    def _tune_chunks(self) -> None:
        """Runs of cheap items travel as one CHUNK message (one pickle, one
        record), but a slow stage must get items one by one so that all its
        workers share them.  Per stage, from its measured time per item: none
        while unmeasured (8 items) or slow; while below _CHEAP_NS, CHUNKs of
        up to ``max_in_flight // (2 * workers)`` items (at most _MAX_CHUNK).
        While every stage is cheap and the source's items small, a stage
        whose max_in_flight was not given gets _AUTO_MAX_IN_FLIGHT; back to
        its default once not.  A run keeps its
        boundaries through a row of cheap stages (the smallest of their
        CHUNKs), so that it reaches the parent whole.  Stage k-1's workers
        read stage k's length from their rows; the feeder uses stage 0's."""
        stages = self._stages
        cheap = []
        for s in stages:
            items = s.total(W.S_IN)
            cheap.append(
                s.spec.kind == "map"
                and items >= 8
                and s.total(W.S_BUSY_NS) < _CHEAP_NS * items
                and not s.total(W.S_LOANS)  # (results built in slots leave one by one: see output_array)
            )
        grow = all(cheap) and self._small_source
        for s, c in zip(stages, cheap):
            if s.auto:
                s.max_in_flight = _AUTO_MAX_IN_FLIGHT if grow else s.base_max_in_flight
            s.chunk = max(1, min(_MAX_CHUNK, s.max_in_flight // (2 * s.workers))) if c else 1
        self._window = sum(s.max_in_flight for s in stages)
        for s in stages:
            s.words[s.workers * s.width + W.P_BOUND] = s.max_in_flight
        limits = [1] * len(stages) + [1 << 30]  # the parent takes anything
        for k in range(len(stages) - 1, -1, -1):
            c = stages[k].chunk
            limits[k] = min(c, limits[k + 1]) if c > 1 and limits[k + 1] > 1 else c
        self._chunk = limits[0]
        for k, s in enumerate(stages):
            for i in range(s.workers):
                s.words[i * s.width + W.S_CHUNK_OUT] = limits[k + 1]

    def _look_for_lost(self, now: float) -> None:
        """After a crash: items in flight with every queue empty and every
        worker idle for a while were lost by a worker killed between taking
        and recording them.  Feed them again."""
        if not self._inflight.count:
            self._suspect = False
            return
        idle = (
            not self._feeding
            and not self._retry
            and not self._retry_runs
            and all(q.qsize() == 0 for q in self._queues)
            and all(s.total(W.S_STATE) == 0 for s in self._stages)
        )
        if not idle:
            self._stall_since = None
            return
        if self._stall_since is None:
            self._stall_since = now
            return
        if now - self._stall_since < _STALL_SECONDS:
            return
        self._stall_since = None
        for seq in self._inflight.seqs():
            self._retry_or_give_up(seq, self._stages[0], "an item was lost with a killed worker")

    def _entered(self, k: int) -> int:
        """Items put on stage ``k``'s queue so far (by the feeder, or by the
        workers of stage ``k - 1``)."""
        if k == 0:
            return self._fed_items
        p = self._stages[k - 1]
        return sum(p.words[W.S_PUT : p.workers * p.width : p.width])

    def _resync(self, now: float) -> None:
        """After a crash: make a stage's count of items exact again when it
        is empty.  A worker killed between taking items and counting them
        leaves them counted in the stage forever (or one killed between a
        put and counting it, too few); so when a stage's queue is empty, its
        workers idle, nobody about to put on it and its counters still for
        0.1 s, the parent sets its count to 0 (its row's S_DONE)."""
        for k, s in enumerate(self._stages):
            words, width, n = s.words, s.width, s.workers
            span = (n + 1) * width
            in_flight = self._entered(k) - sum(words[W.S_DONE:span:width])
            if k == 0:
                about_to_put = self._putting
            else:
                p = self._stages[k - 1]
                about_to_put = any(p.words[W.S_RESERVED : p.workers * p.width : p.width])
            key = (self._entered(k), sum(words[W.S_IN : n * width : width]), sum(words[W.S_DONE:span:width]))
            quiet = (
                in_flight != 0
                and not about_to_put
                and not any(words[W.S_STATE : n * width : width])
                and self._queues[k].qsize() == 0
            )
            if not quiet:
                s.quiet_since = None
            elif s.quiet_since is None or s.quiet_since[0] != key:
                s.quiet_since = (key, now)
            elif now - s.quiet_since[1] >= 0.1:
                words[n * width + W.S_DONE] += key[0] - key[2]
                s.quiet_since = None

    def _show_progress(self, now: float) -> None:
        if not sys.stderr.isatty() or now - getattr(self, "_last_progress", 0.0) < 0.5:
            return
        self._last_progress = now
        st = self.statistics()
        parts = [f"{s.name}: {s.items_in}->{s.items_out} busy {s.busy_fraction:.0%}" for s in st.stages]
        sys.stderr.write("\r" + " | ".join(parts) + f" | out {st.outputs}\x1b[K")
        sys.stderr.flush()

    def _shutdown(self, graceful: bool) -> None:
        self._stop = True
        with self._cond:
            self._cond.notify_all()
        if self._feeder is not None:
            self._feeder.join(2.0)
            self._feeder = None
        procs = [(s, p) for s in self._stages for p in s.procs if p is not None]
        if graceful:
            for k, s in enumerate(self._stages):
                for _ in range(s.workers):
                    try:
                        self._queues[k].put(W.END, timeout=0.2)
                    except Full:
                        break
            deadline = time.monotonic() + _JOIN_SECONDS
            for _, p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for _, p in procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + _JOIN_SECONDS
        for _, p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for _, p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(1.0)
        for s in self._stages:
            s.procs = []
        for q in self._queues + self._rooms:
            q.close()
        self._queues = []
        self._rooms = []
        board, self._board = self._board, None
        if board is not None:
            board.close()
            board.unlink()

    # -- statistics ---------------------------------------------------------------
    def statistics(self) -> PipelineStatistics:
        """A snapshot of the pipeline and of every stage (see the dataclasses)."""
        elapsed = time.monotonic() - self._started if self._started else 0.0
        stages = []
        for k, s in enumerate(self._stages):
            if s.words is None:
                stages.append(StageStatistics(s.spec.name, s.spec.kind, s.workers, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0))
                continue
            t = s.total
            items_in = t(W.S_IN)
            busy = t(W.S_BUSY_NS) / 1e9
            in_flight = W.stage_in_flight(lambda: self._entered(k), s.words, s.width, s.workers)
            stages.append(
                StageStatistics(
                    name=s.spec.name,
                    kind=s.spec.kind,
                    workers=s.workers,
                    items_in=items_in,
                    items_out=t(W.S_OUT),
                    in_flight=max(0, in_flight),  # (duplicates put after a timeout: below 0 for a while)
                    filtered=t(W.S_FILTERED),
                    skipped=t(W.S_SKIPPED) + s.crash_skipped,
                    dead_letters=self._dead_by_stage.get(s.spec.name, 0),
                    retries=t(W.S_RETRIES) + s.crash_retries,
                    crashes=s.crashes,
                    busy_fraction=min(1.0, busy / (elapsed * s.workers)) if elapsed else 0.0,
                    seconds_per_item=busy / items_in if items_in else 0.0,
                )
            )
        f = self._fates
        return PipelineStatistics(
            stages=tuple(stages),
            source_items=self._next_seq,
            outputs=self._outputs - (self._handing[0].__length_hint__() if self._handing is not None else 0),
            with_output=f[0],
            filtered=f[W.FILTERED],
            skipped=f[W.SKIPPED],
            dead_letters=f[W.DEAD],
            empty=f[W.EMPTY],
            merged=f[W.MERGED],
            in_flight=self._inflight.count,
            crash_retries=sum(s.crash_retries for s in self._stages),
            duplicates_dropped=self._dups,
            elapsed_seconds=elapsed,
            bottleneck=max(stages, key=lambda s: s.busy_fraction).name if stages and self._started else None,
        )

    def __repr__(self) -> str:
        names = " -> ".join(s.spec.name for s in self._stages)
        return f"<shmq.Pipeline {self._state} [{names}]>"

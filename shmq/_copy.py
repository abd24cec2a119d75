"""Large copies into shared memory, split across helper threads.

One core cannot saturate the memory bus: putting 16 MiB arrays through a
Queue with the copy split over two threads ran at 1.4-2.4x (median 1.7x) the
rate of one thread, on the 2-core VM of docs/benchmarks.md (2026-11-22);
copies that fit the caches gained nothing.  ``copy_into`` therefore splits copies of at least
``PARALLEL_MIN_BYTES`` between the calling thread and up to
``MAX_HELPERS`` daemon threads, started on first use, one per extra CPU this
process may use: the calling thread's affinity mask and the cgroup's CPU
quota, looked at again for every such copy (the quota at most once a
second), so a process confined to one CPU copies alone; helpers take the
caller's affinity before they copy.  Every part is a ``numpy.copyto``, which
releases the GIL, so the parts run at once and other Python threads keep
running meanwhile.  A part that no helper has started when the caller has
finished its own is copied by the caller: a helper that does not get a CPU
costs a hand-off, never a wait.

``SHMQ_COPY_THREADS=1`` in the environment keeps every copy in the calling
thread; ``SHMQ_COPY_THREADS=n`` uses at most ``n`` threads in all.

Interrupts: a copy never returns, normally or by an exception (Ctrl-C, a
signal handler's), while a helper may still write its destination.  Each
part is run by whoever claims it first, the helper or the caller; the
claim is one atomic, repeatable ``dict.setdefault``, and a helper marks a
part finished before it posts the part's lock, so an exception landing
anywhere in the hand-off leaves the caller able to tell, on retrying,
whether to wait, and never makes it wait for a post that already came.
The one gap Python leaves open: a second signal raised within the few
bytecodes that record a first one during that wait.
"""
from __future__ import annotations

import os
import threading
import time
from queue import SimpleQueue
from typing import List, Optional

import numpy as np

from . import _platform as P

__all__ = ("copy_into", "PARALLEL_MIN_BYTES", "MAX_HELPERS", "usable_threads")

PARALLEL_MIN_BYTES = 8 << 20  # below this, waking a helper cost more than it saved (6 MiB: 0.9x, 8 MiB: 1.2x)
MAX_HELPERS = 3
QUOTA_TTL_SECONDS = 1.0  # reading the cgroup quota costs ~70 us: not on every copy
_ALIGN = 4096  # parts start on page boundaries

_uint8 = np.uint8
_frombuffer = np.frombuffer
_copyto = np.copyto
_monotonic = time.monotonic

_HELPER = "helper"
_CALLER = "caller"


class _Part:
    """A part of one copy: run by the helper it was handed to or, if that has
    not claimed it yet, by the caller."""

    __slots__ = ("dst", "src", "cpus", "_claim", "done", "finished", "error")

    def __init__(self, dst: np.ndarray, src: np.ndarray, cpus: Optional[frozenset]) -> None:
        self.dst: Optional[np.ndarray] = dst
        self.src: Optional[np.ndarray] = src
        self.cpus = cpus  # the caller's affinity: the helper runs where the caller may
        self._claim: dict = {}
        self.done = threading.Lock()  # posted once, by a helper, after ``finished`` is set
        self.done.acquire()
        self.finished = False
        self.error: Optional[BaseException] = None

    def claim(self, who: str) -> bool:
        """True if ``who`` runs this part.  Atomic (one C call under the GIL)
        and repeatable: asking again gives the same answer."""
        return self._claim.setdefault("by", who) is who

    def copy(self) -> None:
        try:
            _copyto(self.dst, self.src)  # type: ignore[arg-type]
        except BaseException as exc:  # reported by copy_into
            self.error = exc
        self.dst = self.src = None  # hold no view of the destination's memory


class _Helper:
    """One daemon thread that copies the parts handed to it."""

    __slots__ = ("_inbox", "writing", "parts")

    def __init__(self) -> None:
        self._inbox: SimpleQueue = SimpleQueue()
        #: True while this helper writes a destination; parts it has copied (for tests)
        self.writing = False
        self.parts = 0
        threading.Thread(target=self._run, name="shmq-copy", daemon=True).start()

    def _run(self) -> None:
        inbox = self._inbox
        while True:
            part = inbox.get()
            if part.claim(_HELPER):  # else the caller copied it, or gave up on it
                if part.cpus is not None:  # one system call (~1 us) per part of >= 4 MiB
                    try:
                        os.sched_setaffinity(0, part.cpus)
                    except OSError:
                        pass
                self.writing = True
                part.copy()
                self.writing = False
                self.parts += 1
                part.finished = True
                part.done.release()
            del part

    def hand(self, part: _Part) -> None:
        self._inbox.put(part)


_state_lock = threading.Lock()  # held by the one copy using the helpers
_helpers: List[_Helper] = []
_quota = (-1.0, None)  # (read at, cgroup CPU quota)


def usable_threads(affinity: Optional[frozenset] = None) -> int:
    """Threads one large copy may use, the caller included: the CPUs the
    calling thread may use now (``affinity``, default its current mask) within
    the cgroup's quota, ``SHMQ_COPY_THREADS`` and ``MAX_HELPERS``."""
    global _quota
    now = _monotonic()
    if now - _quota[0] > QUOTA_TTL_SECONDS:
        _quota = (now, P.cgroup_cpu_quota())
    threads = P.usable_cpus(_quota[1], affinity)
    wanted = os.environ.get("SHMQ_COPY_THREADS", "").strip()
    if wanted.isdigit():
        threads = min(threads, max(1, int(wanted)))
    return min(threads, MAX_HELPERS + 1)


def _reset_after_fork() -> None:
    global _helpers, _state_lock
    _helpers = []  # the threads did not survive the fork
    _state_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def copy_into(dst: memoryview, src: memoryview) -> None:
    """Copy the bytes of ``src`` to the start of ``dst`` (both C-contiguous,
    ``dst`` writable and at least as long).  Large copies are split across
    helper threads when the process may use more than one CPU; a copy while
    another thread's copy holds the helpers runs in the calling thread.
    Raises what ``numpy.copyto`` raises (ValueError for a short or read-only
    ``dst``), and whatever interrupts it, after every helper has let go."""
    n = src.nbytes
    if n < PARALLEL_MIN_BYTES or not _state_lock.acquire(False):
        _copyto(_frombuffer(dst, _uint8, n), _frombuffer(src, _uint8, n))
        return
    try:
        d = _frombuffer(dst, _uint8, n)
        s = _frombuffer(src, _uint8, n)
        cpus = P.cpu_affinity()
        count = min(usable_threads(cpus), n // (PARALLEL_MIN_BYTES // 2) or 1)
        if count <= 1:
            _copyto(d, s)
            return
        while len(_helpers) < count - 1:
            _helpers.append(_Helper())
        step = (n // count + _ALIGN - 1) & -_ALIGN
        pending: List[_Part] = []
        error: Optional[BaseException] = None
        try:
            for k in range(1, count):
                lo = k * step
                if lo >= n:
                    break
                pending.append(_Part(d[lo : lo + step], s[lo : lo + step], cpus))  # registered first,
                _helpers[k - 1].hand(pending[-1])  # then handed over
            _copyto(d[:step], s[:step])
        except BaseException as exc:
            error = exc
        # Settle every part: copy here the ones no helper has claimed (or drop
        # them after an error), wait for the others.  Every step may be
        # interrupted and repeated: claim() answers the same, ``finished`` is
        # set before ``done`` is posted, and a part leaves ``pending`` only
        # when settled.  All the loop's back edges sit inside the ``try``.
        while True:
            try:
                while pending:
                    part = pending[-1]
                    if part.claim(_CALLER):
                        if error is None and not part.finished:
                            part.copy()
                            part.finished = True
                            error = part.error
                        part.dst = part.src = None
                    else:
                        while not part.finished:
                            part.done.acquire()
                        if error is None:
                            error = part.error
                    pending.pop()
                d = s = part = None  # (an exception's traceback would keep them)
                break
            except BaseException as exc:
                if error is None:
                    error = exc
        if error is not None:
            raise error
    finally:
        _state_lock.release()

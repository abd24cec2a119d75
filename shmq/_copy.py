"""Large copies into shared memory, split across helper threads.

One core cannot saturate the memory bus: putting 16 MiB arrays through a
Queue with the copy split over two threads ran at 1.4-2.4x (median 1.7x) the
rate of one thread, on the 2-core VM of docs/benchmarks.md (2026-11-22);
copies that fit the caches gained nothing.  ``copy_into`` therefore splits copies of at least
``PARALLEL_MIN_BYTES`` between the calling thread and up to
``MAX_HELPERS`` daemon threads, started on first use, one per extra CPU this
process may run on.  Every part is a ``numpy.copyto``, which releases the GIL,
so the parts run at once and other Python threads keep running meanwhile.

``SHMQ_COPY_THREADS=1`` in the environment (read at first use) keeps every
copy in the calling thread; ``SHMQ_COPY_THREADS=n`` uses at most ``n``
threads in all.  A copy never returns, not even on KeyboardInterrupt, before
every helper has finished its part: the destination is not touched after
``copy_into`` has returned or raised.
"""
from __future__ import annotations

import os
import threading
from typing import List, Optional

import numpy as np

__all__ = ("copy_into", "PARALLEL_MIN_BYTES", "MAX_HELPERS")

PARALLEL_MIN_BYTES = 8 << 20  # below this, waking a helper cost more than it saved (6 MiB: 0.9x, 8 MiB: 1.2x)
MAX_HELPERS = 3
_ALIGN = 4096  # parts start on page boundaries

_uint8 = np.uint8
_frombuffer = np.frombuffer
_copyto = np.copyto


class _Helper:
    """One daemon thread that copies the part it is handed."""

    __slots__ = ("_go", "_done", "_job", "error")

    def __init__(self) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job: Optional[tuple] = None
        self.error: Optional[BaseException] = None
        threading.Thread(target=self._run, name="shmq-copy", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._go.acquire()
            job = self._job
            self._job = None
            try:
                _copyto(*job)  # type: ignore[misc]
            except BaseException as exc:  # reported to the caller by finish()
                self.error = exc
            del job
            self._done.release()

    def start(self, dst: np.ndarray, src: np.ndarray) -> None:
        self._job = (dst, src)
        self._go.release()

    def finish(self) -> Optional[BaseException]:
        """Wait for the part to be copied, through any interruption; returns
        the first exception raised meanwhile (the helper's or a signal's)."""
        first: Optional[BaseException] = None
        while True:
            try:
                self._done.acquire()
                break
            except BaseException as exc:  # KeyboardInterrupt: the part is still being written
                first = first or exc
        error, self.error = self.error, None
        return first or error


_state_lock = threading.Lock()  # held by the one copy using the helpers
_helpers: Optional[List[_Helper]] = None


def _helper_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    wanted = os.environ.get("SHMQ_COPY_THREADS", "").strip()
    threads = int(wanted) if wanted.isdigit() else cpus
    return max(0, min(threads, cpus) - 1)


def _reset_after_fork() -> None:
    global _helpers, _state_lock
    _helpers = None  # the threads did not survive the fork
    _state_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def copy_into(dst: memoryview, src: memoryview) -> None:
    """Copy the bytes of ``src`` to the start of ``dst`` (both C-contiguous,
    ``dst`` writable and at least as long).  Large copies are split across
    helper threads when the process may use more than one CPU; a copy while
    another thread's copy holds the helpers runs in the calling thread."""
    n = src.nbytes
    if n < PARALLEL_MIN_BYTES or not _state_lock.acquire(False):
        _copyto(_frombuffer(dst, _uint8, n), _frombuffer(src, _uint8, n))
        return
    try:
        global _helpers
        helpers = _helpers
        if helpers is None:
            helpers = _helpers = [_Helper() for _ in range(min(_helper_count(), MAX_HELPERS))]
        d = _frombuffer(dst, _uint8, n)
        s = _frombuffer(src, _uint8, n)
        parts = min(len(helpers) + 1, n // (PARALLEL_MIN_BYTES // 2) or 1)
        step = (n // parts + _ALIGN - 1) & -_ALIGN
        started: List[_Helper] = []
        error: Optional[BaseException] = None
        try:
            for k in range(1, parts):
                lo = k * step
                if lo >= n:
                    break
                hi = min(lo + step, n)
                helpers[k - 1].start(d[lo:hi], s[lo:hi])
                started.append(helpers[k - 1])
            _copyto(d[:step], s[:step])
        finally:
            for h in started:
                error = h.finish() or error
        if error is not None:
            raise error
    finally:
        _state_lock.release()

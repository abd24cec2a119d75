"""Cross-process synchronisation that survives SIGKILL.

RobustLock
    A named POSIX semaphore used as a mutex (about 45 ns uncontended), made
    safe against a holder that dies: the holder writes its pid in the owner
    word, and the lock's progress shows in a second word -- a generation that
    every acquire bumps, or, for a lock whose holders always move a counter
    of their own (a ring side's message count), that counter, which saves the
    per-record paths a read-modify-write.  Waiters sleep in bounded slices;
    between slices they look at the owner word.  A dead owner, or an empty
    owner word with no progress for ``stale_after`` seconds (the holder died
    between taking the semaphore and writing its pid, or between clearing it
    and posting), means the lock is orphaned.  Recovery re-checks the same
    snapshot under the segment's flock (which the kernel releases if the
    recoverer dies), bumps the generation and posts the semaphore exactly once.

Doorbell
    A semaphore that is only a wake-up hint, never the source of truth: the
    condition lives in the segment.  A waiter counts itself in a flag word
    and sleeps in slices; a poster that sees a count takes one and posts.
    x86 may reorder "publish index, read flag" against "raise flag, re-check
    index": the waiter fences between its two steps, and a poster must too
    (publishing under a lock whose release -- a semaphore post, a locked
    instruction -- comes before it reads the flag does; else full_fence()).

wait_until, deadline_for, deadline_for_mp, remaining
    The one waiting loop (spin, then sleep on a Doorbell) and the deadline
    helpers every blocking call uses (the ring, the slot pool, the queue, the
    channel).  Why the loop spins the way it does: docs/waiting.md.

Waits are ``Semaphore.acquire(True, seconds)``: a signal handler that raises
during one (SystemExit from a SIGTERM handler, Ctrl-C) ends it with that
exception; a signal delivered to another thread is handled when the bounded
wait ends.
"""
from __future__ import annotations

import _thread
import os
import time
from typing import Callable, Optional, Tuple

from . import _platform as P

__all__ = (
    "RobustLock",
    "Doorbell",
    "OwnFlagBell",
    "SLICE_SECONDS",
    "STALE_SECONDS",
    "SPIN_SECONDS",
    "deadline_for",
    "deadline_for_mp",
    "remaining",
    "slice_end",
    "wait_until",
    "full_fence",
)

SLICE_SECONDS = 0.02
STALE_SECONDS = 0.5
#: longest a waiter polls before it sleeps (the adaptive budget starts here)
SPIN_SECONDS = 100e-6

_monotonic = time.monotonic
_sched_yield = getattr(os, "sched_yield", lambda: None)
_YIELDS = 8
_PID = os.getpid()


def _refresh_pid() -> None:
    global _PID
    _PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_refresh_pid)


# A RobustLock's generation word follows its owner word (see _layout's map).
_GENERATION_AFTER_OWNER = 1


class RobustLock:
    """Mutex shared by every process attached to a segment."""

    __slots__ = ("_sem", "_words", "_w_owner", "_w_gen", "_w_progress", "_segment", "stale_after", "on_recover")

    def __init__(
        self, sem, segment, w_owner: int, stale_after: float = STALE_SECONDS, w_progress: Optional[int] = None
    ) -> None:
        """``w_progress``: a word every holder changes before it releases the
        lock -- almost every holder: a lock held in turn only by holders that
        leave it unchanged looks stale after ``stale_after`` seconds if each
        look also falls between a semaphore operation and the owner word's
        store, nanoseconds wide -- instead of the generation, which acquire then
        leaves alone (recoveries still bump it)."""
        self._sem = sem
        self._segment = segment
        self._words = segment.words
        self._w_owner = w_owner
        self._w_gen = w_owner + _GENERATION_AFTER_OWNER
        self._w_progress = self._w_gen if w_progress is None else w_progress
        self.stale_after = stale_after
        #: called (without the lock) after this process recovered the lock
        #: from a dead holder, to repair what the holder left half-done
        self.on_recover = None

    def acquire(self, timeout: Optional[float] = None) -> bool:
        """Take the lock; False if ``timeout`` (seconds) expired first."""
        if not self._sem.acquire(False) and not self._acquire_slow(timeout):
            return False
        w = self._words
        w[self._w_owner] = _PID
        if self._w_progress == self._w_gen:
            w[self._w_gen] += 1
        return True

    def release(self) -> None:
        self._words[self._w_owner] = 0
        self._sem.release()

    def _acquire_slow(self, timeout: Optional[float]) -> bool:
        sem = self._sem
        if timeout is None or timeout > 0:
            # The holder is inside a short section, perhaps preempted: give it
            # the CPU a few times before sleeping in the kernel (a futex wait
            # and wake-up cost more than the section itself).
            for _ in range(_YIELDS):
                _sched_yield()
                if sem.acquire(False):
                    return True
        deadline = None if timeout is None else _monotonic() + timeout
        seen: Optional[Tuple[int, int, int]] = None
        seen_at = 0.0
        w = self._words
        while True:
            wait = SLICE_SECONDS
            if deadline is not None:
                wait = deadline - _monotonic()
                if wait <= 0:
                    return False
                if wait > SLICE_SECONDS:
                    wait = SLICE_SECONDS
            if sem.acquire(True, wait):
                return True
            snap = (w[self._w_owner], w[self._w_gen], w[self._w_progress])
            owner = snap[0]
            if owner:
                seen = None
                if owner != _PID and not P.is_alive(owner):
                    self._recover(snap)
            elif snap != seen:
                seen, seen_at = snap, _monotonic()
            elif _monotonic() - seen_at >= self.stale_after:
                self._recover(snap)
                seen = None

    def _recover(self, snap: Tuple[int, int, int]) -> None:
        w = self._words
        with self._segment.admin_lock():
            if (w[self._w_owner], w[self._w_gen], w[self._w_progress]) != snap:
                return  # somebody took or recovered it meanwhile
            w[self._w_owner] = 0
            w[self._w_gen] = snap[1] + 1
            if P.sem_value(self._sem) == 0:  # (a holder that posted and then died left it free)
                self._sem.release()
        if self.on_recover is not None:
            self.on_recover()

    def holder(self) -> int:
        """Pid recorded as holding the lock (0 if none or unknown)."""
        return self._words[self._w_owner]


# The wait loop's knobs (measured in docs/waiting.md).
#: ready() polls between two looks at the clock (about 1-2 us)
_POLLS = 16
#: a budget halved below this becomes 0: no spin (seconds)
_SPIN_FLOOR = 4e-6
#: with a budget of 0, every this-many-th wait probes with a spin of
#: _PROBE_SECONDS.  The probe must outlast a sleeping partner's wake-up
#: (tens of microseconds): when both sides of a cross-core exchange have
#: stopped spinning, each answer includes a wake-up, and a short probe
#: would never see one.  On one core a probe costs its whole length, so
#: they are rare: 1/16 of the waits, ~6 us a hand-off on average.
_PROBE_EVERY = 16
_PROBE_SECONDS = 100e-6
#: ... and only after _PROBE_AFTER_LONG sleeping waits in a row (probes not
#: counted) took longer than _LONG_WAIT: a partner on our CPU answers
#: within microseconds once we sleep (it runs as soon as we stop), one on
#: another CPU that sleeps as well needs a wake-up, tens of microseconds --
#: what a probe can win back.
_LONG_WAIT = 20e-6
_PROBE_AFTER_LONG = 3
#: adapt the spin budget (off: always spin the whole budget; for measuring)
_ADAPT = True
#: yield the CPU between poll batches (measured, not used: docs/waiting.md)
_YIELD_IN_SPIN = False


# A store followed by a load of another word is the one reordering x86 allows:
# a waiter's "raise flag, re-check index" and a poster's "publish index, read
# flag" could both miss each other.  A locked instruction between the store
# and the load forbids it; a thread lock's acquire and release are two (about
# 80 ns together), and their release also lets other threads in.
_fence_lock = _thread.allocate_lock()
_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release


def full_fence() -> None:
    """A full memory barrier: stores before it are visible to every CPU
    before loads after it run."""
    _fence_acquire()
    _fence_release()


#: longest an OwnFlagBell waiter waits for another to take a post it passed on
_PASS_ON_SECONDS = 0.001
#: most posts one ring_all makes (a corrupt flag word must not loop for long)
_RING_ALL_MAX = 1024


class Doorbell:
    """Sleep until a peer signals, in bounded slices.

    The flag word counts the waiters about to sleep: each :meth:`announce`
    adds one, each :meth:`ring` takes one and posts once, :meth:`ring_all`
    posts once per waiter.  With several waiters on one bell (workers on one
    queue, producers waiting for slots), each hand-off thus wakes a sleeper,
    where a plain flag would be cleared by the first ring and leave the
    others to their slices.  The count is kept with plain loads and stores
    (no compare-and-swap): two updates at the same instant may lose one.  A
    lost decrement costs a spare post (a sleeper wakes once, re-checks and
    sleeps again); a lost increment a sleeper that waits for its slice.

    ``spin_budget``, ``skipped`` and ``long_waits`` are this process's adaptive spin state
    for waits on this bell (see :func:`wait_until`)."""

    __slots__ = ("_sem", "_words", "_w_flag", "spin_budget", "skipped", "long_waits")
    #: a ring takes the waiter's count (see OwnFlagBell for the other kind)
    ring_takes_count = True

    def __init__(self, sem, words, w_flag: int) -> None:
        self._sem = sem
        self._words = words
        self._w_flag = w_flag
        self.spin_budget = SPIN_SECONDS
        self.skipped = 0
        self.long_waits = 0  # sleeping waits in a row that took longer than _LONG_WAIT

    def announce(self) -> None:
        """Say a waiter is about to sleep; re-check the condition after this
        (the fence makes the count visible before the re-check reads), and
        :meth:`withdraw` if it leaves without being rung."""
        w = self._words
        f = self._w_flag
        n = w[f]
        w[f] = n + 1 if n >= 0 else 1
        _fence_acquire()
        _fence_release()

    def withdraw(self) -> None:
        """Take back an :meth:`announce` that no ring answered."""
        w = self._words
        f = self._w_flag
        n = w[f]
        if n > 0:
            w[f] = n - 1

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` or until rung.  True if rung.  Signals are
        handled between slices of at most SLICE_SECONDS."""
        if seconds <= SLICE_SECONDS:
            return self._sem.acquire(True, seconds)
        end = _monotonic() + seconds
        while not self._sem.acquire(True, min(seconds, SLICE_SECONDS)):
            seconds = end - _monotonic()
            if seconds <= 0:
                return False
        return True

    def ring(self) -> None:
        """Wake one sleeper (callers check the flag word first)."""
        w = self._words
        f = self._w_flag
        n = w[f]
        w[f] = n - 1 if n > 0 else 0
        self._sem.release()

    def ring_all(self) -> None:
        """Wake every announced sleeper (callers check the flag word first):
        for a condition only some of the waiters can use."""
        w = self._words
        f = self._w_flag
        n = w[f]
        w[f] = 0
        n = 1 if n < 1 else (n if n < _RING_ALL_MAX else _RING_ALL_MAX)
        release = self._sem.release
        for _ in range(n):
            release()


class OwnFlagBell(Doorbell):
    """A Doorbell whose flag word belongs to one waiter (0/1, written only by
    it): a poster finds the sleepers by scanning every waiter's word and
    posts the semaphore once for each.  For bells whose posters must wake a
    particular waiter, which a shared count cannot name (the slot pool: a
    returned slot serves only its source).  The flag stays up while the
    waiter is inside :func:`wait_until`, rung or not.

    A shared hint word (``w_hint``) spares posters the scan while nobody
    waits: a waiter raises it after its own flag, and the last waiter to
    leave lowers it -- then fences and scans, and raises it again if
    another flag is up (a waiter that raised its flag after the scan raises
    the hint after the lowering: both orders end with the hint up)."""

    __slots__ = ("_count_waiters", "_w_hint")
    ring_takes_count = False

    def __init__(self, sem, words, w_flag: int, w_hint: int, count_waiters: Callable[[], int]) -> None:
        """``count_waiters()``: how many waiters have their flag up now."""
        super().__init__(sem, words, w_flag)
        self._w_hint = w_hint
        self._count_waiters = count_waiters

    def announce(self) -> None:
        w = self._words
        w[self._w_flag] = 1
        w[self._w_hint] = 1
        _fence_acquire()
        _fence_release()

    def withdraw(self) -> None:
        w = self._words
        w[self._w_flag] = 0
        if w[self._w_hint]:
            w[self._w_hint] = 0
            _fence_acquire()
            _fence_release()
            if self._count_waiters():
                w[self._w_hint] = 1

    def pass_on(self) -> None:
        """We took a post meant for another waiter (we woke, and our condition
        is still false): post it again, and let that waiter take it before
        we sleep again (else we could take it back at once, and the waiter
        it was for would sleep until its slice ends).  Waits at most
        _PASS_ON_SECONDS, yielding the CPU, in case that waiter is gone."""
        if self._count_waiters() <= 1:
            return
        sem = self._sem
        sem.release()
        end = _monotonic() + _PASS_ON_SECONDS
        while P.sem_value(sem) > 0 and _monotonic() < end:
            _sched_yield()


# -- deadlines --------------------------------------------------------------


def deadline_for(timeout: Optional[float]) -> Optional[float]:
    """Absolute monotonic deadline for ``timeout`` seconds (None = forever).
    Raises ValueError for a negative or NaN timeout (as queue.Queue does for
    a negative one); TypeError if it is not a number."""
    if timeout is None:
        return None
    if not timeout >= 0:  # (NaN compares false both ways)
        raise ValueError(f"'timeout' must be a non-negative number, got {timeout!r}")
    return _monotonic() + timeout


def deadline_for_mp(timeout: Optional[float]) -> Optional[float]:
    """As :func:`deadline_for`, but a negative timeout means 0, as
    ``multiprocessing.Queue`` has it.  NaN still raises ValueError."""
    if timeout is None:
        return None
    if timeout != timeout:
        raise ValueError(f"'timeout' must be a number, got {timeout!r}")
    return _monotonic() + (timeout if timeout > 0 else 0.0)


def remaining(deadline: Optional[float]) -> Optional[float]:
    """Seconds left until ``deadline`` (None = forever), never negative."""
    if deadline is None:
        return None
    left = deadline - _monotonic()
    return left if left > 0 else 0.0


def slice_end(deadline: Optional[float], seconds: float) -> float:
    """The deadline of the next wait slice: ``seconds`` from now, or
    ``deadline`` if that comes first (for waits that re-check a peer's
    liveness between slices)."""
    end = _monotonic() + seconds
    return end if deadline is None or deadline > end else deadline


# -- the waiting loop ---------------------------------------------------------


def wait_until(
    ready: Callable[[], bool],
    bell: Doorbell,
    deadline: Optional[float],
    spin: float = SPIN_SECONDS,
) -> bool:
    """Return True as soon as ``ready()`` is true, False once ``deadline``
    (monotonic seconds, None = never) has passed.  ``ready`` must be cheap and
    must not block; the caller retries its operation after True.

    The waiter polls for up to ``spin`` seconds, then raises the bell's flag
    and sleeps on its semaphore in slices of at most SLICE_SECONDS (the
    poster's ring wakes it at once; the slices only bound how late a signal
    handler runs).  The spin adapts per bell and process: each spin that
    fails halves the next one, down to none at all (a partner on the same
    CPU cannot run while we spin), one that succeeds restores it, and
    while it is none every _PROBE_EVERY-th wait tries a full one."""
    if ready():
        return True
    now = start = _monotonic()
    probing = False
    if spin > 0:
        budget = bell.spin_budget
        if budget <= 0.0:
            # Recent spins on this bell all failed (the partner shares our
            # CPU, or is idle): sleep at once, but probe now and then in case
            # it moved to another CPU.
            bell.skipped += 1
            if bell.skipped >= _PROBE_EVERY and bell.long_waits >= _PROBE_AFTER_LONG:
                bell.skipped = 0
                budget = _PROBE_SECONDS
                probing = True
        if budget > 0.0:
            if spin > budget:
                spin = budget
            end_spin = now + spin
            if deadline is not None and deadline < end_spin:
                end_spin = deadline
            while now < end_spin:
                for _ in range(_POLLS):
                    if ready():
                        if bell.spin_budget < SPIN_SECONDS:  # the partner runs elsewhere after all
                            bell.spin_budget = SPIN_SECONDS
                        return True
                if _YIELD_IN_SPIN:
                    _sched_yield()
                now = _monotonic()
            if _ADAPT and not probing:  # (a failed probe leaves the budget at 0)
                budget /= 2
                bell.spin_budget = budget if budget >= _SPIN_FLOOR else 0.0
    announced = False
    while True:
        if deadline is None:
            wait = SLICE_SECONDS
        else:
            wait = deadline - now
            if wait <= 0:
                if announced:
                    bell.withdraw()
                return ready()
            if wait > SLICE_SECONDS:
                wait = SLICE_SECONDS
        if not announced:
            bell.announce()
            announced = True
            if ready():
                bell.withdraw()
                return True
        rung = bell.sleep(wait)
        if rung and bell.ring_takes_count:
            announced = False  # the ring took our count
        if ready():
            if announced:
                bell.withdraw()
            if not probing:  # (a probe's wait says nothing about the partner)
                if _monotonic() - start > _LONG_WAIT:
                    bell.long_waits += 1
                else:
                    bell.long_waits = 0
            return True
        if rung and not bell.ring_takes_count:
            bell.pass_on()
        now = _monotonic()

"""Turning "would block" into blocking: deadlines, spinning, sleeping.

Strategy (measured in ../shared/FINDINGS.md): a peer usually answers within
microseconds, and sleeping on a semaphore costs as much as a pipe, so a waiter
first polls for ``spin`` seconds, then raises the doorbell's flag and sleeps on
its semaphore in slices of at most SLICE_SECONDS, re-checking between slices.
A lost wake-up therefore costs one slice, and Ctrl-C is seen within one slice.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from ._sync import SLICE_SECONDS, Doorbell

__all__ = ("SPIN_SECONDS", "deadline_for", "wait_until")

SPIN_SECONDS = 100e-6

_monotonic = time.monotonic


def deadline_for(timeout: Optional[float]) -> Optional[float]:
    """Absolute monotonic deadline for ``timeout`` seconds (None = forever).
    Raises ValueError for a negative timeout, as the standard queues do."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError(f"'timeout' must be a non-negative number, got {timeout!r}")
    return _monotonic() + timeout


def wait_until(
    ready: Callable[[], bool],
    bell: Doorbell,
    deadline: Optional[float],
    spin: float = SPIN_SECONDS,
) -> bool:
    """Return True as soon as ``ready()`` is true, False once ``deadline``
    (monotonic seconds, None = never) has passed.  ``ready`` must be cheap and
    must not block; the caller retries its operation after True."""
    if ready():
        return True
    now = _monotonic()
    if spin > 0:
        end_spin = now + spin
        if deadline is not None and deadline < end_spin:
            end_spin = deadline
        while now < end_spin:
            for _ in range(20):
                if ready():
                    return True
            now = _monotonic()
    while True:
        if deadline is None:
            wait = SLICE_SECONDS
        else:
            wait = deadline - now
            if wait <= 0:
                return ready()
            if wait > SLICE_SECONDS:
                wait = SLICE_SECONDS
        bell.announce()
        if ready():
            return True
        bell.sleep(wait)
        if ready():
            return True
        now = _monotonic()

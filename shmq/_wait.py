"""Turning "would block" into blocking: deadlines, spinning, sleeping.

The loop and the deadline helpers live one layer down, in :mod:`shmq._sync`,
so the slot pool waits the same way as everything above it; this module
keeps the names the blocking APIs import.  Why the loop spins the way it
does, with measurements: docs/waiting.md.
"""
from __future__ import annotations

from ._sync import SLICE_SECONDS, SPIN_SECONDS, deadline_for, deadline_for_mp, remaining, wait_until

__all__ = ("SPIN_SECONDS", "SLICE_SECONDS", "deadline_for", "deadline_for_mp", "remaining", "wait_until")

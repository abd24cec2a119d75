"""The shmq exception hierarchy.

Every condition a caller handles differently has its own class, all under
:class:`ShmqError`.  Where shmq replaces a standard-library API the standard
exception is a base class too, so ``except queue.Full`` or ``except ValueError``
keeps working.
"""
from __future__ import annotations

import queue as _queue

__all__ = (
    "ShmqError",
    "ClosedError",
    "BrokenError",
    "WouldBlock",
    "Full",
    "Empty",
    "EndOfChannel",
    "LayoutError",
    "MessageTooLarge",
    "SharedMemoryFull",
    "SlotError",
    "RemoteError",
    "WorkerDied",
)


class ShmqError(Exception):
    """Root of every exception shmq raises on its own account."""


class ClosedError(ShmqError, ValueError):
    """You get this when you use a handle after calling its ``close()``."""


class BrokenError(ShmqError):
    """The shared state is gone or unusable: the segment was removed under
    this handle (for example by systemd's ``RemoveIPC``), or a peer left it in
    a state that cannot be recovered.  ``__cause__`` holds the OS error."""


class WouldBlock(ShmqError):
    """A non-blocking call could not complete at once."""


class Full(WouldBlock, _queue.Full):
    """No room: the ring is at its byte or message capacity (or the pool has
    no free slot) and the call was non-blocking or its timeout expired."""


class Empty(WouldBlock, _queue.Empty):
    """Nothing to read, and the call was non-blocking or its timeout expired."""


class EndOfChannel(ShmqError):
    """All senders have closed and everything they sent has been received."""


class LayoutError(ShmqError):
    """The named object is not an shmq segment of the expected kind and
    layout version.  The message says what was expected and what was found."""


class MessageTooLarge(ShmqError, ValueError):
    """The record can never fit, however long the caller waits."""


class SharedMemoryFull(ShmqError, OSError):
    """The shared-memory file system (``/dev/shm``) has no room for the
    segment.  Raised at creation, never later as a SIGBUS."""


class SlotError(ShmqError):
    """A slot was released twice, released by a process that does not hold it,
    or an index came back that does not belong to the pool."""


class RemoteError(ShmqError):
    """A pipeline stage's function raised an exception that could not be
    rebuilt in this process (it does not pickle).  ``exc_type``, ``stage`` and
    ``remote_traceback`` say what was raised where; the message holds the
    remote traceback.  (An exception that pickles is re-raised as itself, with
    the remote traceback as its ``__cause__`` and a note.)"""

    def __init__(self, message: str, *, exc_type: str = "", stage: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.stage = stage
        self.remote_traceback = remote_traceback


class WorkerDied(ShmqError):
    """A pipeline worker process died (killed by a signal, such as the OOM
    killer's SIGKILL) while holding an item more times than its stage's
    ``retries`` allow, under ``on_error="raise"`` or ``"retry"``."""

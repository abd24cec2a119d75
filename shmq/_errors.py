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
    "NoFreeName",
    "TooManyMembers",
    "CorruptError",
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


class NoFreeName(ShmqError):
    """shmq made up names for a new segment (a large item's blob, a queue's
    side ring or slot pool) and found each one taken, as many times as it
    tried.  Something else keeps creating names like them in /dev/shm.
    (``FileExistsError`` keeps its meaning: a name *you* gave is taken.)"""


class TooManyMembers(ShmqError):
    """A shared table of the processes using an object is full: more
    processes (or handles handed to children and not yet claimed) use it at
    once than it has room for.  The message says how many fit."""


class CorruptError(BrokenError):
    """A word in shared memory holds a value the protocol never writes (an
    index out of the ring's geometry, a record length running past the
    published data): another process wrote garbage into the segment.  The
    structure is unusable; no record was delivered twice."""


class RemoteError(ShmqError):
    """An exception raised in another process: a service's handler, or a
    pipeline stage's function.  ``type_name`` is the qualified name of its
    class, ``message`` its text, ``remote_traceback`` the formatted traceback
    there, ``stage`` the pipeline stage ("" for a service).  A service sets
    ``__cause__`` to the original exception when it unpickles here; a
    pipeline re-raises such an exception as itself and uses RemoteError only
    for one that does not unpickle."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "", stage: str = "") -> None:
        super().__init__(type_name, message, remote_traceback, stage)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.stage = stage

    def __str__(self) -> str:
        what = f"{self.type_name}: {self.message}" if self.message else self.type_name
        return f"stage {self.stage!r} raised {what}" if self.stage else what


class WorkerDied(ShmqError):
    """A pipeline worker process died (killed by a signal, such as the OOM
    killer's SIGKILL) while holding an item more times than its stage's
    ``retries`` allow, under ``on_error="raise"`` or ``"retry"``."""

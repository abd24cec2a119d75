"""Statistics read from a ring's shared header: frozen dataclasses any
process can produce from the segment's name."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Tuple

from . import _layout as L

__all__ = ("ParticipantInfo", "RingStatistics", "ring_statistics")


@dataclass(frozen=True)
class ParticipantInfo:
    """One process registered with a segment."""

    pid: int
    #: "creator", "producer", "consumer" (several joined by "+"), or "attached"
    role: str
    #: the process still runs (zombies and reused pids count as dead)
    alive: bool


@dataclass(frozen=True)
class RingStatistics:
    """A snapshot of one ring's counters."""

    #: segment name
    name: str
    #: size of the data area in bytes
    capacity_bytes: int
    #: maximum records held at once (0: limited by bytes only)
    max_messages: int
    #: records written since creation
    messages_in: int
    #: records read since creation
    messages_out: int
    #: ring bytes written since creation (payload + 8-byte headers + padding)
    bytes_in: int
    #: ring bytes released by readers since creation
    bytes_out: int
    #: records held now
    messages_used: int
    #: ring bytes held now
    bytes_used: int
    #: highest ``bytes_used`` seen (sampled when producers re-read the head)
    peak_bytes: int
    #: blocking writes that had to wait for room (back-pressure)
    full_waits: int
    #: total seconds writers spent waiting for room
    full_wait_seconds: float
    #: blocking reads that had to wait for a record
    empty_waits: int
    #: total seconds readers spent waiting for a record
    empty_wait_seconds: float
    #: pid of the creating process
    creator_pid: int
    #: the creating process still runs
    creator_alive: bool
    #: registered processes
    participants: Tuple[ParticipantInfo, ...]
    #: time.monotonic() when the snapshot was taken
    taken_at: float

    @property
    def fill_ratio(self) -> float:
        """``bytes_used / capacity_bytes`` (or by messages, whichever is fuller)."""
        ratio = self.bytes_used / self.capacity_bytes if self.capacity_bytes else 0.0
        if self.max_messages:
            ratio = max(ratio, self.messages_used / self.max_messages)
        return ratio


def ring_statistics(ring) -> RingStatistics:
    """Snapshot the counters of ``ring`` (a RingBuffer)."""
    c = ring.counters()
    seg = ring.segment
    parts = tuple(
        ParticipantInfo(p.pid, "+".join(p.roles), p.alive) for p in seg.participants()
    )
    return RingStatistics(
        name=ring.name,
        capacity_bytes=c["capacity_bytes"],
        max_messages=c["max_messages"],
        messages_in=c["messages_in"],
        messages_out=c["messages_out"],
        bytes_in=c["bytes_in"],
        bytes_out=c["bytes_out"],
        messages_used=max(0, c["messages_in"] - c["messages_out"]),
        bytes_used=c["bytes_used"],
        peak_bytes=max(c["peak_bytes"], c["bytes_used"]),
        full_waits=c["full_waits"],
        full_wait_seconds=c["full_wait_ns"] / 1e9,
        empty_waits=c["empty_waits"],
        empty_wait_seconds=c["empty_wait_ns"] / 1e9,
        creator_pid=seg.words[L.W_CREATOR_PID],
        creator_alive=seg.creator_alive(),
        participants=parts,
        taken_at=time.monotonic(),
    )

"""A channel's member table: who holds which of its handles, and how it ended.

The table lives in the last KiB of the channel ring's header (``_layout``:
``W_CH_*``, ``channel_member_word``): per process, how many send and receive
handles it holds; the totals; and persistent state bits (every sender done,
a sender died, every receiver done, a receiver died) that are only ever set.
A handle handed to a process that does not exist yet (a pickled endpoint, a
forked child) is a *reservation* that its receiver claims or that lapses.
``channel.py`` decides what the bits mean to a caller (EndOfChannel,
BrokenError); this module only keeps the counts true, also when a holder is
SIGKILLed in the middle of a change.
"""
from __future__ import annotations

import os
import time
from typing import Tuple

from . import _layout as L
from . import _platform as P
from ._errors import TooManyMembers
from ._segment import Segment

__all__ = ("MemberTable", "SEND", "RECEIVE", "RESERVE_SECONDS", "SCAN_SECONDS")

SEND = 0
RECEIVE = 1
#: how long a pickled (or forked) endpoint's reservation waits to be claimed
RESERVE_SECONDS = 30.0
#: dead holders are looked for at most this often by :meth:`MemberTable.maybe_scan`
SCAN_SECONDS = 0.1

_LOW = (1 << L.CH_HANDLE_SHIFT) - 1
_W_STATE = L.W_CH_STATE
_monotonic = time.monotonic


def _now_us() -> int:
    return time.monotonic_ns() // 1000  # CLOCK_MONOTONIC: one clock for every process


class MemberTable:
    """A channel's member table in its ring's header (see ``_layout``): how
    many handles of each side every process holds, the totals, and the
    channel's persistent state bits.  Every change happens under the ring
    segment's admin lock (a flock, which the kernel drops if the holder dies)."""

    __slots__ = ("_seg", "_w", "_next_scan")

    def __init__(self, segment: Segment) -> None:
        self._seg = segment
        self._w = self._seg.words
        self._next_scan = 0.0

    @staticmethod
    def initialise(segment: Segment) -> None:
        """Creator only, before anybody can find the channel."""
        w = segment.words
        for word in range(L.W_CH_STATE, L.channel_member_word(L.CH_MEMBERS)):
            w[word] = 0
        w[L.W_CH_TAG] = L.CHANNEL_TAG

    @staticmethod
    def is_channel(segment: Segment) -> bool:
        return segment.words[L.W_CH_TAG] == L.CHANNEL_TAG

    def state(self) -> int:
        return self._w[_W_STATE]

    def counts(self) -> Tuple[int, int]:
        w = self._w
        return max(0, w[L.W_CH_SENDERS]), max(0, w[L.W_CH_RECEIVERS])

    def dead_pid(self, side: int) -> int:
        return self._w[L.W_CH_DEAD_SENDER if side == SEND else L.W_CH_DEAD_RECEIVER]

    # -- entries ----------------------------------------------------------
    def _free_entry_locked(self) -> int:
        w = self._w
        for i in range(L.CH_MEMBERS):
            if w[L.channel_member_word(i) + L.CH_PID] == 0:
                return i
        return -1

    def _take(self, pid: int, start_us: int, senders: int, receivers: int) -> int:
        for attempt in range(2):
            with self._seg.admin_lock():
                i = self._free_entry_locked()
                if i >= 0:
                    base = L.channel_member_word(i)
                    w = self._w
                    w[base + L.CH_HANDLES] = 0
                    w[base + L.CH_START_US] = start_us
                    w[base + L.CH_PID] = pid
                    self._change_locked(i, senders, receivers)
                    return i
            if attempt == 0:
                self.scan()  # dead holders and lapsed reservations free their entries
        raise TooManyMembers(
            f"channel {self._seg.name!r} has no free member entry: {L.CH_MEMBERS} processes (or endpoints "
            f"handed to children and not yet claimed) hold it"
        )

    def join(self, senders: int, receivers: int) -> int:
        """A new entry for this process holding the given handles; its index.
        Raises TooManyMembers if the table is full of live holders."""
        return self._take(os.getpid(), P.my_start_us(), senders, receivers)

    def reserve(self, senders: int, receivers: int) -> Tuple[int, int]:
        """Count handles for a process that does not exist yet (a pickled
        endpoint's receiver, a forked child): ``(index, expiry)``, the ticket
        :meth:`claim` takes."""
        expiry = _now_us() + int(RESERVE_SECONDS * 1e6)
        return self._take(L.CH_RESERVED, expiry, senders, receivers), expiry

    def claim(self, ticket: Tuple[int, int]) -> Tuple[int, int, int]:
        """Make the reservation ``ticket`` this process's entry: ``(index,
        senders, receivers)``, or index -1 if it lapsed or was claimed."""
        i, expiry = ticket
        if not 0 <= i < L.CH_MEMBERS:
            return -1, 0, 0
        base = L.channel_member_word(i)
        w = self._w
        start = P.my_start_us()
        with self._seg.admin_lock():
            if w[base + L.CH_PID] != L.CH_RESERVED or w[base + L.CH_START_US] != expiry:
                return -1, 0, 0
            # PID first: a claimer killed between the two stores leaves an
            # entry that looks dead (it is), never a reservation that cannot lapse.
            w[base + L.CH_PID] = os.getpid()
            w[base + L.CH_START_US] = start
            handles = w[base + L.CH_HANDLES]
        return i, handles >> L.CH_HANDLE_SHIFT, handles & _LOW

    def change(self, index: int, senders: int, receivers: int) -> int:
        """Add ``senders``/``receivers`` (may be negative) to entry ``index``
        and the totals; returns the state bits this set."""
        with self._seg.admin_lock():
            return self._change_locked(index, senders, receivers)

    def leave(self, index: int) -> int:
        """Close every handle of entry ``index`` and free it; the bits set."""
        with self._seg.admin_lock():
            base = L.channel_member_word(index)
            w = self._w
            if w[base + L.CH_PID] != os.getpid():
                return 0  # reaped already (a corrupt table, or pid confusion): nothing of ours left
            handles = w[base + L.CH_HANDLES]
            bits = self._change_locked(index, -(handles >> L.CH_HANDLE_SHIFT), -(handles & _LOW))
            w[base + L.CH_PID] = 0
            return bits

    def _change_locked(self, index: int, senders: int, receivers: int, died: int = 0) -> int:
        w = self._w
        base = L.channel_member_word(index)
        handles = w[base + L.CH_HANDLES]
        mine_s = max(0, (handles >> L.CH_HANDLE_SHIFT) + senders)
        mine_r = max(0, (handles & _LOW) + receivers)
        w[base + L.CH_HANDLES] = (mine_s << L.CH_HANDLE_SHIFT) | mine_r  # one store
        # The totals are recounted from the entries, not adjusted: a holder
        # killed halfway through this leaves nothing for the next one to undo.
        total_s = total_r = 0
        for i in range(L.CH_MEMBERS):
            entry = L.channel_member_word(i)
            if w[entry + L.CH_PID]:
                handles = w[entry + L.CH_HANDLES]
                total_s += max(0, handles >> L.CH_HANDLE_SHIFT)
                total_r += max(0, handles & _LOW)
        w[L.W_CH_SENDERS] = total_s
        w[L.W_CH_RECEIVERS] = total_r
        old = w[_W_STATE]
        new = old
        if died and senders < 0:
            new |= L.CH_SENDER_DIED
            if not w[L.W_CH_DEAD_SENDER]:
                w[L.W_CH_DEAD_SENDER] = died
        if died and receivers < 0:
            new |= L.CH_RECEIVER_DIED
            if not w[L.W_CH_DEAD_RECEIVER]:
                w[L.W_CH_DEAD_RECEIVER] = died
        if senders < 0 and total_s == 0:
            new |= L.CH_SENDERS_DONE
        if receivers < 0 and total_r == 0:
            new |= L.CH_RECEIVERS_DONE
        if new != old:
            w[_W_STATE] = new  # one store: a reader sees DONE together with DIED
        return new & ~old

    # -- finding the dead -------------------------------------------------
    def scan(self) -> int:
        """Count the handles of dead holders as closed (noting that they died)
        and drop lapsed reservations; returns the state bits this set."""
        self._next_scan = _monotonic() + SCAN_SECONDS
        w = self._w
        now = _now_us()
        gone = []
        for i in range(L.CH_MEMBERS):
            base = L.channel_member_word(i)
            pid, start = w[base + L.CH_PID], w[base + L.CH_START_US]
            if pid == 0:
                continue
            if pid == L.CH_RESERVED:
                if start < now:
                    gone.append((i, pid, start))
            elif not 0 < pid < 1 << 31 or not P.is_alive(pid, start):
                gone.append((i, pid, start))
        if not gone:
            return 0
        bits = 0
        with self._seg.admin_lock():
            for i, pid, start in gone:
                base = L.channel_member_word(i)
                if w[base + L.CH_PID] != pid or w[base + L.CH_START_US] != start:
                    continue  # claimed, closed or reused meanwhile
                handles = w[base + L.CH_HANDLES]
                # A lapsed reservation was never used: closed, not died.
                died = pid if pid != L.CH_RESERVED else 0
                bits |= self._change_locked(i, -(handles >> L.CH_HANDLE_SHIFT), -(handles & _LOW), died)
                w[base + L.CH_PID] = 0
        return bits

    def maybe_scan(self) -> int:
        """:meth:`scan`, at most once per SCAN_SECONDS."""
        if _monotonic() < self._next_scan:
            return 0
        return self.scan()

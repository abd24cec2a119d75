"""Statistics and inventory of shmq segments, read from their shared headers.

Everything here works from a segment's *name* in any process, without
joining the segment: :func:`read_statistics` maps it read-only
(:class:`~shmq._segment.SegmentView`), so an observer never appears among
the participants and never writes shared memory.

* :func:`read_statistics`: a segment's statistics by name (each kind's
  statistics class lives beside what it measures: ``_ring.RingStatistics``,
  ``_slots.SlotPoolStatistics``; ``_segment.ParticipantInfo``).
* :class:`SegmentInfo`: what the common header tells about any segment
  (kind, size, creator, age, participants): ``shmq ls``, and the fallback
  for kinds without a statistics reader.
* :class:`Rates` / :func:`rates`: messages/s, bytes/s and blocked time
  between two snapshots, with a :func:`verdict` a person can act on.
* :class:`Garbage` / :func:`collect_garbage`: segments and semaphores whose
  creator and participants are all dead (``shmq gc``); a service client's
  reply ring and its parts as soon as the client is dead.
* :class:`ServiceStatistics`, :class:`ServerStatistics`,
  :class:`ClientStatistics`: a ``shmq.Service`` read from its request ring's
  server table and its clients' reply rings and request tables.

shmq never drops a message (a full ring blocks the writer or raises Full), so
there is no drop counter: back-pressure shows as ``full_waits``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import numpy as np

from . import _layout as L
from . import _platform as P
from ._broadcast import latest_statistics, topic_statistics
from ._errors import LayoutError
from ._ring import RingStatistics, read_ring_statistics
from ._segment import ParticipantInfo, SegmentView, participant_infos
from ._segment import set_sweeper as _set_sweeper
from ._slots import view_statistics as pool_view_statistics

__all__ = (
    "VERDICTS",
    "ClientStatistics",
    "Garbage",
    "ServerStatistics",
    "ServiceStatistics",
    "Rates",
    "SegmentInfo",
    "collect_garbage",
    "list_segments",
    "rates",
    "read_statistics",
    "segment_info",
    "verdict",
)


@dataclass(frozen=True)
class SegmentInfo:
    """What the common header of any shmq segment tells."""

    #: segment name
    name: str
    #: "ring", "pool", "blob", "queue"/"joinable-queue"/"simple-queue" (the
    #: main ring of a shmq queue), "queue-side" (its side ring for large
    #: items)
    kind: str
    #: total bytes of the segment (header included)
    size_bytes: int
    #: pid of the creating process
    creator_pid: int
    #: the creating process still runs
    creator_alive: bool
    #: wall-clock creation time, seconds since the epoch
    created: float
    #: registered processes
    participants: Tuple[ParticipantInfo, ...]
    #: time.monotonic() when the snapshot was taken
    taken_at: float
    #: the queue this segment is a part of (its side ring, slot pool or a
    #: large-item blob), or None for a queue's main ring and anything else
    owner: Optional[str] = None
    #: for a service client's reply ring (kind "client"), or a server's
    #: result pool: the service's name
    service: Optional[str] = None

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created)

    @property
    def in_use(self) -> bool:
        """The creator or some participant still runs."""
        return self.creator_alive or any(p.alive for p in self.participants)


_QUEUE_ROLES = {
    L.QUEUE_KIND_QUEUE: "queue",
    L.QUEUE_KIND_JOINABLE: "joinable-queue",
    L.QUEUE_KIND_SIMPLE: "simple-queue",
    L.QUEUE_KIND_SIDE: "queue-side",
    L.QUEUE_KIND_SERVICE: "service",
    L.QUEUE_KIND_REPLIES: "client",
}


def _kind_name(view: SegmentView) -> str:
    """The kind as ``shmq ls`` shows it: a shmq.Queue's rings are "queue" (or
    "joinable-queue", "simple-queue") and "queue-side"; other rings "ring"."""
    if view.kind == L.KIND_RING:
        return _QUEUE_ROLES.get(view.words[L.W_QUEUE_KIND], "ring")
    return L.KIND_NAMES.get(view.kind, f"kind {view.kind}")


def _segment_info(view: SegmentView, owner: Optional[str] = None) -> SegmentInfo:
    w = view.words
    return SegmentInfo(
        name=view.name,
        kind=_kind_name(view),
        size_bytes=view.size,
        creator_pid=w[L.W_CREATOR_PID],
        creator_alive=view.creator_alive(),
        created=w[L.W_CREATED_NS] / 1e9,
        participants=participant_infos(view),
        taken_at=time.monotonic(),
        owner=owner,
        service=linked_service(w) if view.kind == L.KIND_RING else None,
    )


class _Inventory:
    """One pass over /dev/shm: every shmq segment's SegmentInfo, the entries
    that carry shmq's magic but cannot be read (``problems``), and which
    queue each part belongs to.

    A queue's parts are found by name (``<queue>.s``, ``.p``, ``.b<hex>``:
    :func:`~shmq._platform.owner_of`).
    """

    def __init__(self) -> None:
        self.names: List[str] = P.list_shm_names()
        self.infos: Dict[str, SegmentInfo] = {}
        self.idents: Dict[str, Tuple[int, int]] = {}
        #: shmq-looking entries that could not be read: name -> reason
        self.problems: Dict[str, str] = {}
        links: Dict[str, str] = {}  # pool -> the name in its LINK
        for name in self.names:
            try:
                with SegmentView.open(name) as view:
                    info = _segment_info(view)
                    self.idents[name] = view._ident
                    if view.kind == L.KIND_POOL:
                        links[name] = _pool_link(view.words)
            except FileNotFoundError:
                continue  # removed meanwhile
            except PermissionError as exc:
                self.problems[name] = exc.strerror or "permission denied"
                continue
            except LayoutError as exc:
                if _has_magic(name):  # an shmq segment we cannot use; anything else is not ours
                    self.problems[name] = str(exc)
                continue
            except (OSError, ValueError):
                continue  # not a regular file, or a name shmq never makes
            self.infos[name] = info
        for name, info in self.infos.items():
            owner = P.owner_of(name)
            if owner is not None and owner != name:
                self.infos[name] = dataclasses.replace(info, owner=owner)
            elif getattr(self.infos.get(links.get(name, "")), "kind", None) == "service":
                # a server's result pool: shown with its service (gc judges it as any pool)
                self.infos[name] = dataclasses.replace(info, service=links[name])

    def group(self, name: str) -> str:
        """The queue ``name`` belongs to (``name`` itself if it is no part)."""
        info = self.infos.get(name)
        owner = info.owner if info is not None else P.owner_of(name)
        return owner or name

    def members(self) -> Dict[str, List[str]]:
        """group name -> its segments (the queue's main ring first, then its
        parts); a service's clients (each a group: reply ring and parts)
        right after the service."""
        out: Dict[str, List[str]] = {}
        for name in sorted(set(self.infos) | set(self.problems)):
            out.setdefault(self.group(name), []).append(name)
        order = {"queue-side": 0, "pool": 1}
        for group, names in out.items():
            # the queue, then its side ring, its pool, its blobs
            names.sort(key=lambda n: (n != group, order.get(getattr(self.infos.get(n), "kind", ""), 2), n))
        clients: Dict[str, List[str]] = {}
        for group in out:
            service = self.service_of(group)
            if service is not None and service in out:
                clients.setdefault(service, []).append(group)
        ordered: Dict[str, List[str]] = {}
        for group, names in out.items():
            if group in ordered or (self.service_of(group) in clients and group in clients[self.service_of(group)]):
                continue
            ordered[group] = names
            for client in clients.get(group, ()):
                ordered[client] = out[client]
        return ordered

    def matches(self, group: str, names: List[str], prefix: str) -> bool:
        """Whether ``--prefix`` takes in ``group``: its name or a segment's
        starts with ``prefix``, or it belongs to a service whose name does."""
        if group.startswith(prefix) or any(n.startswith(prefix) for n in names):
            return True
        service = self.service_of(group)
        return service is not None and service.startswith(prefix)

    def service_of(self, group: str) -> Optional[str]:
        """The service whose client ``group`` is (a reply ring), else None."""
        info = self.infos.get(group)
        return info.service if info is not None else None


def _pool_link(w: memoryview) -> str:
    """The name in a pool's LINK words (what it serves), or ""."""
    raw = b"".join((w[L.W_LINK + k] & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for k in range(L.LINK_BYTES // L.WORD))
    try:
        return raw.split(b"\0", 1)[0].decode("ascii")
    except UnicodeError:
        return ""


def group_alive(infos: List[SegmentInfo]) -> bool:
    """Whether a group (a segment with its parts, as :class:`_Inventory`
    makes them) is in use: any process of any of its segments lives -- but a
    service client's reply ring and its parts live and die with the client
    alone (the servers attached to it do not keep it)."""
    head = next((i for i in infos if i.owner is None), None)
    if head is not None and head.kind == "client" and head.service is not None:
        return head.creator_alive
    return any(i.in_use for i in infos)


def live_groups(infos: List[SegmentInfo]) -> Set[str]:
    """The names of the groups among ``infos`` that are in use (:func:`group_alive`)."""
    groups: Dict[str, List[SegmentInfo]] = {}
    for i in infos:
        groups.setdefault(i.owner or i.name, []).append(i)
    return {g for g, members in groups.items() if group_alive(members)}


def _has_magic(name: str) -> bool:
    """True if the entry ``name`` in /dev/shm starts with shmq's magic."""
    try:
        fd = P.shm_open_readonly(name)
    except (OSError, ValueError):
        return False
    try:
        return os.pread(fd, len(L.MAGIC), 0) == L.MAGIC
    except OSError:
        return False
    finally:
        os.close(fd)


def segment_info(name: str) -> SegmentInfo:
    """The common header of segment ``name``.  Raises FileNotFoundError,
    PermissionError, or LayoutError if it is not a complete shmq segment."""
    with SegmentView.open(name) as view:
        return _segment_info(view)


def read_statistics(name: str) -> Any:
    """A statistics snapshot of segment ``name``, read-only, from any process:
    RingStatistics for a ring (queues included), SlotPoolStatistics for a
    slot pool, TopicStatistics / LatestStatistics for a topic / Latest,
    ServiceStatistics for a service's request ring, ClientStatistics for a
    service client's reply ring (the same as the handle's ``statistics()``),
    SegmentInfo for any other kind.  Raises
    FileNotFoundError, PermissionError, or LayoutError (not an shmq segment of
    this layout version)."""
    with SegmentView.open(name) as view:
        if view.kind == L.KIND_RING:
            if is_service(view.words):
                return service_statistics(view)
            if linked_service(view.words) is not None:
                return client_statistics(view.name, view, view.words)[0]
            return read_ring_statistics(view.name, view.words, view)
        if view.kind == L.KIND_POOL:
            return pool_view_statistics(view)
        if view.kind == L.KIND_TOPIC:
            return topic_statistics(view)
        if view.kind == L.KIND_LATEST:
            return latest_statistics(view)
        return _segment_info(view)


def list_segments(prefix: str = "", problems: Optional[List[Tuple[str, str]]] = None) -> List[SegmentInfo]:
    """Every shmq segment in /dev/shm whose name starts with ``prefix`` (or
    that is a part of a queue whose name does), identified by its magic
    (other files are ignored), a queue's parts right after it (see
    ``SegmentInfo.owner``).  Entries that carry shmq's magic but cannot be
    read (another user's, another layout version, truncated, a header that
    contradicts itself) are appended to ``problems`` as ``(name, reason)``
    when it is given."""
    inv = _Inventory()
    out = []
    for group, names in inv.members().items():
        if not inv.matches(group, names, prefix):
            continue
        for name in names:
            if name in inv.infos:
                out.append(inv.infos[name])
            elif problems is not None:
                problems.append((name, inv.problems[name]))
    return out


# -- services -------------------------------------------------------------------
# A service's counters live in its request ring's header (the server table,
# written by each server) and in its clients' request tables (written by the
# client and the servers): see "A service" in _layout.  Read here from any
# process, by name, without joining anything.


@dataclass(frozen=True)
class ServerStatistics:
    """One server process of a service, from the request ring's server table."""

    pid: int
    #: the process still runs
    alive: bool
    #: requests it answered with a reply / with an exception (``req.fail``)
    replied: int
    failed: int
    #: partial replies it sent (``req.send_partial``, a generator's yields)
    partials: int
    #: requests it dropped because their client cancelled or left: before a
    #: handler saw them, or the handler's answer
    cancelled: int
    #: requests it took and has not answered yet (0 once it died: see ``lost``)
    in_flight: int


@dataclass(frozen=True)
class ClientStatistics:
    """A snapshot of one client of a service: its reply ring and requests."""

    #: the client's reply ring (replies in all: ``messages_in``; waiting to be read: ``messages_used``)
    replies: RingStatistics
    #: requests sent that no server has answered yet, nor the client cancelled
    outstanding: int
    #: requests sent so far (retries included)
    sent: int
    #: requests sent again: an idempotent call whose server died, or a request a dying server lost
    resent: int
    #: the client's name (its reply ring's)
    name: str = ""
    #: the service it calls
    service: str = ""
    #: the client's process, and whether it still runs
    pid: int = 0
    alive: bool = True

    @property
    def fill_ratio(self) -> float:
        """How full the reply ring is."""
        return self.replies.fill_ratio

    @property
    def taken_at(self) -> float:
        return self.replies.taken_at


@dataclass(frozen=True)
class ServiceStatistics:
    """A snapshot of a service, the same in every process: its request
    ring, its servers and its clients.  Counters only grow (rates: take two
    snapshots)."""

    #: the request ring (requests sent: ``messages_in``; waiting to be taken: ``messages_used``)
    requests: RingStatistics
    #: pids of the live processes listed as servers (the request ring's consumers)
    servers: List[int]
    name: str = ""
    #: requests the servers took off the ring (cancelled ones included)
    received: int = 0
    #: requests answered with a reply / with an exception
    replied: int = 0
    failed: int = 0
    #: requests dropped because their client cancelled (or timed out, or left)
    cancelled: int = 0
    #: partial replies sent
    partials: int = 0
    #: requests a live server took and has not answered yet
    in_flight: int = 0
    #: requests whose server died while serving them (or after reading them
    #: off the ring); their clients failed them with BrokenError or sent them again
    lost: int = 0
    #: every server process with an entry in the server table (the dead ones
    #: until their entry is reused; servers beyond the table's 21 entries
    #: count into the totals only)
    server_table: Tuple[ServerStatistics, ...] = ()
    #: every client whose reply ring names this service (dead ones until collected)
    clients: Tuple[ClientStatistics, ...] = ()

    @property
    def queued(self) -> int:
        """Requests waiting to be taken."""
        return self.requests.messages_used

    @property
    def fill_ratio(self) -> float:
        """How full the request ring is."""
        return self.requests.fill_ratio

    @property
    def taken_at(self) -> float:
        return self.requests.taken_at

    @property
    def answered(self) -> int:
        """Requests that got their final answer (replied or failed)."""
        return self.replied + self.failed


def linked_service(w: memoryview) -> Optional[str]:
    """The service named in the header words ``w`` of a client's reply ring, else None."""
    if w[L.W_QUEUE_KIND] != L.QUEUE_KIND_REPLIES:
        return None
    raw = b"".join(
        (w[L.W_RP_SERVICE + k] & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for k in range(L.RP_SERVICE_BYTES // L.WORD)
    )
    name = raw.split(b"\0", 1)[0]
    try:
        return P.check_name(name.decode("ascii")) if name else None
    except (UnicodeError, ValueError):
        return None  # (not a name shmq makes: show it as a plain ring)


def is_service(w: memoryview) -> bool:
    """Whether the ring words ``w`` are a service's request ring with its server table."""
    return w[L.W_QUEUE_KIND] == L.QUEUE_KIND_SERVICE and w[L.W_SV_TAG] == L.SERVICE_TAG


def _client_table(name: str) -> Optional[np.ndarray]:
    """The request entries of client ``name`` (its table ``<name>.b0``), a
    copy, one row per entry; None if it cannot be read."""
    try:
        with SegmentView.open(P.part_name(name, "b0")) as view:
            w = view.words
            start = L.DATA_OFFSET // L.WORD
            count = L.CL_ENTRIES * L.CL_ENTRY_WORDS
            if view.kind != L.KIND_BLOB or w[L.W_CL_TAG] != L.CLIENT_TAG or len(w) < start + count:
                return None
            part = w[start : start + count]
            try:
                return np.array(part, dtype=np.int64).reshape(L.CL_ENTRIES, L.CL_ENTRY_WORDS)
            finally:
                part.release()
    except (OSError, LayoutError, ValueError):
        return None


def _entry_counts(table: Optional[np.ndarray]) -> Tuple[int, int, Dict[int, int]]:
    """(outstanding, sent, {server pid: requests it took and has not answered})."""
    if table is None:
        return 0, 0, {}
    seq = table[:, L.CL_SEQ]
    open_ = (seq != 0) & (table[:, L.CL_CANCEL] != seq) & (table[:, L.CL_DONE] != seq)
    taken = open_ & (table[:, L.CL_TAKEN] == seq)
    pids, counts = np.unique(table[taken, L.CL_PID], return_counts=True)
    return int(open_.sum()), int(seq.max()), {int(p): int(c) for p, c in zip(pids, counts)}


def client_statistics(name: str, ring: Any, words: memoryview) -> Tuple[ClientStatistics, Dict[int, int]]:
    """Client ``name``'s statistics (``ring``/``words``: its reply ring, a
    Segment or SegmentView and its words), and what each server holds of it."""
    table = _client_table(name)
    outstanding, sent, held = _entry_counts(table)
    resent = 0
    if table is not None:
        try:
            with SegmentView.open(P.part_name(name, "b0")) as view:
                resent = view.words[L.W_CL_RESENT]
        except (OSError, LayoutError, ValueError):
            pass
    replies = read_ring_statistics(name, words, ring)
    stats = ClientStatistics(
        replies=replies,
        outstanding=outstanding,
        sent=sent,
        resent=resent,
        name=name,
        service=linked_service(words) or "",
        pid=replies.creator_pid,
        alive=replies.creator_alive,
    )
    return stats, held


def clients_of(service: str) -> List[str]:
    """The names of the reply rings in /dev/shm that name ``service``."""
    out = []
    for name in P.list_shm_names():
        if P.owner_of(name) is not None:
            continue  # (a part: a reply ring's name is generated)
        try:
            with SegmentView.open(name) as view:
                if view.kind == L.KIND_RING and linked_service(view.words) == service:
                    out.append(name)
        except (OSError, LayoutError, ValueError):
            continue
    return out


def _server_table(w: memoryview) -> Tuple[List[int], List[Tuple[int, int, List[int]]], int]:
    """(SV_RETIRED counters, [(pid, start_us, counters)] of the used entries,
    SV_LOST), read consistently with the folds (SV_FOLDS)."""
    n = max(0, min(w[L.W_SV_SERVERS], L.SV_SERVERS))
    span = range(L.SV_REPLIED, L.SV_ENTRY_WORDS)
    for attempt in range(1000):
        folds = w[L.W_SV_FOLDS]
        if folds & 1 and attempt < 999:  # a fold is under way (microseconds), or its folder died: read anyway
            time.sleep(0)
            continue
        retired = [w[L.W_SV_RETIRED + k] for k in span]
        entries = []
        for i in range(n):
            b = L.service_entry_word(i)
            pid = w[b + L.SV_PID]
            if pid:
                entries.append((pid, w[b + L.SV_START_US], [w[b + k] for k in span]))
        if w[L.W_SV_FOLDS] == folds:
            break
    return retired, entries, w[L.W_SV_LOST]


def service_statistics(view: Any, clients: Optional[List[str]] = None) -> ServiceStatistics:
    """A snapshot of the service whose request ring is ``view`` (a Segment
    or SegmentView of it).  ``clients``: the names of its clients' reply
    rings, if the caller has listed them (else /dev/shm is searched)."""
    w = view.words
    name = view.name
    tagged = is_service(w)
    client_stats = []
    held: Dict[int, int] = {}
    for c in clients_of(name) if clients is None else clients:
        try:
            with SegmentView.open(c) as ring:
                if ring.kind != L.KIND_RING or linked_service(ring.words) != name:
                    continue
                stats, by_server = client_statistics(c, ring, ring.words)
        except (OSError, LayoutError, ValueError):
            continue  # (closed meanwhile)
        client_stats.append(stats)
        for pid, k in by_server.items():
            held[pid] = held.get(pid, 0) + k
    requests = read_ring_statistics(name, w, view)
    retired, entries, lost = _server_table(w) if tagged else ([0] * 6, [], 0)
    totals = list(retired)
    table = []
    for pid, start, counts in entries:
        alive = P.is_alive(pid, start)
        totals = [a + b for a, b in zip(totals, counts)]
        r, f, pa, dr, sk = counts[:5]
        table.append(ServerStatistics(pid, alive, r, f, pa, dr + sk, held.get(pid, 0) if alive else 0))
    replied, failed, partials, dropped, skipped = totals[:5]
    return ServiceStatistics(
        requests=requests,
        servers=sorted({p.pid for p in view.participants() if p.alive and p.role & L.ROLE_CONSUMER}),
        name=name,
        received=requests.messages_out,
        replied=replied,
        failed=failed,
        cancelled=dropped + skipped,
        partials=partials,
        in_flight=sum(x.in_flight for x in table),
        lost=lost,
        server_table=tuple(table),
        clients=tuple(client_stats),
    )


# -- rates and verdict -----------------------------------------------------

VERDICTS = ("idle", "producer-bound", "consumer-bound", "balanced")

#: a side "waits" when its processes spent at least this share of the interval blocked
WAIT_RATIO = 0.2
#: a queue is "mostly full" at or above this fill ratio (mean of the two snapshots)
MOSTLY_FULL = 0.8


@dataclass(frozen=True)
class Rates:
    """What happened on one queue between two statistics snapshots."""

    #: segment name
    name: str
    #: seconds between the snapshots
    interval_seconds: float
    #: records written / read per second
    messages_in_per_second: float
    messages_out_per_second: float
    #: ring bytes written / released per second (headers and padding included)
    bytes_in_per_second: float
    bytes_out_per_second: float
    #: seconds producers spent blocked on a full queue, per second; summed
    #: over producers, so 2.0 means two producers blocked throughout
    producer_wait_ratio: float
    #: seconds consumers spent blocked on an empty queue, per second (summed)
    consumer_wait_ratio: float
    #: fill ratio in the later snapshot
    fill_ratio: float
    #: one of VERDICTS, see :func:`verdict`
    verdict: str


def verdict(producer_wait_ratio: float, consumer_wait_ratio: float, mean_fill_ratio: float, moved: bool) -> str:
    """What limits a queue, in words a person can act on:

    * ``"consumer-bound"``: producers spent at least WAIT_RATIO of the time
      blocked on a full queue, or it stayed mostly full: add consumers or
      make them faster (or give the queue more room for bursts).
    * ``"producer-bound"``: consumers spent at least WAIT_RATIO of the time
      blocked on an empty queue: the consumers keep up; the producers set
      the pace.
    * ``"balanced"``: messages moved and neither side waited much.
    * ``"idle"``: nothing moved and nobody waited.

    Blocked time is counted when a blocked call returns, so a process that
    stays blocked for the whole interval shows up only through the fill.
    """
    full_side = producer_wait_ratio >= WAIT_RATIO or mean_fill_ratio >= MOSTLY_FULL
    empty_side = consumer_wait_ratio >= WAIT_RATIO
    if full_side and (not empty_side or producer_wait_ratio >= consumer_wait_ratio):
        return "consumer-bound"
    if empty_side:
        return "producer-bound"
    return "balanced" if moved else "idle"


def rates(before: Any, after: Any) -> Rates:
    """Rates between two snapshots of the same queue (``after`` taken later).

    Works with any statistics object that has ``name``, ``taken_at``,
    ``messages_in/out``, ``bytes_in/out``, ``full_wait_seconds``,
    ``empty_wait_seconds`` and ``fill_ratio`` (RingStatistics, and the queue
    and pool statistics that mirror it).  Raises ValueError if ``after`` was
    not taken after ``before`` or belongs to another queue.
    """
    if before.name != after.name:
        raise ValueError(f"snapshots of different queues: {before.name!r} and {after.name!r}")
    dt = after.taken_at - before.taken_at
    if dt <= 0:
        raise ValueError(f"'after' must be taken after 'before', got an interval of {dt} s")
    m_in = max(0, after.messages_in - before.messages_in)
    m_out = max(0, after.messages_out - before.messages_out)
    p_wait = max(0.0, after.full_wait_seconds - before.full_wait_seconds) / dt
    c_wait = max(0.0, after.empty_wait_seconds - before.empty_wait_seconds) / dt
    mean_fill = (before.fill_ratio + after.fill_ratio) / 2
    return Rates(
        name=after.name,
        interval_seconds=dt,
        messages_in_per_second=m_in / dt,
        messages_out_per_second=m_out / dt,
        bytes_in_per_second=max(0, after.bytes_in - before.bytes_in) / dt,
        bytes_out_per_second=max(0, after.bytes_out - before.bytes_out) / dt,
        producer_wait_ratio=p_wait,
        consumer_wait_ratio=c_wait,
        fill_ratio=after.fill_ratio,
        verdict=verdict(p_wait, c_wait, mean_fill, bool(m_in or m_out)),
    )


# -- garbage ----------------------------------------------------------------


@dataclass(frozen=True)
class Garbage:
    """A segment or semaphore nobody alive can use any more."""

    #: the segment's kind (see SegmentInfo; removed with its semaphores), or "semaphore"
    kind: str
    #: segment or semaphore name
    name: str
    #: bytes the entry holds in /dev/shm (0 for a semaphore)
    size_bytes: int
    #: why it is garbage, in words
    reason: str


def _death_reason(info: SegmentInfo) -> str:
    others = sorted({p.pid for p in info.participants} - {info.creator_pid})
    reason = f"creator {info.creator_pid} is dead"
    if others:
        reason += f", and so are participants {', '.join(map(str, others))}"
    elif info.participants:
        reason += ", and so is every participant"
    return reason


def _orphan_semaphore(name: str, existing: Set[str], segments: Set[str]) -> Optional[Garbage]:
    """``name`` as Garbage if it is a semaphore whose segment is gone and
    that nobody can open again.  ``existing``: every segment name found
    (a segment's semaphores go, or stay, with it); ``segments``: those that
    stay."""
    for suffix in P.SEM_SUFFIXES:
        if name.endswith(suffix):
            break
    else:
        return None
    base = name[: -len(suffix)]
    if base in existing:
        return None  # belongs to an existing segment: goes (or stays) with it
    pid = P.generated_name_pid(name)
    if pid:
        if P.is_alive(pid):
            return None
        return Garbage("semaphore", name, 0, f"its segment is gone and its creator {pid} is dead")
    owner = P.owner_of(base)
    if owner is not None:
        if owner in segments:
            return None
        return Garbage("semaphore", name, 0, f"its segment and its queue {owner} are gone")
    return None  # an explicitly named segment's: nothing tells whose it is


def collect_garbage(
    prefix: str = "", dry_run: bool = False, problems: Optional[List[Tuple[str, str]]] = None
) -> List[Garbage]:
    """Find, and unless ``dry_run`` remove, what nobody alive can use:

    * shmq segments (recognised by their magic) whose creator and every
      registered participant are dead (a zombie, or a pid now used by another
      process, counts as dead), together with their semaphores.  A queue and
      its parts (side ring, slot pool, large-item blobs) count as one: all of
      them stay while any process of any of them lives (a blob made by a
      producer that died stays while a consumer of its queue lives);
    * semaphores with an shmq suffix whose segment is gone: named by
      ``new_name()`` after a creator pid that is dead, or named after a queue
      part whose queue is gone too.

    Only names starting with ``prefix`` are considered (a queue's parts go
    with it; a service's clients and result pools with the service).  A segment is removed only if its name still refers to the
    file that was checked.  Entries that carry shmq's magic but cannot be
    read are never touched; they are appended to ``problems`` as ``(name,
    reason)`` when it is given.  Returns what was (or would be) removed.
    """
    inv = _Inventory()
    found: List[Garbage] = []
    removed: Set[str] = set()
    for group, names in inv.members().items():
        if not inv.matches(group, names, prefix):
            continue
        bad = [n for n in names if n in inv.problems]
        if problems is not None:
            problems.extend((n, inv.problems[n]) for n in bad)
        infos = [inv.infos[n] for n in names if n in inv.infos]
        if bad or group_alive(infos):
            continue  # something of the queue lives (or cannot be judged): keep all of it
        service = inv.service_of(group)
        for info in infos:
            reason = _death_reason(info)
            if service is not None:
                reason = f"its client {info.creator_pid} is dead (a reply ring of service {service}" + (
                    f", part of {info.owner})" if info.owner is not None else ")"
                )
            elif info.owner is not None:
                reason += f" (part of queue {info.owner}, whose processes are all dead)"
            if not _still_names(info.name, inv.idents.get(info.name)):
                continue
            if not dry_run:
                P.shm_unlink(info.name)  # the segment and its semaphores
            removed.add(info.name)
            found.append(Garbage(info.kind, info.name, info.size_bytes, reason))
    segments = set(inv.names) - removed
    for name in P.list_shm_semaphores():
        if name.startswith(prefix):
            item = _orphan_semaphore(name, set(inv.names), segments)
            if item is not None:
                if not dry_run:
                    P.sem_unlink(name)
                found.append(item)
    return found


def _still_names(name: str, ident: Optional[Tuple[int, int]]) -> bool:
    """True while ``name`` still refers to the file identified by ``ident``."""
    try:
        st = os.stat(os.path.join(P.SHM_DIR, name))
    except OSError:
        return False
    return ident is not None and (st.st_dev, st.st_ino) == ident


# SHMQ_SWEEP=1: each process runs collect_garbage() once, before it creates its first segment.
_set_sweeper(collect_garbage)

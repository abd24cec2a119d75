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
  creator and participants are all dead (``shmq gc``).

shmq never drops a message (a full ring blocks the writer or raises Full), so
there is no drop counter: back-pressure shows as ``full_waits``.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from . import _layout as L
from . import _platform as P
from ._broadcast import latest_statistics, topic_statistics
from ._errors import LayoutError
from ._ring import read_ring_statistics
from ._segment import ParticipantInfo, SegmentView, participant_infos
from ._segment import set_sweeper as _set_sweeper
from ._slots import view_statistics as pool_view_statistics

__all__ = (
    "VERDICTS",
    "Garbage",
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
        for name in self.names:
            try:
                with SegmentView.open(name) as view:
                    info = _segment_info(view)
                    self.idents[name] = view._ident
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

    def group(self, name: str) -> str:
        """The queue ``name`` belongs to (``name`` itself if it is no part)."""
        info = self.infos.get(name)
        owner = info.owner if info is not None else P.owner_of(name)
        return owner or name

    def members(self) -> Dict[str, List[str]]:
        """group name -> its segments (the queue's main ring first, then its parts)."""
        out: Dict[str, List[str]] = {}
        for name in sorted(set(self.infos) | set(self.problems)):
            out.setdefault(self.group(name), []).append(name)
        order = {"queue-side": 0, "pool": 1}
        for group, names in out.items():
            # the queue, then its side ring, its pool, its blobs
            names.sort(key=lambda n: (n != group, order.get(getattr(self.infos.get(n), "kind", ""), 2), n))
        return out


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
    slot pool, TopicStatistics / LatestStatistics for a topic / Latest (the
    same as the handle's ``statistics()``), SegmentInfo for any other kind.  Raises
    FileNotFoundError, PermissionError, or LayoutError (not an shmq segment of
    this layout version)."""
    with SegmentView.open(name) as view:
        if view.kind == L.KIND_RING:
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
        if not (group.startswith(prefix) or any(n.startswith(prefix) for n in names)):
            continue
        for name in names:
            if name in inv.infos:
                out.append(inv.infos[name])
            elif problems is not None:
                problems.append((name, inv.problems[name]))
    return out


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
    with it).  A segment is removed only if its name still refers to the
    file that was checked.  Entries that carry shmq's magic but cannot be
    read are never touched; they are appended to ``problems`` as ``(name,
    reason)`` when it is given.  Returns what was (or would be) removed.
    """
    inv = _Inventory()
    found: List[Garbage] = []
    removed: Set[str] = set()
    for group, names in inv.members().items():
        if not (group.startswith(prefix) or any(n.startswith(prefix) for n in names)):
            continue
        bad = [n for n in names if n in inv.problems]
        if problems is not None:
            problems.extend((n, inv.problems[n]) for n in bad)
        infos = [inv.infos[n] for n in names if n in inv.infos]
        if bad or any(i.in_use for i in infos):
            continue  # something of the queue lives (or cannot be judged): keep all of it
        for info in infos:
            reason = _death_reason(info)
            if info.owner is not None:
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

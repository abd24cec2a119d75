"""``python -m shmq`` / ``shmq``: look at, clean up and measure shmq segments.

Commands::

    shmq ls    [--prefix P] [--json]                 the shmq segments on this machine
    shmq stat  NAME [--interval S] [--json]          one statistics snapshot (and rates)
    shmq top   [--prefix P] [--interval S] [--iterations N] [--json]   live view; Ctrl-C quits
    shmq gc    [--prefix P] [--dry-run] [--json]     remove what only dead processes used
    shmq bench [--quick] [--only NAME] [--json] [--plot FILE.png]   run benchmarks/
    shmq demo  [-n COUNT] [-s SIZE]                  move messages between two processes

Every command reads segments read-only by name (it never joins them).  A
queue's parts (side ring, slot pool, large-item blobs) are shown with it.
A running ``shmq.Pipeline`` shows as a pipeline (its board: a Latest holding
its statistics) with a row per stage: items in and out, in flight, busy.
A ``shmq.Service`` shows as a service (its request ring) with its clients'
reply rings under it: calls in and out, in flight, servers and clients.
An error is one line on stderr and exit status 1 (2 for bad usage); a
segment that cannot be read is one line on stderr, and the command goes on.
Set SHMQ_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import threading
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import shmq
from shmq import lowlevel as ll

EXIT_ERROR = 1


class CliError(Exception):
    """An error reported as one line, exit status 1."""


# -- formatting ------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(x: float) -> str:
    """1234567 -> '1.23M' (short, for rates)."""
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= limit:
            return f"{x / limit:.2f}{unit}"
    return f"{x:.0f}" if x == int(x) or x >= 10 else f"{x:.1f}"


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _bar(ratio: float, width: int = 10) -> str:
    filled = min(width, max(0, round(ratio * width)))
    return "[" + "#" * filled + "." * (width - filled) + f"] {ratio * 100:3.0f}%"


def _participants(parts: Tuple[Any, ...]) -> str:
    if not parts:
        return "none"
    return ", ".join(f"{p.pid} {p.role} ({'alive' if p.alive else 'dead'})" for p in parts)


def _table(rows: List[List[str]], header: List[str], right: Tuple[int, ...] = ()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _wall_time(taken_at: float) -> float:
    """``time.monotonic()`` value ``taken_at`` as seconds since the epoch."""
    return time.time() - (time.monotonic() - taken_at)


def _as_json(obj: Any) -> Any:
    """A statistics dataclass as a JSON-ready dict, derived properties
    included, and ``timestamp``: the wall-clock time (seconds since the
    epoch) the snapshot was taken, when it says."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        out.update(dataclasses.asdict(obj))
        for prop in ("fill_ratio", "age_seconds", "in_use", "queued", "answered"):
            if hasattr(obj, prop):
                out[prop] = getattr(obj, prop)
        if isinstance(getattr(obj, "taken_at", None), float):
            out["timestamp"] = _wall_time(obj.taken_at)
        return out
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_as_json))


# -- ls ---------------------------------------------------------------------


def _shown_name(info: Any, depth: int = -1) -> str:
    """A queue's part indented under its queue (``depth``: levels, if the
    caller knows them: a service's client, and a client's parts)."""
    if depth < 0:
        depth = 1 if getattr(info, "owner", None) else 0
    return "  " * depth + info.name


def _depths(infos: List[Any]) -> Dict[str, int]:
    """How deep each segment sits: a queue's part 1; a service's client 1
    (under its service, when listed), the client's parts 2."""
    by_name = {i.name: i for i in infos}
    out = {}
    for i in infos:
        head = by_name.get(i.owner) if i.owner else i
        depth = 1 if i.owner else 0
        if head is not None and getattr(head, "service", None) in by_name:
            depth += 1
        out[i.name] = depth
    return out


def _report_problems(problems: List[Tuple[str, str]]) -> None:
    for name, reason in problems:
        print(f"shmq: cannot read {name}: {reason}", file=sys.stderr)


def cmd_ls(args: argparse.Namespace) -> int:
    """The shmq segments on this machine, a queue's parts under it."""
    problems: List[Tuple[str, str]] = []
    infos = ll.list_segments(args.prefix, problems)
    if args.json:
        listing = []
        for i in infos:
            entry = _as_json(i)
            board = _pipeline_board(i.name) if i.kind == "latest" else None
            if board:
                entry["kind"] = "pipeline"
                entry["pipeline"] = board
            summary = _service_part_summary(i)
            if summary is not None:
                entry["summary"] = summary
            listing.append(entry)
        _print_json(listing)
    elif not infos:
        print("no shmq segments" + (f" named {args.prefix}*" if args.prefix else ""))
    else:
        rows = []
        depths = _depths(infos)
        for i in infos:
            alive = sum(p.alive for p in i.participants)
            board = _pipeline_board(i.name) if i.kind == "latest" else None
            rows.append(
                [
                    _shown_name(i, depths[i.name]),
                    "pipeline" if board else i.kind,
                    _size(i.size_bytes),
                    str(i.creator_pid),
                    "yes" if i.creator_alive else "NO",
                    _age(i.age_seconds),
                    f"{alive}/{len(i.participants)}",
                    _service_part_text(i),
                ]
            )
            for x in board["statistics"]["stages"] if board else ():
                procs = f"{x.get('workers_alive', 0)}/{x['workers']}"
                rows.append([f"  {x['name']}", "stage", "-", "-", "-", "-", procs, ""])
        header = ["NAME", "KIND", "SIZE", "CREATOR", "ALIVE", "AGE", "PROCS", "INFO"]
        if not any(r[-1] for r in rows):  # (the column only where there is something to say)
            header.pop()
            for r in rows:
                r.pop()
        print(_table(rows, header, right=(2, 3, 5, 6)))
    _report_problems(problems)
    return 0


# -- pipelines ----------------------------------------------------------------
# A running shmq.Pipeline puts its statistics on a *board*: a Latest without
# a slot pool whose value is a dict with "kind": shmq.Pipeline.BOARD_KIND
# (see Pipeline.name).


def _pipeline_board(name: str) -> Optional[Dict[str, Any]]:
    """The value on the Latest ``name`` if it is a pipeline's board, else None.

    A board is a Latest without a slot pool (shmq/pipeline.py), so a Latest
    with one is turned away from its header (read-only) before its value is
    read: reading a slot value would take a member entry and holds in its
    pool, and a reader entry.  A board's value is a pickle in the Latest
    itself, read through Latest.attach: no participant entry, nothing
    written."""
    try:
        stats = ll.read_statistics(name)
    except (OSError, shmq.ShmqError):
        return None
    if not isinstance(stats, shmq.LatestStatistics) or stats.slot_size or stats.slot_count or not stats.version:
        return None
    try:
        latest = shmq.Latest.attach(name)
    except (OSError, shmq.ShmqError):
        return None
    if latest._slots:  # (the name was taken by a new Latest meanwhile: not a board either)
        latest.close()
        return None
    try:
        value = latest.get()
    except Exception:
        return None
    finally:
        latest.close()
    if isinstance(value, dict) and value.get("kind") == shmq.Pipeline.BOARD_KIND:
        return value
    return None


def _stage_rates(before: Optional[Dict[str, Any]], after: Dict[str, Any]) -> List[Optional[Dict[str, float]]]:
    """Per stage of board value ``after``: items in/out per second and the
    busy fraction since board value ``before`` (None where unknown)."""
    out: List[Optional[Dict[str, float]]] = []
    stages = after["statistics"]["stages"]
    old = before["statistics"]["stages"] if before else []
    dt = after["taken_at"] - before["taken_at"] if before else 0.0
    for k, st in enumerate(stages):
        if dt <= 0 or k >= len(old) or old[k]["name"] != st["name"] or st["items_in"] < old[k]["items_in"]:
            out.append(None)
            continue
        o = old[k]
        out.append(
            {
                "items_in_per_second": (st["items_in"] - o["items_in"]) / dt,
                "items_out_per_second": (st["items_out"] - o["items_out"]) / dt,
                "busy_fraction": min(1.0, max(0.0, (st["busy_seconds"] - o["busy_seconds"]) / (dt * st["workers"]))),
            }
        )
    return out


def _pipeline_lines(board: Dict[str, Any], rates: Optional[List[Optional[Dict[str, float]]]] = None) -> List[Tuple[str, str]]:
    st = board["statistics"]
    lines = [
        ("pipeline", f"pid {board['pid']}, running {st['elapsed_seconds']:.1f} s, board updated "
                     f"{_age(max(0.0, time.time() - board['taken_at']))} ago"),
        ("items", f"{st['source_items']:,} taken from the source, {st['outputs']:,} outputs, "
                  f"{st['in_flight']:,} in flight"),
        ("accounted", f"{st['with_output']:,} with output, {st['filtered']:,} filtered, {st['skipped']:,} skipped, "
                      f"{st['dead_letters']:,} dead letters, {st['empty']:,} empty, {st['merged']:,} merged"),
        ("crashes", f"{st['crash_retries']:,} items fed again, {st['duplicates_dropped']:,} duplicates dropped"),
        ("dead letters", str(board.get("dead_letters_queue"))),
        ("bottleneck", str(st["bottleneck"])),
    ]
    for k, x in enumerate(st["stages"]):
        r = rates[k] if rates else None
        rate = (f", {_count(r['items_in_per_second'])} in/s, {_count(r['items_out_per_second'])} out/s, "
                f"busy {r['busy_fraction']:.0%} now") if r else ""
        lines.append(
            ("stages" if k == 0 else "",
             f"{x['name']} ({x['kind']}, {x.get('workers_alive', x['workers'])}/{x['workers']} workers): "
             f"{x['items_in']:,} in, {x['items_out']:,} out, {x['in_flight']:,} in flight "
             f"of {x.get('max_in_flight', 0):,}, busy {x['busy_fraction']:.0%}, "
             f"{x['seconds_per_item'] * 1e6:,.1f} us/item, {x['retries']:,} retries, {x['crashes']} crashes, "
             f"{x['dead_letters']:,} dead letters{rate}")
        )
    return lines


def _stage_entries(info: Any, board: Dict[str, Any], before: Optional[Dict[str, Any]], dead: bool) -> List[Dict[str, Any]]:
    """``shmq top`` rows for the stages of the pipeline on board ``info``."""
    st = board["statistics"]
    rates = _stage_rates(before, board) if not dead else [None] * len(st["stages"])
    out = []
    for x, r in zip(st["stages"], rates):
        mif = x.get("max_in_flight") or 0
        out.append(
            {
                "name": x["name"],
                "kind": "stage",
                "owner": info.name,
                "dead": dead,
                "procs_alive": x.get("workers_alive", 0),
                "procs": x["workers"],
                "fill_ratio": min(1.0, x["in_flight"] / mif) if mif else None,
                "rates": None,
                "stage": dict(x, bottleneck=x["name"] == st["bottleneck"], **(r or {})),
            }
        )
    return out


# -- services -----------------------------------------------------------------
# A shmq.Service is its request ring (kind "service", ServiceStatistics) and
# one reply ring per client (kind "client", ClientStatistics, named after no
# one: the ring's header names its service).  Every counter is read from
# shared memory by name: the same in every process.


def _read_service_part(name: str) -> Any:
    """ServiceStatistics / ClientStatistics of ``name``, or None."""
    try:
        stats = ll.read_statistics(name)
    except (OSError, shmq.ShmqError):
        return None
    return stats if isinstance(stats, (shmq.ServiceStatistics, shmq.ClientStatistics)) else None


def _service_summary(s: Any) -> Dict[str, Any]:
    """What ``ls --json`` and ``top --json`` say of a service or of a client."""
    if isinstance(s, shmq.ClientStatistics):
        return {"service": s.service, "pid": s.pid, "dead": not s.alive, "outstanding": s.outstanding,
                "sent": s.sent, "resent": s.resent, "replies_unread": s.replies.messages_used}
    return {
        "servers": s.servers,
        "servers_dead": [x.pid for x in s.server_table if not x.alive],
        "clients": len(s.clients),
        "clients_dead": sum(not c.alive for c in s.clients),
        "queued": s.queued,
        "in_flight": s.in_flight,
        "received": s.received,
        "replied": s.replied,
        "failed": s.failed,
        "cancelled": s.cancelled,
        "lost": s.lost,
        "partials": s.partials,
    }


def _service_text(s: Any) -> str:
    """The INFO column of a service's or a client's row."""
    if isinstance(s, shmq.ClientStatistics):
        if not s.alive:
            return f"DEAD: client {s.pid} died (shmq gc removes it)"
        return f"{s.outstanding:,} outstanding, {s.replies.messages_used:,} replies unread"
    dead = sum(not x.alive for x in s.server_table)
    servers = ",".join(map(str, s.servers)) or "none"
    clients_dead = sum(not c.alive for c in s.clients)
    return (
        f"{s.in_flight:,} in flight, {s.queued:,} queued; servers {servers}" + (f" ({dead} dead)" if dead else "")
        + f"; clients {len(s.clients) - clients_dead}/{len(s.clients)}"
    )


def _service_part_summary(info: Any) -> Optional[Dict[str, Any]]:
    if info.kind not in ("service", "client"):
        return None
    s = _read_service_part(info.name)
    return _service_summary(s) if s is not None else None


def _service_part_text(info: Any) -> str:
    if info.kind == "pool" and getattr(info, "service", None):
        return f"results of server {info.creator_pid}"
    if info.kind not in ("service", "client"):
        return ""
    s = _read_service_part(info.name)
    return _service_text(s) if s is not None else ""


def _service_lines(s: "shmq.ServiceStatistics") -> List[Tuple[str, str]]:
    r = s.requests
    dead = [x.pid for x in s.server_table if not x.alive]
    lines = [
        ("service", f"{s.name}: request ring {_size(r.capacity_bytes)}"),
        ("creator", f"{r.creator_pid} ({'alive' if r.creator_alive else 'dead'})"),
        ("servers", (f"{len(s.servers)} live: {', '.join(map(str, s.servers))}" if s.servers else "none live")
                    + (f"; dead: {', '.join(map(str, dead))}" if dead else "")),
        ("calls", f"{s.received:,} received, {s.replied:,} replied, {s.failed:,} failed, {s.cancelled:,} cancelled, "
                  f"{s.in_flight:,} in flight, {s.lost:,} lost; {s.partials:,} partial replies"),
        ("queued", f"{s.queued:,} waiting to be taken, request ring {_bar(s.fill_ratio)}"),
        ("waits", f"servers waited {r.empty_waits:,} times for a request ({r.empty_wait_seconds:.3f} s), "
                  f"clients {r.full_waits:,} times for room ({r.full_wait_seconds:.3f} s)"),
    ]
    for k, x in enumerate(s.server_table):
        lines.append(
            ("per server" if k == 0 else "",
             f"{x.pid} ({'alive' if x.alive else 'dead'}): {x.replied:,} replied, {x.failed:,} failed, "
             f"{x.cancelled:,} cancelled, {x.in_flight:,} in flight, {x.partials:,} partial replies")
        )
    alive = sum(c.alive for c in s.clients)
    lines.append(("clients", f"{alive} live" + (f", {len(s.clients) - alive} dead" if alive < len(s.clients) else "")))
    for c in s.clients:
        lines.append(("", _client_line(c)))
    lines.append(("participants", _participants(r.participants)))
    return lines


def _client_line(c: "shmq.ClientStatistics") -> str:
    return (
        f"{c.name} (pid {c.pid}, {'alive' if c.alive else 'DEAD'}): {c.outstanding:,} outstanding, "
        f"{c.sent:,} sent, {c.resent:,} resent; replies unread {c.replies.messages_used:,} {_bar(c.fill_ratio)}"
    )


def _client_lines(c: "shmq.ClientStatistics") -> List[Tuple[str, str]]:
    return [
        ("client", f"of service {c.service}: pid {c.pid} ({'alive' if c.alive else 'dead: shmq gc removes it'})"),
        ("requests", f"{c.outstanding:,} outstanding, {c.sent:,} sent, {c.resent:,} resent"),
    ] + [(("reply " + k) if k == "ring" else k, v) for k, v in _ring_lines(c.replies)]


def _service_rates(before: Any, after: Any) -> ll.Rates:
    """A service's rates: in, requests sent per second; out, calls answered
    (replied or failed) per second; the waits and the verdict those of the
    request ring ("consumer-bound": the servers do not keep up).  A client's:
    its reply ring's."""
    if isinstance(after, shmq.ClientStatistics):
        return ll.rates(before.replies, after.replies)
    r = ll.rates(before.requests, after.requests)
    answered = max(0, after.answered - before.answered)
    return dataclasses.replace(r, messages_out_per_second=answered / r.interval_seconds)


# -- stat -------------------------------------------------------------------


def _ring_lines(s: ll.RingStatistics) -> List[Tuple[str, str]]:
    limit = f", at most {s.max_messages:,} records" if s.max_messages else ""
    lines = [
        ("ring", f"{s.name}: {_size(s.capacity_bytes)} data area{limit}"),
        ("creator", f"{s.creator_pid} ({'alive' if s.creator_alive else 'dead'})"),
        (
            "messages",
            f"in {s.messages_in:,}, out {s.messages_out:,}, held {s.messages_used:,}"
            + (f" {_bar(s.messages_used / s.max_messages)}" if s.max_messages else ""),
        ),
        (
            "bytes",
            f"in {s.bytes_in:,}, out {s.bytes_out:,}, held {s.bytes_used:,} "
            f"{_bar(s.bytes_used / s.capacity_bytes if s.capacity_bytes else 0.0)}, peak {s.peak_bytes:,}",
        ),
        ("full waits", f"{s.full_waits:,} producer waits for room, {s.full_wait_seconds:.3f} s in total"),
        ("empty waits", f"{s.empty_waits:,} consumer waits for a record, {s.empty_wait_seconds:.3f} s in total"),
        ("participants", _participants(s.participants)),
    ]
    return lines


def _topic_lines(s: "shmq.TopicStatistics") -> List[Tuple[str, str]]:
    state = "ended" if s.ended else f"{s.publishers} publisher handle{'s' if s.publishers != 1 else ''} open"
    lines = [
        ("topic", f"{s.name}: {_size(s.capacity_bytes)} ring, overflow {s.overflow}"),
        ("creator", f"{s.creator_pid} ({'alive' if s.creator_alive else 'dead'})"),
        ("published", f"{s.published:,} messages, {s.bytes_published:,} bytes; {state}"),
        ("held", f"{s.held_messages:,} messages, {s.held_bytes:,} bytes (for start=\"oldest\")"),
        ("subscribers", f"{len(s.subscribers)}, slowest lag {_bar(s.fill_ratio)}" if s.subscribers else "none"),
    ]
    for sub in s.subscribers:
        lines.append(
            ("", f"pid {sub.pid}: lag {sub.lag_messages:,} messages ({_size(sub.lag_bytes)}), "
                 f"received {sub.received:,}, lost {sub.lost:,}")
        )
    lines.append(("participants", _participants(s.participants)))
    return lines


def _latest_lines(s: "shmq.LatestStatistics") -> List[Tuple[str, str]]:
    return [
        ("latest", f"{s.name}: values up to {_size(s.capacity_bytes)}"),
        ("creator", f"{s.creator_pid} ({'alive' if s.creator_alive else 'dead'})"),
        ("version", f"{s.version:,}" + (f", newest value {s.value_bytes:,} bytes" if s.version else " (never set)")),
        ("waiters", f"{s.waiters}"),
        ("participants", _participants(s.participants)),
    ]


def _stat_lines(stats: Any) -> List[Tuple[str, str]]:
    if isinstance(stats, ll.RingStatistics):
        return _ring_lines(stats)
    if isinstance(stats, shmq.TopicStatistics):
        return _topic_lines(stats)
    if isinstance(stats, shmq.LatestStatistics):
        return _latest_lines(stats)
    if isinstance(stats, shmq.ServiceStatistics):
        return _service_lines(stats)
    if isinstance(stats, shmq.ClientStatistics):
        return _client_lines(stats)
    return _generic_lines(stats)


def _fields_text(lines: List[Tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


def _generic_lines(obj: Any) -> List[Tuple[str, str]]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "participants":
            text = _participants(value)
        elif f.name == "created":
            text = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(value))} ({_age(time.time() - value)} ago)"
        elif f.name.endswith("bytes") and isinstance(value, int):
            text = f"{value:,} ({_size(value)})"
        elif f.name == "taken_at":
            continue
        else:
            text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        lines.append((f.name.replace("_", " "), text))
    return lines


def _rates_lines(r: ll.Rates, service: bool = False) -> List[Tuple[str, str]]:
    if service:  # (a service's request ring: the clients produce, the servers consume)
        return [
            (f"rates ({r.interval_seconds:.1f} s)",
             f"calls in {_count(r.messages_in_per_second)}/s, answered {_count(r.messages_out_per_second)}/s"),
            ("blocked", f"clients {r.producer_wait_ratio * 100:.0f}% of the time (a full request ring), "
                        f"servers {r.consumer_wait_ratio * 100:.0f}% (waiting for requests)"),
            ("verdict", r.verdict + (" (the servers do not keep up)" if r.verdict == "consumer-bound" else "")),
        ]
    return [
        (
            f"rates ({r.interval_seconds:.1f} s)",
            f"in {_count(r.messages_in_per_second)} msg/s, out {_count(r.messages_out_per_second)} msg/s, "
            f"{r.bytes_out_per_second / 1e6:,.1f} MB/s out",
        ),
        (
            "blocked",
            f"producers {r.producer_wait_ratio * 100:.0f}% of the time, consumers {r.consumer_wait_ratio * 100:.0f}%",
        ),
        ("verdict", r.verdict),
    ]


def _has_rates(stats: Any) -> bool:
    return _is_stream(stats) or _is_service(stats) or all(
        hasattr(stats, a) for a in ("messages_in", "full_wait_seconds", "fill_ratio", "taken_at")
    )


def _is_service(stats: Any) -> bool:
    return isinstance(stats, (shmq.ServiceStatistics, shmq.ClientStatistics))


def _is_stream(stats: Any) -> bool:
    return isinstance(stats, (shmq.TopicStatistics, shmq.LatestStatistics))


def _stream_count(stats: Any) -> int:
    """The counter a topic's (Latest's) rate is taken from: messages published (versions set)."""
    return stats.published if isinstance(stats, shmq.TopicStatistics) else stats.version


def _stream_rates(before: Any, after: Any) -> ll.Rates:
    """Rates of a topic or a Latest between two snapshots.  In: messages
    published (versions set) per second; out: messages received, summed
    over the subscribers (a topic's bytes are written once and read in place,
    so the byte rates are both the bytes published per second).  Topics do
    not count blocked time: the wait ratios are 0 and the verdict comes from
    the fill of a ``block`` topic (its slowest subscriber gates)."""
    dt = after.taken_at - before.taken_at
    if dt <= 0 or before.name != after.name:
        raise ValueError(f"snapshots of {before.name!r} and {after.name!r} {dt:.3f} s apart")
    m_in = max(0, _stream_count(after) - _stream_count(before))
    if isinstance(after, shmq.TopicStatistics):
        m_out = max(0, sum(x.received for x in after.subscribers) - sum(x.received for x in before.subscribers))
        b_in = max(0, after.bytes_published - before.bytes_published)
        fill = after.fill_ratio
        mean_fill = (before.fill_ratio + fill) / 2
    else:
        m_out, b_in, fill, mean_fill = 0, 0, 0.0, 0.0
    return ll.Rates(
        name=after.name,
        interval_seconds=dt,
        messages_in_per_second=m_in / dt,
        messages_out_per_second=m_out / dt,
        bytes_in_per_second=b_in / dt,
        bytes_out_per_second=b_in / dt,
        producer_wait_ratio=0.0,
        consumer_wait_ratio=0.0,
        fill_ratio=fill,
        verdict=ll.verdict(0.0, 0.0, mean_fill, bool(m_in or m_out)),
    )


def _rates_between(before: Any, after: Any) -> ll.Rates:
    if _is_service(after):
        return _service_rates(before, after)
    return _stream_rates(before, after) if _is_stream(after) else ll.rates(before, after)


def _part_text(part: Any, info: Any) -> str:
    """One line about a part of a queue."""
    if isinstance(part, ll.RingStatistics):
        return (
            f"{info.kind} {part.name}: {part.messages_used:,} held, {part.messages_in:,} in, "
            f"{part.messages_out:,} out, {_size(part.bytes_used)} of {_size(part.capacity_bytes)}"
        )
    if isinstance(part, ll.SlotPoolStatistics):
        return (
            f"pool {part.name}: {part.slot_count - part.free} of {part.slot_count} slots of "
            f"{_size(part.slot_size)} in use ({part.loaned} loaned, {part.sent} sent), "
            f"{part.allocations:,} allocations"
        )
    return f"{info.kind} {info.name}: {_size(info.size_bytes)}, created by {info.creator_pid}"


def cmd_stat(args: argparse.Namespace) -> int:
    """One statistics snapshot of NAME (two, and the rates between them, with
    --interval); a queue's parts follow it."""
    stats = ll.read_statistics(args.name)
    board = _pipeline_board(args.name) if isinstance(stats, shmq.LatestStatistics) else None
    rates = stage_rates = None
    if args.interval is not None:
        if args.interval <= 0:
            raise CliError(f"--interval must be positive, got {args.interval}")
        if board is not None:
            time.sleep(args.interval)
            later_board = _pipeline_board(args.name)
            if later_board is not None:
                stage_rates = _stage_rates(board, later_board)
                board = later_board
        elif _has_rates(stats):
            time.sleep(args.interval)
            later = ll.read_statistics(args.name)
            rates = _rates_between(stats, later)
            stats = later
    if board is not None:
        if args.json:
            out = {"type": "PipelineBoard", "name": args.name, **board}
            if stage_rates is not None:
                out["stage_rates"] = stage_rates
            _print_json(out)
        else:
            print(_fields_text(_pipeline_lines(board, stage_rates)))
        return 0
    parts = []
    order = {"queue-side": 0, "pool": 1}
    mine = [i for i in ll.list_segments(args.name) if i.owner == args.name]
    for info in sorted(mine, key=lambda i: (order.get(i.kind, 2), i.name)):
        try:
            parts.append((ll.read_statistics(info.name), info))
        except FileNotFoundError:
            continue  # a blob consumed meanwhile
        except (OSError, shmq.LayoutError) as exc:
            print(f"shmq: cannot read {info.name}: {_error_line(exc)}", file=sys.stderr)
    if args.json:
        out = _as_json(stats)
        out["timestamp"] = time.time() if "timestamp" not in out else out["timestamp"]
        if rates is not None:
            out["rates"] = _as_json(rates)
        if parts:
            out["parts"] = [dict(_as_json(p), kind=i.kind) for p, i in parts]
        _print_json(out)
        return 0
    lines = _stat_lines(stats)
    if rates is not None:
        lines += _rates_lines(rates, service=isinstance(stats, shmq.ServiceStatistics))
    lines += [("parts" if k == 0 else "", _part_text(*p)) for k, p in enumerate(parts)]
    print(_fields_text(lines))
    return 0


# -- top --------------------------------------------------------------------


#: on a terminal, the INFO column is left out when less room than this is left for it
MIN_INFO_WIDTH = 16
_TOP_HEADER = ["NAME", "KIND", "IN/s", "OUT/s", "MB/s", "FILL", "P-WAIT", "C-WAIT", "VERDICT", "PROCS"]


def _top_sample(
    prefix: str, previous: Dict[str, Any], problems: Optional[List[Tuple[str, str]]] = None
) -> List[Dict[str, Any]]:
    """One reading of every segment (a queue's parts after it), with rates
    since ``previous`` (name -> statistics, updated in place).  A segment
    whose creator and participants are all dead is marked ``dead`` and
    gets no rates; a queue and its parts live or die together (as for
    ``gc``).  Unreadable shmq entries go to ``problems``."""
    unreadable: List[Tuple[str, str]] = []
    infos = ll.list_segments(prefix, unreadable)
    if problems is not None:
        problems.extend(unreadable)
    live_groups = _live_groups(infos)
    live_groups.update(n for n, _ in unreadable)  # gc keeps what it cannot judge
    out = []
    current: Dict[str, Any] = {}
    for info in infos:
        try:
            stats = ll.read_statistics(info.name)
        except (OSError, shmq.LayoutError):
            continue  # vanished since the listing
        entry: Dict[str, Any] = {
            "name": info.name,
            "kind": info.kind,
            "owner": info.owner,
            "dead": (info.owner or info.name) not in live_groups,
            "procs_alive": sum(p.alive for p in info.participants),
            "procs": len(info.participants),
            "fill_ratio": None,
            "rates": None,
        }
        if info.service is not None:
            entry["service"] = info.service  # (a service's client, or a server's result pool)
        if _has_rates(stats):
            current[info.name] = stats
            entry["fill_ratio"] = getattr(stats, "fill_ratio", None)
            before = previous.get(info.name)
            count = _stream_count if _is_stream(stats) else _service_count if _is_service(stats) else (lambda x: x.messages_in)
            # A counter that went back (or a kind that changed) means the name now holds a new segment.
            if (
                not entry["dead"]
                and before is not None
                and type(before) is type(stats)
                and count(stats) >= count(before)
                and stats.taken_at > before.taken_at
            ):
                entry["rates"] = _rates_between(before, stats)
        elif getattr(stats, "slot_count", 0):  # a pool: slots in use
            entry["fill_ratio"] = (stats.slot_count - stats.free) / stats.slot_count
        if _is_service(stats):
            entry["summary"] = _service_summary(stats)
            entry["info"] = _service_text(stats)
        board = _pipeline_board(info.name) if info.kind == "latest" else None
        if board is not None:
            entry["kind"] = "pipeline"
            entry["rates"] = None
            key = info.name + "#board"
            out.append(entry)
            out.extend(_stage_entries(info, board, previous.get(key), entry["dead"]))
            current[key] = board
            continue
        out.append(entry)
    previous.clear()
    previous.update(current)
    return out


def _service_count(stats: Any) -> int:
    """The counter a service's (a client's) rate is taken from: requests sent (replies written)."""
    return stats.replies.messages_in if isinstance(stats, shmq.ClientStatistics) else stats.requests.messages_in


def _live_groups(infos: List[Any]) -> set:
    """The groups (a segment and its parts) in use, as ``gc`` judges them:
    any of their processes lives; a service client's reply ring and its
    parts live and die with the client alone (the servers attached to it do
    not keep it)."""
    by_name = {i.name: i for i in infos}
    out = set()
    for i in infos:
        group = i.owner or i.name
        head = by_name.get(group)
        if head is not None and head.kind == "client" and head.service is not None:
            if head.creator_alive:
                out.add(group)
        elif i.in_use:
            out.add(group)
    return out


def _top_row(e: Dict[str, Any], depth: int = -1) -> List[str]:
    if depth < 0:
        depth = 1 if e["owner"] else 0
    name = "  " * depth + e["name"]
    row = [name, e["kind"], "-", "-", "-", "-", "-", "-", "-", f"{e['procs_alive']}/{e['procs']}", e.get("info", "")]
    if e["fill_ratio"] is not None:
        row[5] = _bar(e["fill_ratio"])
    stage = e.get("stage")
    if stage is not None:  # a pipeline's stage: items per second, busy fraction
        if e["dead"]:
            row[8] = "DEAD"
        elif "items_in_per_second" in stage:
            row[2] = _count(stage["items_in_per_second"])
            row[3] = _count(stage["items_out_per_second"])
            row[8] = f"busy {stage['busy_fraction']:.0%}" + (" (bottleneck)" if stage["bottleneck"] else "")
        return row
    r = e["rates"]
    if e["dead"]:
        row[8] = "DEAD (shmq gc removes it)"
        if e["kind"] == "client":
            row[10] = ""  # (the verdict says it)
    elif r is not None:
        row[2] = _count(r.messages_in_per_second)
        row[3] = _count(r.messages_out_per_second)
        row[4] = f"{r.bytes_out_per_second / 1e6:.1f}"
        row[6] = f"{r.producer_wait_ratio * 100:.0f}%"
        row[7] = f"{r.consumer_wait_ratio * 100:.0f}%"
        row[8] = r.verdict
    return row


def _shorten(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its middle elided."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    keep = width - 1
    return text[: (keep + 1) // 2] + "~" + text[len(text) - keep // 2 :]


def _top_text(
    entries: List[Dict[str, Any]],
    prefix: str,
    interval: float,
    width: int = 0,
    problems: Optional[List[Tuple[str, str]]] = None,
) -> str:
    """One screen.  With ``width`` (a terminal's), the NAME column is
    shortened so that every other column still fits; no other column is cut."""
    title = (
        f"shmq top  {time.strftime('%H:%M:%S')}  every {interval:g} s  "
        f"{len(entries)} segment{'s' if len(entries) != 1 else ''}"
        + (f" named {prefix}*" if prefix else "")
        + "  (Ctrl-C quits)"
    )
    notes = "".join(f"\ncannot read {n}: {r}" for n, r in problems or ())
    if width:
        notes = "\n".join(_shorten(line, width) for line in notes.split("\n"))
    if not entries:
        return title + "\n\nno shmq segments" + notes
    depths = _top_depths(entries)
    rows = [_top_row(e, depths.get(k, -1)) for k, e in enumerate(entries)]
    header = _TOP_HEADER + ["INFO"]
    if not any(r[-1] for r in rows):  # (the column only where there is something to say)
        header.pop()
        for r in rows:
            r.pop()
    right = (2, 3, 4, 6, 7, 9)
    if width:
        if header[-1] == "INFO":  # the free text gives way first: cut to what the others leave, or dropped
            fixed = sum(max(len(str(r[i])) for r in [header] + rows) for i in range(len(header) - 1))
            room = width - fixed - 2 * (len(header) - 1)
            if room < MIN_INFO_WIDTH:
                header.pop()
                for r in rows:
                    r.pop()
            else:
                for r in rows:
                    r[-1] = r[-1] if len(r[-1]) <= room else r[-1][: room - 1] + "~"
        others = [max(len(str(r[i])) for r in [header] + rows) for i in range(1, len(header))]
        room = width - sum(others) - 2 * (len(header) - 1)
        room = max(room, len("NAME"))
        for r in rows:
            r[0] = _shorten(r[0], room)
    return title + "\n\n" + _table(rows, header, right=right) + notes


def _top_depths(entries: List[Dict[str, Any]]) -> Dict[int, int]:
    """Row index -> indentation, for a service's clients (1) and their parts (2)."""
    services = {e["name"] for e in entries if e["kind"] == "service"}
    clients = {e["name"] for e in entries if e.get("service") in services}
    out = {}
    for k, e in enumerate(entries):
        if e["name"] in clients:
            out[k] = 1
        elif e["owner"] in clients:
            out[k] = 2
    return out


def _top_json(entries: List[Dict[str, Any]], interval: float, problems: List[Tuple[str, str]]) -> str:
    frame: Dict[str, Any] = {
        "timestamp": time.time(),
        "interval": interval,
        "segments": [],
        "unreadable": [{"name": n, "reason": r} for n, r in problems],
    }
    for e in entries:
        e = dict(e)
        if e["rates"] is not None:
            e["rates"] = _as_json(e["rates"])
        frame["segments"].append(e)
    return json.dumps(frame)


#: seconds between the two readings before the first frame (so it has rates)
FIRST_FRAME_SAMPLE = 0.5


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of every queue, refreshed every --interval seconds."""
    if args.interval <= 0:
        raise CliError(f"--interval must be positive, got {args.interval}")
    tty = sys.stdout.isatty() and not args.json
    previous: Dict[str, Any] = {}
    n = 0
    try:
        # A first reading, so that the first frame already has rates.
        _top_sample(args.prefix, previous)
        time.sleep(min(args.interval, FIRST_FRAME_SAMPLE))
        while True:
            problems: List[Tuple[str, str]] = []
            entries = _top_sample(args.prefix, previous, problems)
            if args.json:
                sys.stdout.write(_top_json(entries, args.interval, problems) + "\n")
            elif tty:
                width = shutil.get_terminal_size().columns
                text = _top_text(entries, args.prefix, args.interval, width, problems)
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
            else:
                text = _top_text(entries, args.prefix, args.interval, 0, problems)
                sys.stdout.write(("\n" if n else "") + text + "\n")
            sys.stdout.flush()
            n += 1
            if args.iterations and n >= args.iterations:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
    return 0


# -- gc ---------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove segments and semaphores that only dead processes used (a queue
    and its parts as one)."""
    problems: List[Tuple[str, str]] = []
    items = ll.collect_garbage(args.prefix, dry_run=args.dry_run, problems=problems)
    if args.json:
        _print_json(
            {
                "timestamp": time.time(),
                "dry_run": args.dry_run,
                "removed": [_as_json(g) for g in items],
                "unreadable": [{"name": n, "reason": r} for n, r in problems],
            }
        )
        _report_problems(problems)
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for g in items:
        what = f"{g.kind} {g.name}" + (f" ({_size(g.size_bytes)}) and its semaphores" if g.size_bytes else "")
        print(f"{verb} {what}: {g.reason}")
    segs = sum(g.kind != "semaphore" for g in items)
    sems = len(items) - segs
    print(f"{verb} {segs} segment(s) and {sems} orphan semaphore(s)")
    _report_problems(problems)
    return 0


# -- bench ------------------------------------------------------------------


#: the peers the benchmarks compare with when installed: module -> pip name
PEERS = {"faster_fifo": "faster-fifo", "zmq": "pyzmq", "iceoryx2": "iceoryx2"}


def _bench_dir(arg: Optional[str]) -> Path:
    if arg:
        path = Path(arg)
        if not (path / "_harness.py").is_file():
            raise CliError(f"no shmq benchmark suite in {path} (no _harness.py there)")
        return path
    # A source checkout: benchmarks/ next to the package, or in the current directory.
    for path in (Path(shmq.__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"):
        if (path / "_harness.py").is_file():
            return path
    raise CliError(
        "the benchmark scripts are not installed with the shmq package: run 'shmq bench' in a "
        "source checkout of shmq, or pass --dir PATH/TO/shmq/benchmarks"
    )


def _compares_with(script: Path, module: str) -> bool:
    """Whether ``script`` measures the peer library ``module`` when it is installed."""
    try:
        text = script.read_text()
        if f'"{module}"' in text:
            return True
        shared = script.parent / "_transports.py"
        return "_transports" in text and f'"{module}"' in shared.read_text()
    except OSError:
        return False


def _pump(stream: Any, label: str, tail: List[str]) -> None:
    """Copy a script's stderr (its progress) to ours, each line labelled."""
    for line in stream:
        line = line.rstrip("\n")
        tail.append(line)
        del tail[:-20]
        print(f"  [{label}] {line}", file=sys.stderr, flush=True)


def _run_script(script: Path, args: argparse.Namespace, index: int = 1, total: int = 1) -> Tuple[List[Dict[str, Any]], str]:
    cmd = [sys.executable, str(script), "--json"] + (["--quick"] if args.quick else [])
    print(f"[{index}/{total}] running {script.name}{' --quick' if args.quick else ''} ...", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: List[str] = []
    pump = threading.Thread(target=_pump, args=(proc.stderr, script.name, tail), daemon=True)
    pump.start()
    rows, other = [], []
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(args.timeout, stop)
    timer.start()
    try:
        for line in proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                other.append(line.rstrip("\n"))
                continue
            if isinstance(obj, dict):
                obj.setdefault("script", script.name)
                rows.append(obj)
                if "meta" not in obj:
                    found = _row_value(obj)
                    figure = f"{_fmt_value(found[1], found[2])} {found[2]}" if found else obj.get("error", "no result")
                    print(
                        f"  [{script.name}] {obj.get('workload', '')} / {obj.get('transport', '')}: {figure}",
                        file=sys.stderr,
                        flush=True,
                    )
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pump.join(10)
        proc.stdout.close()
        proc.stderr.close()
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(cmd, args.timeout)
    if returncode != 0:
        last = (tail or ["(no output)"])[-1]
        raise CliError(f"{script.name} failed with exit status {returncode}: {last}")
    return rows, "\n".join(other)


def _fmt_value(v: Optional[float], unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("us", "µs"):
        return f"{v:,.2f}"
    return _count(v)


def _row_value(r: Dict[str, Any]) -> Optional[Tuple[str, float, str]]:
    """(key, value, unit) of a result row: the harness's ``median``, or the
    first ``*_per_s`` figure of a script with a schema of its own."""
    if isinstance(r.get("median"), (int, float)):
        return "median", r["median"], r.get("unit", "")
    for k, v in r.items():
        if k.endswith(("_per_s", "_per_second")) and isinstance(v, (int, float)):
            return k, v, k.rsplit("_per_s", 1)[0].replace("_", " ") + "/s"
    return None


def _bench_table(rows: List[Dict[str, Any]]) -> str:
    table = []
    for r in rows:
        if "meta" in r:
            continue
        bench = r.get("bench") or str(r.get("script", "?")).replace("bench_", "").replace(".py", "")
        if r.get("not_installed"):
            table.append([bench, "-", str(r.get("transport", "")), "not installed", "-", "-"])
            continue
        found = _row_value(r)
        if found is None:
            what = "error: " + str(r["error"])[:60] if r.get("error") else "no result"
            table.append([bench, str(r.get("workload", "")), str(r.get("transport", "")), what, "-", "-"])
            continue
        _, value, unit = found
        low, high = r.get("min"), r.get("max")
        if low is None and isinstance(r.get("runs"), list) and r["runs"]:
            low, high = min(r["runs"]), max(r["runs"])
        spread = "-" if low is None or high is None or not value else f"±{(high - low) / 2 / value * 100:.0f}%"
        ratio = r.get("vs_mp_queue")
        workload = r.get("workload") or ", ".join(
            f"{k}={r[k]}" for k in r if k.startswith("size") and not isinstance(r[k], (list, dict))
        )
        table.append(
            [
                bench,
                str(workload),
                str(r.get("transport", "")),
                f"{_fmt_value(value, unit)} {unit}",
                spread,
                "-" if ratio is None else f"{ratio:.2f}x",
            ]
        )
    return _table(table, ["BENCH", "WORKLOAD", "TRANSPORT", "MEDIAN", "SPREAD", "VS MP.QUEUE"], right=(3, 4, 5))


def _plot(rows: List[Dict[str, Any]], path: str, plt: Any) -> None:
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        if r.get("bench") == "sizes" and r.get("size") and r.get("median"):
            series.setdefault(r["transport"], []).append((r["size"], r["median"]))
    if not series:
        raise CliError("no message-size results to plot (is bench_sizes.py in the suite?)")
    fig, ax = plt.subplots(figsize=(8, 5))
    for transport, points in sorted(series.items()):
        points.sort()
        ours = transport.startswith("shmq")
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="o", label=transport, linewidth=2.5 if ours else 1.2
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("throughput (MB/s), 1 producer -> 1 consumer")
    ax.set_title(f"shmq {shmq.__version__}: throughput against message size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite (benchmarks/bench_*.py) and print one table."""
    plt = None
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise CliError("--plot needs matplotlib: pip install 'shmq[bench]'") from None
    bench_dir = _bench_dir(args.dir)
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.only:
        wanted = {o if o.startswith("bench_") else f"bench_{o}" for o in args.only}
        wanted = {w if w.endswith(".py") else w + ".py" for w in wanted}
        unknown = wanted - {s.name for s in scripts}
        if unknown:
            raise CliError(f"no such benchmark: {', '.join(sorted(unknown))} (have: {', '.join(s.name for s in scripts)})")
        scripts = [s for s in scripts if s.name in wanted]
    if args.plot and not any(s.name == "bench_sizes.py" for s in scripts):
        scripts.append(bench_dir / "bench_sizes.py")
    all_rows: List[Dict[str, Any]] = []
    failures = []
    print(f"shmq {shmq.__version__}, {ll.CORE} core (SHMQ_PURE=1 forces the pure-Python one)", file=sys.stderr)
    missing = [module for module in PEERS if importlib.util.find_spec(module) is None]
    if missing:
        print(
            f"not installed, so not compared: {', '.join(PEERS[m] for m in missing)} (pip install 'shmq[bench]')",
            file=sys.stderr,
        )
    for k, script in enumerate(scripts, 1):
        try:
            rows, other = _run_script(script, args, k, len(scripts))
        except CliError as exc:
            failures.append(str(exc))
            print(f"shmq: {exc}", file=sys.stderr)
            continue
        except subprocess.TimeoutExpired:
            failures.append(f"{script.name} timed out")
            print(f"shmq: {script.name} did not finish in {args.timeout} s", file=sys.stderr)
            continue
        all_rows.extend(rows)
        bench = next((r.get("bench") for r in rows if r.get("bench")), script.stem.replace("bench_", ""))
        all_rows.extend(
            {"bench": bench, "script": script.name, "transport": PEERS[module], "not_installed": True}
            for module in missing
            if _compares_with(script, module)
        )
        if other.strip() and not args.json:
            print(f"--- {script.name} (not JSON) ---\n{other}")
    if args.json:
        for r in all_rows:
            print(json.dumps(r))
    else:
        meta = next((r["meta"] for r in all_rows if "meta" in r), None)
        if meta:
            print(
                f"{meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, Python {meta.get('python', '?')}, "
                f"shmq {meta.get('versions', {}).get('shmq', '?')}"
            )
        print(_bench_table(all_rows))
    if plt is not None:
        _plot(all_rows, args.plot, plt)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return EXIT_ERROR if failures else 0


# -- demo -------------------------------------------------------------------


#: the largest message ``shmq demo -s`` takes
DEMO_MAX_SIZE = 64 << 20
#: seconds the demo's producer or consumer waits for the other before giving up
DEMO_PATIENCE = 60.0


def _demo_consumer(name: str, count: int, ready: Any, done: Any) -> None:
    """The demo's consumer (a spawned process): attach, say ready, read
    ``count`` messages, say done.  Errors end it with one line, exit status 1."""
    try:
        ring = shmq.Ring.attach(name)
        try:
            read = ring.read
            ready.set()
            for _ in range(count):
                read(timeout=DEMO_PATIENCE)
            done.set()
        finally:
            ring.close()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        print(f"shmq demo: consumer: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


def _demo_ring_capacity(size: int) -> int:
    """Room for at least 16 records of ``size`` bytes, at least 1 MiB."""
    record = 8 + (size + 7) // 8 * 8
    return max(1 << 20, 16 * record)


def cmd_demo(args: argparse.Namespace) -> int:
    """A producer process and a consumer process move messages; print the rate.

    The clock runs from the moment the consumer is attached and waiting to
    the moment it has read the last message: process start-up is not timed.
    """
    method = "spawn"
    ctx = mp.get_context(method)
    capacity = _demo_ring_capacity(args.size)
    ready, done = ctx.Event(), ctx.Event()
    with shmq.Ring.create(capacity, multi_producer=False, multi_consumer=False) as ring:
        proc = ctx.Process(target=_demo_consumer, args=(ring.name, args.count, ready, done))
        try:
            proc.start()
            while not ready.wait(0.1):
                if not proc.is_alive():
                    raise CliError(f"the consumer process ended before it was ready (exit status {proc.exitcode})")
            payload = b"x" * args.size
            write = ring.write
            t0 = time.perf_counter()
            for _ in range(args.count):
                try:
                    write(payload, 1.0)
                except shmq.Full:
                    if not proc.is_alive():
                        raise CliError(f"the consumer process died (exit status {proc.exitcode})") from None
                    write(payload, DEMO_PATIENCE)
            while not done.wait(0.1):
                if not proc.is_alive():
                    raise CliError(f"the consumer process died (exit status {proc.exitcode})")
            elapsed = time.perf_counter() - t0
            proc.join(DEMO_PATIENCE)
        finally:
            ring.unlink()
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    rate = args.count / elapsed if elapsed > 0 else float("inf")
    print(
        f"shmq {shmq.__version__} ({ll.CORE} core): moved {args.count:,} messages of {args.size} bytes "
        f"from one process to another in {elapsed:.3f} s: {rate:,.0f} msg/s, "
        f"{rate * args.size / 1e6:,.1f} MB/s\n"
        f"measured: this process -> 1 consumer process (start method {method}), one message at a time "
        f"(Ring.write / Ring.read) through a single-producer single-consumer shmq.Ring of {_size(capacity)}; "
        f"timed from the consumer being ready to its last read (process start-up not included)"
    )
    return 0


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _size_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of bytes, got {text!r}") from None
    if not 0 <= value <= DEMO_MAX_SIZE:
        raise argparse.ArgumentTypeError(f"must be between 0 and {DEMO_MAX_SIZE:,} bytes, got {value:,}")
    return value


# -- entry point ------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The module docstring is reST; --help shows it without the markup.
    description = (__doc__ or "").split("\n\n")[0].replace("``", "").rstrip(":")
    parser = argparse.ArgumentParser(
        prog="shmq", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"shmq {shmq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def prefix_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prefix", default="", help="only segments whose name starts with PREFIX")

    ls = sub.add_parser("ls", help="list the shmq segments on this machine")
    prefix_arg(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_ls)

    stat = sub.add_parser("stat", help="print one statistics snapshot of a segment")
    stat.add_argument("name", help="segment name (as shown by 'shmq ls')")
    stat.add_argument("--interval", type=float, default=None, metavar="S", help="also measure rates over S seconds")
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.set_defaults(func=cmd_stat)

    top = sub.add_parser("top", help="live view of all queues (Ctrl-C quits)")
    prefix_arg(top)
    top.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (1)")
    top.add_argument("--iterations", type=int, default=0, metavar="N", help="stop after N refreshes (0: never)")
    top.add_argument("--json", action="store_true", help="print one JSON object per refresh, one per line")
    top.set_defaults(func=cmd_top)

    gc = sub.add_parser("gc", help="remove segments and semaphores whose creator and participants are all dead")
    prefix_arg(gc)
    gc.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    gc.add_argument("--json", action="store_true", help="print JSON")
    gc.set_defaults(func=cmd_gc)

    bench = sub.add_parser("bench", help="run the benchmark suite and print the table")
    bench.add_argument("--quick", action="store_true", help="tiny counts: check the suite runs, not its speed")
    bench.add_argument("--only", action="append", metavar="NAME", help="run only bench_NAME.py (repeatable)")
    bench.add_argument("--json", action="store_true", help="print every result as one JSON line")
    bench.add_argument("--plot", metavar="FILE.png", help="draw throughput against message size (needs matplotlib)")
    bench.add_argument("--dir", help="the benchmarks directory (default: the source checkout's)")
    bench.add_argument("--timeout", type=float, default=900, help="seconds allowed per script (900)")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="move messages between two processes and print the rate")
    demo.add_argument("-n", "--count", type=_count_arg, default=500_000, help="messages to move (500000)")
    demo.add_argument("-s", "--size", type=_size_arg, default=64, help="bytes per message (64)")
    demo.set_defaults(func=cmd_demo)
    return parser


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, (FileNotFoundError, PermissionError)) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc) or type(exc).__name__


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`shmq ls | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except (CliError, OSError, ValueError, shmq.ShmqError) as exc:
        if os.environ.get("SHMQ_DEBUG"):
            raise
        print(f"shmq {args.command}: {_error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR

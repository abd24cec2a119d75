"""``python -m shmq`` / ``shmq``: look at, clean up and measure shmq segments.

Commands::

    shmq ls    [--prefix P] [--json]                 the shmq segments on this machine
    shmq stat  NAME [--interval S] [--json]          one statistics snapshot (and rates)
    shmq top   [--prefix P] [--interval S] [--iterations N]   live view; Ctrl-C quits
    shmq gc    [--prefix P] [--dry-run] [--json]     remove what only dead processes used
    shmq bench [--quick] [--only NAME] [--json] [--plot FILE.png]   run benchmarks/
    shmq demo  [-n COUNT] [-s SIZE]                  move messages between two processes

Every command reads segments read-only by name (it never joins them).  An
error is one line on stderr and exit status 1 (2 for bad usage); set
SHMQ_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
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


def _as_json(obj: Any) -> Any:
    """A statistics dataclass as a JSON-ready dict, derived properties included."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"type": type(obj).__name__}
        out.update(dataclasses.asdict(obj))
        for prop in ("fill_ratio", "age_seconds", "in_use"):
            if hasattr(obj, prop):
                out[prop] = getattr(obj, prop)
        return out
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_as_json))


# -- ls ---------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """The shmq segments on this machine."""
    problems: List[Tuple[str, str]] = []
    infos = ll.list_segments(args.prefix, problems)
    if args.json:
        _print_json([_as_json(i) for i in infos])
    elif not infos:
        print("no shmq segments" + (f" named {args.prefix}*" if args.prefix else ""))
    else:
        rows = []
        for i in infos:
            alive = sum(p.alive for p in i.participants)
            rows.append(
                [
                    i.name,
                    i.kind,
                    _size(i.size_bytes),
                    str(i.creator_pid),
                    "yes" if i.creator_alive else "NO",
                    _age(i.age_seconds),
                    f"{alive}/{len(i.participants)}",
                ]
            )
        print(_table(rows, ["NAME", "KIND", "SIZE", "CREATOR", "ALIVE", "AGE", "PROCS"], right=(2, 3, 5, 6)))
    for name, reason in problems:
        print(f"shmq: cannot read {name}: {reason}", file=sys.stderr)
    return 0


# -- stat -------------------------------------------------------------------


def _ring_text(s: ll.RingStatistics) -> str:
    limit = f", at most {s.max_messages:,} records" if s.max_messages else ""
    lines = [
        ("ring", f"{s.name}: {_size(s.capacity_bytes)} data area{limit}"),
        ("creator", f"{s.creator_pid} ({'alive' if s.creator_alive else 'dead'})"),
        ("messages", f"in {s.messages_in:,}, out {s.messages_out:,}, held {s.messages_used:,}"),
        (
            "bytes",
            f"in {s.bytes_in:,}, out {s.bytes_out:,}, held {s.bytes_used:,} {_bar(s.fill_ratio)}, "
            f"peak {s.peak_bytes:,}",
        ),
        ("full waits", f"{s.full_waits:,} producer waits for room, {s.full_wait_seconds:.3f} s in total"),
        ("empty waits", f"{s.empty_waits:,} consumer waits for a record, {s.empty_wait_seconds:.3f} s in total"),
        ("participants", _participants(s.participants)),
    ]
    return _fields_text(lines)


def _fields_text(lines: List[Tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


def _generic_text(obj: Any) -> str:
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
    return _fields_text(lines)


def _rates_text(r: ll.Rates) -> str:
    return _fields_text(
        [
            (
                f"rates ({r.interval_seconds:.1f} s)",
                f"in {_count(r.messages_in_per_second)} msg/s, out {_count(r.messages_out_per_second)} msg/s, "
                f"{r.bytes_out_per_second / 1e6:,.1f} MB/s out",
            ),
            (
                "blocked",
                f"producers {r.producer_wait_ratio * 100:.0f}% of the time, "
                f"consumers {r.consumer_wait_ratio * 100:.0f}%",
            ),
            ("verdict", r.verdict),
        ]
    )


def _has_rates(stats: Any) -> bool:
    return all(hasattr(stats, a) for a in ("messages_in", "full_wait_seconds", "fill_ratio", "taken_at"))


def cmd_stat(args: argparse.Namespace) -> int:
    """One statistics snapshot of NAME (two, and the rates between them, with --interval)."""
    stats = ll.read_statistics(args.name)
    rates = None
    if args.interval is not None:
        if args.interval <= 0:
            raise CliError(f"--interval must be positive, got {args.interval}")
        if _has_rates(stats):
            time.sleep(args.interval)
            later = ll.read_statistics(args.name)
            rates = ll.rates(stats, later)
            stats = later
    if args.json:
        out = _as_json(stats)
        if rates is not None:
            out["rates"] = _as_json(rates)
        _print_json(out)
        return 0
    print(_ring_text(stats) if isinstance(stats, ll.RingStatistics) else _generic_text(stats))
    if rates is not None:
        print(_rates_text(rates))
    return 0


# -- top --------------------------------------------------------------------


def _top_frame(prefix: str, previous: Dict[str, Any], interval: float, width: int = 0) -> str:
    """One screen: every segment, rates since ``previous`` (updated in place);
    lines cut at ``width`` columns when given."""
    infos = ll.list_segments(prefix)
    rows = []
    current: Dict[str, Any] = {}
    for info in infos:
        try:
            stats = ll.read_statistics(info.name)
        except (OSError, shmq.LayoutError):
            continue  # vanished since the listing
        procs = f"{sum(p.alive for p in info.participants)}/{len(info.participants)}"
        row = [info.name, info.kind, "-", "-", "-", "-", "-", "-", "-", procs]
        if _has_rates(stats):
            current[info.name] = stats
            row[5] = _bar(stats.fill_ratio)
            before = previous.get(info.name)
            # A counter that went back means the name now holds a new segment.
            if before is not None and stats.messages_in >= before.messages_in and stats.taken_at > before.taken_at:
                r = ll.rates(before, stats)
                row[2] = _count(r.messages_in_per_second)
                row[3] = _count(r.messages_out_per_second)
                row[4] = f"{r.bytes_out_per_second / 1e6:.1f}"
                row[6] = f"{r.producer_wait_ratio * 100:.0f}%"
                row[7] = f"{r.consumer_wait_ratio * 100:.0f}%"
                row[8] = r.verdict
        elif getattr(stats, "slot_count", 0):  # a pool: slots in use
            row[5] = _bar((stats.slot_count - stats.free) / stats.slot_count)
        rows.append(row)
    previous.clear()
    previous.update(current)
    title = (
        f"shmq top  {time.strftime('%H:%M:%S')}  every {interval:g} s  "
        f"{len(rows)} segment{'s' if len(rows) != 1 else ''}"
        + (f" named {prefix}*" if prefix else "")
        + "  (Ctrl-C quits)"
    )
    if not rows:
        return title + "\n\nno shmq segments"
    header = ["NAME", "KIND", "IN/s", "OUT/s", "MB/s", "FILL", "P-WAIT", "C-WAIT", "VERDICT", "PROCS"]
    table = _table(rows, header, right=(2, 3, 4, 6, 7, 9))
    if width:
        table = "\n".join(line[:width] for line in table.splitlines())
    return title + "\n\n" + table


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of every queue, refreshed every --interval seconds."""
    if args.interval <= 0:
        raise CliError(f"--interval must be positive, got {args.interval}")
    tty = sys.stdout.isatty()
    previous: Dict[str, Any] = {}
    n = 0
    try:
        while True:
            width = shutil.get_terminal_size().columns if tty else 0
            frame = _top_frame(args.prefix, previous, args.interval, width)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n")
            else:
                sys.stdout.write(("\n" if n else "") + frame + "\n")
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
    """Remove segments and semaphores that only dead processes used."""
    items = ll.collect_garbage(args.prefix, dry_run=args.dry_run)
    if args.json:
        _print_json({"dry_run": args.dry_run, "removed": [_as_json(g) for g in items]})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for g in items:
        what = f"{g.kind} {g.name}" + (f" ({_size(g.size_bytes)}) and its semaphores" if g.size_bytes else "")
        print(f"{verb} {what}: {g.reason}")
    segs = sum(g.kind != "semaphore" for g in items)
    sems = len(items) - segs
    print(f"{'would remove' if args.dry_run else 'removed'} {segs} segment(s) and {sems} orphan semaphore(s)")
    return 0


# -- bench ------------------------------------------------------------------


def _bench_dir(arg: Optional[str]) -> Path:
    if arg:
        path = Path(arg)
    else:
        path = Path(shmq.__file__).resolve().parent.parent / "benchmarks"
    if not (path / "_harness.py").is_file():
        raise CliError(f"no shmq benchmark suite in {path}: run from a source checkout, or pass --dir")
    return path


def _run_script(script: Path, args: argparse.Namespace) -> Tuple[List[Dict[str, Any]], str]:
    cmd = [sys.executable, str(script), "--json"] + (["--quick"] if args.quick else [])
    print(f"running {script.name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    rows, other = [], []
    for line in proc.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        if isinstance(obj, dict):
            obj.setdefault("script", script.name)
            rows.append(obj)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CliError(f"{script.name} failed with exit status {proc.returncode}: {last}")
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
        found = _row_value(r)
        if "meta" in r or found is None:
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
        bench = r.get("bench") or str(r.get("script", "?")).replace("bench_", "").replace(".py", "")
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
    for script in scripts:
        try:
            rows, other = _run_script(script, args)
        except CliError as exc:
            failures.append(str(exc))
            print(f"shmq: {exc}", file=sys.stderr)
            continue
        except subprocess.TimeoutExpired:
            failures.append(f"{script.name} timed out")
            print(f"shmq: {script.name} did not finish in {args.timeout} s", file=sys.stderr)
            continue
        all_rows.extend(rows)
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


def _demo_consumer(name: str, count: int) -> None:
    ring = shmq.Ring.attach(name)
    try:
        for _ in range(count):
            ring.read(timeout=60)
    finally:
        ring.close()


def cmd_demo(args: argparse.Namespace) -> int:
    """A producer process and a consumer process move messages; print the rate."""
    ctx = mp.get_context("spawn")
    with shmq.Ring.create(1 << 20, multi_producer=False, multi_consumer=False) as ring:
        try:
            proc = ctx.Process(target=_demo_consumer, args=(ring.name, args.count))
            proc.start()
            payload = b"x" * args.size
            write = ring.write
            t0 = time.perf_counter()
            for _ in range(args.count):
                write(payload, 60)
            proc.join(120)
            elapsed = time.perf_counter() - t0
        finally:
            ring.unlink()
    if proc.exitcode != 0:
        print(f"consumer failed with exit code {proc.exitcode}", file=sys.stderr)
        return 1
    rate = args.count / elapsed
    print(
        f"shmq {shmq.__version__}: moved {args.count:,} messages of {args.size} bytes "
        f"from one process to another in {elapsed:.2f} s: {rate:,.0f} msg/s, "
        f"{rate * args.size / 1e6:,.1f} MB/s"
    )
    return 0


# -- entry point ------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmq", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    demo.add_argument("-n", "--count", type=int, default=500_000)
    demo.add_argument("-s", "--size", type=int, default=64)
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

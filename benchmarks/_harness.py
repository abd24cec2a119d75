"""Shared harness of the shmq benchmarks (not a benchmark itself).

Every ``bench_*.py`` script answers one question.  It measures shmq and its
baselines in the same run, interleaving their repeats (the machine is noisy:
identical runs differ by a factor of two) after one untimed warm-up round,
and reports the median, the spread (min and max) and the ratio to
``multiprocessing.Queue``.

Output: a table, or with ``--json`` one JSON object per line: first
``{"bench": ..., "meta": {...}}`` (machine, Python, library versions,
pinning), then one row per (workload, transport)::

    {"bench": "throughput", "workload": "64 B bytes 1->1", "transport": "shmq Ring",
     "unit": "msg/s", "higher_is_better": true, "median": ..., "min": ..., "max": ...,
     "repeats": 5, "vs_mp_queue": 8.1}

``vs_mp_queue`` is always "times better than mp.Queue": for a rate it is
``median / mp.Queue median``, for a time ``mp.Queue median / median``.
``shmq bench`` runs every script with ``--json`` and prints one table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence


#: fork starts a child in milliseconds and lets it inherit the transports
CTX = mp.get_context("fork")
BASELINE = "mp.Queue"
#: seconds any one measurement may take before it is abandoned
MEASURE_TIMEOUT = 300.0


class BenchError(Exception):
    """A measurement failed (a child died, hung, or a library misbehaved)."""


# -- machine and pinning ----------------------------------------------------


def cores() -> List[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


_CORES = cores()


def pin(index: int) -> Optional[int]:
    """Pin this process to core number ``index`` (modulo the cores we may
    use), if the machine allows; returns the core or None."""
    if len(_CORES) < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    core = _CORES[index % len(_CORES)]
    try:
        os.sched_setaffinity(0, {core})
    except OSError:
        return None
    return core


@contextlib.contextmanager
def unpinned() -> Iterator[None]:
    """Let this process run on every core it started with, then restore
    its affinity."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:
        return None
    if module == "zmq":
        return f"{mod.__version__} (libzmq {mod.zmq_version()})"
    v = getattr(mod, "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version({"faster_fifo": "faster-fifo", "posix_ipc": "posix_ipc"}.get(module, module))
        except Exception:
            v = "?"
    return str(v)


def _shmq_core() -> str:
    """Which shmq core runs here: "c" (compiled) or "python" (SHMQ_PURE=1, or not built)."""
    import shmq.lowlevel

    return shmq.lowlevel.CORE


def meta() -> Dict[str, Any]:
    """The machine, Python and library versions a result belongs to."""
    versions = {m: _version(m) for m in ("shmq", "numpy", "posix_ipc", "psutil", "faster_fifo", "zmq", "iceoryx2")}
    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cores": len(_CORES),
        "pinned": len(_CORES) >= 2 and hasattr(os, "sched_setaffinity"),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "shmq_core": _shmq_core(),
        "versions": {k: v for k, v in versions.items() if v is not None},
        "start_method": "fork",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- command line -----------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per line (first: the machine)")
    p.add_argument("--quick", action="store_true", help="tiny counts, one repeat: checks the script runs")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measurement")
    p.add_argument(
        "--timeout", type=float, default=None, help=f"seconds one measurement may take ({MEASURE_TIMEOUT:.0f}; --quick: 60)"
    )
    return p


def setup(args: argparse.Namespace) -> None:
    """Apply the common options and pin this process to core 0."""
    global MEASURE_TIMEOUT
    MEASURE_TIMEOUT = args.timeout or (60.0 if args.quick else MEASURE_TIMEOUT)
    pin(0)


# -- measuring --------------------------------------------------------------


class Case:
    """One (workload, transport) cell: ``run()`` returns one measurement."""

    def __init__(
        self,
        workload: str,
        transport: str,
        run: Callable[[], float],
        unit: str,
        higher_is_better: bool = True,
        **extra: Any,
    ) -> None:
        self.workload = workload
        self.transport = transport
        self.run = run
        self.unit = unit
        self.higher_is_better = higher_is_better
        self.extra = extra
        self.values: List[float] = []
        self.error: Optional[str] = None


def measure(cases: Sequence[Case], repeats: int, progress: bool = True, warmup: Optional[bool] = None) -> None:
    """Run every case ``repeats`` times, interleaved (repeat r runs each case
    once, starting at a rotating position), so slow phases of a noisy machine
    hit every transport alike.  Unless ``warmup`` is false (default: when
    repeating), a first untimed round runs every case once and is thrown
    away (first imports, first page faults).  A case that fails is not run
    again."""
    n = len(cases)
    warm = repeats > 1 if warmup is None else warmup
    for r in range(-1 if warm else 0, repeats):
        for k in range(n):
            case = cases[(k + max(r, 0)) % n]
            if case.error is not None:
                continue
            if progress and r == (-1 if warm else 0):
                print(f"  {case.workload} / {case.transport} ...", file=sys.stderr, flush=True)
            try:
                value = case.run()
            except Exception as exc:  # one broken peer must not end the run
                case.error = f"{type(exc).__name__}: {exc}"
                if progress:
                    print(f"  {case.workload} / {case.transport}: {case.error}", file=sys.stderr)
                continue
            if r >= 0:
                case.values.append(value)
        if progress:
            done = "warm-up round" if r < 0 else f"repeat {r + 1}/{repeats}"
            print(f"  {done} done", file=sys.stderr, flush=True)


def rows(bench: str, cases: Sequence[Case]) -> List[Dict[str, Any]]:
    """Result rows, with the ratio to the mp.Queue case of the same workload."""
    out = []
    base: Dict[str, float] = {}
    for c in cases:
        if c.transport == BASELINE and c.values:
            base[c.workload] = statistics.median(c.values)
    for c in cases:
        row: Dict[str, Any] = {
            "bench": bench,
            "workload": c.workload,
            "transport": c.transport,
            "unit": c.unit,
            "higher_is_better": c.higher_is_better,
            "repeats": len(c.values),
        }
        row.update(c.extra)
        if c.values:
            med = statistics.median(c.values)
            row.update(median=med, min=min(c.values), max=max(c.values))
            b = base.get(c.workload)
            if b and med:
                row["vs_mp_queue"] = med / b if c.higher_is_better else b / med
        if c.error:
            row["error"] = c.error
        out.append(row)
    return out


def _fmt(v: float, unit: str) -> str:
    if unit in ("us",):
        return f"{v:,.2f}"
    if abs(v) >= 1e6:
        return f"{v / 1e6:,.2f}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:,.1f}k"
    return f"{v:,.1f}"


def report(bench: str, results: List[Dict[str, Any]], as_json: bool) -> None:
    """Print the rows as JSON lines (machine first) or as a table."""
    if as_json:
        print(json.dumps({"bench": bench, "meta": meta()}))
        for r in results:
            print(json.dumps(r))
        return
    m = meta()
    print(f"# {bench}: {m['cpu']}, {m['cores']} cores, {m['python']}, shmq {m['versions'].get('shmq')}")
    table = [["WORKLOAD", "TRANSPORT", "MEDIAN", "MIN", "MAX", "VS MP.QUEUE"]]
    for r in results:
        if "median" not in r:
            table.append([r["workload"], r["transport"], "error", "", "", r.get("error", "")[:60]])
            continue
        u = r["unit"]
        ratio = r.get("vs_mp_queue")
        table.append(
            [
                r["workload"],
                r["transport"],
                f"{_fmt(r['median'], u)} {u}",
                _fmt(r["min"], u),
                _fmt(r["max"], u),
                "" if ratio is None else f"{ratio:.2f}x",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())


# -- child processes --------------------------------------------------------


class children:
    """``with children(target, [args, ...]):`` runs one child per args tuple
    for the block, under a deadline (SIGALRM: a peer that hangs cannot hang
    the run).  On success the children must exit by themselves; on failure
    they are killed at once."""

    def __init__(self, target: Callable[..., None], arg_tuples: Sequence[tuple], seconds: Optional[float] = None):
        self.target = target
        self.arg_tuples = arg_tuples
        self.seconds = MEASURE_TIMEOUT if seconds is None else seconds
        self.procs: List[Any] = []

    def _alarm(self, signum: int, frame: Any) -> None:
        raise BenchError(f"measurement did not finish in {self.seconds:.0f} s")

    def __enter__(self) -> List[Any]:
        for args in self.arg_tuples:
            p = CTX.Process(target=self.target, args=args, daemon=True)
            p.start()
            self.procs.append(p)
        self._old = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self.procs

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        try:
            if exc_type is None:
                finish(self.procs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
            for p in self.procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)


def expect(conn: Any, what: str, timeout: Optional[float] = None) -> Any:
    """The next object from ``conn``, or BenchError after ``timeout`` seconds."""
    timeout = MEASURE_TIMEOUT if timeout is None else timeout
    if not conn.poll(timeout):
        raise BenchError(f"no {what} within {timeout:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        raise BenchError(f"a child exited before sending {what}") from None


def finish(procs: Sequence[Any], timeout: float = 30.0) -> None:
    """Join children; kill any that hang (a failed measurement)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    if hung:
        raise BenchError(f"{len(hung)} child process(es) hung")
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        raise BenchError(f"child process(es) failed with exit codes {bad}")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def library_available(module: str) -> bool:
    return _version(module) is not None


__all__ = (
    "BASELINE",
    "BenchError",
    "CTX",
    "Case",
    "cores",
    "expect",
    "finish",
    "library_available",
    "measure",
    "meta",
    "parser",
    "percentile",
    "pin",
    "report",
    "setup",
    "rows",
    "children",
)

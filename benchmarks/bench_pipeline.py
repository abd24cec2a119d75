"""Cross-process pipelines: how fast does shmq.Pipeline move items through
two stages of worker processes, against the stdlib pools and pypeln?

Workloads (one worker process per stage everywhere):

* "trivial": N small ints through ``inc`` then ``double`` (functions that do
  nearly nothing): items/s, i.e. the cost of the plumbing.  Baselines:
  ``multiprocessing.Pool.imap`` chained over two pools with chunksize 1 and
  with several chunksizes (the best is "tuned"), ``ProcessPoolExecutor.map``
  chained over two executors (chunksize 1 and 512), and pypeln
  ``process.map`` (when installed).  The baselines that move one item per
  message run ``--slow-items`` items (their rate does not depend on N).
* "faults": "trivial" with 1% of the items raising in stage 1 (under
  ``on_error="dead-letter"``) and one stage-1 worker SIGKILLing itself half
  way: the run must complete with the dead letters holding exactly the
  failing items (checked); reported with the throughput lost against "trivial".
* "arrays": M arrays of 6 MiB through ``decode`` (makes the array) ->
  ``process`` (a new array: ``a + 1``) -> the parent, which reads one
  element: arrays/s and the parent's peak RSS (sampled).  Baselines:
  ``Pool.imap`` and ``ProcessPoolExecutor.map`` (chunksize 1) and pypeln, on
  ``--slow-arrays`` arrays.  Two shmq rows: the same functions (each result
  is a new array, copied once into a slot), and ``decode_into`` /
  ``process_into``, which build their results with
  ``shmq.pipeline.output_array`` (in the slot they travel in: no copy).

Reported: the median rate of ``--repeats`` runs (interleaved: every case
once, then again) and its ratios to ``Pool.imap`` with chunksize 1 and with
its best chunksize, and the CPU time of all the processes per item (less sensitive to other load than the rate).  The machine may be loaded by other work:
rates are noisy there; ratios in one run are what to read.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np

import shmq

try:  # optional baseline
    import pypeln as pl
except ImportError:  # pragma: no cover - depends on the machine
    pl = None

ARRAY_BYTES = 6 << 20
CTX = mp.get_context("fork")


# -- stage functions ------------------------------------------------------------
def inc(x):
    return x + 1


def double(x):
    return 2 * x


def inc_or_fail(x):
    """inc, but 1% of the items raise, and the item KILL_AT kills its worker once."""
    if x % 100 == 37:
        raise ValueError(f"bad item {x}")
    if x == KILL_AT[0] and not os.path.exists(KILL_AT[1]):
        open(KILL_AT[1], "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


KILL_AT = [-1, ""]  # item, flag file (set before the workers fork)


def run_faults(n: int, **kw) -> float:
    import tempfile

    flag = os.path.join(tempfile.mkdtemp(), "killed")
    KILL_AT[:] = [n // 2, flag]
    t0 = time.perf_counter()
    count = total = 0  # (not a set of the outputs: the parent's memory stays flat)
    with shmq.Pipeline(range(n), start_method="fork").map(inc_or_fail, on_error="dead-letter", **kw).map(double, **kw) as pipe:
        for out in pipe:
            count += 1
            total += out
        seconds = time.perf_counter() - t0
        dead = []
        while not pipe.dead_letters.empty():
            dead.append(pipe.dead_letters.get(timeout=5).item)
        st = pipe.statistics()
    failing = [x for x in range(n) if x % 100 == 37]
    assert os.path.exists(flag), "the kill did not happen"
    assert sorted(dead) == failing, "dead letters differ from the failing items"
    # every other item exactly once: their count and sum (outputs are distinct)
    assert count == n - len(failing) and total == 2 * sum(x + 1 for x in range(n)) - 2 * sum(x + 1 for x in failing), "outputs lost or duplicated"
    assert st.stages[0].crashes == 1 and st.with_output + st.dead_letters == n
    os.unlink(flag)
    return seconds


def decode(i):
    return np.full(ARRAY_BYTES // 8, float(i))


def process(a):
    return a + 1.0


def decode_into(i):
    """``decode``, its result built where it travels (no copy)."""
    out = shmq.pipeline.output_array(ARRAY_BYTES // 8, np.float64)
    out.fill(float(i))
    return out


def process_into(a):
    """``process``, likewise."""
    out = shmq.pipeline.output_array(a.shape, a.dtype)
    np.add(a, 1.0, out=out)
    return out


# -- runners: each returns (items, seconds) ---------------------------------------------
def run_shmq(f1: Callable, f2: Callable, n: int, source: Callable, sink: Callable, **kw) -> float:
    t0 = time.perf_counter()
    with shmq.Pipeline(source(n), start_method="fork").map(f1, **kw).map(f2, **kw) as pipe:
        for out in pipe:
            sink(out)
    return time.perf_counter() - t0


def run_pool(f1: Callable, f2: Callable, n: int, source: Callable, sink: Callable, chunksize: int = 1) -> float:
    t0 = time.perf_counter()
    with CTX.Pool(1) as p1, CTX.Pool(1) as p2:
        for out in p2.imap(f2, p1.imap(f1, source(n), chunksize), chunksize):
            sink(out)
    return time.perf_counter() - t0


def run_executor(f1: Callable, f2: Callable, n: int, source: Callable, sink: Callable, chunksize: int = 1) -> float:
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(1, mp_context=CTX) as e1, cf.ProcessPoolExecutor(1, mp_context=CTX) as e2:
        for out in e2.map(f2, e1.map(f1, source(n), chunksize=chunksize), chunksize=chunksize):
            sink(out)
    return time.perf_counter() - t0


def run_pypeln(f1: Callable, f2: Callable, n: int, source: Callable, sink: Callable) -> float:
    t0 = time.perf_counter()
    stage = pl.process.map(f1, source(n), workers=1, maxsize=64)
    for out in pl.process.map(f2, stage, workers=1, maxsize=64):
        sink(out)
    return time.perf_counter() - t0


class PeakRSS:
    """Samples this process's RSS every 20 ms while in the with-block."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.base = self.peak
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.t.join()


def ints(n):
    return iter(range(n))


def first_element(a):
    return float(a[0])


def drop(x):
    pass


def measure(run: Callable[[], float], n: int) -> Dict[str, float]:
    """One run: its rate, the parent's peak RSS growth, and the CPU time
    per item (µs) of every process (this one's threads and the children
    it waited for: every runner here joins its workers)."""
    t0 = os.times()
    with PeakRSS() as m:
        seconds = run()
    t1 = os.times()
    cpu = sum(t1[i] - t0[i] for i in range(4))  # user, system, children's user, children's system
    return {"rate": n / seconds, "peak_rss_mib": (m.peak - m.base) / 2**20, "cpu_us_per_item": cpu / n * 1e6}


def medians(runs: List[Dict[str, float]]) -> Dict[str, float]:
    return {
        "rate": statistics.median(r["rate"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "cpu_us_per_item": statistics.median(r["cpu_us_per_item"] for r in runs),
    }


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts, one repeat: checks the script runs")
    p.add_argument("--json", action="store_true", help="one JSON object per line (first: the machine)")
    p.add_argument("--items", type=int, default=1_000_000, help="small items for 'trivial' (default 1000000)")
    p.add_argument(
        "--slow-items", type=int, default=20_000,
        help="items for the baselines that move one item per message (chunksize 1, pypeln; default 20000)",
    )
    p.add_argument("--arrays", type=int, default=2000, help="6 MiB arrays for 'arrays' (default 2000)")
    p.add_argument("--slow-arrays", type=int, default=200, help="arrays for Pool.imap and pypeln (default 200)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--workloads", default="trivial,faults,arrays",
        help="which workloads to run (comma-separated; default trivial,faults,arrays)",
    )
    p.add_argument(
        "--chunksizes", default="64,512,4096,32768",
        help="Pool.imap chunksizes tried for 'trivial' (its best is the tuned baseline; default 64,512,4096,32768)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.slow_items, args.arrays, args.slow_arrays, args.repeats = 20_000, 2000, 20, 10, 1
    chunksizes = [int(c) for c in args.chunksizes.split(",")]

    n, ns, m, ms, r = args.items, args.slow_items, args.arrays, args.slow_arrays, args.repeats
    cases = [("trivial", "Pool.imap chunksize=1", ns, lambda: run_pool(inc, double, ns, ints, drop))]
    for c in chunksizes:
        cases.append(("trivial", f"Pool.imap chunksize={c}", n, lambda c=c: run_pool(inc, double, n, ints, drop, c)))
    cases += [
        ("trivial", "ProcessPoolExecutor.map chunksize=1", ns, lambda: run_executor(inc, double, ns, ints, drop)),
        ("trivial", "ProcessPoolExecutor.map chunksize=512", n, lambda: run_executor(inc, double, n, ints, drop, 512)),
    ]
    if pl is not None:
        cases.append(("trivial", "pypeln process.map", ns, lambda: run_pypeln(inc, double, ns, ints, drop)))
    cases += [
        ("trivial", "shmq Pipeline (defaults)", n, lambda: run_shmq(inc, double, n, ints, drop)),
        ("trivial", "shmq Pipeline ordered=True", n, lambda: run_shmq(inc, double, n, ints, drop, ordered=True)),
        ("trivial", "shmq Pipeline max_in_flight=128", n, lambda: run_shmq(inc, double, n, ints, drop, max_in_flight=128)),
        ("faults", "shmq Pipeline (defaults)", n, lambda: run_faults(n)),
        ("arrays", "Pool.imap chunksize=1", ms, lambda: run_pool(decode, process, ms, ints, first_element)),
        ("arrays", "ProcessPoolExecutor.map chunksize=1", ms, lambda: run_executor(decode, process, ms, ints, first_element)),
    ]
    if pl is not None:
        cases.append(("arrays", "pypeln process.map", ms, lambda: run_pypeln(decode, process, ms, ints, first_element)))
    cases.append(("arrays", "shmq Pipeline (defaults)", m, lambda: run_shmq(decode, process, m, ints, first_element)))
    cases.append(("arrays", "shmq Pipeline, output_array", m, lambda: run_shmq(decode_into, process_into, m, ints, first_element)))
    wanted = set(args.workloads.split(","))
    cases = [c for c in cases if c[0] in wanted]

    machine = {
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "load": os.getloadavg(),
        "shmq": shmq.__version__,
        "pypeln": getattr(pl, "__version__", None) if pl else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.json:
        print(json.dumps({"machine": machine}), flush=True)
    # Repeats interleaved (every case once, then again...): the load of a
    # shared machine drifts, and each case sees the same drift.
    runs: List[List[Dict[str, float]]] = [[] for _ in cases]
    for k in range(r):
        for (workload, transport, count, run), got in zip(cases, runs):
            print(f"measuring {workload}: {transport} ({count} items), run {k + 1} of {r}...", file=sys.stderr, flush=True)
            got.append(measure(run, count))
    results = []
    for (workload, transport, count, _), got in zip(cases, runs):
        results.append({"bench": "pipeline", "workload": workload, "transport": transport, "items": count, **medians(got)})
        if args.json:
            print(json.dumps(results[-1]), flush=True)
    rate = {(row["workload"], row["transport"]): row["rate"] for row in results}
    # the baselines: Pool.imap with chunksize 1, and with its best chunksize
    nan = float("nan")
    base1 = {w: rate.get((w, "Pool.imap chunksize=1"), nan) for w in ("trivial", "arrays")}
    base1["faults"] = base1["trivial"]
    pools = [row for row in results if row["workload"] == "trivial" and row["transport"].startswith("Pool.imap chunksize=")]
    tuned = [row for row in pools if row["transport"] != "Pool.imap chunksize=1"]
    best = max(tuned, key=lambda row: row["rate"]) if tuned else {"transport": "-", "rate": nan}
    best_rate = {"trivial": best["rate"], "faults": best["rate"], "arrays": base1["arrays"]}
    if args.json:
        print(json.dumps({"bench": "pipeline", "best_pool_imap": best["transport"], "rate": best["rate"]}), flush=True)
        return
    print(f"machine: {machine}")
    if tuned:
        print(f"tuned baseline: {best['transport']} (best of {', '.join(map(str, chunksizes))})")
    print("| workload | transport | items | items/s | vs Pool.imap(1) | vs Pool.imap(best) | CPU µs/item (all processes) | parent peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        w = row["workload"]
        print(
            f"| {w} | {row['transport']} | {row['items']:,} | {row['rate']:,.0f} | "
            f"{row['rate'] / base1[w]:.2f}x | {row['rate'] / best_rate[w]:.2f}x | {row['cpu_us_per_item']:,.2f} | "
            f"{row['peak_rss_mib']:.0f} MiB |"
        )
    if pl is not None and "arrays" in wanted:
        for t in ("shmq Pipeline (defaults)", "shmq Pipeline, output_array"):
            ratio = rate[("arrays", t)] / rate[("arrays", "pypeln process.map")]
            print(f"arrays, {t} vs pypeln: {ratio:.1f}x; vs Pool.imap: {rate[('arrays', t)] / base1['arrays']:.1f}x")
    if {"faults", "trivial"} <= wanted:
        loss = 1 - rate[("faults", "shmq Pipeline (defaults)")] / rate[("trivial", "shmq Pipeline (defaults)")]
        print(
            "faults (1% of items raising into the dead letters, one stage-1 worker SIGKILLed half way; "
            f"checked: run complete, dead letters == the failing items): throughput lost vs trivial: {loss:.0%}"
        )


if __name__ == "__main__":
    main()

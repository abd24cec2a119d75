"""Request/reply through ``shmq.Service`` against pyzmq and multiprocessing.

Three questions:

* ``rtt``: round trip of a small call (a 3-tuple there, a 2-tuple back), one
  client and one server process: median and 99th percentile in microseconds.
  Baselines: pyzmq REQ/REP over ipc:// with ``send_pyobj`` (when installed)
  and a request/reply built from two ``multiprocessing.Queue``.
* ``fan``: calls per second with 4 client processes and 2 server processes
  (shmq: one service, work sharing; pyzmq: REQ clients, a ROUTER/DEALER
  proxy process, REP workers; two mp.Queue: one request queue the servers
  share, one reply queue per client).
* ``array``: a call whose argument and result are 16 MiB float32 arrays
  (the server returns ``a + 1``): calls per second, same baselines as ``rtt``.

The round trip is measured by placement (``--placement``): ``cross-core``
(server on the second CPU, client on the first), ``one-core`` (both on the
first) and ``unpinned``; every repeat (``--repeats``) runs every placement
and transport once, interleaved, and the table shows the median over the
repeats of each run's median and p99, with the spread of the run medians
(the noise).  Ratios are against pyzmq.

Usage: ``python benchmarks/bench_service.py [--quick] [--json] [-n N]
[--repeats R] [--placement P]... [--only rtt|array|fan]...``.  The numbers
depend heavily on how loaded the machine is; compare rows of one run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List

import numpy as np

import shmq

CTX = mp.get_context("fork")
SPAWN = mp.get_context("spawn")  # the baselines' servers: no state inherited from this process
SMALL = (1, "abc", 1.5)


PLACEMENTS = ("cross-core", "one-core", "unpinned")
_CORES = sorted(os.sched_getaffinity(0))


@contextlib.contextmanager
def _placed(placement: str) -> Iterator[Callable[[], None]]:
    """Place the server started inside the block and this process (the
    client): ``cross-core`` server on the second CPU, client on the first;
    ``one-core`` both on the first; ``unpinned`` wherever the scheduler
    puts them.  Yields ``started()``, to call once the server has started
    (it inherits the affinity this process had at its start)."""
    before = os.sched_getaffinity(0)
    if placement == "unpinned" or len(_CORES) < 2:
        os.sched_setaffinity(0, _CORES)
    else:
        os.sched_setaffinity(0, {_CORES[1] if placement == "cross-core" else _CORES[0]})

    def started() -> None:
        if placement == "cross-core" and len(_CORES) >= 2:
            os.sched_setaffinity(0, {_CORES[0]})

    try:
        yield started
    finally:
        os.sched_setaffinity(0, before)


def _handler(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x + 1
    return (x[0], "ok")


# -- shmq ---------------------------------------------------------------------------------
def shmq_calls(payload: Any, n: int, placement: str = "unpinned") -> List[float]:
    svc = shmq.Service()
    try:
        with _placed(placement) as started, svc.serve(_handler, workers=1, ctx=CTX):
            started()
            c = svc.client()
            for _ in range(min(n, 200)):
                c.call(payload, timeout=60)
            out = []
            clock = time.perf_counter_ns
            for _ in range(n):
                t0 = clock()
                c.call(payload, timeout=60)
                out.append((clock() - t0) / 1e3)
            c.close()
        return out
    finally:
        svc.unlink()
        svc.close()


def _fan_client(name: str, seconds: float, start: Any, out: Any) -> None:
    c = shmq.Service.attach(name).client()
    c.call(SMALL, timeout=60)
    start.wait(60)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        c.call(SMALL, timeout=60)
        n += 1
    out.put(n)
    c.close()


def shmq_fan(clients: int, servers: int, seconds: float) -> float:
    svc = shmq.Service()
    try:
        with svc.serve(_handler, workers=servers, ctx=CTX):
            start, out = CTX.Event(), CTX.Queue()
            procs = [CTX.Process(target=_fan_client, args=(svc.name, seconds, start, out)) for _ in range(clients)]
            for p in procs:
                p.start()
            time.sleep(0.5)
            start.set()
            total = sum(out.get(timeout=120) for _ in procs)
            for p in procs:
                p.join(30)
        return total / seconds
    finally:
        svc.unlink()
        svc.close()


# -- pyzmq REQ/REP --------------------------------------------------------------------------
def _zmq_server(addr: str, n: int) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.REP)
    sock.bind(addr)
    for _ in range(n):
        sock.send_pyobj(_handler(sock.recv_pyobj()))
    sock.close(linger=1000)


def zmq_calls(payload: Any, n: int, placement: str = "unpinned") -> List[float]:
    import zmq

    warm = min(n, 200)
    with tempfile.TemporaryDirectory() as d, _placed(placement) as started:
        addr = f"ipc://{d}/rr"
        p = SPAWN.Process(target=_zmq_server, args=(addr, n + warm))
        p.start()
        started()
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.RCVTIMEO, 120_000)  # a dead server fails the run instead of hanging it
        sock.connect(addr)
        for _ in range(warm):
            sock.send_pyobj(payload)
            sock.recv_pyobj()
        out = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            sock.send_pyobj(payload)
            sock.recv_pyobj()
            out.append((clock() - t0) / 1e3)
        sock.close(linger=0)
        p.join(30)
    return out


def _zmq_proxy(front: str, back: str) -> None:
    import zmq

    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind(front)
    dealer.bind(back)
    try:
        zmq.proxy(router, dealer)
    except zmq.ContextTerminated:
        pass


def _zmq_worker(back: str) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.REP)
    sock.connect(back)
    while True:
        sock.send_pyobj(_handler(sock.recv_pyobj()))


def _zmq_fan_client(front: str, seconds: float, start: Any, out: Any) -> None:
    import zmq

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 120_000)
    sock.connect(front)
    sock.send_pyobj(SMALL)
    sock.recv_pyobj()
    start.wait(60)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        sock.send_pyobj(SMALL)
        sock.recv_pyobj()
        n += 1
    out.put(n)
    sock.close(linger=0)


def zmq_fan(clients: int, servers: int, seconds: float) -> float:
    """REQ clients -> ROUTER/DEALER proxy process -> REP workers."""
    with tempfile.TemporaryDirectory() as d:
        front, back = f"ipc://{d}/front", f"ipc://{d}/back"
        helpers = [SPAWN.Process(target=_zmq_proxy, args=(front, back), daemon=True)]
        helpers += [SPAWN.Process(target=_zmq_worker, args=(back,), daemon=True) for _ in range(servers)]
        for p in helpers:
            p.start()
        start, out = SPAWN.Event(), SPAWN.Queue()
        procs = [SPAWN.Process(target=_zmq_fan_client, args=(front, seconds, start, out)) for _ in range(clients)]
        for p in procs:
            p.start()
        time.sleep(2.0)  # spawn start-up
        start.set()
        total = sum(out.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
        for p in helpers:
            p.kill()
            p.join(10)
    return total / seconds


# -- two mp.Queue --------------------------------------------------------------------------
def _mpq_server(req: Any, rep: Any, n: int) -> None:
    for _ in range(n):
        rep.put(_handler(req.get()))


def mpq_calls(payload: Any, n: int, placement: str = "unpinned") -> List[float]:
    warm = min(n, 200)
    req, rep = SPAWN.Queue(), SPAWN.Queue()
    with _placed(placement) as started:
        p = SPAWN.Process(target=_mpq_server, args=(req, rep, n + warm))
        p.start()
        started()
        for _ in range(warm):
            req.put(payload)
            rep.get()
        out = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t0 = clock()
            req.put(payload)
            rep.get()
            out.append((clock() - t0) / 1e3)
        p.join(30)
    return out


def _mpq_fan_server(req: Any, reps: List[Any]) -> None:
    while True:
        item = req.get()
        if item is None:
            return
        k, payload = item
        reps[k].put(_handler(payload))


def _mpq_fan_client(k: int, req: Any, rep: Any, seconds: float, start: Any, out: Any) -> None:
    req.put((k, SMALL))
    rep.get()
    start.wait(60)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        req.put((k, SMALL))
        rep.get()
        n += 1
    out.put(n)


def mpq_fan(clients: int, servers: int, seconds: float) -> float:
    """Clients put (client, request) on one shared queue; each of the
    servers takes from it and puts the reply on the client's own queue."""
    req = SPAWN.Queue()
    reps = [SPAWN.Queue() for _ in range(clients)]
    helpers = [SPAWN.Process(target=_mpq_fan_server, args=(req, reps), daemon=True) for _ in range(servers)]
    for p in helpers:
        p.start()
    start, out = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_mpq_fan_client, args=(k, req, reps[k], seconds, start, out)) for k in range(clients)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # spawn start-up
    start.set()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    for _ in helpers:
        req.put(None)
    for p in helpers:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(10)
    return total / seconds


# -- report ---------------------------------------------------------------------------------
def _have_zmq() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


def _p99(values: List[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("-n", "--count", type=int, help="small calls per measurement (5000; --quick 500)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats of each measurement (3; --quick 1)")
    parser.add_argument("--placement", choices=PLACEMENTS, action="append", help="rtt only in these placements (repeatable; default all)")
    parser.add_argument("--only", choices=("rtt", "array", "fan"), action="append", help="only these cases (repeatable)")
    args = parser.parse_args()
    n_small = args.count or (500 if args.quick else 5000)
    n_big = 5 if args.quick else 30
    repeats = args.repeats or (1 if args.quick else 3)
    fan_seconds = 1.0 if args.quick else 3.0
    cases = args.only or ("rtt", "array", "fan")
    placements = args.placement or PLACEMENTS
    big = np.ones(4 << 20, dtype=np.float32)
    transports: Dict[str, Callable[..., List[float]]] = {"shmq.Service": shmq_calls, "mp.Queue x2": mpq_calls}
    if _have_zmq():
        transports["pyzmq REQ/REP"] = zmq_calls
    rows = []
    meta = {
        "python": platform.python_version(),
        "shmq": shmq.__version__,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
    }
    if "rtt" in cases:
        # every repeat runs every (placement, transport) once: load changes hit them alike
        runs: Dict[tuple, List[tuple]] = {}
        for _ in range(repeats):
            for placement in placements:
                for label, fn in transports.items():
                    t = fn(SMALL, n_small, placement)
                    runs.setdefault((placement, label), []).append((statistics.median(t), _p99(t)))
        for (placement, label), rs in runs.items():
            meds, p99s = [r[0] for r in rs], [r[1] for r in rs]
            rows.append({"bench": "service", "case": "rtt", "placement": placement, "transport": label,
                         "median_us": statistics.median(meds), "median_min_us": min(meds), "median_max_us": max(meds),
                         "p99_us": statistics.median(p99s), "p99_max_us": max(p99s), "calls": n_small, "repeats": len(rs)})
    if "array" in cases:
        per: Dict[str, List[float]] = {}
        for _ in range(repeats):
            for label, fn in transports.items():
                t = fn(big, n_big)
                per.setdefault(label, []).append(1e6 / statistics.median(t))
        for label, v in per.items():
            rows.append({"bench": "service", "case": "array16MiB", "transport": label, "calls_per_s": statistics.median(v),
                         "calls_per_s_min": min(v), "calls_per_s_max": max(v), "calls": n_big, "repeats": len(v)})
    if "fan" in cases:
        fans: Dict[str, Callable[[int, int, float], float]] = {"shmq.Service": shmq_fan, "mp.Queue x2": mpq_fan}
        if _have_zmq():
            fans["pyzmq ROUTER/DEALER"] = zmq_fan
        per = {}
        for _ in range(repeats):
            for label, fn in fans.items():
                per.setdefault(label, []).append(fn(4, 2, fan_seconds))
        for label, v in per.items():
            rows.append({"bench": "service", "case": "fan4x2", "transport": label, "calls_per_s": statistics.median(v),
                         "calls_per_s_min": min(v), "calls_per_s_max": max(v), "seconds": fan_seconds, "repeats": len(v)})
    for r in rows:
        r.update(meta)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"python {meta['python']}, {meta['cpus']} cpus, load average {meta['loadavg']:.1f}")
    zmq_rtt = {r["placement"]: r for r in rows if r["case"] == "rtt" and r["transport"] == "pyzmq REQ/REP"}
    zmq_rate = {r["case"]: r for r in rows if r["case"] != "rtt" and r["transport"].startswith("pyzmq")}
    for r in rows:
        if r["case"] == "rtt":
            ref = zmq_rtt.get(r["placement"])
            ratio = f"  ({ref['median_us'] / r['median_us']:.2f}x pyzmq)" if ref else ""
            print(f"rtt {r['placement']:10s} {r['transport']:19s} median {r['median_us']:8.1f} us"
                  f" [{r['median_min_us']:.1f}-{r['median_max_us']:.1f}]  p99 {r['p99_us']:8.1f} us (max {r['p99_max_us']:.1f}){ratio}")
        else:
            ref = zmq_rate.get(r["case"])
            ratio = f"  ({r['calls_per_s'] / ref['calls_per_s']:.2f}x pyzmq)" if ref else ""
            what = "16 MiB array  " if r["case"] == "array16MiB" else "4x2 fan       "
            print(f"{what}  {r['transport']:19s} {r['calls_per_s']:10.1f} calls/s"
                  f" [{r['calls_per_s_min']:.1f}-{r['calls_per_s_max']:.1f}]{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

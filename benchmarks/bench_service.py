"""Request/reply through ``shmq.Service`` against pyzmq and multiprocessing.

Three questions:

* ``rtt``: round trip of a small call (a 3-tuple there, a 2-tuple back), one
  client and one server process: median and 99th percentile in microseconds.
  Baselines: pyzmq REQ/REP over ipc:// with ``send_pyobj`` (when installed)
  and a request/reply built from two ``multiprocessing.Queue``.
* ``fan``: calls per second with 4 client processes and 2 server processes
  (shmq: one service, work sharing; pyzmq: REQ clients, a ROUTER/DEALER
  proxy process, REP workers).
* ``array``: a call whose argument and result are 16 MiB float32 arrays
  (the server returns ``a + 1``): calls per second, same baselines as ``rtt``.

Usage: ``python benchmarks/bench_service.py [--quick] [--json]``.  The
numbers depend heavily on how loaded the machine is; compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np

import shmq

CTX = mp.get_context("fork")
SPAWN = mp.get_context("spawn")  # the baselines' servers: no state inherited from this process
SMALL = (1, "abc", 1.5)


def _handler(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x + 1
    return (x[0], "ok")


# -- shmq ---------------------------------------------------------------------------------
def shmq_calls(payload: Any, n: int) -> List[float]:
    svc = shmq.Service()
    try:
        with svc.serve(_handler, workers=1, ctx=CTX):
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


def zmq_calls(payload: Any, n: int) -> List[float]:
    import zmq

    warm = min(n, 200)
    with tempfile.TemporaryDirectory() as d:
        addr = f"ipc://{d}/rr"
        p = SPAWN.Process(target=_zmq_server, args=(addr, n + warm))
        p.start()
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


def mpq_calls(payload: Any, n: int) -> List[float]:
    warm = min(n, 200)
    req, rep = SPAWN.Queue(), SPAWN.Queue()
    p = SPAWN.Process(target=_mpq_server, args=(req, rep, n + warm))
    p.start()
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
    args = parser.parse_args()
    n_small = 500 if args.quick else 5000
    n_big = 5 if args.quick else 30
    fan_seconds = 1.0 if args.quick else 3.0
    big = np.ones(4 << 20, dtype=np.float32)
    transports: Dict[str, Callable[[Any, int], List[float]]] = {"shmq.Service": shmq_calls, "mp.Queue x2": mpq_calls}
    if _have_zmq():
        transports["pyzmq REQ/REP"] = zmq_calls
    rows = []
    meta = {
        "python": platform.python_version(),
        "shmq": shmq.__version__,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
    }
    for label, fn in transports.items():
        t = fn(SMALL, n_small)
        rows.append({"bench": "service", "case": "rtt", "transport": label, "median_us": statistics.median(t), "p99_us": _p99(t), "calls": n_small})
    for label, fn in transports.items():
        t = fn(big, n_big)
        rows.append({"bench": "service", "case": "array16MiB", "transport": label, "calls_per_s": 1e6 / statistics.median(t), "median_ms": statistics.median(t) / 1e3, "calls": n_big})
    rows.append({"bench": "service", "case": "fan4x2", "transport": "shmq.Service", "calls_per_s": shmq_fan(4, 2, fan_seconds)})
    if _have_zmq():
        rows.append({"bench": "service", "case": "fan4x2", "transport": "pyzmq ROUTER/DEALER", "calls_per_s": zmq_fan(4, 2, fan_seconds)})
    for r in rows:
        r.update(meta)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"python {meta['python']}, {meta['cpus']} cpus, load average {meta['loadavg']:.1f}")
    base = {r["case"]: r for r in rows if r["transport"] == "mp.Queue x2"}
    for r in rows:
        if r["case"] == "rtt":
            ratio = base["rtt"]["median_us"] / r["median_us"]
            print(f"rtt        {r['transport']:15s} median {r['median_us']:8.1f} us  p99 {r['p99_us']:8.1f} us  ({ratio:.2f}x mp.Queue)")
        elif r["case"] == "array16MiB":
            ratio = r["calls_per_s"] / base["array16MiB"]["calls_per_s"]
            print(f"16 MiB     {r['transport']:15s} {r['calls_per_s']:8.1f} calls/s  ({ratio:.2f}x mp.Queue)")
        else:
            print(f"4x2 fan    {r['transport']:19s} {r['calls_per_s']:8.0f} calls/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

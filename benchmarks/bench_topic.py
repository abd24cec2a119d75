"""Publish/subscribe fan-out: how many small tuples per second does each
subscriber receive when one publisher feeds 1, 2 or 4 subscriber processes?

shmq: one ``shmq.Topic`` (1 MiB ring, back-pressure): each message is pickled
and written once, every subscriber reads it at its own cursor.  Baseline in
the same run: pyzmq PUB/SUB over ipc:// with ``send_pyobj``/``recv_pyobj``
(high-water marks 0, so nothing is dropped), when pyzmq is installed.  Time
runs from the publisher's first send to each subscriber's last message; the
rate is messages / that time, per subscriber, median over subscribers and
repeats.  Processes are forked; nothing is pinned.

``shmq.Latest`` (no baseline): set/get pairs per second in one process, and
the latency of ``get()`` while a forked writer sets continuously (median and
99th percentile of single calls).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import shmq

MESSAGE = (1, "abc", 1.5)


def _shmq_subscriber(name: str, conn: Any) -> None:
    topic = shmq.Topic.attach(name)
    sub = topic.subscribe()
    conn.send("ready")
    count = 0
    for _ in sub:
        count += 1
    conn.send((count, time.perf_counter()))
    sub.close()
    topic.close()


def run_shmq(n: int, fan: int) -> List[float]:
    topic = shmq.Topic(1 << 20)
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(fan)]
    procs = [ctx.Process(target=_shmq_subscriber, args=(topic.name, child)) for _, child in pipes]
    for p in procs:
        p.start()
    for parent, _ in pipes:
        assert parent.poll(60) and parent.recv() == "ready"
    publish = topic.publish
    t0 = time.perf_counter()
    for _ in range(n):
        publish(MESSAGE)
    topic.close()
    rates = []
    for parent, _ in pipes:
        assert parent.poll(120)
        count, t_end = parent.recv()
        assert count == n, (count, n)
        rates.append(n / (t_end - t0))
    for p in procs:
        p.join(30)
    topic.unlink()
    return rates


def _zmq_subscriber(address: str, conn: Any) -> None:
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    while sock.recv_pyobj() != "hello":
        pass
    conn.send("ready")
    count = 0
    recv = sock.recv_pyobj
    while True:
        msg = recv()
        if msg is None:
            break
        if msg != "hello":
            count += 1
    conn.send((count, time.perf_counter()))
    sock.close(0)
    context.term()


def run_zmq(n: int, fan: int) -> List[float]:
    import zmq

    address = f"ipc:///tmp/bench_topic_{os.getpid()}.ipc"
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(address)
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(fan)]
    procs = [ctx.Process(target=_zmq_subscriber, args=(address, child)) for _, child in pipes]
    for p in procs:
        p.start()
    waiting = list(pipes)
    deadline = time.monotonic() + 60
    while waiting:  # PUB/SUB's slow joiner: say hello until every subscriber heard it
        assert time.monotonic() < deadline
        sock.send_pyobj("hello")
        still = []
        for pc in waiting:
            if pc[0].poll(0.001):
                assert pc[0].recv() == "ready"
            else:
                still.append(pc)
        waiting = still
    send = sock.send_pyobj
    t0 = time.perf_counter()
    for _ in range(n):
        send(MESSAGE)
    send(None)
    rates = []
    for parent, _ in pipes:
        assert parent.poll(120)
        count, t_end = parent.recv()
        assert count == n, (count, n)
        rates.append(n / (t_end - t0))
    for p in procs:
        p.join(30)
    sock.close(0)
    context.term()
    try:
        os.unlink(address[len("ipc://"):])
    except OSError:
        pass
    return rates


def _set_forever(name: str) -> None:
    latest = shmq.Latest.attach(name)
    k = 0
    while True:
        latest.set(MESSAGE + (k,))
        k += 1


def run_latest(n: int) -> Dict[str, float]:
    latest = shmq.Latest(64 << 10)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            latest.set(MESSAGE)
            latest.get()
        best = min(best, time.perf_counter() - t0)
    writer = mp.get_context("fork").Process(target=_set_forever, args=(latest.name,), daemon=True)
    writer.start()
    while latest.version < 100:
        time.sleep(0.001)
    get, clock = latest.get, time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        get()
        samples.append(clock() - t0)
    writer.kill()
    writer.join(30)
    samples.sort()
    latest.unlink()
    latest.close()
    return {"set_get_pairs_per_s": n / best, "get_ns_median_while_setting": samples[len(samples) // 2],
            "get_ns_p99_while_setting": samples[int(len(samples) * 0.99)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per case")
    parser.add_argument("--fan", type=int, nargs="+", default=[1, 2, 4], help="subscriber counts")
    parser.add_argument("--quick", action="store_true", help="20,000 messages, 1 repeat")
    parser.add_argument("--json", action="store_true", help="one JSON line per result")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.repeats = 20_000, 1
    try:
        import zmq  # noqa: F401

        transports: Dict[str, Callable[[int, int], List[float]]] = {"shmq.Topic": run_shmq, "pyzmq PUB/SUB": run_zmq}
    except ImportError:
        transports = {"shmq.Topic": run_shmq}
    results: Dict[tuple, List[float]] = {}
    for _ in range(args.repeats):
        for fan in args.fan:
            for label, run in transports.items():
                results.setdefault((label, fan), []).extend(run(args.messages, fan))
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "shmq": shmq.__version__,
        "messages": args.messages,
        "repeats": args.repeats,
    }
    rows = []
    for fan in args.fan:
        base = statistics.median(results[("pyzmq PUB/SUB", fan)]) if ("pyzmq PUB/SUB", fan) in results else None
        for label in transports:
            rate = statistics.median(results[(label, fan)])
            rows.append({"bench": "topic_fanout", "transport": label, "subscribers": fan,
                         "msgs_per_s_per_subscriber": round(rate), "vs_zmq": round(rate / base, 2) if base else None,
                         **meta})
    latest = run_latest(args.messages)
    rows.append({"bench": "latest", **{k: round(v) for k, v in latest.items()}, **meta})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"small tuples {MESSAGE!r}, {args.messages} messages, {args.repeats} repeat(s), Python {meta['python']}")
    print(f"{'transport':<16}{'subs':>5}{'msgs/s per sub':>16}{'vs zmq':>8}")
    for row in rows[:-1]:
        ratio = "" if row["vs_zmq"] is None else f"{row['vs_zmq']:.2f}x"
        print(f"{row['transport']:<16}{row['subscribers']:>5}{row['msgs_per_s_per_subscriber']:>16,}{ratio:>8}")
    print(f"shmq.Latest: {latest['set_get_pairs_per_s']:,.0f} set/get pairs/s in one process; get() while a "
          f"writer sets: median {latest['get_ns_median_while_setting']:,.0f} ns, "
          f"p99 {latest['get_ns_p99_while_setting']:,.0f} ns")


if __name__ == "__main__":
    sys.exit(main())

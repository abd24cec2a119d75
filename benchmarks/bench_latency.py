"""Request/reply round trip between two processes: how long does it take to
send 64 bytes to another process and get 64 bytes back?

The parent sends a request and waits for the reply; the child echoes.  shmq
uses two single-producer/single-consumer ``shmq.Ring`` objects (one per
direction, blocking ``write``/``read``: a short spin, then a semaphore).
Baselines in the same run: two ``multiprocessing.Queue`` (always), two
``os.pipe`` (the kernel's floor), faster-fifo and pyzmq PUSH/PULL pairs over
ipc:// when installed.  The two processes are pinned to cores 0 and 1 where
the machine allows.  Reported per transport: the median and the 99th
percentile of every round trip in a run (microseconds), each the median over
the interleaved repeats, and the speed-up over mp.Queue (mp.Queue time /
time).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

import _harness as H
import _transports as T

PAYLOAD = b"r" * 64


def _echo_main(fwd: T.Transport, back: T.Transport, n: int, conn: Any) -> None:
    H.pin(1)
    rx = fwd.receiver()
    tx = back.sender()
    conn.send("ready")
    recv, send = fwd.recv, back.send
    for _ in range(n):
        send(tx, [recv(rx, 1)])
    fwd.close_end(rx)
    back.close_end(tx)


def round_trips(make: Any, n: int, warmup: int) -> List[float]:
    """Round-trip times in microseconds of ``n`` requests after ``warmup``."""
    fwd, back = make(), make()
    fwd.prepare()
    back.prepare()
    try:
        parent, child = H.CTX.Pipe()
        with H.children(_echo_main, [(fwd, back, n + warmup, child)]):
            child.close()
            H.expect(parent, "ready")
            tx = fwd.sender()
            rx = back.receiver()
            send, recv = fwd.send, back.recv
            msg = [PAYLOAD]
            clock = time.perf_counter_ns
            out = []
            try:
                for _ in range(warmup):
                    send(tx, msg)
                    recv(rx, 1)
                for _ in range(n):
                    t0 = clock()
                    send(tx, msg)
                    recv(rx, 1)
                    out.append((clock() - t0) / 1e3)
            finally:
                fwd.close_end(tx)
                back.close_end(rx)
        return out
    finally:
        fwd.cleanup()
        back.cleanup()


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("-n", "--count", type=int, default=20_000, help="round trips per measurement (20000)")
    args = p.parse_args()
    n = 500 if args.quick else args.count
    repeats = args.repeats or (1 if args.quick else 5)
    H.setup(args)
    makers = [lambda: T.ShmqRing("raw", capacity=1 << 16), lambda: T.MpQueue("raw"), lambda: T.Pipe("raw")]
    if H.library_available("faster_fifo"):
        makers.append(lambda: T.FasterFifo("raw"))
    if H.library_available("zmq"):
        makers.append(lambda: T.Zmq("raw"))
    # one measurement gives both figures; keep the p99 of the same run
    p99s: Dict[str, List[float]] = {}
    cases = []
    for make in makers:
        name = make().name

        def run(make=make, name=name) -> float:
            rtts = sorted(round_trips(make, n, min(n, 2_000)))
            p99s.setdefault(name, []).append(H.percentile(rtts, 0.99))
            return H.percentile(rtts, 0.5)

        cases.append(H.Case("64 B round trip, median", name, run, "us", higher_is_better=False))
    H.measure(cases, repeats)
    results = H.rows("latency", cases)
    tails = []
    for c in cases:
        tail = H.Case("64 B round trip, p99", c.transport, lambda: 0.0, "us", higher_is_better=False)
        tail.values = p99s.get(c.transport, [])
        tail.error = c.error
        tails.append(tail)
    results += H.rows("latency", tails)
    H.report("latency", results, args.json)


if __name__ == "__main__":
    main()

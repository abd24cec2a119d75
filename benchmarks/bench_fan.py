"""Fan-in and fan-out: how many 64-byte messages per second move when four
producer processes share one consumer (4->1), or one producer feeds four
consumers (1->4)?

shmq uses one multi-producer/multi-consumer ``shmq.Ring`` (its crash-safe
locks are taken once per call: "single" is one lock round per message,
"batched" one per 256).  Baselines in the same run: ``multiprocessing.Queue``
(always), faster-fifo and pyzmq PUSH/PULL over ipc:// when installed.  The
single side runs on core 0; the four others share the remaining cores (on a
2-core machine, all four on core 1).  Fan-in's time runs from the first
producer's first send to the last message received (the shared
``_transports.fan_in``, also used by ``bench_queue.py``).  Fan-out ends with
one stop message per consumer; its time runs to the last consumer's stop.
Reported: messages/s, median of the interleaved repeats, and the ratio to
mp.Queue.
"""
from __future__ import annotations

import time
from typing import Any, List

import _harness as H
import _transports as T

PAYLOAD = b"f" * 64
FAN = 4
BATCH = 256


def fan_in(t: T.Transport, n: int, batch: int) -> float:
    """Seconds for FAN child processes to deliver ``n`` messages in all to
    this process, from the first one's first send."""
    k = n // FAN
    return T.fan_in(t, k, lambda p: [PAYLOAD] * k, FAN, batch)


def _consumer_main(t: T.Transport, batch: int, conn: Any) -> None:
    H.pin(1)
    end = t.receiver()
    conn.send("ready")
    count = t.recv_until_stop_batched(end, batch) if batch > 1 else t.recv_until_stop(end)
    conn.send((count, time.perf_counter()))
    t.close_end(end)


def _stop_consumers(t: T.Transport, end: Any, conns: List[Any]) -> List[Any]:
    """Send the stop messages; every consumer's (count, end time)."""
    if not isinstance(t, T.Zmq):
        # A shared queue: each consumer takes exactly one stop, its first.
        for _ in conns:
            t.send_stop(end)
        return [H.expect(c, "a consumer's end") for c in conns]
    # PUSH routes round-robin and may hand a stop to a consumer that already
    # stopped: keep sending until every consumer has reported.
    results, pending = [], list(conns)
    while pending:
        t.send_stop(end)
        for c in [c for c in pending if c.poll(0.001)]:
            results.append(c.recv())
            pending.remove(c)
    return results


def fan_out(t: T.Transport, n: int, batch: int) -> float:
    """Seconds for this process to deliver ``n`` messages to FAN child
    processes, until the last one has seen its stop message."""
    t.prepare()
    try:
        pipes = [H.CTX.Pipe() for _ in range(FAN)]
        with H.children(_consumer_main, [(t, batch, c) for _, c in pipes]):
            for _, child in pipes:
                child.close()
            end = t.sender()
            try:
                for parent, _ in pipes:
                    H.expect(parent, "ready")
                msgs = [PAYLOAD] * n
                t0 = time.perf_counter()
                if batch > 1:
                    t.send_batched(end, msgs, batch)
                else:
                    t.send(end, msgs)
                results = _stop_consumers(t, end, [parent for parent, _ in pipes])
            finally:
                t.close_end(end)
        got = sum(r[0] for r in results)
        if got != n:
            raise H.BenchError(f"consumers received {got} messages, expected {n}")
        return max(r[1] for r in results) - t0
    finally:
        t.cleanup()


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("-n", "--count", type=int, default=100_000, help="messages per measurement (100000)")
    args = p.parse_args()
    n = 2_000 if args.quick else args.count
    repeats = args.repeats or (1 if args.quick else 5)
    H.setup(args)
    cases = []
    for label, run_fan, bind in (("fan-in 4->1", fan_in, "receiver"), ("fan-out 1->4", fan_out, "sender")):
        for mode in ("single", "batched"):
            workload = f"64 B {label} {mode}"
            transports: List[T.Transport] = [T.ShmqRing("raw", multi=True), T.MpQueue("raw")]
            if H.library_available("faster_fifo"):
                transports.append(T.FasterFifo("raw"))
            if H.library_available("zmq") and mode == "single":
                transports.append(T.Zmq("raw", bind=bind))
            for t in transports:
                if mode == "batched" and not t.batched and t.name != H.BASELINE:
                    continue
                batch = BATCH if (mode == "batched" and t.batched) else 1

                def run(t=t, batch=batch, run_fan=run_fan) -> float:
                    return n / run_fan(t, n, batch)

                cases.append(H.Case(workload, t.name, run, "msg/s"))
    H.measure(cases, repeats)
    H.report("fan", H.rows("fan", cases), args.json)


if __name__ == "__main__":
    main()

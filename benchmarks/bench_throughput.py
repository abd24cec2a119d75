"""Throughput, one producer process -> one consumer process: how many small
messages per second can a process hand to another?

Workloads: 64-byte ``bytes`` and a small tuple ``(7, 2.5, "shmq", b"xy")``,
one call per message ("single") and in batches of 256 ("batched").  shmq is a
single-producer/single-consumer ``shmq.Ring`` (``write``/``read``,
``write_many``/``read_many``; tuples pickled by the caller).  Baselines in the
same run: ``multiprocessing.Queue`` (always), faster-fifo (``put``/``get``,
``put_many``/``get_many``), pyzmq PUSH/PULL over ipc:// and iceoryx2 when
installed, and the floors: ``os.pipe`` for 64-byte bytes, and
``pickle.dumps`` + ``pickle.loads`` in one process for tuples (what any
pickling transport pays).  The producer runs on core 0 and the consumer on
core 1 where the machine allows.  Reported: messages/s, median of the
interleaved repeats, and the ratio to mp.Queue.
"""
from __future__ import annotations

import pickle
import time

import _harness as H
import _transports as T

TUPLE = (7, 2.5, "shmq", b"xy")
BATCH = 256


def pickle_floor(n: int):
    def run() -> float:
        dumps, loads = pickle.dumps, pickle.loads
        t0 = time.perf_counter()
        for _ in range(n):
            loads(dumps(TUPLE, 5))
        return n / (time.perf_counter() - t0)

    return run


def cases(n: int, warmup: int):
    out = []
    for kind, label, payload in (("raw", "64 B bytes", b"x" * 64), ("obj", "small tuple", TUPLE)):
        msgs = [payload] * n
        warm = [payload] * warmup
        for mode in ("single", "batched"):
            workload = f"{label} 1->1 {mode}"
            transports = T.peers(kind)
            if kind == "raw":
                transports.append(T.Pipe(kind))
            for t in transports:
                if mode == "batched" and not t.batched and t.name != H.BASELINE:
                    continue  # mp.Queue stays as the baseline, one at a time
                batch = BATCH if (mode == "batched" and t.batched) else 1

                def run(t=t, batch=batch, msgs=msgs, warm=warm) -> float:
                    return n / T.one_to_one(t, msgs, warm, batch)

                out.append(H.Case(workload, t.name, run, "msg/s"))
            if kind == "obj" and mode == "single":
                out.append(H.Case(workload, "floor: pickle dumps+loads", pickle_floor(n), "msg/s"))
    return out


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("-n", "--count", type=int, default=100_000, help="messages per measurement (100000)")
    args = p.parse_args()
    n = 2_000 if args.quick else args.count
    repeats = args.repeats or (1 if args.quick else 5)
    H.setup(args)
    cs = cases(n, min(n, 10_000))
    H.measure(cs, repeats)
    H.report("throughput", H.rows("throughput", cs), args.json)


if __name__ == "__main__":
    main()

"""Per-call cost of the ring's hot path in one process (no peer, no waiting).

    PYTHONPATH=. python tools/bench_hot_path.py [--rounds 7] [--n 200000]

Prints the best of ``--rounds`` runs, in nanoseconds per call, of
``Queue.put`` and ``Queue.get`` of a small tuple and ``Ring.try_write`` /
``Ring.try_read`` of 64 bytes.  Best-of, because the machine is shared:
the minimum is the run least disturbed by others.
"""
from __future__ import annotations

import argparse
import time

import shmq


def _best(fn, n, rounds):
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    n, rounds = args.n, args.rounds
    batch = 1000  # items in the ring at once: far below its capacity
    item = (1, "two", 3.0)
    q = shmq.Queue()
    ring = shmq.Ring.create(1 << 20)
    rec = b"x" * 64
    try:
        put, get = q.put, q.get
        try_write, try_read = ring.try_write, ring.try_read

        def puts(n):
            for _ in range(n // batch):
                for _ in range(batch):
                    put(item)
                for _ in range(batch):
                    get()

        def writes(n):
            for _ in range(n // batch):
                for _ in range(batch):
                    try_write(rec)
                for _ in range(batch):
                    try_read()

        # put+get and write+read are timed together; the split comes from
        # timing the second half alone on a filled queue
        def gets_only(n):
            t = 0
            for _ in range(n // batch):
                for _ in range(batch):
                    put(item)
                t0 = time.perf_counter_ns()
                for _ in range(batch):
                    get()
                t += time.perf_counter_ns() - t0
            return t

        def reads_only(n):
            t = 0
            for _ in range(n // batch):
                for _ in range(batch):
                    try_write(rec)
                t0 = time.perf_counter_ns()
                for _ in range(batch):
                    try_read()
                t += time.perf_counter_ns() - t0
            return t

        both_q = _best(puts, n, rounds)
        both_r = _best(writes, n, rounds)
        get_ns = min(gets_only(n) / n for _ in range(rounds))
        read_ns = min(reads_only(n) / n for _ in range(rounds))
        print(f"Queue.put      {both_q - get_ns:7.0f} ns")
        print(f"Queue.get      {get_ns:7.0f} ns")
        print(f"Ring.try_write {both_r - read_ns:7.0f} ns")
        print(f"Ring.try_read  {read_ns:7.0f} ns")
    finally:
        q.close()
        ring.close()
        ring.unlink()


if __name__ == "__main__":
    main()

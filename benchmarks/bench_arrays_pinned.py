"""Large float32 arrays between two processes, by placement: how many 16 MiB
and 64 MiB arrays per second reach another process, when both run on one
core, on two cores, or wherever the scheduler puts them?

Each measurement starts from a fresh transport (so a pool's first round --
page faults, or the pre-faulting that replaces them -- is part of it, as in
a program that moves a handful of arrays): the producer sends ``count``
arrays, the consumer drops each at once (reading one element).
Transports: ``shmq.Queue.put(array)`` / ``get()`` (through the queue's slot
pool: one copy in, a zero-copy view out), a shmq channel's
``loan_array`` + ``numpy.copyto`` (the array is written into the slot, only
its index travels), and ``multiprocessing.Queue``.  Placements:
``one-core`` (both on the first CPU), ``cross-core`` (producer on the first,
consumer on the second), ``unpinned``.  Every repeat runs every (size,
placement, transport) once, interleaved.  Reported: arrays/s (median over
the repeats, min and max) and the ratio to mp.Queue in the same placement.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

import _harness as H
import shmq

MiB = 1 << 20
SIZES = ((16 * MiB, 40), (64 * MiB, 11))
PLACEMENTS = ("one-core", "cross-core", "unpinned")


def _place(placement: str, role: str) -> None:
    cores = H._CORES
    if placement == "unpinned" or len(cores) < 2:
        os.sched_setaffinity(0, cores)
    elif placement == "one-core":
        os.sched_setaffinity(0, {cores[0]})
    else:
        os.sched_setaffinity(0, {cores[0] if role == "producer" else cores[1]})


# -- transports: make() in the parent -> (handle for the child, produce, receive, close)


def _queue() -> Tuple[Any, Callable[[np.ndarray], None], Callable[[Any], None], Callable[[], None]]:
    q = shmq.Queue()

    def receive(q: Any) -> None:
        a = q.get(timeout=120)
        a[0]
        del a

    return q, (lambda a: q.put(a, timeout=120)), receive, q.close


def _channel_loan(size: int):
    tx, rx = shmq.open_channel(1 << 16, slot_size=size, slot_count=8, multi_producer=False, multi_consumer=False)

    def produce(src: np.ndarray) -> None:
        with tx.loan_array(src.shape, src.dtype, timeout=120) as a:
            np.copyto(a, src)

    def receive(rx: Any) -> None:
        a = rx.receive(timeout=120)
        a[0]
        del a

    def close() -> None:
        tx.unlink()
        tx.close()
        rx.close()

    return rx, produce, receive, close


def _mp_queue():
    q = H.CTX.Queue()

    def receive(q: Any) -> None:
        q.get(timeout=120)[0]

    def close() -> None:
        q.close()
        q.join_thread()

    return q, (lambda a: q.put(a)), receive, close


TRANSPORTS: Dict[str, Callable[[int], Any]] = {
    "shmq Queue.put": lambda size: _queue(),
    "shmq channel loan_array": _channel_loan,
    "mp.Queue": lambda size: _mp_queue(),
}


def _consume(handle: Any, receive: Callable[[Any], None], count: int, placement: str, conn: Any) -> None:
    _place(placement, "consumer")
    conn.send("ready")
    for _ in range(count):
        receive(handle)
    conn.send("done")


def arrays_per_second(transport: str, size: int, count: int, placement: str) -> float:
    handle, produce, receive, close = TRANSPORTS[transport](size)
    src = np.ones(size // 4, np.float32)
    before = os.sched_getaffinity(0)
    try:
        parent, child = H.CTX.Pipe()
        with H.children(_consume, [(handle, receive, count, placement, child)]):
            child.close()
            H.expect(parent, "ready")
            _place(placement, "producer")
            t0 = time.perf_counter()
            for _ in range(count):
                produce(src)
            H.expect(parent, "done")
            return count / (time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, before)
        close()


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("--placement", choices=PLACEMENTS, action="append", help="only these placements (repeatable)")
    args = p.parse_args()
    sizes = ((16 * MiB, 4),) if args.quick else SIZES
    repeats = args.repeats or (1 if args.quick else 3)
    H.setup(args)
    placements = args.placement or PLACEMENTS
    runs: Dict[Tuple[str, str, str], List[float]] = {}
    for rep in range(repeats):
        for size, count in sizes:
            for placement in placements:
                for name in TRANSPORTS:
                    n = max(2, count // 4) if name == "mp.Queue" else count  # mp.Queue is ~50x slower
                    try:
                        v = arrays_per_second(name, size, n, placement)
                    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                        if not args.json:
                            print(f"  {name} {size // MiB} MiB {placement}: failed: {exc!r}", flush=True)
                        continue
                    runs.setdefault((f"{size // MiB} MiB float32, {placement}", name, placement), []).append(v)
        if not args.json:
            print(f"  repeat {rep + 1}/{repeats} done", flush=True)
    results = []
    for (workload, name, placement), vals in runs.items():
        base = runs.get((workload, "mp.Queue", placement))
        med = statistics.median(vals)
        results.append({
            "bench": "arrays_pinned", "workload": workload, "transport": name, "unit": "arrays/s",
            "higher_is_better": True, "median": med, "min": min(vals), "max": max(vals), "repeats": len(vals),
            "vs_mp_queue": med / statistics.median(base) if base else None,
        })
    H.report("arrays_pinned", results, args.json)


if __name__ == "__main__":
    main()

"""A fresh slot pool's first round: what does pre-faulting cost at creation,
and what does it save on the first writes into each slot?

For a pool of 8 slots of 64 MiB (the fitted Queue default, 512 MiB), in one
process: the time ``SlotPool.create`` takes, then the time to allocate each
slot once and ``numpy.copyto`` a 64 MiB array into it (the first round), then
a second round (warm).  Modes: ``none`` (no pre-faulting: every page faults
in as the copy touches it), ``shipped`` (the first PREFAULT_SLOTS slots at
creation, each other slot by MADV_POPULATE_WRITE at its first allocation),
``all at creation``.  Reported: milliseconds, median over interleaved repeats.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import numpy as np

import _harness as H
from shmq import _slots
from shmq._slots import SlotPool

MiB = 1 << 20


def one_run(mode: str, slot_size: int, slots: int) -> Dict[str, float]:
    saved = (_slots.PREFAULT_SLOTS, _slots._POPULATE_OK)
    if mode == "none":
        _slots._POPULATE_OK = False
    elif mode == "all at creation":
        _slots.PREFAULT_SLOTS = slots
    try:
        t0 = time.perf_counter()
        pool = SlotPool.create(slot_size, slots)
        created = time.perf_counter() - t0
    finally:
        _slots.PREFAULT_SLOTS, _slots._POPULATE_OK = saved
    src = np.ones(slot_size // 4, np.float32)
    rounds: List[float] = []
    try:
        for _ in range(2):
            t0 = time.perf_counter()
            got = [pool.allocate(1, timeout=10)[0] for _ in range(slots)]
            for i in got:
                view = pool.view(i)
                np.copyto(np.frombuffer(view, np.float32), src)
                view.release()
            rounds.append(time.perf_counter() - t0)
            pool.abort(got)
    finally:
        pool.close()
        pool.unlink()
    return {"create": created * 1e3, "first round": rounds[0] * 1e3, "second round": rounds[1] * 1e3}


def main() -> None:
    p = H.parser(__doc__)
    args = p.parse_args()
    slot_size, slots = (16 * MiB, 4) if args.quick else (64 * MiB, 8)
    repeats = args.repeats or (1 if args.quick else 5)
    modes = ("none", "shipped", "all at creation")
    got: Dict[str, List[Dict[str, float]]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            got[m].append(one_run(m, slot_size, slots))
    results = []
    for m in modes:
        for what in ("create", "first round", "second round"):
            vals = [r[what] for r in got[m]]
            results.append({
                "bench": "pool_warmup", "workload": f"{slots} x {slot_size // MiB} MiB pool: {what}",
                "transport": f"pre-fault {m}", "unit": "ms", "higher_is_better": False,
                "median": statistics.median(vals), "min": min(vals), "max": max(vals), "repeats": len(vals),
                "vs_mp_queue": None,
            })
    results.sort(key=lambda r: r["workload"])
    H.report("pool_warmup", results, args.json)


if __name__ == "__main__":
    main()

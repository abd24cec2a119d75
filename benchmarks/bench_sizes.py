"""Throughput against message size, one producer process -> one consumer
process: where does each transport stop being bound by per-message cost and
start being bound by copying?

``bytes`` messages of 8 B to 16 MiB (powers of 8), one call per message:
shmq through a single-producer/single-consumer ``shmq.Ring`` (capacity four
messages, at least 1 MiB), ``multiprocessing.Queue`` (always), faster-fifo
and pyzmq PUSH/PULL over ipc:// (zero-copy from 64 KiB) when installed, and
``os.pipe`` with fixed-size messages (the kernel's floor).  Each measurement
moves about 16 MiB (at least 20 and at most 200,000 messages).  Processes
pinned to cores 0 and 1 where the machine allows.  Reported: payload MB/s
(median of the interleaved repeats) and the ratio to mp.Queue; ``shmq bench
--plot FILE.png`` draws these rows.
"""
from __future__ import annotations

from typing import List

import _harness as H
import _transports as T

SIZES = tuple(8**k for k in range(1, 9))  # 8 B .. 16 MiB


def label(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size // scale} {unit}"
    return f"{size} B"


def cases(sizes, budget: int) -> List[H.Case]:
    out = []
    for size in sizes:
        n = max(20, min(200_000, budget // size))
        payload = b"s" * size
        msgs, warm = [payload] * n, [payload] * min(n, 1_000)
        transports = T.peers("raw", size, capacity=max(1 << 20, 4 * (size + 16)))
        transports = [t for t in transports if not isinstance(t, T.Iceoryx2)]
        transports.append(T.Pipe("raw", size))
        for t in transports:

            def run(t=t, n=n, msgs=msgs, warm=warm, size=size) -> float:
                return n * size / T.one_to_one(t, msgs, warm) / 1e6

            out.append(H.Case(f"{label(size)} bytes 1->1", t.name, run, "MB/s", size=size))
    return out


def main() -> None:
    p = H.parser(__doc__)
    args = p.parse_args()
    sizes = (64, 1 << 16) if args.quick else SIZES
    repeats = args.repeats or (1 if args.quick else 3)
    H.setup(args)
    cs = cases(sizes, (1 << 18) if args.quick else (16 << 20))
    H.measure(cs, repeats)
    H.report("sizes", H.rows("sizes", cs), args.json)


if __name__ == "__main__":
    main()

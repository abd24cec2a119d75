"""Large numpy arrays, one producer process -> one consumer process: how many
1 MiB / 16 MiB / 64 MiB arrays per second reach the other process?

shmq, two ways through one single-producer/single-consumer ``shmq.Ring``:
"copy" (``write(array)``, ``numpy.frombuffer(read())``: one copy in, one
out) and "loan" (``reserve()`` a record, ``numpy.copyto`` the array into it,
``commit()``; the consumer views it in place with ``peek()`` and
``release()``: one copy in all, the one a producer computing its result in
place would pay anyway; the Ring has no blocking ``reserve``, so both sides
poll).  Baselines in the same run: ``multiprocessing.Queue`` (always),
faster-fifo and pyzmq PUSH/PULL over ipc:// (``copy=False``) when
installed, and the floor: ``numpy.copyto`` of the array in one process.
The consumer reads one byte at each end of every array.  Processes pinned to
cores 0 and 1 where the machine allows.  Reported: arrays/s (median of the
interleaved repeats) and the ratio to mp.Queue; the pool's zero-copy channel
is measured by bench_zero_copy.py.
"""
from __future__ import annotations

import time
from typing import Any, List

import numpy as np

import _harness as H
import _transports as T

MiB = 1 << 20
SIZES = ((1 * MiB, 2000), (16 * MiB, 100), (64 * MiB, 24))


class ShmqRingLoan(T.ShmqRing):
    """shmq.Ring with reserve()/commit() and peek()/release(): in place."""

    name = "shmq Ring loan"
    batched = False

    def send(self, end: Any, msgs: List[Any]) -> None:
        reserve, commit = end.reserve, end.commit
        for m in msgs:
            view = reserve(m.nbytes)
            while view is None:
                view = reserve(m.nbytes)
            np.copyto(np.frombuffer(view, np.uint8), m)
            view.release()
            commit()

    def recv(self, end: Any, n: int) -> Any:
        peek, release = end.peek, end.release
        total = 0
        for _ in range(n):
            view = peek()
            while view is None:
                view = peek()
            a = np.frombuffer(view, np.uint8)
            total += int(a[0]) + int(a[-1])
            del a
            view.release()
            release()
        return total


def _touch(t: T.Transport) -> None:
    """Make the consumer read both ends of each array it receives."""
    recv = t.recv

    def recv_touching(end: Any, n: int) -> Any:
        total = 0
        for _ in range(n):
            a = recv(end, 1)
            total += int(a[0]) + int(a[-1])
        return total

    t.recv = recv_touching  # type: ignore[method-assign]


def copy_floor(size: int, n: int):
    src = np.ones(size, np.uint8)
    dst = np.empty_like(src)

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            np.copyto(dst, src)
        return n / (time.perf_counter() - t0)

    return run


def cases(sizes) -> List[H.Case]:
    out = []
    for size, n in sizes:
        arr = np.ones(size, np.uint8)
        msgs, warm = [arr] * n, [arr] * 2
        workload = f"{size // MiB} MiB array 1->1"
        cap = 3 * size
        transports: List[T.Transport] = [
            T.ShmqRing("array", size, capacity=cap),
            ShmqRingLoan("array", size, capacity=cap),
            T.MpQueue("array", size),
        ]
        transports[0].name = "shmq Ring copy"
        if H.library_available("faster_fifo"):
            transports.append(T.FasterFifo("array", size, capacity=cap))
        if H.library_available("zmq"):
            transports.append(T.Zmq("array", size))
        for t in transports:
            if not isinstance(t, ShmqRingLoan):
                _touch(t)

            def run(t=t, n=n, msgs=msgs, warm=warm) -> float:
                return n / T.one_to_one(t, msgs, warm)

            out.append(H.Case(workload, t.name, run, "arrays/s", size=size))
        out.append(H.Case(workload, "floor: numpy copyto", copy_floor(size, n), "arrays/s", size=size))
    return out


def main() -> None:
    p = H.parser(__doc__)
    args = p.parse_args()
    sizes = ((1 * MiB, 10),) if args.quick else SIZES
    repeats = args.repeats or (1 if args.quick else 3)
    H.setup(args)
    cs = cases(sizes)
    H.measure(cs, repeats)
    H.report("arrays", H.rows("arrays", cs), args.json)


if __name__ == "__main__":
    main()

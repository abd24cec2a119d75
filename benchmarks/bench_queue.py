"""shmq.Queue as a drop-in for multiprocessing.Queue: how many small Python
objects per second does one producer process hand to one consumer process?

Workload: the tuples ``(i, "abc", 1.5)`` for i in range(N) (N = 1,000,000 by
default), sent through ``shmq.Queue`` with ``put``/``get`` ("single") and
with ``put_many``/``get_many`` in batches of 256 ("batched").  Baselines in
the same run, interleaved with it: ``multiprocessing.Queue`` (``put``/``get``),
faster-fifo (``put``/``get`` and ``put_many``/``get_many``) and pyzmq PUSH/PULL
over ipc:// with ``send_pyobj``/``recv_pyobj``, when installed.  Every
transport pickles in the producer and unpickles in the consumer, as a user's
program would.  The producer runs on core 0 and the consumer on core 1 (where
the machine has two).  Reported: items/s from the first timed put to the last
get, median of the repeats, and the ratio to mp.Queue.
"""
from __future__ import annotations

from typing import Any, List

import _harness as H
import _transports as T

import shmq

BATCH = 256


class ShmqQueue(T.Transport):
    """shmq.Queue, inherited by the forked consumer like an mp.Queue."""

    name = "shmq.Queue"
    kinds = ("obj",)
    batched = True

    def prepare(self) -> None:
        self.q = shmq.Queue()

    def sender(self) -> Any:
        return self.q

    receiver = sender

    def cleanup(self) -> None:
        self.q.close()  # the creating process: unlinks the queue

    def send(self, end: Any, msgs: List[Any]) -> None:
        put = end.put
        for m in msgs:
            put(m)

    def recv(self, end: Any, n: int) -> Any:
        get = end.get
        m = None
        for _ in range(n):
            m = get()
        return m

    def send_batched(self, end: Any, msgs: List[Any], batch: int) -> None:
        put_many = end.put_many
        for i in range(0, len(msgs), batch):
            put_many(msgs[i : i + batch])

    def recv_batched(self, end: Any, n: int, batch: int) -> Any:
        get_many = end.get_many
        got = 0
        m = None
        while got < n:
            items = get_many(min(batch, n - got))
            got += len(items)
            m = items[-1]
        return m


def transports() -> List[T.Transport]:
    out: List[T.Transport] = [ShmqQueue("obj"), T.MpQueue("obj")]
    if H.library_available("faster_fifo"):
        out.append(T.FasterFifo("obj"))
    if H.library_available("zmq"):
        out.append(T.Zmq("obj"))
    return out


def cases(n: int, warmup: int) -> List[H.Case]:
    msgs = [(i, "abc", 1.5) for i in range(n)]
    warm = msgs[:warmup]
    out = []
    for mode in ("single", "batched"):
        for t in transports():
            if mode == "batched" and not t.batched and t.name != H.BASELINE:
                continue  # mp.Queue stays as the baseline, one item at a time
            batch = BATCH if (mode == "batched" and t.batched) else 1

            def run(t: T.Transport = t, batch: int = batch) -> float:
                return n / T.one_to_one(t, msgs, warm, batch)

            out.append(H.Case(f"(i, 'abc', 1.5) 1->1 {mode}", t.name, run, "items/s"))
    return out


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("-n", "--count", type=int, default=1_000_000, help="items per measurement (1000000)")
    args = p.parse_args()
    n = 5_000 if args.quick else args.count
    repeats = args.repeats or (1 if args.quick else 3)
    H.pin(0)  # the producer; the consumer pins itself to core 1
    cs = cases(n, min(n, 20_000))
    H.measure(cs, repeats)
    H.report("queue", H.rows("queue", cs), args.json)


if __name__ == "__main__":
    main()

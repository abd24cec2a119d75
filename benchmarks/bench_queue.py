"""shmq.Queue as a drop-in for multiprocessing.Queue: how many small Python
objects per second does one producer process hand to one consumer process,
and four producer processes to one consumer?

Tuples workload (``--workloads tuples``): the tuples ``(i, "abc", 1.5)`` for i
in range(N) (N = 1,000,000 by default), sent through ``shmq.Queue`` with
``put``/``get`` ("single") and with ``put_many``/``get_many`` in batches of
256 ("batched").  Baselines in the same run, interleaved with it:
``multiprocessing.Queue`` (``put``/``get``), faster-fifo (``put``/``get`` and
``put_many``/``get_many``) and pyzmq PUSH/PULL over ipc:// with
``send_pyobj``/``recv_pyobj``, when installed.  Every transport pickles in the
producer and unpickles in the consumer, as a user's program would.  The
producer runs on core 0 and the consumer on core 1 (where the machine has
two).  Reported: items/s from the first timed put to the last get (after an
untimed warm-up of 20,000 items), median of the repeats, and the ratio to
mp.Queue.

Fan-in workload (``--workloads fanin``): the same tuples and transports, four
producer processes -> one consumer process, N // 4 tuples from each
(producer p sends i in [p * N // 4, (p + 1) * N // 4)), "single" and
"batched" as above; pyzmq's PULL side binds and the four PUSH sockets
connect.  The consumer runs on core 0 and the four producers share core 1
(where the machine has two).  Items/s counts the items of all producers,
from the first producer's first put to the consumer's last get (no warm-up
batch).  The consumer keeps each item's i and afterwards checks, for every
producer, that it got each of its items exactly once and its last one last:
a measurement that fails the check is reported as an error, not a rate.

Arrays workload (``--workloads arrays``): float32 numpy arrays of 1 and 16
MiB, ``put``/``get`` one at a time, the consumer reading one element of
each.  ``shmq.Queue()`` with default settings (its slot pool fits its 8
slots to the first array: one copy into a slot, read in place), the same with
``zero_copy=False`` (pickled through the side path, as before the pool), and
``multiprocessing.Queue``, in the same run.  Unlike the tuples, the arrays
run unpinned: each process may use both cores, as in a user's program
(shmq.Queue splits copies of 8 MiB and more with a helper thread; mp.Queue's
feeder thread pickles and writes the pipe).

All three workloads run by default.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Tuple

import _harness as H
import _transports as T
import numpy as np

import shmq

BATCH = 256
FAN = 4
MiB = 1 << 20
ARRAY_MIB = (1, 16)
#: arrays per measurement, by transport and size in MiB (about a second each on a 2-core VM)
ARRAY_COUNTS = {
    "shmq.Queue": {1: 10_000, 16: 1_000},
    "shmq.Queue zero_copy=False": {1: 2_000, 16: 100},
    "mp.Queue": {1: 2_000, 16: 60},
}


class ShmqQueue(T.MpQueue):
    """shmq.Queue, inherited by the forked consumer like an mp.Queue (same
    put/get loops as the mp.Queue transport), plus put_many/get_many."""

    name = "shmq.Queue"
    kinds = ("obj",)
    batched = True

    def prepare(self) -> None:
        self.q = shmq.Queue()

    def cleanup(self) -> None:
        self.q.close()  # the creating process: unlinks the queue

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

    def batch_getter(self, end: Any) -> Callable[[int], List[Any]]:
        return end.get_many


def _recv_arrays(end: Any, n: int) -> None:
    get = end.get
    for _ in range(n):
        get()[0]


class ShmqQueueArrays(ShmqQueue):
    """shmq.Queue with default settings moving arrays: through its slot pool
    (which fits its slots to the first array), or with ``zero_copy=False``
    through the side path."""

    kinds = ("array",)
    batched = False

    def __init__(self, kind: str, msg_size: int, zero_copy: bool = True) -> None:
        super().__init__(kind, msg_size)
        self.zero_copy = zero_copy
        self.name = "shmq.Queue" if zero_copy else "shmq.Queue zero_copy=False"

    def prepare(self) -> None:
        self.q = shmq.Queue(zero_copy=self.zero_copy)

    def recv(self, end: Any, n: int) -> Any:
        _recv_arrays(end, n)


class MpQueueArrays(T.MpQueue):
    def recv(self, end: Any, n: int) -> Any:
        _recv_arrays(end, n)


def array_cases(quick: bool) -> List[H.Case]:
    out = []
    for mib in ARRAY_MIB:
        size = mib * MiB
        src = np.ones(size // 4, np.float32)
        for t in (ShmqQueueArrays("array", size), ShmqQueueArrays("array", size, False), MpQueueArrays("array", size)):
            n = 4 if quick else ARRAY_COUNTS[t.name][mib]
            warm = [src] * (2 if quick else 4 if t.name == H.BASELINE else 16)

            def run(t: T.Transport = t, msgs: List[Any] = [src] * n, warm: List[Any] = warm) -> float:
                return len(msgs) / T.one_to_one(t, msgs, warm, pinned=False)

            out.append(H.Case(f"{mib} MiB float32 array 1->1", t.name, run, "arrays/s"))
    return out


def transports() -> List[T.Transport]:
    out: List[T.Transport] = [ShmqQueue("obj"), T.MpQueue("obj")]
    if H.library_available("faster_fifo"):
        out.append(T.FasterFifo("obj"))
    if H.library_available("zmq"):
        out.append(T.Zmq("obj"))
    return out


def modes() -> Iterator[Tuple[str, T.Transport, int]]:
    """(mode, transport, batch size) for the tuple workloads: every transport
    one item at a time ("single"), then the ones with put_many/get_many in
    batches ("batched"; mp.Queue stays as the baseline, one item at a time)."""
    for mode in ("single", "batched"):
        for t in transports():
            if mode == "single" or t.batched or t.name == H.BASELINE:
                yield mode, t, (BATCH if (mode == "batched" and t.batched) else 1)


def cases(n: int, warmup: int) -> List[H.Case]:
    msgs = [(i, "abc", 1.5) for i in range(n)]
    warm = msgs[:warmup]
    out = []
    for mode, t, batch in modes():
        def run(t: T.Transport = t, batch: int = batch) -> float:
            return n / T.one_to_one(t, msgs, warm, batch)

        out.append(H.Case(f"(i, 'abc', 1.5) 1->1 {mode}", t.name, run, "items/s"))
    return out


def _receive_ids(t: T.Transport, batch: int, ids: List[int]) -> Callable[[Any, int], None]:
    """A fan-in receive loop that keeps each tuple's i in ``ids`` (the same
    loop for every transport; one list append per item)."""

    def receive(end: Any, n: int) -> None:
        if batch > 1:
            get_many = t.batch_getter(end)
            got = 0
            while got < n:
                items = get_many(min(batch, n - got))
                got += len(items)
                ids.extend([m[0] for m in items])
        else:
            get, append = t.getter(end), ids.append
            for _ in range(n):
                append(get()[0])

    return receive


def check_fan_in(ids: List[int], n_each: int, producers: int = FAN) -> None:
    """Raise BenchError unless ``ids`` holds each producer's i exactly once,
    with its last i received last."""
    got = np.asarray(ids, dtype=np.int64)
    total = n_each * producers
    if got.size != total or (total and (got.min() < 0 or got.max() >= total)):
        raise H.BenchError(f"received {got.size} items (expected {total}), or an i out of range")
    who = got // n_each
    for p in range(producers):
        mine = got[who == p]
        lo, hi = p * n_each, (p + 1) * n_each
        if mine.size != n_each or not np.array_equal(np.sort(mine), np.arange(lo, hi)):
            raise H.BenchError(f"producer {p}: {mine.size} items, not each of its {n_each} exactly once")
        if n_each and mine[-1] != hi - 1:
            raise H.BenchError(f"producer {p}: last item received was i={mine[-1]}, not its last, i={hi - 1}")


def fan_in_cases(n: int) -> List[H.Case]:
    n_each = n // FAN

    def make(p: int) -> List[Any]:
        return [(i, "abc", 1.5) for i in range(p * n_each, (p + 1) * n_each)]

    out = []
    for mode, t, batch in modes():
        def run(t: T.Transport = t, batch: int = batch) -> float:
            ids: List[int] = []
            seconds = T.fan_in(t, n_each, make, FAN, batch, _receive_ids(t, batch, ids))
            check_fan_in(ids, n_each)
            return n_each * FAN / seconds

        out.append(H.Case(f"(i, 'abc', 1.5) fan-in {FAN}->1 {mode}", t.name, run, "items/s"))
    return out


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument(
        "-n",
        "--count",
        type=int,
        default=1_000_000,
        help="tuples per measurement; fan-in: all four producers together (1000000)",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=("tuples", "fanin", "arrays"),
        default=["tuples", "fanin", "arrays"],
        help="small tuples 1->1, small tuples fan-in 4->1, 1 and 16 MiB numpy arrays (all three)",
    )
    args = p.parse_args()
    n = 5_000 if args.quick else args.count
    repeats = args.repeats or (1 if args.quick else 3)
    H.setup(args)  # --timeout; pins this process (1->1 producer, fan-in consumer) to core 0
    cs = cases(n, min(n, 20_000)) if "tuples" in args.workloads else []
    if "fanin" in args.workloads:
        cs += fan_in_cases(n)
    if "arrays" in args.workloads:
        cs += array_cases(args.quick)
    H.measure(cs, repeats)
    H.report("queue", H.rows("queue", cs), args.json)


if __name__ == "__main__":
    main()

"""Large float32 arrays between two processes, by placement: how many 1, 16
and 64 MiB arrays per second reach another process, when both run on one
core, on two cores, or wherever the scheduler puts them?

Each measurement starts from a fresh transport (so a pool's first round --
page faults, or the pre-faulting that replaces them -- is part of it, as in
a program that moves a handful of arrays): the producer sends one untimed
array (a Queue makes its slot pool at its first large put, a channel when it
is opened: neither is timed), then ``count`` timed arrays; the consumer
drops each at once (reading one element).
Transports: ``shmq.Queue.put(array)`` / ``get()`` (through the queue's slot
pool: one copy in, a zero-copy view out), ``Queue.loan_array`` +
``numpy.copyto`` + ``Queue.put`` of the loaned array (written into the
slot, only its index travels), the same with the loan written in place
(one element: what the queue costs per array, with the data made where it
travels; mp.Queue's arrays are likewise made before the clock starts), a
shmq channel's ``loan_array`` +
``numpy.copyto`` (likewise), iceoryx2 publish-subscribe of a ``uint8``
slice (``loan_slice_uninit`` + ``numpy.copyto`` + ``send``; the subscriber
polls, yielding the CPU between empty polls, and drops each sample), and
``multiprocessing.Queue``.  Two rows run in ONE process, as ceilings: the
channel's loan + copyto + send + receive loop, and a bare ``numpy.copyto``
of the array into one warm buffer (what one copy costs: the bound of
``Queue.put``, which must copy the caller's array once).  Placements:
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
SIZES = ((1 * MiB, 400), (16 * MiB, 40), (64 * MiB, 11))
PLACEMENTS = ("one-core", "cross-core", "unpinned")


def _place(placement: str, role: str) -> None:
    cores = H._CORES
    if placement == "unpinned" or len(cores) < 2:
        os.sched_setaffinity(0, cores)
    elif placement == "one-core":
        os.sched_setaffinity(0, {cores[0]})
    else:
        os.sched_setaffinity(0, {cores[0] if role == "producer" else cores[1]})


# -- transports: make() in the parent -> (handle for the child, produce, receive, close[, start])
# ``start()``, if given, runs in the parent after the consumer is ready, untimed.
# One-process rows (LOCAL): make() -> (step, close); step(src) moves one array.


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


def _queue_loan() -> Tuple[Any, Callable[[np.ndarray], None], Callable[[Any], None], Callable[[], None]]:
    q = shmq.Queue()

    def produce(src: np.ndarray) -> None:
        a = q.loan_array(src.shape, src.dtype, timeout=120)
        np.copyto(a, src)
        q.put(a, timeout=120)

    def receive(q: Any) -> None:
        a = q.get(timeout=120)
        a[0]
        del a

    return q, produce, receive, q.close


def _queue_loan_in_place() -> Tuple[Any, Callable[[np.ndarray], None], Callable[[Any], None], Callable[[], None]]:
    """A loan the producer writes in place -- here one element, standing for
    data it computes straight into the array -- so the row shows what the
    queue itself costs per array, as the mp.Queue row does (its arrays are
    made before the clock starts)."""
    q = shmq.Queue()

    def produce(src: np.ndarray) -> None:
        a = q.loan_array(src.shape, src.dtype, timeout=120)
        a[0] = src[0]
        q.put(a, timeout=120)

    def receive(q: Any) -> None:
        a = q.get(timeout=120)
        a[0]
        del a

    return q, produce, receive, q.close


def _iceoryx2(size: int):
    """iceoryx2 0.10 publish-subscribe of ``Slice[c_uint8]``: the publisher
    is made in the parent once the subscriber exists (``start``)."""
    import ctypes

    import iceoryx2 as iox2
    from iceoryx2.slice import Slice

    service_name = f"shmq/bench/arrays/{os.getpid()}/{time.monotonic_ns()}"
    state: Dict[str, Any] = {}

    def service() -> Tuple[Any, Any]:
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        svc = (
            node.service_builder(iox2.ServiceName.new(service_name))
            .publish_subscribe(Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)
            .open_or_create()
        )
        return node, svc

    def start() -> None:
        node, svc = service()
        pub = (
            svc.publisher_builder()
            .initial_max_slice_len(size)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        state.update(node=node, svc=svc, pub=pub, kind=ctypes.c_uint8 * size)

    def produce(src: np.ndarray) -> None:
        sample = state["pub"].loan_slice_uninit(size)
        np.copyto(np.frombuffer(state["kind"].from_address(sample.payload_ptr), src.dtype), src.reshape(-1))
        sample.assume_init().send()

    def subscribe() -> None:
        node, svc = service()
        state.update(node=node, svc=svc, sub=svc.subscriber_builder().create())

    def receive(_: Any) -> None:
        sub = state["sub"]
        while True:
            sample = sub.receive()
            if sample is not None:
                break
            os.sched_yield()  # a pure busy poll starves a producer on the same core
        del sample

    def close() -> None:
        state.clear()

    receive.setup = subscribe  # type: ignore[attr-defined]  # before "ready": a sample sent to nobody is lost
    receive.teardown = close  # type: ignore[attr-defined]  # drop the subscriber's node: iceoryx2 removes its files
    return None, produce, receive, close, start


def _local_loan(size: int):
    """One process: the channel's loan + copyto + send, then receive and drop."""
    tx, rx = shmq.open_channel(1 << 16, slot_size=size, slot_count=8, multi_producer=False, multi_consumer=False)

    def step(src: np.ndarray) -> None:
        with tx.loan_array(src.shape, src.dtype, timeout=120) as a:
            np.copyto(a, src)
        a = rx.receive(timeout=120)
        a[0]
        del a

    def close() -> None:
        tx.unlink()
        tx.close()
        rx.close()

    return step, close


def _local_copyto(size: int):
    """One process: numpy.copyto of the array into one warm buffer."""
    dst = np.zeros(size // 4, np.float32)
    return (lambda src: np.copyto(dst, src)), (lambda: None)


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
    "shmq Queue.put of a loaned array": lambda size: _queue_loan(),
    "shmq Queue.put of a loaned array, written in place": lambda size: _queue_loan_in_place(),
    "shmq channel loan_array": _channel_loan,
    "iceoryx2 loan+copyto": _iceoryx2,
    "mp.Queue": lambda size: _mp_queue(),
    "one process: channel loan+copyto+receive": _local_loan,
    "one process: numpy.copyto": _local_copyto,
}
LOCAL = {"one process: channel loan+copyto+receive", "one process: numpy.copyto"}
OPTIONAL = {"iceoryx2 loan+copyto": "iceoryx2"}


def _consume(handle: Any, receive: Callable[[Any], None], count: int, placement: str, conn: Any) -> None:
    _place(placement, "consumer")
    setup = getattr(receive, "setup", None)
    if setup is not None:
        setup()
    conn.send("ready")
    receive(handle)  # the untimed first array
    conn.send("warm")
    for _ in range(count):
        receive(handle)
    conn.send("done")
    teardown = getattr(receive, "teardown", None)
    if teardown is not None:  # a child ends in os._exit: nothing it holds is ever collected
        teardown()


def _local_per_second(transport: str, size: int, count: int, placement: str) -> float:
    step, close = TRANSPORTS[transport](size)
    src = np.ones(size // 4, np.float32)
    before = os.sched_getaffinity(0)
    try:
        _place(placement, "producer")
        step(src)  # untimed, as in the two-process rows
        t0 = time.perf_counter()
        for _ in range(count):
            step(src)
        return count / (time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, before)
        close()


def arrays_per_second(transport: str, size: int, count: int, placement: str) -> float:
    if transport in LOCAL:
        return _local_per_second(transport, size, count, placement)
    made = TRANSPORTS[transport](size)
    handle, produce, receive, close = made[:4]
    src = np.ones(size // 4, np.float32)
    before = os.sched_getaffinity(0)
    try:
        parent, child = H.CTX.Pipe()
        with H.children(_consume, [(handle, receive, count, placement, child)]):
            child.close()
            H.expect(parent, "ready")
            if len(made) > 4:
                made[4]()
            _place(placement, "producer")
            produce(src)  # untimed: a Queue makes its pool at its first large put
            H.expect(parent, "warm")
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
    p.add_argument("--only", action="append", help="only transports whose name contains this (repeatable)")
    p.add_argument("--size", type=int, action="append", help="only these sizes in MiB (1, 16, 64; repeatable)")
    args = p.parse_args()
    sizes = ((16 * MiB, 4),) if args.quick else SIZES
    if args.size:
        sizes = tuple((size, count) for size, count in SIZES if size // MiB in args.size)
    names = [
        n for n in TRANSPORTS
        if (not args.only or n == "mp.Queue" or any(o in n for o in args.only))
        and (n not in OPTIONAL or H.library_available(OPTIONAL[n]))
    ]  # fmt: skip
    repeats = args.repeats or (1 if args.quick else 3)
    H.setup(args)
    placements = args.placement or PLACEMENTS
    runs: Dict[Tuple[str, str, str], List[float]] = {}
    for rep in range(repeats):
        for size, count in sizes:
            for placement in placements:
                for name in names[rep % len(names):] + names[: rep % len(names)]:  # rotating start
                    n = max(2, count // 4) if name == "mp.Queue" else count  # mp.Queue is ~50x slower
                    if "in place" in name:
                        n = count * 10  # no copy: ~10-50x faster than the others
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
    for r in results:  # the ratios: loan paths against iceoryx2 and the one-process loop
        workload = r["workload"]
        for key, ref in (
            ("vs_iceoryx2", "iceoryx2 loan+copyto"),
            ("vs_one_process_loop", "one process: channel loan+copyto+receive"),
        ):
            base = runs.get((workload, ref, _placement_of(workload)))
            r[key] = r["median"] / statistics.median(base) if base else None
    H.report("arrays_pinned", results, args.json)
    if not args.json:
        print("\nratios (median / median): vs iceoryx2, vs the one-process loan loop")
        for r in results:
            if r["vs_iceoryx2"] is not None:
                print(
                    f"  {r['workload']:<28} {r['transport']:<42} {r['median']:>9.1f}/s"
                    f"  {r['vs_iceoryx2']:5.2f}x  {(r['vs_one_process_loop'] or 0):5.2f}x"
                )


def _placement_of(workload: str) -> str:
    return workload.rsplit(", ", 1)[1]


if __name__ == "__main__":
    main()

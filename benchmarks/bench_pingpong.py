"""64-byte ping-pong between two processes, by placement: how long does a
hand-off take when the partner runs on the same core, on another core, or
wherever the scheduler puts it?

The parent sends 64 bytes, the child sends them back; one round trip is two
hand-offs.  Placements: ``one-core`` (both processes pinned to the first CPU
of the affinity mask: the partner can only run when the waiter gives the
CPU up), ``cross-core`` (parent on the first CPU, child on the second) and
``unpinned``.  Transports: ``shmq.Queue`` and single-producer/single-consumer
``shmq.Ring`` (blocking ``put``/``get``, ``write``/``read``: shmq's wait loop),
and the baselines ``multiprocessing.Queue`` and ``multiprocessing.SimpleQueue``,
plus pyzmq (PAIR over ipc://), faster-fifo and iceoryx2 (publish-subscribe,
polling subscriber) where installed.  Every repeat runs every (placement,
transport) once, interleaved, after one untimed warm-up round; reported per
pair: the median over the repeats of each run's median and 99th percentile
round trip (microseconds), the spread of the run medians (the noise), and
the speed-up over mp.Queue.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import _harness as H
import shmq

PAYLOAD = b"p" * 64
PLACEMENTS = ("one-core", "cross-core", "unpinned")
#: seconds of timed round trips per measurement at most (at least 100 round trips)
MAX_SECONDS = 3.0


# -- transports: (parent end, child end) of a two-way link -------------------
# A link is made in the parent before the fork; ``end(role)`` runs in the
# process that uses that end and returns (send, recv, close).


class Link:
    name = "?"

    def end(self, role: str) -> Tuple[Callable[[bytes], Any], Callable[[], Any], Callable[[], None]]:
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


class ShmqQueueLink(Link):
    name = "shmq Queue"

    def __init__(self) -> None:
        self.q = (shmq.Queue(), shmq.Queue())

    def end(self, role):
        a, b = self.q if role == "parent" else self.q[::-1]
        return a.put, b.get, lambda: None

    def cleanup(self) -> None:
        for q in self.q:
            q.close()


class ShmqRingLink(Link):
    name = "shmq Ring"

    def __init__(self) -> None:
        self.r = tuple(shmq.Ring.create(1 << 16, multi_producer=False, multi_consumer=False) for _ in "ab")

    def end(self, role):
        a, b = self.r if role == "parent" else self.r[::-1]
        return a.write, b.read, lambda: None

    def cleanup(self) -> None:
        for r in self.r:
            r.close()
            r.unlink()


class MpQueueLink(Link):
    name = "mp.Queue"

    def __init__(self) -> None:
        self.q = (H.CTX.Queue(), H.CTX.Queue())

    def end(self, role):
        a, b = self.q if role == "parent" else self.q[::-1]
        return a.put, b.get, lambda: None

    def cleanup(self) -> None:
        for q in self.q:
            q.close()
            q.join_thread()


class MpSimpleQueueLink(MpQueueLink):
    name = "mp.SimpleQueue"

    def __init__(self) -> None:
        self.q = (H.CTX.SimpleQueue(), H.CTX.SimpleQueue())

    def cleanup(self) -> None:
        for q in self.q:
            q.close()


class FasterFifoLink(Link):
    name = "faster-fifo"

    def __init__(self) -> None:
        import faster_fifo

        self.q = (faster_fifo.Queue(1 << 16), faster_fifo.Queue(1 << 16))

    def end(self, role):
        a, b = self.q if role == "parent" else self.q[::-1]
        return a.put, lambda: b.get(timeout=60), lambda: None


class ZmqLink(Link):
    name = "pyzmq"

    def __init__(self) -> None:
        import tempfile

        base = tempfile.mktemp(prefix="shmq-pp-")
        self.addr = (f"ipc://{base}-a", f"ipc://{base}-b")

    def end(self, role):
        import zmq

        ctx = zmq.Context()
        out = ctx.socket(zmq.PUSH)
        inn = ctx.socket(zmq.PULL)
        a, b = self.addr if role == "parent" else self.addr[::-1]
        if role == "parent":
            out.bind(a)
            inn.bind(b)
        else:
            out.connect(a)
            inn.connect(b)

        def close() -> None:
            out.close(0)
            inn.close(0)
            ctx.term()

        return out.send, inn.recv, close

    def cleanup(self) -> None:
        for a in self.addr:
            try:
                os.unlink(a[len("ipc://"):])
            except OSError:
                pass


class IceoryxLink(Link):
    name = "iceoryx2"

    def __init__(self) -> None:
        import _transports as T

        self.t = (T.Iceoryx2("raw"), T.Iceoryx2("raw"))
        for t in self.t:
            t.prepare()

    def end(self, role):
        a, b = self.t if role == "parent" else self.t[::-1]
        tx, rx = a.sender(), b.receiver()
        return (lambda m: a.send(tx, (m,))), (lambda: b.recv(rx, 1)), lambda: None


def links() -> List[type]:
    out: List[type] = [ShmqQueueLink, ShmqRingLink, MpQueueLink, MpSimpleQueueLink]
    for module, cls in (("zmq", ZmqLink), ("faster_fifo", FasterFifoLink), ("iceoryx2", IceoryxLink)):
        if H.library_available(module):
            out.append(cls)
    return out


# -- one measurement ----------------------------------------------------------


def _place(placement: str, role: str) -> None:
    cores = H._CORES  # (the affinity at start: the parent pins itself to core 0 later)
    if placement == "unpinned" or len(cores) < 2:
        os.sched_setaffinity(0, cores)
    elif placement == "one-core":
        os.sched_setaffinity(0, {cores[0]})
    else:
        os.sched_setaffinity(0, {cores[0] if role == "parent" else cores[1]})


def _echo_main(link: Link, placement: str, limit: Any, conn: Any) -> None:
    _place(placement, "child")
    send, recv, close = link.end("child")
    conn.send("ready")
    done = 0
    while done < limit.value:  # the parent may lower it (see round_trips)
        send(recv())
        done += 1
    close()


def round_trips(cls: type, placement: str, n: int, warmup: int) -> List[float]:
    """Round-trip times (microseconds) of ``n`` ping-pongs after ``warmup``."""
    link = cls()
    before = os.sched_getaffinity(0)
    try:
        parent, child = H.CTX.Pipe()
        limit = H.CTX.RawValue("q", n + warmup)  # echoes the child makes
        with H.children(_echo_main, [(link, placement, limit, child)]):
            child.close()
            H.expect(parent, "ready")
            _place(placement, "parent")
            send, recv, close = link.end("parent")
            clock = time.perf_counter_ns
            out = []
            try:
                for _ in range(warmup):
                    send(PAYLOAD)
                    recv()
                stop = clock() + int(MAX_SECONDS * 1e9)
                for k in range(n):
                    t0 = clock()
                    if t0 > stop and k >= 100:  # (a polling peer on one core: ms per round trip)
                        limit.value = warmup + k + 1  # before the ping: the child sees it after echoing
                        send(PAYLOAD)
                        recv()
                        out.append((clock() - t0) / 1e3)
                        break
                    send(PAYLOAD)
                    recv()
                    out.append((clock() - t0) / 1e3)
            finally:
                close()
        return out
    finally:
        os.sched_setaffinity(0, before)
        link.cleanup()


def summarize(runs: List[Tuple[float, float]]) -> Dict[str, Dict[str, float]]:
    """{"median"|"p99": {"median", "min", "max"}} over the repeats."""
    out = {}
    for k, stat in enumerate(("median", "p99")):
        vals = [r[k] for r in runs]
        out[stat] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


# Wait strategies of shmq's wait loop, for --wait-variants (docs/waiting.md):
# each sets the loop's knobs in the parent before the fork.
def _variant(adaptive: bool, yield_in_spin: bool = False, spin: bool = True) -> Callable[[], None]:
    def apply() -> None:
        from shmq import _sync, ring

        _sync._YIELD_IN_SPIN = yield_in_spin
        _sync._ADAPT = adaptive
        ring.Ring.spin = _sync.SPIN_SECONDS if spin else 0.0

    return apply


WAIT_VARIANTS = {
    "shipped: adaptive": _variant(True),
    "spin 100us (old)": _variant(False),
    "yield-spin 100us": _variant(False, yield_in_spin=True),
    "adaptive + yield": _variant(True, yield_in_spin=True),
    "no spin": _variant(False, spin=False),
}


def run_all(classes: List[type], placements, n: int, repeats: int, progress: bool = True,
            variants: Optional[Dict[str, Callable[[], None]]] = None) -> Dict[Tuple[str, str, str], List[Tuple[float, float]]]:
    """{(variant, placement, transport): [(median, p99) per repeat]}, every
    repeat running every combination once, interleaved."""
    variants = variants or {"": lambda: None}
    runs: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = {}
    warmup = min(n, 200)
    for rep in range(repeats + 1):  # round 0 is the untimed warm-up
        for placement in placements:
            for cls in classes:
                for vname, apply in variants.items():
                    if vname != next(iter(variants)) and not cls.name.startswith("shmq"):
                        continue  # a variant only changes shmq: run the baselines once
                    apply()
                    try:
                        rtts = sorted(round_trips(cls, placement, n if rep else min(n, 300), warmup))
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        if progress:
                            print(f"  {cls.name} {placement}: failed: {exc!r}", flush=True)
                        continue
                    if rep:
                        runs.setdefault((vname, placement, cls.name), []).append(
                            (H.percentile(rtts, 0.5), H.percentile(rtts, 0.99))
                        )
        if progress and rep:
            print(f"  repeat {rep}/{repeats} done", flush=True)
    return runs


def main() -> None:
    p = H.parser(__doc__)
    p.add_argument("-n", "--count", type=int, default=5_000, help="round trips per measurement (5000)")
    p.add_argument("--placement", choices=PLACEMENTS, action="append", help="only these placements (repeatable)")
    p.add_argument("--only", action="append", help="only transports whose name contains this (repeatable)")
    p.add_argument("--wait-variants", action="store_true",
                   help="also run shmq under each wait strategy of docs/waiting.md (interleaved)")
    args = p.parse_args()
    n = 500 if args.quick else args.count
    repeats = args.repeats or (1 if args.quick else 5)
    H.setup(args)
    placements = args.placement or PLACEMENTS
    classes = [c for c in links() if not args.only or any(o in c.name for o in args.only)]
    variants = WAIT_VARIANTS if args.wait_variants else None
    runs = run_all(classes, placements, n, repeats, progress=not args.json, variants=variants)
    first = next(iter(variants)) if variants else ""
    results = []
    base = {pl: summarize(runs[(first, pl, "mp.Queue")]) for pl in placements if (first, pl, "mp.Queue") in runs}
    for (vname, placement, name), rs in runs.items():
        s = summarize(rs)
        label = f"{name} [{vname}]" if vname and name.startswith("shmq") else name
        for stat in ("median", "p99"):
            ref = base.get(placement, {}).get(stat, {}).get("median")
            v = s[stat]
            results.append({
                "bench": "pingpong", "workload": f"64 B ping-pong {placement}, {stat}", "transport": label,
                "unit": "us", "higher_is_better": False, "median": v["median"], "min": v["min"], "max": v["max"],
                "repeats": len(rs), "vs_mp_queue": (ref / v["median"]) if ref and v["median"] else None,
            })
    results.sort(key=lambda r: (r["workload"].split(",")[0], r["workload"], r["transport"]))
    H.report("pingpong", results, args.json)


if __name__ == "__main__":
    main()

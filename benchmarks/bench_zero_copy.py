"""Large numpy arrays from one process to another: zero-copy slot pools
against pickling transports and the memory-bandwidth floor.

Measured, for float32 arrays of 1, 16 and 64 MiB, one producer process and
one consumer process (the consumer reads one element of each array and drops
it), in arrays per second:

* ``loan``     -- shmq channel, producer writes in place into a loaned slot
                  (``with tx.loan_array(shape, dtype) as a: a[0] = i``):
                  nothing is copied, only the slot index travels;
* ``copy``     -- shmq channel, ``tx.send(array)`` of an existing array: one
                  copy into a slot, zero-copy view at the receiver;
* ``queue``    -- ``shmq.Queue.put(array)`` / ``get()`` (uses the pool when
                  Queue supports it; reported as is otherwise);
* ``codec``    -- the Queue plug-in recipe of docs/zero_copy.md: a Ring, a
                  SlotPool and a Codec, ``encode -> write -> lease.sent()`` /
                  ``read -> decode`` (what ``Queue.put`` does with the pool);
* ``mp_queue`` -- ``multiprocessing.Queue`` (pickle + pipe + unpickle);
* ``faster_fifo`` -- ``faster_fifo.Queue`` (pickle into a shared ring);
* ``copyto``   -- ``numpy.copyto`` of the same array in one process: the
                  memory-bandwidth floor a transport that copies once meets.

Every figure is the median of ``--repeat`` runs, interleaved; the ratios are
against baselines measured in the same run.  Targets from the issue: loan at
least 100,000 arrays/s at 16 MiB and roughly independent of size; copy at
least 60% of ``copyto``; ``queue`` (``codec`` until Queue uses the pool) at
least 30x ``mp_queue`` at 16 MiB.

    python benchmarks/bench_zero_copy.py                 # table
    python benchmarks/bench_zero_copy.py --json          # one JSON object per line
    python benchmarks/bench_zero_copy.py --sizes 16 --repeat 5 --only loan copy copyto
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import numpy as np

import shmq
from shmq.lowlevel import Codec, SlotPool

MiB = 1 << 20
TRANSPORTS = ("loan", "copy", "queue", "codec", "mp_queue", "faster_fifo", "copyto")
# Arrays per run, by transport and size in MiB: each run takes about a second on a 2-core VM.
COUNTS = {
    "loan": {1: 60_000, 16: 60_000, 64: 60_000},
    "copy": {1: 10_000, 16: 600, 64: 150},
    "queue": {1: 10_000, 16: 600, 64: 150},
    "codec": {1: 10_000, 16: 600, 64: 150},
    "mp_queue": {1: 600, 16: 20, 64: 5},
    "faster_fifo": {1: 3_000, 16: 40, 64: 10},
    "copyto": {1: 20_000, 16: 1_500, 64: 400},
}


def count_for(transport: str, size_mib: int, scale: float) -> int:
    table = COUNTS[transport]
    base = table.get(size_mib) or max(3, int(table[16] * 16 / size_mib))
    return max(3, int(base * scale))


# -- consumers (child processes) ---------------------------------------------------
def _consume_channel(rx, count, ready, done):
    rx.receive(timeout=60)  # warm-up item
    ready.set()
    for _ in range(count):
        a = rx.receive(timeout=60)
        a[0]
        del a
    done.set()
    rx.close()


def _consume_codec(ring_name, count, ready, done):
    ring = shmq.Ring.attach(ring_name)
    codec = Codec(None, ring=ring)
    codec.note_consumer()
    codec.decode(ring.read(timeout=60))
    ready.set()
    for _ in range(count):
        a = codec.decode(ring.read(timeout=60))
        a[0]
        del a
    done.set()
    codec.close()
    ring.close()


def _consume_queue(q, count, ready, done):
    q.get(timeout=60)
    ready.set()
    for _ in range(count):
        a = q.get(timeout=60)
        a[0]
        del a
    done.set()


# -- one run of one transport ------------------------------------------------------------
def _run_in_child(ctx, target, handle, count, produce):
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=target, args=(handle, count, ready, done))
    proc.start()
    try:
        produce(-1)
        if not ready.wait(120):
            raise RuntimeError("consumer did not start")
        t0 = time.perf_counter()
        for i in range(count):
            produce(i)
        if not done.wait(600):
            raise RuntimeError("consumer did not finish")
        elapsed = time.perf_counter() - t0
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    return count / elapsed


def run_channel(ctx, size, count, loan):
    n = size // 4
    slots = 8 if size <= 16 * MiB else 4
    tx, rx = shmq.open_channel(1 << 20, slot_size=size, slot_count=slots, multi_producer=False, multi_consumer=False)
    src = np.ones(n, np.float32)
    try:
        for _ in range(slots):  # fault every slot's pages in before timing
            with tx.loan_array(n, np.float32, timeout=60) as a:
                a[:] = 0
            rx.receive(timeout=60)
        if loan:

            def produce(i):
                with tx.loan_array(n, np.float32, timeout=60) as a:
                    a[0] = i

        else:

            def produce(i):
                tx.send(src, timeout=60)

        return _run_in_child(ctx, _consume_channel, rx, count, produce)
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def run_shmq_queue(ctx, size, count):
    q = shmq.Queue(maxsize=8)
    src = np.ones(size // 4, np.float32)
    try:
        return _run_in_child(ctx, _consume_queue, q, count, lambda i: q.put(src, timeout=60))
    finally:
        q.close()
        q.unlink()


def run_codec(ctx, size, count):
    slots = 8 if size <= 16 * MiB else 4
    ring = shmq.Ring.create(1 << 20, max_messages=8)
    pool = SlotPool.create(size, slots, link=ring.name)
    codec = Codec(pool, ring=ring)
    src = np.ones(size // 4, np.float32)

    def put(i):
        data, lease = codec.encode(src, 60)
        if lease is None:
            ring.write(data, 60)
            return
        try:
            ring.write(data, 60)
        except BaseException:
            lease.abort()
            raise
        lease.sent()

    try:
        return _run_in_child(ctx, _consume_codec, ring.name, count, put)
    finally:
        codec.close()
        pool.close()
        ring.close()
        pool.unlink()
        ring.unlink()


def run_mp_queue(ctx, size, count):
    q = ctx.Queue(maxsize=8)
    src = np.ones(size // 4, np.float32)
    try:
        return _run_in_child(ctx, _consume_queue, q, count, lambda i: q.put(src, timeout=60))
    finally:
        q.close()
        q.join_thread()


def run_faster_fifo(ctx, size, count):
    import faster_fifo

    q = faster_fifo.Queue(max_size_bytes=3 * size + MiB)
    src = np.ones(size // 4, np.float32)
    return _run_in_child(ctx, _consume_queue, q, count, lambda i: q.put(src, timeout=60))


def run_copyto(size, count):
    src = np.ones(size // 4, np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    t0 = time.perf_counter()
    for _ in range(count):
        np.copyto(dst, src)
    return count / (time.perf_counter() - t0)


def measure(transport, ctx, size_mib, scale):
    size = size_mib * MiB
    count = count_for(transport, size_mib, scale)
    if transport == "loan":
        return run_channel(ctx, size, count, loan=True)
    if transport == "copy":
        return run_channel(ctx, size, count, loan=False)
    if transport == "queue":
        return run_shmq_queue(ctx, size, count)
    if transport == "codec":
        return run_codec(ctx, size, count)
    if transport == "mp_queue":
        return run_mp_queue(ctx, size, count)
    if transport == "faster_fifo":
        return run_faster_fifo(ctx, size, count)
    return run_copyto(size, count)


# -- report ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64], help="array sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the arrays per run")
    parser.add_argument("--only", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    parser.add_argument("--start-method", default="fork", choices=mp.get_all_start_methods())
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    args = parser.parse_args(argv)
    if "faster_fifo" in args.only:
        try:
            import faster_fifo  # noqa: F401
        except ImportError:
            args.only.remove("faster_fifo")
    ctx = mp.get_context(args.start_method)
    machine = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "shmq": shmq.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "start_method": args.start_method,
        "queue_uses_pool": hasattr(shmq.Queue, "_pool"),
    }
    runs = {(t, s): [] for s in args.sizes for t in args.only}
    for _ in range(args.repeat):  # interleaved, so a noisy moment hits every transport
        for size in args.sizes:
            for transport in args.only:
                runs[(transport, size)].append(measure(transport, ctx, size, args.scale))
    rows = []
    for size in args.sizes:
        med = {t: statistics.median(runs[(t, size)]) for t in args.only}
        for t in args.only:
            row = {"transport": t, "size_mib": size, "arrays_per_s": med[t], "runs": runs[(t, size)]}
            if "copyto" in med:
                row["vs_copyto"] = med[t] / med["copyto"]
            if "mp_queue" in med:
                row["vs_mp_queue"] = med[t] / med["mp_queue"]
            rows.append(row)
    if args.json:
        print(json.dumps({"machine": machine}))
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"shmq {machine['shmq']}, Python {machine['python']}, numpy {machine['numpy']}, {machine['cpus']} CPUs, "
          f"{machine['platform']}; median of {args.repeat}; Queue uses the pool: {machine['queue_uses_pool']}")
    print(f"{'transport':12s} {'MiB':>4s} {'arrays/s':>12s} {'GB/s':>8s} {'vs copyto':>10s} {'vs mp.Queue':>12s}")
    for row in rows:
        gbs = row["arrays_per_s"] * row["size_mib"] * MiB / 1e9
        vc = f"{row['vs_copyto']:.2f}" if "vs_copyto" in row else "-"
        vq = f"{row['vs_mp_queue']:.1f}x" if "vs_mp_queue" in row else "-"
        print(f"{row['transport']:12s} {row['size_mib']:4d} {row['arrays_per_s']:12,.0f} {gbs:8.1f} {vc:>10s} {vq:>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

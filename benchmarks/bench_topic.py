"""Publish/subscribe fan-out: how many small tuples per second does each
subscriber receive when one publisher feeds 1, 2 or 4 subscriber processes?

shmq: one ``shmq.Topic`` (1 MiB ring, back-pressure): each message is pickled
and written once, every subscriber reads it at its own cursor.  Baseline in
the same run: pyzmq PUB/SUB over ipc:// with ``send_pyobj``/``recv_pyobj``
(high-water marks 0, so nothing is dropped), when pyzmq is installed.  Time
runs from the publisher's first send to each subscriber's last message; the
rate is messages / that time, per subscriber, median over subscribers and
repeats.  Processes are forked; nothing is pinned.

Frames: 1920x1080x3 uint8 arrays (6 MiB) from one publisher to 1, 2, 4
subscribers.  shmq: a Topic with a slot pool (4 slots): the publisher copies
each frame into a slot once, every subscriber gets a read-only view of it.
Baseline in the same run: iceoryx2 publish-subscribe (when installed), the
frame copied once into a loaned sample (the publisher retries until
delivered), subscribers polling (yielding the CPU when nothing came) and
reading it in place.
Each subscriber checks the frame number written in the frame's first bytes,
so frames are delivered in order and complete.  Also the shared memory the
transport holds while it runs: bytes allocated in /dev/shm by the files the
publisher and the subscribers map, halfway through (does it grow with
subscribers?).

``shmq.Latest`` (no baseline): set/get pairs per second in one process, and
the latency of ``get()`` while a forked writer sets continuously (median and
99th percentile of single calls).  And 6 MiB frames through a Latest: a
forked writer sets 1920x1080x3 uint8 frames as fast as it can while this
process calls ``get()`` for ``--latest-seconds`` and reads the frame number
in each frame's first bytes; gets/s of the reader (and sets/s of the writer
meanwhile), the value pickled into the cell (``Latest(capacity_bytes=7 MiB)``:
every set and every get copies 6 MiB) against the slot pool
(``slot_size=8 MiB, slot_count=4``: a set copies the frame into a slot once,
a get returns a read-only view).  Repetitions interleave the two; the table
gives the median and the range.  ``--latest-only`` runs just the Latest rows.
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
from typing import Any, Callable, Dict, List

import shmq

MESSAGE = (1, "abc", 1.5)
FRAME_SHAPE = (1080, 1920, 3)
FRAME_BYTES = 1080 * 1920 * 3
FRAME_SLOTS = 4  # the pool: 4 x 6 MiB, whatever the number of subscribers
SHM = "/dev/shm"


def _shm_mapped(pids: List[int]) -> int:
    """Bytes allocated in /dev/shm by the files these processes map, each
    file once (other processes on the machine do not count)."""
    paths = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    at = line.find(SHM + "/")
                    if at >= 0:
                        paths.add(line[at:].strip().replace(" (deleted)", ""))
        except OSError:
            pass
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            pass
    return total


def _frame_shmq_subscriber(name: str, n: int, conn: Any) -> None:
    topic = shmq.Topic.attach(name)
    sub = topic.subscribe()
    conn.send("ready")
    count = 0
    for frame in sub:
        assert int(frame.reshape(-1)[:8].view("<u8")[0]) == count and frame.shape == FRAME_SHAPE
        count += 1
        del frame  # the view goes: its slot can go back
    conn.send((count, time.perf_counter()))
    sub.close()
    topic.close()


def _frames(n: int) -> Any:
    import numpy as np

    frame = np.zeros(FRAME_SHAPE, np.uint8)
    frame[...] = np.arange(FRAME_SHAPE[1] * 3, dtype=np.uint8).reshape(1, FRAME_SHAPE[1], 3)
    return frame


def run_frames_shmq(n: int, fan: int) -> Any:
    topic = shmq.Topic(1 << 20, slot_size=FRAME_BYTES, slot_count=FRAME_SLOTS)
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(fan)]
    procs = [ctx.Process(target=_frame_shmq_subscriber, args=(topic.name, n, c)) for _, c in pipes]
    for p in procs:
        p.start()
    for parent, _ in pipes:
        assert parent.poll(60) and parent.recv() == "ready"
    frame = _frames(n)
    stamp = frame.reshape(-1)[:8].view("<u8")
    publish = topic.publish
    t0 = time.perf_counter()
    for i in range(n):
        stamp[0] = i
        publish(frame)
        if i == n // 2:
            held = _shm_mapped([os.getpid()] + [p.pid for p in procs])
    topic.close()
    rates = []
    for parent, _ in pipes:
        assert parent.poll(300)
        count, t_end = parent.recv()
        assert count == n, (count, n)
        rates.append(n / (t_end - t0))
    for p in procs:
        p.join(30)
    topic.unlink()
    return rates, held


def _iox_service(service_name: str) -> Any:
    import ctypes

    import iceoryx2 as iox2

    class Frame(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint8 * FRAME_BYTES)]

    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    service = (
        node.service_builder(iox2.ServiceName.new(service_name))
        .publish_subscribe(Frame)
        .subscriber_max_buffer_size(2)
        .max_subscribers(8)
        .enable_safe_overflow(False)
        .open_or_create()
    )
    return node, service, Frame


def _frame_iox_subscriber(service_name: str, n: int, conn: Any) -> None:
    import numpy as np

    node, service, _ = _iox_service(service_name)
    sub = service.subscriber_builder().create()
    conn.send("ready")
    count = 0
    while count < n:
        sample = sub.receive()
        if sample is None:
            os.sched_yield()  # (a subscriber that polls without yielding starves the publisher on 2 cores)
            continue
        frame = np.ctypeslib.as_array(sample.payload().contents.data).reshape(FRAME_SHAPE)  # in place
        assert int(frame.reshape(-1)[:8].view("<u8")[0]) == count
        count += 1
        del frame, sample
    conn.send((count, time.perf_counter()))
    del sub, service, node


def run_frames_iox(n: int, fan: int) -> Any:
    import iceoryx2 as iox2

    service_name = f"shmq/bench_topic/{os.getpid()}/{fan}/{time.monotonic_ns()}"
    node, service, frame_type = _iox_service(service_name)
    pub = service.publisher_builder().backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered).create()
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(fan)]
    procs = [ctx.Process(target=_frame_iox_subscriber, args=(service_name, n, c)) for _, c in pipes]
    for p in procs:
        p.start()
    for parent, _ in pipes:
        assert parent.poll(60) and parent.recv() == "ready"
    frame = _frames(n)
    stamp = frame.reshape(-1)[:8].view("<u8")
    source = frame_type.from_buffer(frame)  # the frame's own memory: write_payload copies it once
    t0 = time.perf_counter()
    for i in range(n):
        stamp[0] = i
        pub.loan_uninit().write_payload(source).send()
        if i == n // 2:
            held = _shm_mapped([os.getpid()] + [p.pid for p in procs])
    rates = []
    for parent, _ in pipes:
        assert parent.poll(300)
        count, t_end = parent.recv()
        assert count == n, (count, n)
        rates.append(n / (t_end - t0))
    for p in procs:
        p.join(30)
    del source, pub, service, node
    return rates, held


def _shmq_subscriber(name: str, conn: Any) -> None:
    topic = shmq.Topic.attach(name)
    sub = topic.subscribe()
    conn.send("ready")
    count = 0
    for _ in sub:
        count += 1
    conn.send((count, time.perf_counter()))
    sub.close()
    topic.close()


def run_shmq(n: int, fan: int) -> List[float]:
    topic = shmq.Topic(1 << 20)
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(fan)]
    procs = [ctx.Process(target=_shmq_subscriber, args=(topic.name, child)) for _, child in pipes]
    for p in procs:
        p.start()
    for parent, _ in pipes:
        assert parent.poll(60) and parent.recv() == "ready"
    publish = topic.publish
    t0 = time.perf_counter()
    for _ in range(n):
        publish(MESSAGE)
    topic.close()
    rates = []
    for parent, _ in pipes:
        assert parent.poll(120)
        count, t_end = parent.recv()
        assert count == n, (count, n)
        rates.append(n / (t_end - t0))
    for p in procs:
        p.join(30)
    topic.unlink()
    return rates


def _zmq_subscriber(address: str, conn: Any) -> None:
    import zmq

    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    while sock.recv_pyobj() != "hello":
        pass
    conn.send("ready")
    count = 0
    recv = sock.recv_pyobj
    while True:
        msg = recv()
        if msg is None:
            break
        if msg != "hello":
            count += 1
    conn.send((count, time.perf_counter()))
    sock.close(0)
    context.term()


def run_zmq(n: int, fan: int) -> List[float]:
    import zmq

    address = f"ipc:///tmp/bench_topic_{os.getpid()}.ipc"
    context = zmq.Context()
    sock = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(address)
    ctx = mp.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(fan)]
    procs = [ctx.Process(target=_zmq_subscriber, args=(address, child)) for _, child in pipes]
    for p in procs:
        p.start()
    waiting = list(pipes)
    deadline = time.monotonic() + 60
    while waiting:  # PUB/SUB's slow joiner: say hello until every subscriber heard it
        assert time.monotonic() < deadline
        sock.send_pyobj("hello")
        still = []
        for pc in waiting:
            if pc[0].poll(0.001):
                assert pc[0].recv() == "ready"
            else:
                still.append(pc)
        waiting = still
    send = sock.send_pyobj
    t0 = time.perf_counter()
    for _ in range(n):
        send(MESSAGE)
    send(None)
    rates = []
    for parent, _ in pipes:
        assert parent.poll(120)
        count, t_end = parent.recv()
        assert count == n, (count, n)
        rates.append(n / (t_end - t0))
    for p in procs:
        p.join(30)
    sock.close(0)
    context.term()
    try:
        os.unlink(address[len("ipc://"):])
    except OSError:
        pass
    return rates


def _set_forever(name: str) -> None:
    latest = shmq.Latest.attach(name)
    k = 0
    while True:
        latest.set(MESSAGE + (k,))
        k += 1


def run_latest(n: int) -> Dict[str, float]:
    latest = shmq.Latest(64 << 10)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            latest.set(MESSAGE)
            latest.get()
        best = min(best, time.perf_counter() - t0)
    writer = mp.get_context("fork").Process(target=_set_forever, args=(latest.name,), daemon=True)
    writer.start()
    while latest.version < 100:
        time.sleep(0.001)
    get, clock = latest.get, time.perf_counter_ns
    samples = []
    for _ in range(n):
        t0 = clock()
        get()
        samples.append(clock() - t0)
    writer.kill()
    writer.join(30)
    samples.sort()
    latest.unlink()
    latest.close()
    return {"set_get_pairs_per_s": n / best, "get_ns_median_while_setting": samples[len(samples) // 2],
            "get_ns_p99_while_setting": samples[int(len(samples) * 0.99)]}


def _set_frames_forever(name: str) -> None:
    import numpy as np

    latest = shmq.Latest.attach(name)
    frame = np.zeros(FRAME_SHAPE, np.uint8)
    flat = frame.reshape(-1).view(np.uint64)
    k = 0
    while True:
        k += 1
        flat[0] = k  # the frame number, in its first bytes
        latest.set(frame)


def run_latest_frames(seconds: float, slots: bool) -> Dict[str, float]:
    """gets/s of a reader of 6 MiB frames while a forked writer sets them at
    full speed, and the writer's sets/s meanwhile."""
    import numpy as np

    if slots:
        latest = shmq.Latest(64 << 10, slot_size=8 << 20, slot_count=4)
    else:
        latest = shmq.Latest(7 << 20)
    writer = mp.get_context("fork").Process(target=_set_frames_forever, args=(latest.name,), daemon=True)
    writer.start()
    try:
        latest.wait(newer_than=10, timeout=60)
        gets = 0
        last = 0
        v0 = latest.version
        t0 = time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            for _ in range(10):
                frame = latest.get()
                number = int(frame.reshape(-1)[:8].view(np.uint64)[0])
                assert number >= last, (number, last)  # versions never go back
                last = number
            gets += 10
        elapsed = time.perf_counter() - t0
        sets = latest.version - v0
    finally:
        writer.kill()
        writer.join(30)
        latest.unlink()
        latest.close()
    return {"gets_per_s": gets / elapsed, "sets_per_s": sets / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per case")
    parser.add_argument("--fan", type=int, nargs="+", default=[1, 2, 4], help="subscriber counts")
    parser.add_argument("--quick", action="store_true", help="20,000 messages, 1 repeat")
    parser.add_argument("--frames", type=int, default=300, help="6 MiB frames per run (0: skip the frame rows)")
    parser.add_argument("--latest-seconds", type=float, default=2.0,
                        help="seconds per run of the Latest 6 MiB frame rows (0: skip them)")
    parser.add_argument("--latest-only", action="store_true", help="only the Latest rows")
    parser.add_argument("--json", action="store_true", help="one JSON line per result")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.repeats, args.frames = 20_000, 1, min(args.frames, 60)
        args.latest_seconds = min(args.latest_seconds, 1.0)
    if args.latest_only:
        return _main_latest(args)
    try:
        import zmq  # noqa: F401

        transports: Dict[str, Callable[[int, int], List[float]]] = {"shmq.Topic": run_shmq, "pyzmq PUB/SUB": run_zmq}
    except ImportError:
        transports = {"shmq.Topic": run_shmq}
    results: Dict[tuple, List[float]] = {}
    for _ in range(args.repeats):
        for fan in args.fan:
            for label, run in transports.items():
                results.setdefault((label, fan), []).extend(run(args.messages, fan))
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "shmq": shmq.__version__,
        "messages": args.messages,
        "repeats": args.repeats,
    }
    frame_transports: Dict[str, Callable[[int, int], Any]] = {"shmq.Topic": run_frames_shmq}
    try:
        import iceoryx2  # noqa: F401

        frame_transports["iceoryx2"] = run_frames_iox
    except ImportError:
        pass
    frames: Dict[tuple, List[Any]] = {}
    if args.frames:
        for _ in range(args.repeats):
            for fan in args.fan:
                for label, run in frame_transports.items():
                    rates, held = run(args.frames, fan)
                    got = frames.setdefault((label, fan), [[], []])
                    got[0].extend(rates)
                    got[1].append(held)
    rows = []
    for fan in args.fan:
        base = statistics.median(results[("pyzmq PUB/SUB", fan)]) if ("pyzmq PUB/SUB", fan) in results else None
        for label in transports:
            rate = statistics.median(results[(label, fan)])
            rows.append({"bench": "topic_fanout", "transport": label, "subscribers": fan,
                         "msgs_per_s_per_subscriber": round(rate), "vs_zmq": round(rate / base, 2) if base else None,
                         **meta})
    frame_rows = []
    for fan in args.fan if args.frames else []:
        base_key = ("iceoryx2", fan)
        base = statistics.median(frames[base_key][0]) if base_key in frames else None
        for label in frame_transports:
            rates, held = frames[(label, fan)]
            rate = statistics.median(rates)
            frame_rows.append({"bench": "topic_frames", "transport": label, "subscribers": fan,
                               "frames_per_s_per_subscriber": round(rate, 1),
                               "vs_iceoryx2": round(rate / base, 2) if base else None,
                               "shm_bytes": max(held), "frames": args.frames, **meta})
    latest = run_latest(args.messages)
    rows.append({"bench": "latest", **{k: round(v) for k, v in latest.items()}, **meta})
    latest_rows = _latest_frame_rows(args, meta)
    if args.json:
        for row in rows + frame_rows + latest_rows:
            print(json.dumps(row))
        return
    print(f"small tuples {MESSAGE!r}, {args.messages} messages, {args.repeats} repeat(s), Python {meta['python']}")
    print(f"{'transport':<16}{'subs':>5}{'msgs/s per sub':>16}{'vs zmq':>8}")
    for row in rows[:-1]:
        ratio = "" if row["vs_zmq"] is None else f"{row['vs_zmq']:.2f}x"
        print(f"{row['transport']:<16}{row['subscribers']:>5}{row['msgs_per_s_per_subscriber']:>16,}{ratio:>8}")
    if frame_rows:
        print(f"1920x1080x3 uint8 frames (6 MiB), {args.frames} frames, {args.repeats} repeat(s)")
        print(f"{'transport':<16}{'subs':>5}{'frames/s per sub':>18}{'vs iceoryx2':>13}{'/dev/shm MiB':>14}")
        for row in frame_rows:
            ratio = "" if row["vs_iceoryx2"] is None else f"{row['vs_iceoryx2']:.2f}x"
            print(f"{row['transport']:<16}{row['subscribers']:>5}{row['frames_per_s_per_subscriber']:>18,.1f}"
                  f"{ratio:>13}{row['shm_bytes'] / 2**20:>14,.1f}")
    print(f"shmq.Latest: {latest['set_get_pairs_per_s']:,.0f} set/get pairs/s in one process; get() while a "
          f"writer sets: median {latest['get_ns_median_while_setting']:,.0f} ns, "
          f"p99 {latest['get_ns_p99_while_setting']:,.0f} ns")
    _print_latest_frames(args, latest_rows)


_LATEST_MODES = {"pickled into the cell": False, "slot pool": True}


def _latest_frame_rows(args: argparse.Namespace, meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    if not args.latest_seconds:
        return []
    runs: Dict[str, List[Dict[str, float]]] = {}
    for _ in range(args.repeats):
        for label, slots in _LATEST_MODES.items():  # interleaved
            runs.setdefault(label, []).append(run_latest_frames(args.latest_seconds, slots))
    rows = []
    for label, got in runs.items():
        gets = [r["gets_per_s"] for r in got]
        sets = [r["sets_per_s"] for r in got]
        rows.append({"bench": "latest_frames", "mode": label, "gets_per_s": round(statistics.median(gets), 1),
                     "gets_per_s_min": round(min(gets), 1), "gets_per_s_max": round(max(gets), 1),
                     "sets_per_s": round(statistics.median(sets), 1), "sets_per_s_min": round(min(sets), 1),
                     "sets_per_s_max": round(max(sets), 1), "seconds": args.latest_seconds, **meta})
    return rows


def _print_latest_frames(args: argparse.Namespace, rows: List[Dict[str, Any]]) -> None:
    if not rows:
        return
    print(f"shmq.Latest, 1920x1080x3 uint8 frames (6 MiB): a reader's get() while a writer sets at full speed, "
          f"{args.repeats} x {args.latest_seconds:g} s, median (min-max)")
    print(f"{'value':<24}{'gets/s':>24}{'sets/s meanwhile':>24}")
    for row in rows:
        gets = f"{row['gets_per_s']:,.0f} ({row['gets_per_s_min']:,.0f}-{row['gets_per_s_max']:,.0f})"
        sets = f"{row['sets_per_s']:,.0f} ({row['sets_per_s_min']:,.0f}-{row['sets_per_s_max']:,.0f})"
        print(f"{row['mode']:<24}{gets:>24}{sets:>24}")


def _main_latest(args: argparse.Namespace) -> None:
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "shmq": shmq.__version__, "messages": args.messages, "repeats": args.repeats}
    latest = run_latest(args.messages)
    rows = [{"bench": "latest", **{k: round(v) for k, v in latest.items()}, **meta}]
    latest_rows = _latest_frame_rows(args, meta)
    if args.json:
        for row in rows + latest_rows:
            print(json.dumps(row))
        return
    print(f"shmq.Latest: {latest['set_get_pairs_per_s']:,.0f} set/get pairs/s in one process; get() while a "
          f"writer sets: median {latest['get_ns_median_while_setting']:,.0f} ns, "
          f"p99 {latest['get_ns_p99_while_setting']:,.0f} ns")
    _print_latest_frames(args, latest_rows)


if __name__ == "__main__":
    sys.exit(main())

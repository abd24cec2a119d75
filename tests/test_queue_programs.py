"""Programs a user would write with shmq's queues, run under fork, spawn and
forkserver: a worker pool fed by one queue and answering on another, a
producer/consumer pair passing numpy arrays and dicts, and log lines from
several processes gathered by one."""
from __future__ import annotations

import hashlib
import os

import numpy as np

import shmq
from conftest import join_all

T = 60.0


# -- a worker pool: tasks on a JoinableQueue, answers on a Queue ------------------


def pool_worker(tasks, results):
    while True:
        task = tasks.get(timeout=T)
        try:
            if task is None:
                return
            kind, tid, payload = task
            if kind == "square":
                results.put((tid, payload * payload))
            elif kind == "stats":
                results.put((tid, {"n": len(payload), "sum": float(payload.sum()), "max": float(payload.max())}))
            elif kind == "fail":
                raise ValueError(f"task {tid} cannot be done")
        except Exception as exc:
            results.put((tid, exc))  # exceptions travel like any object
        finally:
            tasks.task_done()


def make_tasks():
    rng = np.random.default_rng(5)
    tasks = []
    for tid in range(240):
        if tid % 40 == 13:
            tasks.append(("fail", tid, None))
        elif tid % 8 == 0:
            size = 1_000_000 if tid % 80 == 0 else 2_000  # 8 MB arrays go through the side path
            tasks.append(("stats", tid, rng.standard_normal(size)))
        else:
            tasks.append(("square", tid, tid))
    return tasks


def test_worker_pool(ctx):
    tasks = shmq.JoinableQueue(maxsize=16)  # back-pressure: the parent waits for the workers
    results = shmq.Queue()
    workers = [ctx.Process(target=pool_worker, args=(tasks, results)) for _ in range(3)]
    for w in workers:
        w.start()
    todo = make_tasks()
    for task in todo:
        tasks.put(task, timeout=T)
    assert tasks.join(timeout=T)
    answers = dict(results.get(timeout=T) for _ in todo)
    assert results.empty()
    for kind, tid, payload in todo:
        got = answers[tid]
        if kind == "square":
            assert got == tid * tid
        elif kind == "stats":
            assert got == {"n": len(payload), "sum": float(payload.sum()), "max": float(payload.max())}
        else:
            assert isinstance(got, ValueError) and str(got) == f"task {tid} cannot be done"
    for _ in workers:
        tasks.put(None)
    join_all(workers)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    tasks.close()
    results.close()


# -- a producer and a consumer passing numpy arrays inside dicts -----------------------


def frame(rng, i):
    return {
        "id": i,
        "image": rng.integers(0, 255, size=(480, 640, 3), dtype=np.uint8),  # 900 KiB: larger than a quarter ring
        "boxes": rng.random((int(rng.integers(0, 20)), 4)),
        "labels": [f"obj{k}" for k in range(int(rng.integers(0, 5)))],
        "exposure": float(rng.random()),
    }


def camera(frames, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        frames.put(frame(rng, i))
    frames.put(None)
    frames.close()


def analyzer(frames, summaries):
    out = []
    for f in iter(lambda: frames.get(timeout=T), None):
        out.append((f["id"], hashlib.sha256(f["image"].tobytes()).hexdigest(), f["boxes"].shape, f["labels"]))
    summaries.put(out)
    frames.close()
    summaries.close()


def test_numpy_arrays_and_dicts(ctx):
    frames = shmq.Queue(capacity_bytes=2 << 20)
    summaries = shmq.SimpleQueue()
    n = 25
    procs = [
        ctx.Process(target=camera, args=(frames, n, 11)),
        ctx.Process(target=analyzer, args=(frames, summaries)),
    ]
    for p in procs:
        p.start()
    got = summaries.get(timeout=T)
    join_all(procs)
    rng = np.random.default_rng(11)
    expected = []
    for i in range(n):
        f = frame(rng, i)
        expected.append((i, hashlib.sha256(f["image"].tobytes()).hexdigest(), f["boxes"].shape, f["labels"]))
    assert got == expected
    frames.close()
    summaries.close()


# -- log lines from several processes, gathered by one ------------------------------------


def chatty(log, wid, lines):
    for i in range(lines):
        log.put(f"worker {wid} pid {os.getpid()}: line {i}")
    log.put(("exit", wid))


def test_gathering_log_lines(ctx):
    log = shmq.SimpleQueue(capacity_bytes=64 << 10)
    workers = [ctx.Process(target=chatty, args=(log, wid, 400)) for wid in range(4)]
    for w in workers:
        w.start()
    per_worker = {wid: [] for wid in range(4)}
    exited = set()
    while len(exited) < len(workers):
        for item in log.get_many(100, timeout=T):
            if isinstance(item, tuple):
                exited.add(item[1])
            else:
                wid = int(item.split()[1])
                per_worker[wid].append(int(item.rsplit(" ", 1)[1]))
    join_all(workers)
    # each process's lines arrive complete and in its order
    assert per_worker == {wid: list(range(400)) for wid in range(4)}
    log.close()

"""A pool of worker processes fed through two shmq queues.

The parent puts tasks on ``tasks``; each of N workers takes tasks until it
gets the sentinel (``None``), puts ``(task id, result, worker pid)`` on
``results``, and exits.  One sentinel per worker shuts the pool down; the
parent collects exactly one result per task.

    python examples/worker_pool.py --tasks 1000 --workers 4

Works with every start method (``--start-method spawn``): a shmq queue
pickles as its name, so it can be passed to any child (or to
``Pool.apply_async``), and the children attach to it by name.
"""
import argparse
import math
import multiprocessing as mp
import os
import time

import shmq

STOP = None  # the sentinel: one per worker


def work(tasks: shmq.Queue, results: shmq.Queue) -> None:
    """Take tasks until the sentinel; answer each on ``results``."""
    pid = os.getpid()
    for task_id, n in iter(tasks.get, STOP):
        # The "work": the number of primes below n (a little CPU per task).
        count = sum(1 for k in range(2, n) if all(k % d for d in range(2, math.isqrt(k) + 1)))
        results.put((task_id, count, pid))
    tasks.close()
    results.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000, help="how many tasks (1000)")
    p.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods())
    args = p.parse_args()
    ctx = mp.get_context(args.start_method)

    # maxsize bounds the tasks in flight: put blocks while the workers are behind
    # (back-pressure) instead of queueing everything up front.
    tasks, results = shmq.Queue(maxsize=64), shmq.Queue()
    workers = [ctx.Process(target=work, args=(tasks, results)) for _ in range(args.workers)]
    for w in workers:
        w.start()

    started = time.perf_counter()
    got = {}
    sent = 0
    # Put and collect in one loop, never blocking on a full task queue: the
    # workers may be waiting for us to take their results.
    while len(got) < args.tasks:
        while sent < args.tasks:
            try:
                tasks.put_nowait((sent, 200 + sent % 100))
            except shmq.Full:
                break
            sent += 1
        try:
            task_id, count, pid = results.get(timeout=0.01 if sent < args.tasks else 30)
        except shmq.Empty:
            continue
        assert task_id not in got, f"task {task_id} answered twice"
        got[task_id] = (count, pid)
    for _ in workers:
        tasks.put(STOP)
    for w in workers:
        w.join(30)
    elapsed = time.perf_counter() - started

    assert sorted(got) == list(range(args.tasks)), "a task got no result"
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    by_worker = sorted({pid for _, pid in got.values()})
    print(f"{args.tasks} tasks done by {len(by_worker)} of {args.workers} workers in {elapsed:.2f} s")
    print("OK")
    tasks.close()
    results.close()


if __name__ == "__main__":
    main()

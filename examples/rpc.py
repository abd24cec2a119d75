"""Request/reply (RPC) over shmq queues, with correlation ids.

Server processes take requests from one shared ``requests`` queue; each
request carries a correlation id and the name of the caller's own reply
queue (``reply_to``).  A server answers on that queue with the same id, so a
client with many calls in flight -- answered out of order by several servers
-- matches each reply to its call.  (A ready-made Service may come; until
then this is the pattern.)

    python examples/rpc.py --calls 2000 --servers 2 --clients 2

Requests:  (call_id, reply_to, method, args)
Replies:   (call_id, ok, result_or_error_text)
"""
import argparse
import itertools
import multiprocessing as mp
import os
import time
from typing import Any, Dict, Tuple

import shmq

STOP = None

METHODS = {
    "add": lambda a, b: a + b,
    "pow": pow,
    "div": lambda a, b: a / b,
}


def serve(requests: shmq.Queue) -> None:
    """Answer requests until the sentinel.  Reply queues are attached by
    name on first use and kept open (attaching costs a few system calls)."""
    replies: Dict[str, shmq.Queue] = {}
    for call_id, reply_to, method, args in iter(requests.get, STOP):
        try:
            answer: Tuple[Any, bool, Any] = (call_id, True, METHODS[method](*args))
        except Exception as exc:  # the error travels back; the server goes on
            answer = (call_id, False, f"{type(exc).__name__}: {exc}")
        q = replies.get(reply_to)
        if q is None:
            q = replies[reply_to] = shmq.Queue.attach(reply_to)
        q.put(answer)
    for q in replies.values():
        q.close()
    requests.close()


class Client:
    """Calls through ``requests``; replies come back on a queue of its own."""

    def __init__(self, requests: shmq.Queue) -> None:
        self.requests = requests
        self.replies = shmq.Queue()  # created (and owned) by this client
        self.ids = itertools.count()
        self.early: Dict[int, Tuple[bool, Any]] = {}  # replies to calls not yet waited for

    def call_async(self, method: str, *args: Any) -> int:
        call_id = next(self.ids)
        self.requests.put((call_id, self.replies.name, method, args))
        return call_id

    def result(self, call_id: int, timeout: float = 30.0) -> Any:
        """The result of ``call_id``; raises RuntimeError with the server's
        error text if the call failed."""
        deadline = time.monotonic() + timeout
        while call_id not in self.early:
            got_id, ok, value = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            self.early[got_id] = (ok, value)
        ok, value = self.early.pop(call_id)
        if not ok:
            raise RuntimeError(value)
        return value

    def call(self, method: str, *args: Any) -> Any:
        return self.result(self.call_async(method, *args))

    def close(self) -> None:
        self.replies.close()


def client(requests: shmq.Queue, calls: int, report: shmq.Queue) -> None:
    c = Client(requests)
    # 1) one call at a time: the round trip
    t = time.perf_counter()
    for i in range(calls // 2):
        assert c.call("add", i, 1) == i + 1
    round_trip = (time.perf_counter() - t) / max(1, calls // 2)
    # 2) pipelined: many calls in flight, replies matched by id (out of order
    #    when several servers answer)
    pending = {c.call_async("pow", i, 2): i for i in range(calls - calls // 2)}
    for call_id, i in pending.items():
        assert c.result(call_id) == i * i
    # 3) an error comes back as an error
    try:
        c.call("div", 1, 0)
        raise AssertionError("no error")
    except RuntimeError as exc:
        assert "ZeroDivisionError" in str(exc)
    report.put((os.getpid(), calls, round_trip))
    c.close()
    report.close()
    requests.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per client (2000)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--start-method", default=None, choices=mp.get_all_start_methods())
    args = p.parse_args()
    ctx = mp.get_context(args.start_method)

    requests = shmq.Queue(maxsize=1000)
    report = shmq.Queue()
    servers = [ctx.Process(target=serve, args=(requests,)) for _ in range(args.servers)]
    clients = [ctx.Process(target=client, args=(requests, args.calls, report)) for _ in range(args.clients)]
    for proc in servers + clients:
        proc.start()
    results = [report.get(timeout=120) for _ in clients]
    for proc in clients:
        proc.join(30)
    for _ in servers:
        requests.put(STOP)
    for proc in servers:
        proc.join(30)

    for pid, n, rt in results:
        print(f"client {pid}: {n} calls answered and matched, +1 error; round trip {rt * 1e6:.0f} us")
    ok = len(results) == args.clients and all(proc.exitcode == 0 for proc in servers + clients)
    print("OK" if ok else "FAILED")
    requests.close()
    report.close()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

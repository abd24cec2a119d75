"""Per-call cost of the ring's hot path in one process (no peer, no waiting).

    PYTHONPATH=. python tools/bench_hot_path.py [--rounds 1000] [--against OLD_RING_PY]

Prints, in nanoseconds per call, the Queue's put and get closures
(``RingBuffer.encoding_writer``/``decoding_reader`` with pickle, as
``shmq.Queue.put``/``get`` are) of a small tuple, and ``try_write`` /
``try_read`` of 64 bytes, on a ring with both locks.  Each round times 1,000
calls of one kind (puts into an empty ring, then gets until it is empty
again); the best round is reported, because the machine is shared and the
fastest round is the least disturbed.

``--against`` loads another version of shmq/_ring.py (for example
``git show HEAD~1:shmq/_ring.py > /tmp/old_ring.py``) beside this one and
alternates the two round by round, so both see the same load: on a busy
machine that resolves differences of a few ns that separate runs cannot.
"""
from __future__ import annotations

import argparse
import importlib.util
import pickle
import time

import shmq
from shmq import _ring

BATCH = 1000
ITEM = (1, "two", 3.0)
RECORD = b"x" * 64


def _refuse(*args):
    raise AssertionError(f"unexpected call: {args!r}")


def load_ring_module(path: str):
    """Another _ring.py, imported as a module of the shmq package."""
    spec = importlib.util.spec_from_file_location("shmq._ring_against", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "shmq"
    spec.loader.exec_module(module)
    return module


class Subject:
    """One ring of one version of _ring, and its four timed loops."""

    def __init__(self, module):
        self.ring = ring = module.RingBuffer.create(1 << 20)
        put = ring.encoding_writer(
            pickle.dumps, pickle.HIGHEST_PROTOCOL, None, _refuse, ring.max_payload, _refuse, _refuse
        )
        get = ring.decoding_reader(pickle.loads, _refuse, _refuse)
        try_write, try_read = ring.try_write, ring.try_read
        loop = range(BATCH)
        clock = time.perf_counter_ns

        def one_round():
            t0 = clock()
            for _ in loop:
                put(None, ITEM)
            t1 = clock()
            for _ in loop:
                get(None)
            t2 = clock()
            for _ in loop:
                try_write(RECORD)
            t3 = clock()
            for _ in loop:
                try_read()
            t4 = clock()
            return (t1 - t0, t2 - t1, t3 - t2, t4 - t3)

        self.one_round = one_round
        self.best = [float("inf")] * 4

    def run(self):
        for i, ns in enumerate(self.one_round()):
            self.best[i] = min(self.best[i], ns / BATCH)

    def close(self):
        self.ring.close()
        self.ring.unlink()


NAMES = ("put (closure)", "get (closure)", "try_write", "try_read")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--against", help="another shmq/_ring.py to compare with, round by round")
    args = ap.parse_args()
    subjects = {"this": Subject(_ring)}
    if args.against:
        subjects["against"] = Subject(load_ring_module(args.against))
    try:
        for _ in range(args.rounds):
            for s in subjects.values():
                s.run()
        print(f"{'ns per call':15s}" + "".join(f"{k:>10s}" for k in subjects))
        for i, name in enumerate(NAMES):
            print(f"{name:15s}" + "".join(f"{s.best[i]:10.0f}" for s in subjects.values()))
    finally:
        for s in subjects.values():
            s.close()


if __name__ == "__main__":
    main()

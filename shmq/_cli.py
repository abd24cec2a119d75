"""``python -m shmq`` / ``shmq``: command-line entry point."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from typing import List, Optional

import shmq


def _demo_consumer(name: str, count: int) -> None:
    ring = shmq.Ring.attach(name)
    try:
        for _ in range(count):
            ring.read(timeout=60)
    finally:
        ring.close()


def cmd_demo(args: argparse.Namespace) -> int:
    """A producer process and a consumer process move messages; print the rate."""
    ctx = mp.get_context("spawn")
    with shmq.Ring.create(1 << 20, multi_producer=False, multi_consumer=False) as ring:
        try:
            proc = ctx.Process(target=_demo_consumer, args=(ring.name, args.count))
            proc.start()
            payload = b"x" * args.size
            write = ring.write
            t0 = time.perf_counter()
            for _ in range(args.count):
                write(payload, 60)
            proc.join(120)
            elapsed = time.perf_counter() - t0
        finally:
            ring.unlink()
    if proc.exitcode != 0:
        print(f"consumer failed with exit code {proc.exitcode}", file=sys.stderr)
        return 1
    rate = args.count / elapsed
    print(
        f"shmq {shmq.__version__}: moved {args.count:,} messages of {args.size} bytes "
        f"from one process to another in {elapsed:.2f} s: {rate:,.0f} msg/s, "
        f"{rate * args.size / 1e6:,.1f} MB/s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="move messages between two processes and print the rate")
    demo.add_argument("-n", "--count", type=int, default=500_000)
    demo.add_argument("-s", "--size", type=int, default=64)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

"""End-to-end smoke tests of the core ring across real processes."""
import hashlib
import subprocess
import sys

import pytest

import shmq
from conftest import join_all


def _consume(name, n, out_q):
    ring = shmq.Ring.attach(name)
    h = hashlib.sha256()
    for _ in range(n):
        h.update(ring.read(timeout=30))
    ring.close()
    out_q.put(h.hexdigest())


def test_one_producer_one_consumer_every_start_method(ctx):
    ring = shmq.Ring.create(4096)
    try:
        out = ctx.Queue()
        p = ctx.Process(target=_consume, args=(ring.name, 2000, out))
        p.start()
        h = hashlib.sha256()
        for i in range(2000):
            msg = bytes([i % 256]) * (i % 700)
            h.update(msg)
            ring.write(msg, timeout=30)
        assert out.get(timeout=60) == h.hexdigest()
        join_all([p])
        assert p.exitcode == 0
    finally:
        ring.close()
        ring.unlink()


def test_unrelated_subprocess_attaches_by_name():
    with shmq.Ring.create(1 << 16) as ring:
        try:
            ring.write(b"from the creator")
            code = (
                "import shmq,sys; r=shmq.Ring.attach(sys.argv[1]); "
                "print(r.read(timeout=10).decode()); r.write(b'reply'); r.close()"
            )
            res = subprocess.run(
                [sys.executable, "-c", code, ring.name], capture_output=True, text=True, timeout=60
            )
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == "from the creator"
            assert ring.read(timeout=10) == b"reply"
        finally:
            ring.unlink()

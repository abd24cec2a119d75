"""A process killed between bumping its message counter and publishing its
index leaves the counters one off; the survivor that recovers the lock repairs
them, so qsize() stays exact and no record is lost.

The child reproduces the exact state such a kill leaves (lock held, counter
bumped, index not published) and then SIGKILLs itself: a real death in real
shared memory, at the one instant a random kill rarely hits."""
import multiprocessing as mp
import os
import signal

import pytest

import shmq
from shmq import _layout as L
from conftest import join_all


def _die_mid_operation(name, side):
    ring = shmq.Ring.attach(name)
    if side == "producer":
        ring._plock.acquire()
        ring._w[L.W_MSGS_IN] += 1  # ... and killed before TAIL is published
    else:
        ring._clock.acquire()
        ring._w[L.W_MSGS_OUT] += 1  # ... and killed before HEAD is published
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_counters_repaired_after_a_kill_between_counter_and_index(side):
    ring = shmq.Ring.create(4096)
    try:
        for i in range(3):
            ring.write(b"m%d" % i)
        proc = mp.get_context("fork").Process(target=_die_mid_operation, args=(ring.name, side))
        proc.start()
        join_all([proc])
        assert proc.exitcode == -signal.SIGKILL
        assert ring.qsize() == (4 if side == "producer" else 2)  # the damage
        # The next operation on the dead side recovers the lock and repairs.
        if side == "producer":
            ring.write(b"m3", timeout=10)
            assert ring.qsize() == 4
            got = [ring.read(timeout=10) for _ in range(4)]
        else:
            got = [ring.read(timeout=10) for _ in range(3)]
            ring.write(b"m3", timeout=10)
            got.append(ring.read(timeout=10))
        assert got == [b"m0", b"m1", b"m2", b"m3"]
        assert ring.qsize() == 0 and ring.empty()
        c = ring.statistics()
        assert c.messages_in - c.messages_out == 0
    finally:
        ring.close()
        ring.unlink()

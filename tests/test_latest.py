"""shmq.Latest: the newest value; writers never wait; readers never see a
torn value, also when a writer is SIGKILLed mid-write."""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import shmq

from conftest import join_all, unique_name

_made = []


def _latest(*args, **kwargs):
    latest = shmq.Latest(*args, **kwargs)
    _made.append(latest.name)
    return latest


@pytest.fixture(autouse=True)
def _unlink_made():
    yield
    from shmq import _platform

    while _made:
        _platform.shm_unlink(_made.pop())


def test_set_get_version():
    latest = _latest(4096)
    assert latest.version == 0
    with pytest.raises(shmq.Empty, match="never set"):
        latest.get()
    assert latest.set({"a": 1}) == 1
    assert latest.set({"a": 2}) == 2
    assert latest.get() == {"a": 2} and latest.version == 2
    assert latest.wait(newer_than=1, timeout=0) == (2, {"a": 2})
    t0 = time.monotonic()
    with pytest.raises(shmq.Empty):
        latest.wait(newer_than=2, timeout=0.1)
    assert time.monotonic() - t0 >= 0.09
    for k in range(10):  # buffers are reused in turn
        latest.set(k)
        assert latest.get() == k
    latest.close()
    latest.close()
    with pytest.raises(shmq.ClosedError):
        latest.get()


def test_bad_arguments_and_too_large():
    with pytest.raises(ValueError, match="'capacity_bytes'"):
        shmq.Latest(100)
    latest = _latest(1024)
    with pytest.raises(shmq.MessageTooLarge):
        latest.set(b"x" * 2000)
    with pytest.raises(ValueError):
        latest.wait(timeout=-1)
    latest.close()


def test_pickles_as_name_and_attach():
    latest = _latest(4096, name=unique_name("lt"))
    latest.set("v1")
    other = pickle.loads(pickle.dumps(latest))
    assert other.get() == "v1" and other.name == latest.name
    other.set("v2")
    assert latest.get() == "v2"
    other.close()
    with pytest.raises(shmq.LayoutError):
        shmq.Topic.attach(latest.name)
    latest.unlink()
    latest.close()
    assert not os.path.exists("/dev/shm/" + latest.name)


def _waiter(latest, results):
    results.put(latest.wait(newer_than=0, timeout=30))


def test_wait_wakes_every_reader_in_other_processes(ctx):
    latest = _latest(4096)
    results = ctx.Queue()
    procs = [ctx.Process(target=_waiter, args=(latest, results)) for _ in range(3)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 30
    while latest._w[shmq._layout.W_L_WAITERS] < 3 and time.monotonic() < deadline:  # all asleep
        time.sleep(0.005)
    t0 = time.monotonic()
    latest.set("go")
    outs = [results.get(timeout=30) for _ in procs]
    woke = time.monotonic() - t0
    join_all(procs)
    assert outs == [(1, "go")] * 3
    assert woke < 1.0
    latest.close()


def _value(k, size):
    return (k, bytes([k % 251]) * size)


def _writer_forever(name, first):
    latest = shmq.Latest.attach(name)
    rng = random.Random(first)
    k = first
    while True:
        latest.set(_value(k, rng.choice((10, 100_000, 400_000))))
        k += 1


def _valid(v):
    k, body = v
    assert body == bytes([k % 251]) * len(body), f"torn value {k}"
    return k


def test_no_torn_read_when_writers_are_sigkilled(ctx):
    """Writers of values up to 400 KB are SIGKILLed at random points while
    this process reads: every value read is whole, the version never goes
    back, and after each kill the value is the last complete one."""
    latest = _latest(512 * 1024)
    latest.set(_value(0, 10))
    rng = random.Random(1234)
    next_first = 1
    last_version = 0
    for round_ in range(6):
        p = ctx.Process(target=_writer_forever, args=(latest.name, next_first))
        p.start()
        start_version = latest.version
        deadline = time.monotonic() + 30
        while latest.version < start_version + 5:  # the writer runs
            assert time.monotonic() < deadline
            _valid(latest.get())
        kill_at = time.monotonic() + rng.uniform(0.0, 0.05)
        while time.monotonic() < kill_at:
            version, value = latest.get_versioned()
            assert version >= last_version
            last_version = version
            _valid(value)
        os.kill(p.pid, signal.SIGKILL)
        join_all([p])
        version, value = latest.get_versioned()
        k = _valid(value)
        assert version >= last_version
        last_version = version
        next_first = k + 1_000_000  # values of the next writer are distinct
    # a writer killed holding the lock delays the next set by at most ~0.5 s
    t0 = time.monotonic()
    latest.set(_value(7, 10))
    assert time.monotonic() - t0 < 1.5
    assert latest.get() == _value(7, 10)
    latest.close()


def test_unrelated_process_reads_by_name():
    latest = _latest(4096)
    latest.set({"config": 1})
    script = textwrap.dedent(
        f"""
        import shmq
        latest = shmq.Latest.attach({latest.name!r})
        print(latest.get()["config"], flush=True)
        version, value = latest.wait(newer_than=1, timeout=30)
        print(version, value["config"], flush=True)
        latest.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=dict(os.environ), text=True
    )
    try:
        assert proc.stdout.readline().strip() == "1"
        latest.set({"config": 2})
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.split() == ["2", "2"]
    latest.close()

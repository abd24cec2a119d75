"""Statistics read from the shared header: snapshots, reading by name from
another process, participants, rates and verdicts, inventory."""
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import shmq
from conftest import unique_name
from shmq import lowlevel as ll
from shmq._stats import MOSTLY_FULL, WAIT_RATIO, VERDICTS, rates, verdict

# A subprocess that attaches to a ring, says so, and waits for stdin to close.
ATTACH_AND_WAIT = (
    "import shmq,sys; r=shmq.Ring.attach(sys.argv[1]); print('attached', flush=True); "
    "sys.stdin.read(); r.close()"
)


def record(n):
    return (n + 15) & ~7


def test_snapshot_counts_every_transition():
    with shmq.Ring.create(1024, name=unique_name("st"), multi_producer=False, multi_consumer=False) as ring:
        try:
            s0 = ring.statistics()
            assert (s0.messages_in, s0.messages_out, s0.bytes_in, s0.bytes_used, s0.peak_bytes) == (0, 0, 0, 0, 0)
            assert s0.capacity_bytes == 1024 and s0.max_messages == 0
            for _ in range(3):
                ring.write(b"x" * 10)
            s1 = ring.statistics()
            assert (s1.messages_in, s1.messages_used) == (3, 3)
            assert s1.bytes_in == s1.bytes_used == 3 * record(10)
            assert s1.peak_bytes == 3 * record(10)
            assert ring.read() == b"x" * 10
            s2 = ring.statistics()
            assert (s2.messages_out, s2.messages_used, s2.bytes_out) == (1, 2, record(10))
            # the peak is sampled (when a producer re-reads HEAD, and by every snapshot)
            assert 2 * record(10) <= s2.peak_bytes <= 3 * record(10)
            assert s2.fill_ratio == pytest.approx(2 * record(10) / 1024)
            assert s2.taken_at > s1.taken_at
            assert s2.creator_pid == os.getpid() and s2.creator_alive
            assert s2.participants == (ll.ParticipantInfo(os.getpid(), "creator+producer+consumer", True),)
            with pytest.raises(dataclasses.FrozenInstanceError):
                s2.messages_in = 0
        finally:
            ring.unlink()


def test_blocked_writes_and_reads_are_counted_with_their_time():
    with shmq.Ring.create(64, name=unique_name("st")) as ring:
        try:
            while ring.try_write(b"12345678"):
                pass
            with pytest.raises(shmq.Full):
                ring.write(b"12345678", timeout=0.05)
            s = ring.statistics()
            assert s.full_waits == 1 and 0.04 <= s.full_wait_seconds < 5
            assert s.empty_waits == 0
            while ring.try_read() is not None:
                pass
            with pytest.raises(shmq.Empty):
                ring.read(timeout=0.05)
            s = ring.statistics()
            assert s.empty_waits == 1 and 0.04 <= s.empty_wait_seconds < 5
            assert s.full_waits == 1
        finally:
            ring.unlink()


def test_max_messages_counts_in_the_fill_ratio():
    with shmq.Ring.create(1 << 16, max_messages=4, name=unique_name("st")) as ring:
        try:
            ring.write(b"a")
            ring.write(b"b")
            assert ring.statistics().fill_ratio == pytest.approx(0.5)
        finally:
            ring.unlink()


def test_another_process_reads_the_same_counters_without_joining():
    with shmq.Ring.create(4096, name=unique_name("st")) as ring:
        try:
            for i in range(5):
                ring.write(bytes(i))
            ring.read()
            code = (
                "import sys; from shmq.lowlevel import read_statistics as rs; s = rs(sys.argv[1]); "
                "print(type(s).__name__, s.messages_in, s.messages_out, s.bytes_used, len(s.participants))"
            )
            res = subprocess.run([sys.executable, "-c", code, ring.name], capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            mine = ring.statistics()
            assert res.stdout.split() == ["RingStatistics", "5", "1", str(mine.bytes_used), "1"]
            # the reader never registered
            assert len(ring.statistics().participants) == 1
        finally:
            ring.unlink()


def test_read_statistics_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError):
        ll.read_statistics(unique_name("none"))
    name = unique_name("foreign")
    with open(os.path.join("/dev/shm", name), "wb") as f:
        f.write(b"not shmq" * 1024)
    try:
        with pytest.raises(shmq.LayoutError, match="is not an shmq segment"):
            ll.read_statistics(name)
        assert name not in [i.name for i in ll.list_segments(name)]
    finally:
        os.unlink(os.path.join("/dev/shm", name))


def test_participants_show_who_is_alive():
    with shmq.Ring.create(4096, name=unique_name("st")) as ring:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", ATTACH_AND_WAIT, ring.name],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert child.stdout.readline().strip() == "attached"
                parts = {p.pid: p for p in ll.read_statistics(ring.name).participants}
                assert parts[child.pid] == ll.ParticipantInfo(child.pid, "attached", True)
                child.kill()
                child.wait(30)
                parts = {p.pid: p for p in ll.read_statistics(ring.name).participants}
                assert parts[child.pid].alive is False
                assert parts[os.getpid()].alive is True
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait(30)
                child.stdout.close()
                child.stdin.close()
        finally:
            ring.unlink()


def test_queue_and_pool_statistics_by_name():
    q = shmq.Queue()
    try:
        q.put(("a", 1))
        kinds = {i.name: i.kind for i in ll.list_segments("shmq_")}
        main = q.statistics().name
        assert kinds[main] == "queue"
        assert "queue-side" in kinds.values()
        s = ll.read_statistics(main)
        assert isinstance(s, ll.RingStatistics) and s.messages_in == 1
    finally:
        q.close()
    from shmq._slots import SlotPool

    pool = SlotPool.create(1024, 4, name=unique_name("pool"))
    try:
        s = ll.read_statistics(pool.name)
        assert (type(s).__name__, s.slot_count, s.slot_size) == ("SlotPoolStatistics", 4, 1024)
        assert ll.segment_info(pool.name).kind == "pool"
    finally:
        pool.close()
        pool.unlink()


# -- rates and verdicts ---------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    with shmq.Ring.create(1000, name=unique_name("st")) as ring:
        try:
            yield ring.statistics()
        finally:
            ring.unlink()


def later(s, seconds=1.0, **changes):
    return dataclasses.replace(s, taken_at=s.taken_at + seconds, **changes)


def test_rates_per_second(base):
    after = later(base, 2.0, messages_in=2000, messages_out=1000, bytes_in=4000, bytes_out=2000,
                  full_wait_seconds=0.5, empty_wait_seconds=0.1)
    r = rates(base, after)
    assert r.interval_seconds == pytest.approx(2.0)
    assert (r.messages_in_per_second, r.messages_out_per_second) == (pytest.approx(1000), pytest.approx(500))
    assert (r.bytes_in_per_second, r.bytes_out_per_second) == (pytest.approx(2000), pytest.approx(1000))
    assert r.producer_wait_ratio == pytest.approx(0.25)
    assert r.consumer_wait_ratio == pytest.approx(0.05)
    assert r.verdict == "consumer-bound"


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, "idle"),
        ({"messages_in": 10, "messages_out": 10}, "balanced"),
        ({"messages_in": 10, "messages_out": 10, "empty_wait_seconds": 0.6}, "producer-bound"),
        ({"messages_in": 10, "messages_out": 10, "full_wait_seconds": 0.6}, "consumer-bound"),
        # full and nothing moving: a stalled consumer, even with nobody's wait counted yet
        ({"bytes_used": 900, "bytes_in": 900}, "consumer-bound"),
        # both sides waited: the larger share wins
        ({"messages_in": 1, "full_wait_seconds": 0.3, "empty_wait_seconds": 0.7}, "producer-bound"),
        ({"messages_in": 1, "full_wait_seconds": 0.7, "empty_wait_seconds": 0.3}, "consumer-bound"),
    ],
)
def test_verdict_from_snapshots(base, changes, expected):
    before = base
    if "bytes_used" in changes:
        before = dataclasses.replace(base, bytes_used=changes["bytes_used"])
    assert rates(before, later(base, **changes)).verdict == expected


def test_verdict_thresholds():
    assert set(VERDICTS) == {"idle", "producer-bound", "consumer-bound", "balanced"}
    assert verdict(WAIT_RATIO, 0, 0, True) == "consumer-bound"
    assert verdict(0, WAIT_RATIO, 0, True) == "producer-bound"
    assert verdict(0, 0, MOSTLY_FULL, False) == "consumer-bound"
    assert verdict(WAIT_RATIO / 2, WAIT_RATIO / 2, 0.5, True) == "balanced"


def test_rates_reject_mismatched_snapshots(base):
    with pytest.raises(ValueError, match="different queues"):
        rates(base, dataclasses.replace(base, name="other"))
    with pytest.raises(ValueError, match="interval"):
        rates(base, base)


SLOW_READER = (
    "import shmq,sys,time; r=shmq.Ring.attach(sys.argv[1]); print('attached', flush=True)\n"
    "while r.read(timeout=30) != b'end': time.sleep(0.005)\n"
    "r.close()"
)
SLOW_WRITER = (
    "import shmq,sys,time; r=shmq.Ring.attach(sys.argv[1]); print('attached', flush=True)\n"
    "for _ in range(int(sys.argv[2])): r.write(b'x' * 32, timeout=30); time.sleep(0.005)\n"
    "r.write(b'end', timeout=30); r.close()"
)


def _verdict_over(ring, seconds=0.6):
    before = ll.read_statistics(ring.name)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return rates(before, ll.read_statistics(ring.name))


def test_a_slow_consumer_makes_the_ring_consumer_bound():
    with shmq.Ring.create(256, name=unique_name("cb"), multi_producer=False, multi_consumer=False) as ring:
        try:
            child = subprocess.Popen([sys.executable, "-c", SLOW_READER, ring.name], stdout=subprocess.PIPE, text=True)
            stop = threading.Event()

            def produce():
                while not stop.is_set():
                    try:
                        ring.write(b"y" * 32, timeout=0.05)
                    except shmq.Full:
                        pass
                ring.write(b"end", timeout=30)

            writer = threading.Thread(target=produce)
            try:
                assert child.stdout.readline().strip() == "attached"
                writer.start()
                r = _verdict_over(ring)
            finally:
                stop.set()
                writer.join(60)
                assert child.wait(60) == 0
                child.stdout.close()
            assert r.verdict == "consumer-bound", r
            assert r.producer_wait_ratio > 0.5 and r.messages_out_per_second > 0
        finally:
            ring.unlink()


def test_a_slow_producer_makes_the_ring_producer_bound():
    with shmq.Ring.create(1 << 16, name=unique_name("pb"), multi_producer=False, multi_consumer=False) as ring:
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", SLOW_WRITER, ring.name, "300"], stdout=subprocess.PIPE, text=True
            )
            seen = []

            def consume():
                while (m := ring.read(timeout=30)) != b"end":
                    seen.append(m)

            reader = threading.Thread(target=consume)
            try:
                assert child.stdout.readline().strip() == "attached"
                reader.start()
                r = _verdict_over(ring)
            finally:
                reader.join(60)
                assert child.wait(60) == 0
                child.stdout.close()
            assert r.verdict == "producer-bound", r
            assert r.consumer_wait_ratio > 0.5 and r.messages_in_per_second > 0
            assert len(seen) == 300
        finally:
            ring.unlink()


def test_sigkilled_creator_is_garbage_and_a_live_one_is_not():
    code = "import shmq,sys; r=shmq.Ring.create(4096, name=sys.argv[1]); print(r.name, flush=True); sys.stdin.read()"
    dead_name = unique_name("gcd")
    child = subprocess.Popen([sys.executable, "-c", code, dead_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().decode().strip() == dead_name
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        child.stdin.close()
    live = shmq.Ring.create(4096, name=unique_name("gcl"))
    try:
        prefix = dead_name
        found = ll.collect_garbage(prefix, dry_run=True)
        assert [(g.kind, g.name) for g in found] == [("ring", dead_name)]
        assert os.path.exists(f"/dev/shm/{dead_name}")
        assert ll.collect_garbage(live.name) == []
        assert [g.name for g in ll.collect_garbage(prefix)] == [dead_name]
        assert not os.path.exists(f"/dev/shm/{dead_name}")
        assert not [e for e in os.listdir("/dev/shm") if dead_name in e]
        assert os.path.exists(f"/dev/shm/{live.name}")
    finally:
        live.close()
        live.unlink()


def test_a_header_of_another_layout_version_is_a_layout_error_and_a_problem_not_a_crash():
    import struct

    from shmq import _layout as L

    name = unique_name("ver")
    path = f"/dev/shm/{name}"
    with open(path, "wb") as f:
        f.write(L.MAGIC + struct.pack("<qqq", L.LAYOUT_VERSION + 1, L.KIND_RING, L.DATA_OFFSET) + bytes(L.DATA_OFFSET - 32))
    try:
        for _ in range(3):  # no mapping is left half-closed behind
            with pytest.raises(shmq.LayoutError, match="layout version"):
                ll.SegmentView.open(name)
        with pytest.raises(shmq.LayoutError, match="layout version"):
            ll.read_statistics(name)
        problems = []
        assert ll.list_segments(name, problems) == []
        assert problems == [(name, f"'{name}' has shmq layout version {L.LAYOUT_VERSION + 1}, expected {L.LAYOUT_VERSION}")]
        problems = []
        assert ll.collect_garbage(name, problems=problems) == []
        assert [n for n, _ in problems] == [name] and os.path.exists(path)
    finally:
        os.unlink(path)

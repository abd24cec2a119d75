"""Segments: create/attach/close/unlink, names, permissions, foreign objects,
a full /dev/shm, leak warnings, exit-time ownership, participants, fork."""
from __future__ import annotations

import errno
import fcntl
import gc
import multiprocessing as mp
import os
import stat
import time

import posix_ipc
import psutil
import pytest

import shmq
from shmq import _layout as L
from shmq import _platform as P
from shmq._ring import RingBuffer
from shmq._segment import Segment, SegmentView

from _core_helpers import (
    fork_call,
    is_zombie,
    run_python,
    sem_exists,
    shm_exists,
    thread_is_in,
    wait_for,
    wait_pid,
)
from conftest import SESSION_TAG, join_all, session_entries, unique_name

SIZE = L.DATA_OFFSET + 4096
FORK = mp.get_context("fork")


@pytest.fixture
def seg():
    s = Segment.create(L.KIND_RING, SIZE)
    s.publish()
    yield s
    s.close()
    s.unlink()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# -- create / attach / close / unlink ----------------------------------------
def test_create_attach_close_unlink():
    s = Segment.create(L.KIND_RING, SIZE)
    try:
        assert s.is_creator and not s.closed
        assert s.size == SIZE and len(s.buf) == SIZE and len(s.words) == SIZE // 8
        assert s.words[L.W_CREATOR_PID] == os.getpid()
        s.publish()
        assert bytes(s.buf[:8]) == L.MAGIC
        s.words[600] = 12345
        a = Segment.attach(s.name, L.KIND_RING)
        try:
            assert not a.is_creator and a.kind == L.KIND_RING and a.size == SIZE
            assert a.words[600] == 12345  # the same memory
            a.words[601] = 7
            assert s.words[601] == 7
        finally:
            a.close()
        assert a.closed
        a.close()  # idempotent
        assert shm_exists(s.name)  # closing an attached handle keeps the segment
    finally:
        s.close()
        s.unlink()
    assert not shm_exists(s.name)
    s.unlink()  # safe to call again
    with pytest.raises(FileNotFoundError):
        Segment.attach(s.name)


def test_close_releases_every_descriptor():
    before = open_fds()
    for _ in range(5):
        s = Segment.create(L.KIND_RING, SIZE)
        s.publish()
        a = Segment.attach(s.name)
        a.close()
        s.close()
        s.unlink()
        r = RingBuffer.create(1024)
        r2 = RingBuffer.attach(r.name)
        r2.close()
        r.close()
        r.unlink()
    assert open_fds() == before


def test_closed_segment_raises_closed_error(seg):
    a = Segment.attach(seg.name)
    a.close()
    with pytest.raises(shmq.ClosedError):
        a.participants()
    with pytest.raises(shmq.ClosedError):
        with a.admin_lock():
            pass
    assert "closed" in repr(a)


def test_mappings_survive_unlink(seg):
    a = Segment.attach(seg.name)
    try:
        seg.unlink()
        assert not shm_exists(seg.name)
        a.words[700] = 99
        assert seg.words[700] == 99
        with pytest.raises(shmq.BrokenError, match="removed"):
            a.check_exists()
        with pytest.raises(FileNotFoundError):
            Segment.attach(seg.name)
    finally:
        a.close()


def test_check_exists_detects_a_replaced_name():
    name = unique_name("rp")
    s = Segment.create(L.KIND_RING, SIZE, name=name)
    try:
        s.check_exists()
        s.unlink()
        s2 = Segment.create(L.KIND_RING, SIZE, name=name)
        try:
            with pytest.raises(shmq.BrokenError, match="replaced"):
                s.check_exists()
        finally:
            s2.close()
            s2.unlink()
    finally:
        s.close()
        s.unlink()


def test_create_validates_size():
    with pytest.raises(ValueError, match="'size'"):
        Segment.create(L.KIND_RING, L.DATA_OFFSET - 8)


def test_create_existing_name_raises_file_exists(seg):
    with pytest.raises(FileExistsError):
        Segment.create(L.KIND_RING, SIZE, name=seg.name)
    Segment.attach(seg.name).close()  # the original is untouched


def test_constructor_is_private():
    with pytest.raises(TypeError, match="create"):
        Segment()


# -- names ---------------------------------------------------------------------
def test_generated_names(monkeypatch):
    s = Segment.create(L.KIND_RING, SIZE)
    try:
        assert s.name.startswith(f"shmq_{SESSION_TAG}_{os.getpid()}_")
        assert len(s.name) <= P.MAX_NAME_LENGTH == 24
    finally:
        s.close()
        s.unlink()
    for tag in ("", "a", "abcdef", "abcdefghij", "x-y", "ü"):
        monkeypatch.setenv("SHMQ_NAME_TAG", tag)
        names = {P.new_name() for _ in range(50)}
        assert len(names) == 50
        for n in names:
            assert len(n) <= 24, n
            assert P.check_name(n) == n
    # the longest possible pid still fits
    monkeypatch.setattr(os, "getpid", lambda: 4194304)
    monkeypatch.setenv("SHMQ_NAME_TAG", "abcdef")
    assert len(P.new_name()) <= 24


@pytest.mark.parametrize("bad", [b"shmq_x", 123, 1.5, ["a"]])
def test_explicit_name_must_be_str(bad):
    with pytest.raises(TypeError, match="'name'"):
        Segment.create(L.KIND_RING, SIZE, name=bad)
    with pytest.raises(TypeError, match="'name'"):
        Segment.attach(bad)
    with pytest.raises(TypeError, match="'name'"):
        RingBuffer.create(1024, name=bad)


@pytest.mark.parametrize(
    "bad", ["", "/", "a" * 25, "a/b", "a b", "caf\u00e9", "x\n", "x\x00y", ".", "..", "/..", "a*"]
)
def test_explicit_name_validated(bad):
    # Judge only the entries this test could have made (other programs may
    # create and remove names in /dev/shm meanwhile).
    stripped = bad.lstrip("/")
    mine = {stripped, "sem." + stripped} if stripped not in ("", ".", "..") else set()

    def made():
        try:
            return mine & set(os.listdir("/dev/shm"))
        except OSError:
            return set()

    before = made()
    with pytest.raises(ValueError, match="'name'"):
        Segment.create(L.KIND_RING, SIZE, name=bad)
    with pytest.raises(ValueError, match="'name'"):
        Segment.attach(bad)
    assert made() <= before


def test_explicit_name_with_leading_slash_and_max_length():
    name = unique_name("ml") + "x" * 24
    name = name[:24]
    s = Segment.create(L.KIND_RING, SIZE, name="/" + name)
    try:
        assert s.name == name
        s.publish()
        Segment.attach("/" + name).close()
    finally:
        s.close()
        s.unlink()



def _semaphore_namespace_name() -> str:
    # "sem." + a session name: what Linux calls the file of POSIX semaphore "/shmq_..."
    return "sem." + unique_name("sn")[:20]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda name: shmq.Queue(name=name), id="Queue"),
        pytest.param(lambda name: shmq.Ring.create(4096, name=name), id="Ring.create"),
        pytest.param(lambda name: shmq.open_channel(name=name), id="open_channel"),
    ],
)
def test_names_in_the_semaphore_namespace_are_refused(make):
    name = _semaphore_namespace_name()
    before = set(session_entries())
    with pytest.raises(ValueError, match="'sem.'"):
        make(name)
    with pytest.raises(ValueError, match="'sem.'"):
        make("/" + name)
    assert set(session_entries()) == before
    assert not any(name in entry for entry in os.listdir("/dev/shm"))

# -- permissions ------------------------------------------------------------------
def test_segment_and_semaphores_are_owner_only():
    old = os.umask(0)  # the mode must not depend on a permissive umask
    try:
        r = RingBuffer.create(1024)
    finally:
        os.umask(old)
    try:
        mode = stat.S_IMODE(os.stat(f"/dev/shm/{r.name}").st_mode)
        assert mode == 0o600, oct(mode)
        for suffix in P.SEM_SUFFIXES:
            path = f"/dev/shm/sem.{r.name}{suffix}"
            if os.path.exists(path):
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, (path, oct(os.stat(path).st_mode))
        assert stat.S_IMODE(os.stat(f"/dev/shm/sem.{r.name}-ne").st_mode) == 0o600
    finally:
        r.close()
        r.unlink()
    for suffix in P.SEM_SUFFIXES:
        assert not sem_exists(r.name + suffix)


# -- attaching to things that are not shmq segments -------------------------------------
@pytest.fixture
def foreign():
    """Make plain POSIX shm objects (not shmq segments); unlinks them after."""
    made = []

    def make(data=None, size=0):
        name = unique_name("fo")
        size = len(data) if data is not None else size
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            if data:
                os.pwrite(shm.fd, data, 0)
        finally:
            os.close(shm.fd)
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            posix_ipc.unlink_shared_memory("/" + name)
        except posix_ipc.ExistentialError:
            pass


def test_attach_missing_name():
    with pytest.raises(FileNotFoundError):
        Segment.attach(unique_name("no"))
    with pytest.raises(FileNotFoundError):
        shmq.Ring.attach(unique_name("no"))


@pytest.mark.parametrize(
    "what, size",
    [
        ("random", 8192),
        ("random", 4096 + 5000),  # not a whole number of 8-byte words
        ("zeros", 8192),
        ("small", 100),
        ("small", 4095),
        ("empty", 0),
    ],
)
def test_attach_foreign_object_raises_layout_error(foreign, what, size):
    if what == "random":
        data = os.urandom(size)
        while data[:8] == L.MAGIC or data[:8] == bytes(8):  # pragma: no cover - astronomically unlikely
            data = os.urandom(size)
        name = foreign(data)
    else:
        name = foreign(size=size)
    fds = open_fds()
    t0 = time.monotonic()
    with pytest.raises(shmq.LayoutError) as info:
        Segment.attach(name, wait=0.2)
    msg = str(info.value)
    assert "expected" in msg and "found" in msg, msg
    assert name in msg
    with pytest.raises(shmq.LayoutError):
        shmq.Ring.attach(name)
    with pytest.raises(shmq.LayoutError):
        SegmentView.open(name)  # the read-only view the tools use
    assert time.monotonic() - t0 < 10
    gc.collect()  # a half-built handle must neither warn nor keep a descriptor
    assert open_fds() == fds


def test_attach_waits_for_a_young_segment_to_be_published():
    import threading

    s = Segment.create(L.KIND_RING, SIZE)
    got = []
    t = threading.Thread(target=lambda: got.append(Segment.attach(s.name, wait=30)))
    try:
        t.start()
        wait_for(lambda: thread_is_in(t, Segment.attach), what="the attacher to wait for MAGIC")
        assert not got
        s.publish()
        t.join(30)
        assert len(got) == 1 and got[0].kind == L.KIND_RING
        got[0].close()
    finally:
        t.join(30)
        s.close()
        s.unlink()


def test_wrong_layout_version(seg):
    seg.words[L.W_VERSION] = L.LAYOUT_VERSION + 41
    with pytest.raises(shmq.LayoutError, match=rf"version {L.LAYOUT_VERSION + 41}.*expected {L.LAYOUT_VERSION}"):
        Segment.attach(seg.name)
    with pytest.raises(shmq.LayoutError):
        shmq.Ring.attach(seg.name)


def test_wrong_size_word(seg):
    seg.words[L.W_SIZE] = SIZE * 2
    with pytest.raises(shmq.LayoutError, match="bytes"):
        Segment.attach(seg.name)


def test_wrong_kind():
    pool = Segment.create(L.KIND_POOL, SIZE)
    try:
        pool.publish()
        with pytest.raises(shmq.LayoutError, match="pool, expected a ring"):
            Segment.attach(pool.name, L.KIND_RING)
        with pytest.raises(shmq.LayoutError, match="pool, expected a ring"):
            shmq.Ring.attach(pool.name)
        Segment.attach(pool.name).close()  # any kind: fine
    finally:
        pool.close()
        pool.unlink()


# -- a full /dev/shm ----------------------------------------------------------------
def test_full_dev_shm_raises_shared_memory_full():
    free = P.shm_free_bytes()
    assert free is not None and free == os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    before = session_entries()
    too_big = free + (1 << 30)
    for make in (
        lambda: Segment.create(L.KIND_RING, too_big),
        lambda: Segment.create(L.KIND_RING, too_big, name=unique_name("fu")),
        lambda: RingBuffer.create(too_big),
        lambda: shmq.Ring.create(too_big, name=unique_name("fu")),
    ):
        t0 = time.monotonic()
        with pytest.raises(shmq.SharedMemoryFull) as info:
            make()
        assert time.monotonic() - t0 < 10
        exc = info.value
        assert isinstance(exc, OSError) and isinstance(exc, shmq.ShmqError)
        assert exc.errno == errno.ENOSPC
        assert "/dev/shm" in str(exc) and "--shm-size" in str(exc)
        assert session_entries() == before  # nothing left behind


# -- leak warnings and exit-time ownership -----------------------------------------------
def test_unclosed_segment_warns():
    s = Segment.create(L.KIND_RING, SIZE)
    s.unlink()
    with pytest.warns(ResourceWarning, match="unclosed shmq segment"):
        del s
        gc.collect()


def test_unclosed_ring_warns():
    r = shmq.Ring.create(1024)
    r.unlink()
    with pytest.warns(ResourceWarning, match="unclosed shmq segment"):
        del r
        gc.collect()


def test_closed_handles_do_not_warn():
    import warnings

    r = shmq.Ring.create(1024)
    a = shmq.Ring.attach(r.name)
    a.close()
    r.close()
    r.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del r, a
        gc.collect()


CREATE_AND_EXIT = """
import shmq, sys
from shmq._segment import Segment, SegmentView
from shmq import _layout as L
r = shmq.Ring.create(4096)
s = Segment.create(L.KIND_RING, 8192)
s.publish()
r.write(b"left behind")
print(r.name, s.name, flush=True)
if sys.argv[1] == "closed":
    r.close(); s.close()
"""


@pytest.mark.parametrize("how", ["open", "closed"])
def test_creator_unlinks_at_normal_exit(how):
    res = run_python(CREATE_AND_EXIT, how)
    assert res.returncode == 0, res.stderr
    ring_name, seg_name = res.stdout.split()
    assert SESSION_TAG in ring_name
    assert not shm_exists(ring_name) and not shm_exists(seg_name)
    for suffix in P.SEM_SUFFIXES:
        assert not sem_exists(ring_name + suffix)
    assert "resource_tracker" not in res.stderr


def test_forked_child_exit_does_not_unlink_the_parents_segment():
    code = """
import os, sys, shmq
r = shmq.Ring.create(4096)
pid = os.fork()
if pid == 0:
    sys.exit(0)                       # normal exit, atexit runs in the child
os.waitpid(pid, 0)
print(os.path.exists('/dev/shm/' + r.name), r.name, flush=True)
"""
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    still_there, name = res.stdout.split()
    assert still_there == "True"
    assert not shm_exists(name)  # and the creator removed it at its own exit


def _create_in_child(q):
    r = shmq.Ring.create(4096)
    q.put(r.name)
    # returns without close/unlink: the process exits "normally"


def test_creator_unlinks_at_exit_of_a_multiprocessing_child(ctx):
    q = ctx.Queue()
    p = ctx.Process(target=_create_in_child, args=(q,))
    p.start()
    name = q.get(timeout=60)
    join_all([p])
    try:
        assert p.exitcode == 0
        assert not shm_exists(name), f"{ctx.get_start_method()} child left {name} behind"
        assert not sem_exists(name + "-ne")
    finally:
        P.shm_unlink(name)


ATTACH_AND_EXIT = """
import shmq, sys
from shmq._segment import Segment, SegmentView
r = shmq.Ring.attach(sys.argv[1])
s = Segment.attach(sys.argv[2])
print(r.read(timeout=10).decode(), flush=True)
r.write(b"still here")
# exits without close(): an attacher must never remove the segment
"""


def test_attacher_exit_never_removes_the_segment():
    r = shmq.Ring.create(4096)
    s = Segment.create(L.KIND_RING, SIZE)
    s.publish()
    try:
        for i in range(2):
            r.write(b"hello %d" % i)
            res = run_python(ATTACH_AND_EXIT, r.name, s.name)
            assert res.returncode == 0, res.stderr
            assert res.stdout.strip() == "hello %d" % i
            assert res.stderr == ""  # in particular no resource_tracker noise
            assert shm_exists(r.name) and shm_exists(s.name)
            assert sem_exists(r.name + "-ne")
            assert r.read(timeout=10) == b"still here"
        shmq.Ring.attach(r.name).close()
    finally:
        r.close()
        r.unlink()
        s.close()
        s.unlink()


def _attach_and_return(name, q):
    r = shmq.Ring.attach(name)
    q.put(r.read(timeout=30))
    r.write(b"pong")


def test_multiprocessing_attacher_exit_never_removes_the_segment(ctx):
    r = shmq.Ring.create(4096)
    try:
        q = ctx.Queue()
        r.write(b"ping")
        p = ctx.Process(target=_attach_and_return, args=(r.name, q))
        p.start()
        assert q.get(timeout=60) == b"ping"
        join_all([p])
        assert p.exitcode == 0
        assert shm_exists(r.name)
        assert r.read(timeout=10) == b"pong"
    finally:
        r.close()
        r.unlink()


# -- participants ---------------------------------------------------------------------
def _attach_and_wait(name, ready, go, close_first):
    # ready/go are pipe ends: killing a process blocked on a pipe is harmless,
    # unlike one blocked on a multiprocessing Event (pitfall #6)
    r = shmq.Ring.attach(name)
    if close_first:
        r.close()
    ready.send(True)
    go.poll(60)
    if not close_first:
        r.close()


def _start_us(pid):
    return int(psutil.Process(pid).create_time() * 1e6)


def test_participants_table():
    r = shmq.Ring.create(4096)
    procs, gos = [], []
    try:
        me = r.participants()
        assert len(me) == 1
        assert me[0].pid == os.getpid() and me[0].alive
        assert me[0].roles == ["creator"]
        assert abs(me[0].start_us - _start_us(os.getpid())) <= 50_000
        assert r.creator_alive()

        readies = []
        for close_first in (False, False, True):
            ready_r, ready_w = FORK.Pipe(duplex=False)
            go_r, go_w = FORK.Pipe(duplex=False)
            p = FORK.Process(target=_attach_and_wait, args=(r.name, ready_w, go_r, close_first))
            p.start()
            procs.append(p)
            readies.append(ready_r)
            gos.append(go_w)
        for ready in readies:
            assert ready.poll(30) and ready.recv()
        table = {p.pid: p for p in r.participants()}
        for p in procs[:2]:
            assert table[p.pid].alive and table[p.pid].roles == ["attached"]
            assert abs(table[p.pid].start_us - _start_us(p.pid)) <= 50_000
        assert procs[2].pid not in table  # closed handles leave the table

        # a killed attacher, not yet reaped (a zombie), is reported dead
        victim = procs[0]
        victim.kill()
        wait_for(lambda: is_zombie(victim.pid), what="the killed child to become a zombie")
        table = {p.pid: p for p in r.participants()}
        assert not table[victim.pid].alive
        assert table[procs[1].pid].alive
        # ... and after reaping
        join_all([victim])
        assert not {p.pid: p for p in r.participants()}[victim.pid].alive

        stats = r.statistics()
        infos = {i.pid: i for i in stats.participants}
        assert infos[os.getpid()].role == "creator" and infos[os.getpid()].alive
        assert not infos[victim.pid].alive
        for go in gos[1:]:
            go.send(True)
        join_all(procs)
        # a new attacher takes a dead entry: the table never grows without bound
        a = shmq.Ring.attach(r.name)
        try:
            pids = [p.pid for p in r.participants()]
            assert os.getpid() in pids and victim.pid not in pids
        finally:
            a.close()
    finally:
        for go in gos:
            go.close()  # EOF wakes any child still waiting
        join_all(procs)
        r.close()
        r.unlink()


def test_participant_with_reused_pid_is_not_alive(seg):
    # an entry whose start time does not match the running process is a dead
    # process whose pid was reused
    seg.register(L.ROLE_CREATOR)
    base = L.participant_word(seg._slot)
    seg.words[base + L.P_START_US] -= 10_000_000
    (p,) = seg.participants()
    assert p.pid == os.getpid() and not p.alive


def test_creator_alive_reports_a_dead_creator():
    code = """
import shmq
r = shmq.Ring.create(4096)
print(r.name, flush=True)
import os
os._exit(0)          # like a SIGKILL: no unlink at exit
"""
    res = run_python(code)
    assert res.returncode == 0, res.stderr
    name = res.stdout.strip()
    try:
        r = shmq.Ring.attach(name)
        try:
            assert not r.creator_alive()
            assert not r.statistics().creator_alive
        finally:
            r.close()
    finally:
        P.shm_unlink(name)


# -- admin lock after fork ----------------------------------------------------------------
def test_admin_lock_after_fork_is_the_childs_own(seg):
    seg.register(L.ROLE_CREATOR)

    def child_while_parent_holds():
        # A fresh open file description: the parent's flock excludes us ...
        try:
            fcntl.flock(seg._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            return 2
        # ... and the in-process thread lock inherited in the locked state was replaced.
        if not seg._thread_lock.acquire(False):
            return 3
        seg._thread_lock.release()
        return 0

    with seg.admin_lock():
        pid = fork_call(child_while_parent_holds)
        status = wait_pid(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

    r, w = os.pipe()

    def child_holds_then_dies():
        os.close(r)
        import select

        with seg.admin_lock():
            os.write(w, b"x")
            select.select([], [], [], 60)  # hold the lock until killed
        return 4

    pid = fork_call(child_holds_then_dies)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        with pytest.raises(BlockingIOError):
            fcntl.flock(seg._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(pid, 9)
        wait_pid(pid)
        os.close(r)
    # the kernel dropped the dead child's lock
    t0 = time.monotonic()
    with seg.admin_lock():
        pass
    assert time.monotonic() - t0 < 5
    # the child's exit did not unlink the parent's segment, nor clear the parent's entry
    assert shm_exists(seg.name)
    assert [p.pid for p in seg.participants()] == [os.getpid()]

"""Who removes a segment, and when: the creating process, however it ends.

Real processes throughout: programs ended by SIGTERM (what ``timeout``,
docker, systemd and Kubernetes send) while blocked in ``get()`` and while
idle; multiprocessing children of every start method that create a queue, a
ring, a channel or a slot pool and return without ``close()``; a SIGKILLed
creator whose leftovers the next process with ``SHMQ_SWEEP=1`` collects; and
the converse: attachers and forked children of an owner never unlink.

Every test names its segments under a tag of its own (``SHMQ_NAME_TAG``), so
it judges exactly the entries it made in /dev/shm, whatever else runs.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmq
from conftest import SHM_DIR, join_all

T = 30.0  # bound on every wait; none is expected to come near it


def entries(tag: str) -> list:
    """/dev/shm entries (segments and sem.* semaphores) named under ``tag``."""
    marker = f"shmq_{tag}_"
    return sorted(n for n in os.listdir(SHM_DIR) if marker in n)


@pytest.fixture
def tag(monkeypatch):
    """A tag of this test's own, set for this process (and so its children);
    whatever the test leaves under it is removed afterwards."""
    t = "L" + secrets.token_hex(3)[:5]
    monkeypatch.setenv("SHMQ_NAME_TAG", t)
    yield t
    for entry in entries(t):
        try:
            os.unlink(os.path.join(SHM_DIR, entry))
        except OSError:
            pass


def run_program(source: str, tag: str, *args: str, extra_env: dict = None) -> subprocess.Popen:
    env = dict(os.environ, SHMQ_NAME_TAG=tag, PYTHONPATH=os.pathsep.join(sys.path))
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_until(proc: subprocess.Popen, word: str) -> list:
    """Lines the program printed up to the one starting with ``word``."""
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"program ended before {word!r}: {lines} {proc.stderr.read()}")
        lines.append(line.strip())
        if line.startswith(word):
            return lines


def finish(proc: subprocess.Popen) -> tuple:
    try:
        out, err = proc.communicate(timeout=T)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("program did not end")
    return proc.returncode, out, err


# A program that owns everything shmq makes: a Queue with its slot pool and a
# large item waiting in a blob, a JoinableQueue, a Ring, a channel with a slot
# in flight, a bare SlotPool.
OWNER = """
    import os, signal, sys, time
    import numpy as np
    import shmq
    from shmq.lowlevel import SlotPool

    mode = sys.argv[1]
    def handler(signum, frame):
        print("handled", flush=True)
        sys.exit(3)
    if mode == "own-before":
        signal.signal(signal.SIGTERM, handler)
    if mode == "ignored":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    q = shmq.Queue()
    q.put(np.arange(1 << 18, dtype=np.int64))   # 2 MiB: the slot pool
    assert q.get(timeout=10).sum() == (1 << 18) * ((1 << 18) - 1) // 2
    q.put(np.ones(1 << 18))                      # a slot in flight
    q.put("x" * (2 << 20))                       # a blob, through the side ring
    jq = shmq.JoinableQueue()
    jq.put(1)
    ring = shmq.Ring.create(1 << 16)
    ring.write(b"abc")
    tx, rx = shmq.open_channel(slot_size=1 << 20, slot_count=2)
    tx.send({"a": np.ones(1 << 17)})
    pool = SlotPool.create(4096, 4)
    waiting = shmq.Queue()
    if mode == "own-after":
        signal.signal(signal.SIGTERM, handler)
    h = signal.getsignal(signal.SIGTERM)
    print("handler", {signal.SIG_DFL: "SIG_DFL", signal.SIG_IGN: "SIG_IGN"}.get(h) or h.__qualname__, flush=True)
    print("ready", flush=True)
    if mode in ("get", "own-before", "own-after"):
        waiting.get()          # blocked here when SIGTERM comes
    elif mode == "ignored":
        sys.stdin.readline()   # the test sends a line after SIGTERM
        print("survived", flush=True)
    else:
        while True:
            time.sleep(1)       # idle
"""


@pytest.mark.parametrize("mode", ["get", "idle"])
def test_sigterm_unlinks_everything_and_still_kills(tag, mode):
    proc = run_program(OWNER, tag, mode)
    lines = read_until(proc, "ready")
    assert "handler _on_sigterm" in lines  # the default was in place: shmq's is
    made = entries(tag)
    assert any(e.startswith("sem.") for e in made) and len(made) > 10, made
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == -signal.SIGTERM, (rc, err)  # "killed by SIGTERM", as by default
    assert "Traceback" not in err, err
    assert entries(tag) == []


@pytest.mark.parametrize("mode", ["own-before", "own-after"])
def test_a_programs_own_sigterm_handler_is_kept(tag, mode):
    """A handler installed before the first segment is never replaced; one
    installed later wins.  Either way sys.exit() in it lets atexit unlink."""
    proc = run_program(OWNER, tag, mode)
    lines = read_until(proc, "ready")
    assert "handler handler" in lines, lines
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert "handled" in out and rc == 3, (rc, out, err)
    assert entries(tag) == []


def test_an_ignored_sigterm_stays_ignored(tag):
    proc = run_program(OWNER, tag, "ignored")
    lines = read_until(proc, "ready")
    assert "handler SIG_IGN" in lines, lines
    proc.send_signal(signal.SIGTERM)
    proc.stdin.write("go on\n")
    proc.stdin.flush()
    rc, out, err = finish(proc)
    assert "survived" in out and rc == 0, (rc, out, err)
    assert entries(tag) == []


# -- multiprocessing children that create and return without close() ----------


def put_large_items(q):
    q.put(np.ones(1 << 20, dtype=np.uint8))  # the grandchild makes the pool
    q.put("y" * (2 << 20))  # and a blob


def send_large(tx):
    tx.send({"frame": np.ones((256, 1024), dtype=np.uint8)})


def create_and_return(tag, method, kind):
    os.environ["SHMQ_NAME_TAG"] = tag  # (a forkserver child has its server's environment)
    from shmq.lowlevel import SlotPool

    c = mp.get_context(method)
    if kind in ("queue", "joinable"):
        q = shmq.Queue() if kind == "queue" else shmq.JoinableQueue()
        p = c.Process(target=put_large_items, args=(q,))
        p.start()
        join_all([p], T)
        assert p.exitcode == 0
        assert q.qsize() == 2  # left in the queue: a slot in flight, a blob
    elif kind == "channel":
        tx, rx = shmq.open_channel(slot_size=1 << 18, slot_count=8)
        p = c.Process(target=send_large, args=(tx,))
        p.start()
        join_all([p], T)
        assert p.exitcode == 0
    elif kind == "ring":
        ring = shmq.Ring.create(1 << 16)
        ring.write(b"left behind")
    elif kind == "pool":
        pool = SlotPool.create(4096, 4)
        pool.allocate()
    assert entries(tag), "the child made nothing"
    # returns without close(): multiprocessing ends the child with os._exit()


@pytest.mark.parametrize("kind", ["queue", "joinable", "channel", "ring", "pool"])
def test_a_child_that_creates_and_returns_leaves_nothing(ctx, tag, kind):
    p = ctx.Process(target=create_and_return, args=(tag, ctx.get_start_method(), kind))
    p.start()
    join_all([p], T)
    assert p.exitcode == 0
    assert entries(tag) == []


def linger_then_use(name, returned, seen):
    returned.wait(T)  # the child's target has returned; it now joins us
    # Give an early unlink time to show: a child that unlinked before joining
    # would have done so within milliseconds of returning.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and os.path.exists(os.path.join(SHM_DIR, name)):
        time.sleep(0.01)
    q = shmq.Queue.attach(name)  # fails if the child's exit unlinked it already
    q.put("still here")
    seen.set()
    q.close()


def return_with_a_live_grandchild(tag, returned, seen):
    os.environ["SHMQ_NAME_TAG"] = tag
    q = shmq.Queue()
    ctx = mp.get_context("fork")
    ctx.Process(target=linger_then_use, args=(q.name, returned, seen)).start()
    returned.set()  # and return without joining: multiprocessing joins at exit


def test_a_child_unlinks_only_after_joining_its_children(tag):
    ctx = mp.get_context("fork")
    returned, seen = ctx.Event(), ctx.Event()
    p = ctx.Process(target=return_with_a_live_grandchild, args=(tag, returned, seen))
    p.start()
    join_all([p], T)
    assert p.exitcode == 0 and seen.is_set()
    assert entries(tag) == []


# -- a SIGKILLed creator's leftovers and SHMQ_SWEEP ------------------------------

KILLED = """
    import numpy as np, shmq, time
    q = shmq.Queue()
    q.put(np.ones(1 << 18))
    q.put("z" * (2 << 20))
    r = shmq.Ring.create(1 << 16)
    tx, rx = shmq.open_channel(slot_size=1 << 18, slot_count=8)
    tx.send(np.ones(1 << 14))
    print("ready", flush=True)
    while True:
        time.sleep(1)
"""

NEXT = """
    import shmq, sys
    r = shmq.Ring.create(1 << 16)
    print("made", r.name, flush=True)
    r.close()
    r.unlink()
"""


@pytest.mark.parametrize("sweep", ["1", ""])
def test_shmq_sweep_collects_a_killed_creators_segments(tag, sweep):
    proc = run_program(KILLED, tag)
    read_until(proc, "ready")
    orphans = entries(tag)
    proc.kill()
    finish(proc)
    assert entries(tag) == orphans  # SIGKILL: nothing could run
    nxt = run_program(NEXT, tag, extra_env={"SHMQ_SWEEP": sweep})
    rc, out, err = finish(nxt)
    assert rc == 0, err
    assert entries(tag) == ([] if sweep else orphans)


SWEEP_COUNT = """
    import os, shmq
    from shmq import _segment
    calls = []
    _segment.set_sweeper(calls.append)
    rings = [shmq.Ring.create(4096) for _ in range(3)]
    pid = os.fork()
    if pid == 0:
        shmq.Ring.create(4096).unlink()
        os._exit(len(calls))
    _, status = os.waitpid(pid, 0)
    print(calls, os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8)
    for r in rings:
        r.unlink()
"""


def test_the_sweep_runs_once_per_process_within_its_tag(tag):
    rc, out, err = finish(run_program(SWEEP_COUNT, tag, extra_env={"SHMQ_SWEEP": "1"}))
    assert rc == 0, err
    # one sweep here, and one more in the forked child (a process of its own)
    assert out.split() == [f"['shmq_{tag}_']", "2"], out
    assert entries(tag) == []


# -- attachers and forked children never unlink ---------------------------------

ATTACHER = """
    import os, signal, sys, time
    import numpy as np
    import shmq
    from shmq.lowlevel import SlotPool

    qname, rname, cname, pname, how = sys.argv[1:]
    q = shmq.Queue.attach(qname)
    q.put(np.ones(1 << 18))       # this attacher makes the queue's slot pool
    q.put("a" * (2 << 20))        # and a blob
    r = shmq.Ring.attach(rname)
    r.write(b"from the attacher")
    tx, rx = shmq.attach_channel(cname)
    tx.send(np.ones(1 << 14))
    pool = SlotPool.attach(pname)
    print("ready", flush=True)
    if how == "exit":
        sys.exit(0)
    while True:
        time.sleep(1)
"""


def _use_by_attaching(qname, rname, cname, pname):
    from shmq.lowlevel import SlotPool

    q = shmq.Queue.attach(qname)
    q.put(np.ones(1 << 18))
    q.put("c" * (2 << 20))
    r = shmq.Ring.attach(rname)
    r.write(b"from a child")
    tx, rx = shmq.attach_channel(cname)
    tx.send(np.ones(1 << 14))
    SlotPool.attach(pname)
    # returns without close()


def _owned_set(tag):
    from shmq.lowlevel import SlotPool

    q = shmq.Queue()
    ring = shmq.Ring.create(1 << 16)
    tx, rx = shmq.open_channel(slot_size=1 << 18, slot_count=8)
    pool = SlotPool.create(4096, 4)
    return q, ring, (tx, rx), pool


def _check_intact_and_close(tag, made, q, ring, chan, pool, puts):
    assert set(made) <= set(entries(tag))  # nothing of the owner's went
    for _ in range(puts):
        assert q.get(timeout=T).sum() == 1 << 18
        assert len(q.get(timeout=T)) == 2 << 20
        assert ring.read(timeout=T)
        assert chan[1].receive(timeout=T).sum() == 1 << 14
    q.close()  # the owner's last handle: the queue's names go, parts attachers made included
    for thing in (ring, chan[0], pool):
        thing.close()
        thing.unlink()
    chan[1].close()
    assert entries(tag) == []


@pytest.mark.parametrize("how", ["exit", "sigterm"])
def test_an_unrelated_attacher_never_unlinks(tag, how):
    q, ring, chan, pool = _owned_set(tag)
    made = entries(tag)
    proc = run_program(ATTACHER, tag, q.name, ring.name, chan[0].name, pool.name, how)
    read_until(proc, "ready")
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc)
    assert rc == (0 if how == "exit" else -signal.SIGTERM), err
    _check_intact_and_close(tag, made, q, ring, chan, pool, 1)


def test_a_child_that_only_attaches_never_unlinks(ctx, tag):
    q, ring, chan, pool = _owned_set(tag)
    made = entries(tag)
    p = ctx.Process(target=_use_by_attaching, args=(q.name, ring.name, chan[0].name, pool.name))
    p.start()
    join_all([p], T)
    assert p.exitcode == 0
    _check_intact_and_close(tag, made, q, ring, chan, pool, 1)


FORKS = """
    import multiprocessing as mp, os, signal, sys, time
    import numpy as np
    import shmq

    q = shmq.Queue()
    q.put(np.ones(1 << 18))
    q.put("b" * (2 << 20))
    ring = shmq.Ring.create(1 << 16)
    tx, rx = shmq.open_channel(slot_size=1 << 18, slot_count=8)
    def names():
        tag = os.environ["SHMQ_NAME_TAG"]
        return sorted(n for n in os.listdir("/dev/shm") if f"shmq_{tag}_" in n)
    made = names()

    def use():  # inherited handles: the child is an attacher
        q.put(np.ones(1 << 18))
        ring.write(b"child")
        tx.send(np.ones(1 << 14))

    # 1. os.fork(), the child leaving through sys.exit(): its atexit runs
    pid = os.fork()
    if pid == 0:
        use()
        sys.exit(0)
    assert os.waitpid(pid, 0)[1] == 0

    # 2. a multiprocessing fork child returning without close()
    p = mp.get_context("fork").Process(target=use)
    p.start(); p.join(30)
    assert p.exitcode == 0

    # 3. a fork child SIGTERMed: it has SIGTERM's default action back
    ready = mp.get_context("fork").Event()
    def wait_for_sigterm():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        use()
        ready.set()
        time.sleep(60)
    p = mp.get_context("fork").Process(target=wait_for_sigterm)
    p.start()
    assert ready.wait(30)
    p.terminate(); p.join(30)
    assert p.exitcode == -signal.SIGTERM, p.exitcode

    assert set(made) <= set(names()), (made, names())
    assert q.qsize() == 5
    print("intact", flush=True)
    # and the owner's own exit (atexit) unlinks it all
"""


def test_fork_children_of_an_owner_never_unlink_its_segments(tag):
    rc, out, err = finish(run_program(FORKS, tag))
    assert rc == 0 and "intact" in out, (rc, out, err)
    assert entries(tag) == []


REPLACED = """
    import shmq, sys
    ring = shmq.Ring.create(1 << 16, name=sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()  # meanwhile the name is unlinked and made again by another process
"""


def test_exit_leaves_a_name_made_again_by_another_process(tag):
    from shmq import _platform as P

    name = f"shmq_{tag}_again"
    proc = run_program(REPLACED, tag, name)
    read_until(proc, "ready")
    P.shm_unlink(name)  # (as `unlink()` in an attacher, or `shmq gc`)
    ring = shmq.Ring.create(1 << 16, name=name)  # ours now
    try:
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        rc, out, err = finish(proc)
        assert rc == 0, err
        ring.write(b"still ours")
        other = shmq.Ring.attach(name)
        assert other.read(timeout=T) == b"still ours"
        other.close()
    finally:
        ring.close()
        ring.unlink()


MAIN_RETURNS = """
    import os, sys, time
    if sys.argv[1] == "before":
        import multiprocessing.util  # its atexit function registered before shmq's
    import shmq
    q = shmq.Queue()
    import multiprocessing as mp

    def late_user(name, returned):
        returned.wait(30)
        deadline = time.monotonic() + 0.5  # time for an early unlink to show
        while time.monotonic() < deadline and os.path.exists("/dev/shm/" + name):
            time.sleep(0.01)
        shmq.Queue.attach(name).close()
        print("attached", flush=True)

    returned = mp.get_context("fork").Event()
    mp.get_context("fork").Process(target=late_user, args=(q.name, returned)).start()
    returned.set()  # the main module ends here: exit joins the child, then unlinks
"""


@pytest.mark.parametrize("imported", ["before", "after"])
def test_the_main_process_unlinks_after_joining_its_children(tag, imported):
    """Whether multiprocessing was imported before shmq or after the first
    queue, the creator's exit unlinks only once its children are joined."""
    rc, out, err = finish(run_program(MAIN_RETURNS, tag, imported))
    assert rc == 0 and "attached" in out, (rc, out, err)
    assert entries(tag) == []


THREAD_FIRST = """
    import signal, threading
    import shmq
    def state():
        h = signal.getsignal(signal.SIGTERM)
        return "default" if h is signal.SIG_DFL else h.__qualname__
    rings = []
    t = threading.Thread(target=lambda: rings.append(shmq.Ring.create(4096)))
    t.start(); t.join(30)
    print(state())                       # a thread may not set handlers: none yet
    rings.append(shmq.Ring.create(4096))
    print(state())                       # the main thread's first create installs it
    for r in rings:
        r.close(); r.unlink()
"""


def test_the_sigterm_handler_is_installed_from_the_main_thread_only(tag):
    rc, out, err = finish(run_program(THREAD_FIRST, tag))
    assert rc == 0, err
    assert out.split() == ["default", "_on_sigterm"], out
    assert entries(tag) == []

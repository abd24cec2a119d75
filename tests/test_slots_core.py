"""The slot pool's C moves (shmq._core.PoolCore) and the Python ones
(shmq/_slots.py, the specification) are one protocol.

- a Hypothesis state machine drives the C moves and the Python originals
  (``_py_try_allocate``, ``_py_mark_sent``, ``_py_set_fence``,
  ``_py_acquire``, ``_py_release_later``), interleaved on one pool by a
  source handle and a holder handle, against a model of every slot;
- a C-core process and a pure-Python process (``SHMQ_PURE=1``) on one pool,
  both ways, through a channel's loans (the 1 MiB path) and the copy path;
- SIGKILL at every step of the C moves (``SHMQ_CORE_STOP_AT=N``): the pool
  stays usable and the dead process's slots come back.

Everything but the pure-core check is skipped when the extension is not
built (or SHMQ_PURE is set).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmq
from shmq import _slots
from shmq._slots import SlotPool

from _core_helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_C = _slots.CORE == "c"
needs_c = pytest.mark.skipif(not HAVE_C, reason="shmq._core is not built (or SHMQ_PURE is set)")
CHILD_TIMEOUT = 60


def _env(pure: bool, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("SHMQ_PURE", None)
    if pure:
        env["SHMQ_PURE"] = "1"
    return env


def _run(code: str, pure: bool, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=_env(pure, **extra),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _finish(p: subprocess.Popen) -> str:
    try:
        out, err = p.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("child hung")
    assert p.returncode == 0, err.decode()
    return out.decode()


def test_pool_core_follows_shmq_pure():
    code = "import shmq._slots as s; print(s.CORE, type(s.SlotPool.try_allocate).__name__)"
    assert _finish(_run(code, True)).split() == ["python", "function"]
    try:
        import shmq._core  # noqa: F401
    except ImportError:
        return
    assert _finish(_run(code, False)).split() == ["c", "method_descriptor"]


# -- the C moves and the Python ones, interleaved against a model -----------
class PoolCoresMachine(RuleBasedStateMachine):
    """A source handle and a holder handle on one pool of 3 slots.  Each
    move runs in its C form or its Python original; the model says what
    each slot is: free, loaned (gen), sent (gen, fenced?), held (gen)."""

    def __init__(self):
        super().__init__()
        self.pool = SlotPool.create(4096, 3)
        self.holder = SlotPool.attach(self.pool.name)
        self.loaned = {}  # slot -> gen
        self.sent = {}  # slot -> (gen, fenced)
        self.views = {}  # slot -> (gen, view) acquired by the holder, not released
        self.released = set()  # sent slots the holder released (their return is pending)

    def teardown(self):
        for i, (gen, view) in self.views.items():
            view.release()
            self.holder.release(i, gen)  # (else close() waits for these holds)
        self.holder.close()
        self.pool.close()
        self.pool.unlink()

    def _free_model(self):
        # a released, fenced slot comes back with the next collect/allocation
        return 3 - len(self.loaned) - len(self.sent)

    @precondition(lambda self: self._free_model() > 0 or any(self.sent[j][1] for j in self.released))
    @rule(c=st.booleans())
    def allocate(self, c):
        fn = self.pool.try_allocate if c else self.pool._py_try_allocate
        before = set(self.released)
        got = fn(1)
        assert got is not None and len(got) == 1, (self.loaned, self.sent, self.released)
        (i,) = got
        # slots returned and fenced are free now (one may be reused at once)
        for j in before:
            if self.sent.get(j, (0, False))[1]:
                del self.sent[j]
                self.released.discard(j)
        assert i not in self.loaned and i not in self.sent
        gen = self.pool.generation(i)
        assert gen >= 1
        self.loaned[i] = gen
        self.pool.view(i, 8)[:8] = b"%08d" % (i * 1000 + gen % 1000)

    @precondition(lambda self: self.loaned)
    @rule(data=st.data(), c=st.booleans(), fenced=st.booleans())
    def mark_sent(self, data, c, fenced):
        i = data.draw(st.sampled_from(sorted(self.loaned)))
        fn = self.pool.mark_sent if c else self.pool._py_mark_sent
        (gen,) = fn((i,), (8,), 1, fenced)
        assert gen == self.loaned.pop(i)
        self.sent[i] = (gen, not fenced)

    @precondition(lambda self: any(not f for _, f in self.sent.values()))
    @rule(data=st.data(), c=st.booleans())
    def set_fence(self, data, c):
        i = data.draw(st.sampled_from(sorted(j for j, (_, f) in self.sent.items() if not f)))
        fn = self.pool.set_fence if c else self.pool._py_set_fence
        early = i in self.pool._early  # its return was drained before the fence
        fn((i,), 12345)
        gen, _ = self.sent[i]
        self.sent[i] = (gen, True)
        if early:  # freed now (else by the next drain of the return queue)
            assert i in self.released
            del self.sent[i]
            self.released.discard(i)

    @precondition(lambda self: any(i not in self.views and i not in self.released for i in self.sent))
    @rule(data=st.data(), c=st.booleans())
    def acquire(self, data, c):
        i = data.draw(st.sampled_from(sorted(i for i in self.sent if i not in self.views and i not in self.released)))
        gen, _ = self.sent[i]
        fn = self.holder.acquire if c else self.holder._py_acquire
        view = fn(i, gen)
        assert bytes(view) == b"%08d" % (i * 1000 + gen % 1000)
        assert self.holder.holding(i) == 1
        self.views[i] = (gen, view)

    @rule(c=st.booleans(), i=st.integers(0, 2), gen=st.integers(-1, 1 << 31))
    def acquire_stale(self, c, i, gen):
        if i in self.sent and self.sent[i][0] == gen:
            return
        fn = self.holder.acquire if c else self.holder._py_acquire
        with pytest.raises(shmq.SlotError):
            fn(i, gen)

    @precondition(lambda self: self.views)
    @rule(data=st.data(), c=st.booleans())
    def release_later(self, data, c):
        i = data.draw(st.sampled_from(sorted(self.views)))
        gen, view = self.views.pop(i)
        view.release()
        fn = self.holder.release_later if c else self.holder._py_release_later
        fn(i, gen, self.holder.epoch)
        assert self.holder.holding(i) == 0
        self.released.add(i)

    @precondition(lambda self: self.loaned)
    @rule(data=st.data())
    def abort(self, data):
        i = data.draw(st.sampled_from(sorted(self.loaned)))
        self.pool.abort([i])
        del self.loaned[i]

    @invariant()
    def tables_agree(self):
        info = [self.pool.slot_info(i) for i in range(3)]
        for i, s in enumerate(info):
            if i in self.loaned:
                assert s.state == "loaned" and s.generation == self.loaned[i]
            elif i in self.sent:
                assert s.state == "sent" and s.generation == self.sent[i][0]
                assert [h for _, h in s.holders] == ([1] if i in self.views else [])
            else:
                assert s.state == "free"
        # the raw hold words: zero until acquired in this generation (a stale
        # word would count as a hold taken and free a slot nobody received)
        w, pool = self.pool.segment.words, self.pool
        for i in range(3):
            words = [w[pool._holdw + m * 3 + i] for m in range(pool.max_members)]
            me = self.holder._member
            expected = [0] * pool.max_members
            if i in self.views:
                expected[me] = 1 << 32
            elif i in self.released and i in self.sent:
                expected[me] = (1 << 32) + 1
            assert words == expected, (i, words)
        assert self.pool._loaned == self.loaned
        assert self.pool._outstanding == {i: g for i, (g, _) in self.sent.items()}
        assert self.pool._unfenced == {i for i, (_, f) in self.sent.items() if not f}
        assert self.holder._holds == len(self.views)
        st_ = self.pool.statistics()
        assert (st_.loaned, st_.sent) == (len(self.loaned), len(self.sent))
        assert st_.allocations - st_.frees == len(self.loaned) + len(self.sent)


TestPoolCoresMachine = needs_c(PoolCoresMachine.TestCase)
TestPoolCoresMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- a C process and a pure-Python process on one pool ------------------------
RECEIVER = r"""
import sys, shmq, numpy as np, shmq._slots as s
name, n, core = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert s.CORE == core, s.CORE
tx, rx = shmq.attach_channel(name)
tx.close()
total = 0
for k in range(n):
    a = rx.receive(timeout=30)
    assert a.shape == (8192,) and a[0] == k and a[-1] == k, (k, a[0], a[-1])
    total += int(a[1])
    del a
print(total, flush=True)
rx.close()
"""

SENDER = r"""
import sys, shmq, numpy as np, shmq._slots as s
name, n, core = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert s.CORE == core, s.CORE
tx, rx = shmq.attach_channel(name)
rx.close()
for k in range(n):
    if k % 3 == 2:  # the copy path too
        tx.send(np.full(8192, k, np.float64), timeout=30)
    else:
        with tx.loan_array(8192, np.float64, timeout=30) as a:
            a[:] = k
print("sent", flush=True)
tx.close()
"""


@needs_c
@pytest.mark.parametrize("sender_pure", [False, True], ids=["c-sends", "pure-sends"])
def test_c_and_pure_processes_share_one_pool(sender_pure):
    """Loans and copies through one channel, sender on one core and
    receiver on the other: every array arrives whole, and every slot comes
    back to the sender (the pool ends with all slots free)."""
    n = 600
    tx, rx = shmq.open_channel(1 << 14, slot_size=8192 * 8, slot_count=4)
    try:
        recv = _run(RECEIVER, not sender_pure, tx.name, str(n), "c" if sender_pure else "python")
        send = _run(SENDER, sender_pure, tx.name, str(n), "python" if sender_pure else "c")
        assert _finish(send).split() == ["sent"]
        assert int(_finish(recv)) == sum(range(n))
        pool = tx._pool
        st_ = pool.statistics()
        assert st_.corrupt_returns == st_.lost_returns == 0
        assert st_.loaned == 0
        # the sender's last slots come back to nobody (it closed): the janitor frees them
        wait_for(lambda: pool.reclaim() >= 0 and pool.free_count() == pool.slot_count, timeout=5, what="all slots free")
        assert pool.statistics().allocations == pool.statistics().frees
    finally:
        tx.unlink()
        tx.close()
        rx.close()


# -- SIGKILL at every step of the C moves -----------------------------------
# A source that runs the C moves with SHMQ_CORE_STOP_AT set: it allocates a
# slot, marks it sent and prints its reference, then waits for a line on
# stdin (the parent acquired and released it) before the next allocation,
# which therefore drains a return and loans that slot again.
SOURCE = r"""
import sys, shmq._slots as s
assert s.CORE == "c"
pool = s.SlotPool.attach(sys.argv[1])
pool.reclaim()  # (makes the member entry: the first allocation runs the C take)
for k in range(50):
    (i,) = pool.try_allocate(1)
    pool.view(i, 8)[:8] = b"%08d" % k
    (g,) = pool.mark_sent((i,), (8,))
    print(i, g, flush=True)
    sys.stdin.readline()
"""
# A holder: reads references from stdin, acquires and releases each (as a
# view's finalizer does), prints "ok".
HOLDER = r"""
import sys, shmq._slots as s
assert s.CORE == "c"
pool = s.SlotPool.attach(sys.argv[1])
for line in sys.stdin:
    i, g = map(int, line.split())
    v = pool.acquire(i, g)
    v.release()
    pool.release_later(i, g, pool.epoch)
    print("ok", flush=True)
"""
# try_allocate: 51 (return queue drained), 52 (pool lock held), 53 (slot
# fields written, STATE not yet), 54 (slot LOANED and counted), 55 (a
# returned slot cleared and its GEN bumped, STATE still SENT), 56 (LOANED
# again); mark_sent: 61 (size written, STATE not yet), 62 (SENT);
# acquire: 71 (hold recorded); release_later: 81 (hold released, notice not
# pushed), 82 (notice written, RQ_TAIL not yet), 83 (RQ_TAIL published,
# pool lock held).
SOURCE_STEPS = (51, 52, 53, 54, 55, 56, 61, 62)
HOLDER_STEPS = (71, 81, 82, 83)


def _stopped(p: subprocess.Popen) -> bool:
    try:
        return psutil.Process(p.pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


def _line(p: subprocess.Popen, timeout: float = 20) -> bytes:
    """One line of the child's stdout, or b"" once it stopped or exited."""
    deadline = time.monotonic() + timeout
    import select

    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 0.01)
        if ready:
            return p.stdout.readline()
        if _stopped(p) or p.poll() is not None:
            ready, _, _ = select.select([p.stdout], [], [], 0)
            return p.stdout.readline() if ready else b""
    raise AssertionError("child neither answered nor stopped")


class _ConsumedRing:
    """The fence of a ring whose every message was consumed and one of whose
    consumers died (what a channel's RingFence reports after a crash): a
    slot sent by a dead source and never acquired is an orphan."""

    def position(self) -> int:
        return 1

    def passed(self, position: int) -> bool:
        return True

    def someone_died(self) -> bool:
        return True


def _usable(pool: SlotPool, t0: float) -> None:
    """Every slot comes back (a janitor pass for the dead member), within the
    bound, then a full round of hand-offs works."""
    pool.orphan_seconds = 0.2
    pool.fence = _ConsumedRing()
    wait_for(lambda: pool.reclaim() >= 0 and pool.free_count() == pool.slot_count, timeout=5,
             what="every slot back")
    # (measured 0.002-0.024 s, 0.205 s where the orphan rule's 0.2 s applies)
    assert time.monotonic() - t0 < 1.0, time.monotonic() - t0
    for k in range(2 * pool.slot_count):
        (i,) = pool.allocate(1, timeout=2)
        (g,) = pool.mark_sent((i,), (8,))
        pool.acquire(i, g).release()
        pool.release(i, g)
    pool.collect()
    assert pool.free_count() == pool.slot_count
    st_ = pool.statistics()
    assert st_.loaned == st_.sent == 0 and st_.free == pool.slot_count


@needs_c
@pytest.mark.parametrize("step", SOURCE_STEPS)
def test_sigkill_source_at_every_step_of_the_c_moves(step):
    pool = SlotPool.create(4096, 3)
    p = None
    try:
        p = _run(SOURCE, False, pool.name, SHMQ_CORE_STOP_AT=str(step))
        while True:
            line = _line(p)
            if not line:
                break
            i, g = map(int, line.split())
            try:
                pool.acquire(i, g).release()
                pool.release(i, g)
            except shmq.SlotError:
                pass
            p.stdin.write(b"go\n")
            p.stdin.flush()
        assert _stopped(p), p.poll()
        t0 = time.monotonic()
        p.kill()
        p.communicate(timeout=CHILD_TIMEOUT)
        _usable(pool, t0)
    finally:
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=CHILD_TIMEOUT)  # (closes the pipes)
        pool.close()
        pool.unlink()


@needs_c
@pytest.mark.parametrize("step", HOLDER_STEPS)
def test_sigkill_holder_at_every_step_of_the_c_moves(step):
    pool = SlotPool.create(4096, 3)
    p = None
    try:
        p = _run(HOLDER, False, pool.name, SHMQ_CORE_STOP_AT=str(step))
        for k in range(50):
            (i,) = pool.allocate(1, timeout=2)
            (g,) = pool.mark_sent((i,), (8,))
            p.stdin.write(b"%d %d\n" % (i, g))
            p.stdin.flush()
            if _line(p) != b"ok\n":
                break
        assert _stopped(p), p.poll()
        t0 = time.monotonic()
        p.kill()
        p.communicate(timeout=CHILD_TIMEOUT)
        _usable(pool, t0)
    finally:
        if p is not None:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=CHILD_TIMEOUT)  # (closes the pipes)
        pool.close()
        pool.unlink()


# -- the C moves fall back to the Python ones for every unusual case --------
@needs_c
def test_c_moves_raise_what_the_python_raises():
    pool = SlotPool.create(4096, 2)
    holder = SlotPool.attach(pool.name)
    try:
        for fn in (pool.try_allocate, pool._py_try_allocate):
            with pytest.raises(shmq.MessageTooLarge):
                fn(1 << 70)  # (an int64 overflow in C: no error left pending)
            with pytest.raises(ValueError, match="'count'"):
                fn(0)
        (i,) = pool.try_allocate(1)
        for fn in (pool.mark_sent, pool._py_mark_sent):
            with pytest.raises(shmq.SlotError, match="not loaned"):
                fn((1 - i,), (8,))
            with pytest.raises(ValueError, match="'nbytes'"):
                fn((i,), (4097,))
            with pytest.raises(ValueError, match="'deliveries'"):
                fn((i,), (8,), 0)
        (g,) = pool.mark_sent([i], [8], fenced=True)  # keywords: the Python
        for fn in (holder.acquire, holder._py_acquire):
            with pytest.raises(shmq.SlotError, match="out of range"):
                fn(5, g)
            with pytest.raises(shmq.SlotError, match="stale or corrupt"):
                fn(i, g + 1)
        v = holder.acquire(i, g)
        assert holder.holding(i) == 1
        v.release()
        holder.release_later(i, g, holder.epoch)
        holder.release_later(i, g, holder.epoch)  # twice: ignored, as in Python
        holder.release_later(i, g, holder.epoch + 1)  # a forked child's copy: nothing
        assert holder.holding(i) == 0
        assert pool.collect() == 0  # drained: waits for its fence
        pool.set_fence([i], 7)
        assert pool.slot_info(i).state == "free"  # returned before its fence: freed there
        pool.close()
        with pytest.raises(shmq.ClosedError):
            pool.try_allocate(1)
        holder.close()
        with pytest.raises(shmq.ClosedError):
            holder.acquire(i, g)
    finally:
        holder.close()
        pool.close()
        pool.unlink()


@needs_c
def test_loan_path_costs_no_python_slot_moves():
    """The channel's loan + send + receive + drop runs the C moves only (no
    fallback to the Python originals) once the pool is warm."""
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 16, slot_count=4, multi_producer=False, multi_consumer=False)
    calls = []
    pool_cls = type(tx._pool)
    saved = {n: getattr(pool_cls, n) for n in ("_py_try_allocate", "_py_mark_sent", "_py_set_fence", "_py_acquire",
                                               "_py_release_later")}
    try:
        for k in range(10):  # warm: every slot's first use pre-faults it
            with tx.loan_array(1 << 13, np.float64) as a:
                a[0] = k
            del a
            b = rx.receive(timeout=5)
            del b
        for name, fn in saved.items():
            setattr(pool_cls, name, lambda self, *a, _n=name, _f=fn, **k: (calls.append(_n), _f(self, *a, **k))[1])
        for k in range(50):
            with tx.loan_array(1 << 13, np.float64) as a:
                a[0] = k
            b = rx.receive(timeout=5)
            assert b[0] == k
            del b
        assert calls == []
    finally:
        for name, fn in saved.items():
            setattr(pool_cls, name, fn)
        tx.unlink()
        tx.close()
        rx.close()

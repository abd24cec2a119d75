"""The public channel API: send/receive, loans on both sides, back-pressure,
several producers, and the contract of every error."""
import gc
import subprocess
import sys
import threading

import numpy as np
import pytest

import shmq
from conftest import join_all, unique_name


@pytest.fixture
def channel():
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 16, slot_count=3, threshold=1024, name=unique_name("ch"))
    yield tx, rx
    tx.unlink()
    tx.close()
    rx.close()


def slots_in_use(tx):
    tx.collect()
    return tx.statistics().pool.slot_count - tx.statistics().pool.free


# -- creation ---------------------------------------------------------------------
def test_open_and_attach(channel):
    tx, rx = channel
    tx2, rx2 = shmq.attach_channel(tx.name)
    try:
        tx2.send("hello from a second handle")
        assert rx.receive(timeout=5) == "hello from a second handle"
        tx.send(np.arange(1000.0))
        assert rx2.receive(timeout=5)[999] == 999.0
    finally:
        tx2.close()
        rx2.close()
    with pytest.raises(FileNotFoundError):
        shmq.attach_channel(unique_name("none"))
    with pytest.raises(ValueError, match=r"^'threshold' must be a positive int, got 0$"):
        shmq.open_channel(threshold=0)
    with pytest.raises(TypeError, match="use open_channel"):
        shmq.SendChannel(None)


def test_a_bare_pool_is_not_a_channel():
    from shmq.lowlevel import SlotPool

    pool = SlotPool.create(64, 1)
    try:
        with pytest.raises(shmq.LayoutError, match="is a slot pool without a ring, not a channel"):
            shmq.attach_channel(pool.name)
    finally:
        pool.close()
        pool.unlink()


def test_unrelated_process_attaches_by_name(channel):
    tx, rx = channel
    code = (
        "import sys, numpy as np, shmq\n"
        "tx, rx = shmq.attach_channel(sys.argv[1])\n"
        "a = rx.receive(timeout=30)\n"
        "tx.send({'sum': float(a.sum()), 'echo': a * 2}, timeout=30)\n"
        "del a\n"
        "tx.close(); rx.close()\n"
    )
    tx.send(np.ones(5000))
    res = subprocess.run([sys.executable, "-c", code, tx.name], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    reply = rx.receive(timeout=5)
    assert reply["sum"] == 5000.0 and reply["echo"][0] == 2.0


# -- send / receive -----------------------------------------------------------------
def _echo(rx, tx, count):
    for _ in range(count):
        tx.send(rx.receive(timeout=30), timeout=30)


def test_objects_of_every_size_keep_their_order_across_processes(ctx, channel):
    tx, rx = channel
    back_tx, back_rx = shmq.open_channel(1 << 16, slot_size=1 << 16, slot_count=3, threshold=1024)
    try:
        proc = ctx.Process(target=_echo, args=(rx, back_tx, 30))
        proc.start()
        sent = []
        for k in range(30):
            obj = [k, "small"] if k % 3 else {"k": k, "arr": np.full(2000 + k, k, np.int32)}
            tx.send(obj, timeout=30)
            sent.append(obj)
            got = back_rx.receive(timeout=30)
            if k % 3:
                assert got == obj
            else:
                assert got["k"] == k and np.array_equal(got["arr"], obj["arr"])
        join_all([proc])
        assert proc.exitcode == 0
    finally:
        back_tx.unlink()
        back_tx.close()
        back_rx.close()


def test_received_arrays_are_read_only_views_and_copy_is_private(channel):
    tx, rx = channel
    tx.send(np.arange(4096.0))
    view = rx.receive(timeout=5)
    assert not view.flags.writeable
    assert slots_in_use(tx) == 1
    tx.send(np.arange(4096.0))
    mine = rx.receive(timeout=5, copy=True)
    assert mine.flags.writeable
    assert slots_in_use(tx) == 1  # the copy returned its slot at once
    del view
    gc.collect()
    assert slots_in_use(tx) == 0


def test_nowait_variants(channel):
    tx, rx = channel
    with pytest.raises(shmq.Empty):
        rx.receive_nowait()
    held = []
    for _ in range(3):
        tx.send_nowait(np.zeros(1000))
        held.append(rx.receive_nowait())
    with pytest.raises(shmq.Full, match="has no 1 free slot"):
        tx.send_nowait(np.zeros(1000))
    assert isinstance(shmq.Full(), shmq.WouldBlock)
    tx.send_nowait("small objects do not need a slot")
    assert rx.receive_nowait() == "small objects do not need a slot"
    del held


def test_back_pressure_blocks_the_sender_until_a_view_dies(channel):
    tx, rx = channel
    views = []
    for _ in range(3):
        tx.send(np.ones(2000))
        views.append(rx.receive(timeout=5))
    started, errors = threading.Event(), []

    def sender():
        started.set()
        try:
            tx.send(np.full(2000, 7.0), timeout=30)
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=sender)
    t.start()
    assert started.wait(10)
    t.join(0.3)
    assert t.is_alive(), "send() appeared not to block on a full pool"
    views.pop()
    gc.collect()
    t.join(30)
    assert not t.is_alive() and not errors
    views.append(rx.receive(timeout=5))
    assert views[-1][0] == 7.0
    with pytest.raises(shmq.Full):
        tx.send(np.ones(2000), timeout=0.05)


def _multi_sender(tx, tag, count):
    for k in range(count):
        tx.send({"tag": tag, "k": k, "a": np.full(1000, k, np.float64)}, timeout=30)


def test_several_producer_processes_share_one_pool(ctx, channel):
    tx, rx = channel
    procs = [ctx.Process(target=_multi_sender, args=(tx, tag, 25)) for tag in range(3)]
    for p in procs:
        p.start()
    seen = {0: [], 1: [], 2: []}
    for _ in range(75):
        msg = rx.receive(timeout=60)
        assert msg["a"][999] == msg["k"]
        seen[msg["tag"]].append(msg["k"])
        del msg
    join_all(procs)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert seen == {t: list(range(25)) for t in range(3)}  # each producer's order is kept
    stats = tx.statistics().pool
    assert stats.allocations == 75 and stats.corrupt_returns == 0


def test_on_return_runs_for_every_returned_slot(channel):
    tx, rx = channel
    returned = []
    tx.on_return = returned.append
    assert tx.on_return == returned.append
    for _ in range(5):
        tx.send(np.ones(2000), timeout=5)
        rx.receive(timeout=5)
    gc.collect()
    tx.collect()
    assert len(returned) == 5 and set(returned) <= {0, 1, 2}


def test_statistics(channel):
    tx, rx = channel
    tx.send(np.ones(2000))
    tx.send("x")
    stats = rx.statistics()
    assert stats.ring.messages_in == 2
    assert stats.pool.sent == 1 and stats.pool.slot_size == 1 << 16
    assert (stats.open_senders, stats.open_receivers) == (1, 1)
    rx2 = shmq.ReceiveChannel.attach(tx.name)  # one side only
    tx2 = shmq.SendChannel.attach(tx.name)
    assert (tx.statistics().open_senders, tx.statistics().open_receivers) == (2, 2)
    rx2.close()
    tx2.close()
    assert (tx.statistics().open_senders, tx.statistics().open_receivers) == (1, 1)


# -- loans: the producer writes in place --------------------------------------------
def test_loan_writes_in_place_and_the_receiver_sees_it(channel):
    tx, rx = channel
    with tx.loan(1000) as buf:
        assert isinstance(buf, memoryview) and not buf.readonly and buf.nbytes == 1000
        buf[:5] = b"hello"
    got = rx.receive(timeout=5)
    assert isinstance(got, memoryview) and got.readonly and bytes(got[:5]) == b"hello" and got.nbytes == 1000
    with pytest.raises(TypeError):
        got[0] = 1


def test_loan_array_writes_in_place(channel):
    tx, rx = channel
    with tx.loan_array((64, 32), np.float32) as a:
        assert a.flags.writeable and a.flags.c_contiguous
        a[:] = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    got = rx.receive(timeout=5)
    assert got.dtype == np.float32 and got.shape == (64, 32) and not got.flags.writeable
    assert np.array_equal(got, np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    del got


@pytest.mark.parametrize(
    "shape, dtype",
    [(10, "u1"), ((), "f8"), ((0,), "i4"), ((3, 4, 5), ">i2"), (7, "datetime64[ns]"), (5, [("x", "f4"), ("y", "i8")])],
)
def test_loan_array_dtypes_and_shapes(channel, shape, dtype):
    tx, rx = channel
    dt = np.dtype(dtype)
    with tx.loan_array(shape, dt) as a:
        a[...] = np.ones(a.shape, dt) if dt.fields is None else np.zeros(a.shape, dt)
    got = rx.receive(timeout=5)
    assert got.dtype == dt and got.shape == (shape if isinstance(shape, tuple) else (shape,))


def test_loan_partial_send_and_explicit_api(channel):
    tx, rx = channel
    loan = tx.loan(500)
    loan.buf[:3] = b"abc"
    loan.send(3)
    assert bytes(rx.receive(timeout=5)) == b"abc"
    with pytest.raises(shmq.SlotError, match="already sent or aborted"):
        loan.send()
    assert loan.buf is None
    aloan = tx.loan_array(10, np.int8)
    with pytest.raises(ValueError, match="not given for arrays"):
        aloan.send(5)
    arr = aloan.array
    aloan.send()
    assert not arr.flags.writeable  # the slot belongs to the receivers now
    rx.receive(timeout=5)


def test_a_failing_loan_block_sends_nothing(channel):
    tx, rx = channel
    with pytest.raises(RuntimeError, match="boom"):
        with tx.loan_array(100, np.float64) as a:
            a[:] = 1
            raise RuntimeError("boom")
    assert slots_in_use(tx) == 0
    with pytest.raises(shmq.Empty):
        rx.receive_nowait()
    loan = tx.loan(10)
    loan.abort()
    loan.abort()  # idempotent
    assert slots_in_use(tx) == 0


def test_loan_errors(channel):
    tx, rx = channel
    with pytest.raises(shmq.MessageTooLarge, match="a loan of 65537 bytes can never fit a slot of 65536 bytes"):
        tx.loan((1 << 16) + 1)
    with pytest.raises(shmq.MessageTooLarge):
        tx.loan_array((1 << 14) + 1, np.float32)
    with pytest.raises(ValueError, match="must not have negative dimensions"):
        tx.loan_array((-1, 3))
    with pytest.raises(TypeError, match="arrays of Python objects cannot live in a slot"):
        tx.loan_array(3, object)
    loans = [tx.loan(10) for _ in range(3)]
    with pytest.raises(shmq.Full):
        tx.loan(10, timeout=0.05)
    for loan in loans:
        loan.abort()


def test_loan_stays_open_when_the_ring_is_full():
    tx, rx = shmq.open_channel(4096, slot_size=4096, slot_count=4, max_messages=1)
    try:
        tx.send("fills the ring")
        loan = tx.loan(100)
        loan.buf[:2] = b"ok"
        with pytest.raises(shmq.Full):
            loan.send(timeout=0.05)
        assert rx.receive(timeout=5) == "fills the ring"
        loan.send(timeout=5)  # retried: the data is still there
        assert bytes(rx.receive(timeout=5)[:2]) == b"ok"
    finally:
        tx.unlink()
        tx.close()
        rx.close()


# -- receive loans ----------------------------------------------------------------------
def test_a_loaned_array_outlives_its_closed_channel():
    # In a child: before the fix, once the SendLoan was gone the array kept
    # only the mmap (np.ndarray over a memoryview) and closing unmapped it.
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import gc, numpy as np, shmq
        tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 20, slot_count=2)
        a = tx.loan_array((512, 512), np.float32).array
        gc.collect()
        tx.unlink(); tx.close(); rx.close()
        a[:] = 3
        print(float(a.sum()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(3.0 * 512 * 512)


def test_receive_loan_release_and_context(channel):
    tx, rx = channel
    tx.send(np.arange(3000.0))
    loan = rx.receive_loan(timeout=5)
    assert loan.array is not None and loan.array[2999] == 2999.0
    assert loan.buf.readonly and loan.buf.nbytes == 24000
    assert slots_in_use(tx) == 1
    loan.release()
    assert loan.released and slots_in_use(tx) == 0
    with pytest.raises(shmq.SlotError, match="already released"):
        loan.release()
    with tx.loan(64) as buf:
        buf[:1] = b"z"
    with rx.receive_loan(timeout=5) as view:
        assert bytes(view[:1]) == b"z"
        assert slots_in_use(tx) == 1
    assert slots_in_use(tx) == 0
    tx.send({"small": 1})
    with rx.receive_loan(timeout=5) as obj:
        assert obj == {"small": 1}


# -- lifetime ------------------------------------------------------------------------------
def test_closed_endpoints_raise_and_the_other_end_keeps_working(channel):
    tx, rx = channel
    tx2, rx2 = shmq.attach_channel(tx.name)
    tx2.close()
    tx2.close()
    assert tx2.closed and "closed" in repr(tx2)
    with pytest.raises(shmq.ClosedError, match="SendChannel .* is closed"):
        tx2.send(1)
    with pytest.raises(shmq.ClosedError):
        tx2.loan(10)
    tx.send(np.ones(2000))
    assert rx2.receive(timeout=5)[0] == 1.0  # rx2's handles survive tx2.close()
    rx2.close()
    with pytest.raises(shmq.ClosedError):
        rx2.receive()


def test_views_survive_closing_the_channel():
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 16, slot_count=2, threshold=1024)
    try:
        tx.send(np.arange(5000.0))
        view = rx.receive(timeout=5)
        rx.close()
        tx.close()
        assert view[4999] == 4999.0
        del view
        gc.collect()
    finally:
        tx.unlink()


def test_unclosed_endpoints_warn(channel):
    tx, _ = channel
    tx2, rx2 = shmq.attach_channel(tx.name)
    with pytest.warns(ResourceWarning):
        del tx2, rx2
        gc.collect()


def test_endpoints_pickle_as_their_name(channel):
    import pickle

    tx, rx = channel
    data = pickle.dumps(tx)
    assert tx.name.encode() in data and len(data) < 200
    tx2 = pickle.loads(data)
    try:
        tx2.send("via a pickled endpoint")
        assert next(rx) == "via a pickled endpoint"
    finally:
        tx2.close()

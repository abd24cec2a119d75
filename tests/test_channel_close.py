"""Channel close semantics across processes and crashes (trio's vocabulary):
counted handles, EndOfChannel for a finished stream, BrokenError for a cut
one (a sender killed) and for senders once every receiver is gone, clone,
handles handed to children, persistent states."""
import multiprocessing as mp
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shmq
from shmq import _layout as L
from shmq import _members
from conftest import join_all, unique_name

# "within 1 s" of the event, plus a little for a loaded 2-core machine
WITHIN = 1.25


def open_small(**kw):
    kw.setdefault("slot_size", 1 << 14)
    kw.setdefault("slot_count", 4)
    kw.setdefault("threshold", 1024)
    return shmq.open_channel(kw.pop("capacity_bytes", 1 << 14), name=unique_name("cc"), **kw)


@pytest.fixture
def channel():
    tx, rx = open_small()
    yield tx, rx
    tx.unlink()
    tx.close()
    rx.close()


def wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def ring_words(endpoint):
    return endpoint._ring.segment.words


def pool_words(endpoint):
    return endpoint._pool.segment.words


# -- children ---------------------------------------------------------------------
def _produce(tx, tag, count, close):
    for k in range(count):
        item = (tag, k, np.full(300, k, np.int32)) if k % 10 == 0 else (tag, k)
        tx.send(item, timeout=60)
    if close:
        tx.close()  # the other producer leaves it to the exit


def _produce_forever(tx, committed):
    k = 0
    while True:
        tx.send(k if k % 7 else np.full(400, k, np.int64), timeout=60)
        committed.value = k + 1  # after the send returned: k is committed
        k += 1


def _fill_then_block(tx, report):
    try:
        k = 0
        while True:
            tx.send(("filler", k), timeout=60)
            k += 1
    except shmq.BrokenError as exc:
        report.put(("broken", time.monotonic(), str(exc)))
    except BaseException as exc:
        report.put(("other", time.monotonic(), repr(exc)))


def _loan_all_then_block(tx, slot_count, report):
    held = [tx.loan(16, timeout=30) for _ in range(slot_count)]
    try:
        tx.loan(16, timeout=60)
        report.put(("loaned", time.monotonic(), ""))
    except shmq.BrokenError as exc:
        report.put(("broken", time.monotonic(), str(exc)))
    except BaseException as exc:
        report.put(("other", time.monotonic(), repr(exc)))
    for loan in held:
        loan.abort()


def _receive_one_then_hang(rx, ready):
    rx.receive(timeout=60)
    ready.set()
    time.sleep(120)


def _clone_and_close_forever(tx, progress):
    k = 0
    while True:
        extra = tx.clone()
        extra.send(k, timeout=60)
        extra.close()
        progress.value = k = k + 1


_INHERITED = {}


def _send_through_an_inherited_handle(count):
    tx = _INHERITED["tx"]  # not passed: dormant in this forked child until used here
    for k in range(count):
        tx.send(k, timeout=60)


def _send_some_and_exit(tx, count):
    for k in range(count):
        tx.send(k, timeout=60)
    # no close: a normal exit closes the handle


# -- a finite stream ends; a cut stream breaks ---------------------------------------
def test_a_finite_stream_from_children_ends_the_for_loop(ctx, channel):
    tx, rx = channel
    producers = [ctx.Process(target=_produce, args=(tx, tag, 500, tag == 0)) for tag in range(2)]
    for p in producers:
        p.start()
    tx.close()  # right after start: each child holds a counted handle of its own already
    # stops by itself once both children are done (arrays: dropped at once, so their slots return)
    got = [item if len(item) == 2 else (item[0], item[1], int(item[2][0])) for item in rx]
    join_all(producers)
    assert [p.exitcode for p in producers] == [0, 0]
    assert len(got) == 1000
    for tag in range(2):
        mine = [item for item in got if item[0] == tag]
        assert [item[1] for item in mine] == list(range(500))  # no gap, no duplicate, in order
        assert all(item[2] == item[1] for item in mine if len(item) == 3)
    with pytest.raises(shmq.EndOfChannel):  # persistent
        rx.receive(timeout=5)
    with pytest.raises(shmq.EndOfChannel):
        rx.receive_nowait()
    assert rx.statistics().open_senders == 0


def test_a_killed_sender_breaks_the_stream_after_the_drain(ctx, channel):
    tx, rx = channel
    committed = ctx.Value("q", 0)
    child = ctx.Process(target=_produce_forever, args=(tx, committed))
    child.start()
    tx.close()
    got = []
    stop_at = random.randint(20, 400)
    while len(got) < stop_at:
        got.append(rx.receive(timeout=60, copy=True))
    os.kill(child.pid, signal.SIGKILL)
    killed = time.monotonic()
    join_all([child])
    with pytest.raises(shmq.BrokenError, match=rf"sender process {child.pid} died") as info:
        while True:
            got.append(rx.receive(timeout=30, copy=True))
    elapsed = time.monotonic() - killed
    assert elapsed < WITHIN, f"BrokenError came {elapsed:.2f} s after the kill"
    assert not isinstance(info.value, shmq.EndOfChannel)
    values = [int(x[0]) if isinstance(x, np.ndarray) else x for x in got]
    assert values == list(range(len(values)))  # every committed item, no gap, no duplicate
    assert len(values) >= committed.value
    with pytest.raises(shmq.BrokenError, match=str(child.pid)):  # persistent
        rx.receive_nowait()
    assert rx.statistics().open_senders == 0


# -- senders learn that every receiver is gone --------------------------------------------
def _start_blocked_sender(ctx, tx, target, *args):
    report = ctx.Queue()
    child = ctx.Process(target=target, args=(tx, *args, report))
    child.start()
    return child, report


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_closing_the_last_receiver_breaks_a_sender_blocked_on_a_full_ring(start_method):
    ctx = mp.get_context(start_method)
    tx, rx = open_small(capacity_bytes=4096)
    try:
        child, report = _start_blocked_sender(ctx, tx, _fill_then_block)
        tx.close()
        wait_for(lambda: ring_words(rx)[L.W_PRODUCER_WAITING], what="the child to block on the full ring")
        closed_at = time.monotonic()
        rx.close()
        kind, when, message = report.get(timeout=30)
        join_all([child])
        assert kind == "broken", message
        assert "every receiver closed" in message
        assert when - closed_at < WITHIN
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def test_closing_the_last_receiver_breaks_a_sender_blocked_on_a_full_pool():
    ctx = mp.get_context("spawn")
    tx, rx = open_small(slot_count=2)
    try:
        child, report = _start_blocked_sender(ctx, tx, _loan_all_then_block, 2)
        tx.close()
        wait_for(lambda: pool_words(rx)[L.W_RETURN_WAITING], what="the child to block on the empty pool")
        closed_at = time.monotonic()
        rx.close()
        kind, when, message = report.get(timeout=30)
        join_all([child])
        assert kind == "broken", message
        assert when - closed_at < WITHIN
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def test_a_killed_receiver_breaks_a_blocked_sender(ctx):
    tx, rx = open_small(capacity_bytes=4096)
    try:
        ready = ctx.Event()
        child = ctx.Process(target=_receive_one_then_hang, args=(rx, ready))
        child.start()
        rx.close()  # the child holds the only receive handle now
        tx.send("one", timeout=30)
        assert ready.wait(60)
        killed = []

        def kill_when_blocked():
            wait_for(lambda: ring_words(tx)[L.W_PRODUCER_WAITING], what="send() to block")
            killed.append(time.monotonic())
            os.kill(child.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_blocked)
        killer.start()
        with pytest.raises(shmq.BrokenError, match=rf"receiver process {child.pid} died"):
            while True:
                tx.send("filler", timeout=60)
        broke = time.monotonic()
        killer.join(30)
        join_all([child])
        assert broke - killed[0] < WITHIN
        with pytest.raises(shmq.BrokenError):  # persistent, and for every way to send
            tx.send_nowait("x")
        with pytest.raises(shmq.BrokenError):
            tx.loan(10)
        with pytest.raises(shmq.BrokenError):
            tx.loan_array(10, np.uint8)
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def test_send_and_loan_fail_at_once_when_every_receiver_closed(channel):
    tx, rx = channel
    rx2 = rx.clone()
    rx.close()
    tx.send("still a receiver")
    loan = tx.loan(10)
    rx2.close()
    for attempt in (lambda: tx.send(1), lambda: tx.send_nowait(1), lambda: tx.loan(1), lambda: tx.loan_array(3)):
        with pytest.raises(shmq.BrokenError, match="every receiver closed"):
            attempt()
    with pytest.raises(shmq.BrokenError):
        loan.send()
    loan.abort()


# -- handles: clone, close, context managers, children ----------------------------------
def test_clone_counts_and_closed_handles_raise(channel):
    tx, rx = channel
    with tx.clone() as tx2:
        assert rx.statistics().open_senders == 2
        tx.close()
        tx.close()  # idempotent
        with pytest.raises(shmq.ClosedError, match="SendChannel .* is closed"):
            tx.send(1)
        with pytest.raises(shmq.ClosedError):
            tx.clone()
        with pytest.raises(shmq.Empty):
            rx.receive_nowait()  # a sender is left: not the end
        tx2.send("last")
    assert tx2.closed
    stats = rx.statistics()
    assert (stats.open_senders, stats.open_receivers) == (0, 1)
    assert rx.receive(timeout=5) == "last"  # drained first
    started = time.monotonic()
    with pytest.raises(shmq.EndOfChannel, match="every sender closed"):
        rx.receive()
    assert time.monotonic() - started < 1.0
    assert list(rx) == []
    rx3 = rx.clone()
    rx.close()
    with pytest.raises(shmq.ClosedError):
        rx.receive()
    with pytest.raises(shmq.ClosedError):
        pickle.dumps(rx)
    with pytest.raises(shmq.EndOfChannel):
        rx3.receive_nowait()
    assert rx3.statistics().open_receivers == 1
    rx3.close()


def test_closing_the_last_sender_wakes_a_blocked_receiver_at_once(channel):
    tx, rx = channel
    done = []

    def receiver():
        try:
            rx.receive(timeout=30)
        except shmq.EndOfChannel:
            done.append(time.monotonic())

    t = threading.Thread(target=receiver)
    t.start()
    wait_for(lambda: ring_words(rx)[L.W_CONSUMER_WAITING], what="receive() to block")
    closed_at = time.monotonic()
    tx.close()
    t.join(30)
    assert done and done[0] - closed_at < 0.2


def test_a_late_sender_cannot_add_to_a_finished_stream(channel):
    tx, rx = channel
    tx.close()
    with pytest.raises(shmq.EndOfChannel):
        rx.receive_nowait()
    late = shmq.SendChannel.attach(rx.name)
    try:
        with pytest.raises(shmq.BrokenError, match="has ended"):
            late.send("too late")
    finally:
        late.close()


def test_a_child_gets_a_counted_handle_of_its_own(ctx, channel):
    tx, rx = channel
    child = ctx.Process(target=_send_some_and_exit, args=(tx, 10))
    child.start()
    tx.close()  # before the child attached: its handle was reserved when it was pickled (or forked)
    assert list(rx) == list(range(10))  # the child's normal exit closed its handle
    join_all([child])
    assert child.exitcode == 0


def test_a_forked_child_counts_an_inherited_handle_once_it_uses_it(channel):
    tx, rx = channel
    _INHERITED["tx"] = tx
    try:
        child = mp.get_context("fork").Process(target=_send_through_an_inherited_handle, args=(5,))
        child.start()
        assert rx.receive(timeout=60) == 0  # the child uses its inherited sender: counted now
        tx.close()
        assert list(rx) == [1, 2, 3, 4]  # ends at the child's exit
        join_all([child])
        assert child.exitcode == 0
    finally:
        _INHERITED.clear()


def test_a_killed_child_counts_as_closed(ctx, channel):
    tx, rx = channel
    ready = ctx.Event()
    child = ctx.Process(target=_receive_one_then_hang, args=(rx, ready))
    child.start()
    tx.send("one")
    assert ready.wait(60)
    assert rx.statistics().open_receivers == 2
    os.kill(child.pid, signal.SIGKILL)
    join_all([child])
    stats = rx.statistics()
    assert stats.open_receivers == 1
    tx.send("the parent's receiver is still counted")  # no BrokenError: one receiver left
    assert rx.receive(timeout=5) == "the parent's receiver is still counted"


def test_a_pickled_handle_that_nobody_claims_lapses(channel, monkeypatch):
    tx, rx = channel
    monkeypatch.setattr(_members, "RESERVE_SECONDS", 0.3)
    data = pickle.dumps(tx)
    tx.close()
    assert rx.statistics().open_senders == 1  # the reservation
    with pytest.raises(shmq.EndOfChannel):
        rx.receive(timeout=5)  # once it lapsed: closed, not died
    late = pickle.loads(data)  # a lapsed ticket attaches anew, to a finished stream
    try:
        with pytest.raises(shmq.BrokenError, match="has ended"):
            late.send(1)
    finally:
        late.close()


def test_the_member_table_is_bounded(channel):
    tx, rx = channel
    tickets = [pickle.dumps(tx) for _ in range(L.CH_MEMBERS - 1)]  # the creator holds one entry
    with pytest.raises(shmq.TooManyMembers, match=f"{L.CH_MEMBERS} processes"):
        pickle.dumps(rx)
    for data in tickets:
        pickle.loads(data).close()
    assert tx.statistics().open_senders == 1


def test_an_attacher_counts_both_sides_until_it_closes_one(channel):
    tx, rx = channel
    tx2, rx2 = shmq.attach_channel(tx.name)
    assert rx.statistics().open_senders == 2
    tx.close()
    with pytest.raises(shmq.Empty):
        rx.receive(timeout=0.2)  # tx2 still counts
    tx2.close()
    with pytest.raises(shmq.EndOfChannel):
        rx2.receive(timeout=5)
    rx2.close()


def test_unclosed_handles_close_when_collected(channel):
    import gc

    tx, rx = channel
    tx2 = tx.clone()
    tx.close()
    with pytest.warns(ResourceWarning, match="unclosed SendChannel"):
        del tx2
        gc.collect()
    with pytest.raises(shmq.EndOfChannel):
        rx.receive(timeout=5)


# -- unrelated processes attach by name ------------------------------------------------------
CONSUMER = """
import sys, shmq
rx = shmq.ReceiveChannel.attach(sys.argv[1])
got = [x for x in rx]
print(len(got), sum(got))
"""

PRODUCER = """
import sys, shmq
tx = shmq.SendChannel.attach(sys.argv[1])
for k in range(int(sys.argv[2])):
    tx.send(k, timeout=60)
# no close: exiting closes the handle
"""


def test_an_unrelated_consumer_sees_the_end(channel):
    tx, rx = channel
    proc = subprocess.Popen(
        [sys.executable, "-c", CONSUMER, tx.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ),
    )
    try:
        wait_for(lambda: rx.statistics().open_receivers == 2, what="the consumer to attach")
        rx.close()
        for k in range(300):
            tx.send(k, timeout=60)
        tx.close()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0, err
    assert out.split() == ["300", str(sum(range(300)))]


def test_an_unrelated_producer_that_exits_ends_the_stream(channel):
    tx, rx = channel
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, rx.name, "3000"]  # more than the ring holds: it waits for us, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        # Closing the last sender ends the stream for good: close ours only
        # once the producer holds its own handle.
        wait_for(lambda: rx.statistics().open_senders == 2, what="the producer to attach")
        tx.close()
        got = list(rx)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0, err
    assert got == list(range(3000))


# -- faults: kills in the middle of the bookkeeping, a corrupted table -----------------------
def test_a_holder_killed_while_cloning_and_closing_leaves_the_counts_right(channel):
    tx, rx = channel
    ctx = mp.get_context("spawn")
    progress = ctx.Value("q", 0)
    child = ctx.Process(target=_clone_and_close_forever, args=(tx, progress))
    child.start()
    stop_at = random.randint(5, 60)
    got = []
    while progress.value < stop_at:
        got.append(rx.receive(timeout=60))
    os.kill(child.pid, signal.SIGKILL)
    join_all([child])
    stats = rx.statistics()
    assert (stats.open_senders, stats.open_receivers) == (1, 1)  # ours; the child's are gone
    tx.send("ours still works")
    tx.close()
    with pytest.raises(shmq.BrokenError, match=str(child.pid)):
        while True:
            got.append(rx.receive(timeout=30))
    assert got[-1] == "ours still works" and got[:-1] == list(range(len(got) - 1))


def test_a_corrupted_member_table_raises_no_worse_than_shmq_errors(channel):
    tx, rx = channel
    w = ring_words(tx)
    rng = random.Random(7)
    for word in range(L.W_CH_STATE, L.channel_member_word(L.CH_MEMBERS)):
        w[word] = rng.choice([0, -1, 1, 2**62, -(2**62), rng.getrandbits(63), os.getpid()])
    for attempt in (rx.statistics, lambda: tx.send(1, timeout=0.2), lambda: rx.receive(timeout=0.2), tx.clone):
        try:
            result = attempt()
        except shmq.ShmqError:
            pass
        else:
            if isinstance(result, shmq.SendChannel):
                result.close()
    w[L.W_CH_TAG] = 0
    with pytest.raises(shmq.LayoutError, match="has no member table"):
        shmq.attach_channel(tx.name)

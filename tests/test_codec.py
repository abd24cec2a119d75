"""The codec: plain pickles for small objects, slot messages for large
buffers, zero-copy read-only views whose lifetime keeps the slot borrowed,
and dicts of arrays through a queue-like ring across processes."""
import gc
import pickle

import numpy as np
import pytest

import shmq
from conftest import join_all, unique_name
from shmq import _codec as C
from shmq._slots import SlotPool

THRESHOLD = 4096


@pytest.fixture
def pool():
    p = SlotPool.create(1 << 16, 4, name=unique_name("codec"))
    yield p
    p.close()
    p.unlink()


@pytest.fixture
def roundtrip(pool):
    """encode -> sent -> decode with ``pool`` as source and resolver."""

    def run(obj, **kw):
        data, lease = C.encode(obj, pool, threshold=THRESHOLD)
        if lease is not None:
            lease.sent()
        return C.decode(data, {pool.name: pool}.__getitem__, **kw), data

    return run


def in_use(pool):
    pool.collect()
    return pool.slot_count - pool.free_count()


# -- small objects cost nothing extra -----------------------------------------
@pytest.mark.parametrize("obj", [1, "text", {"a": [1, 2.0, None]}, b"x" * (THRESHOLD - 1), np.arange(10)])
def test_small_objects_are_plain_pickles(pool, obj):
    data, lease = C.encode(obj, pool, threshold=THRESHOLD)
    assert lease is None
    assert data == pickle.dumps(obj, protocol=5)
    back = C.decode(data)
    assert type(back) is type(obj)
    assert in_use(pool) == 0


def test_without_a_pool_everything_is_a_plain_pickle():
    big = np.ones(1 << 16)
    data, lease = C.encode({"a": big}, None)
    assert lease is None and not C.is_slot_message(data)
    assert np.array_equal(C.decode(data)["a"], big)


def test_threshold_boundary(roundtrip, pool):
    below = np.zeros(THRESHOLD // 8 - 1)
    at = np.zeros(THRESHOLD // 8)
    (obj, data) = roundtrip({"below": below, "at": at})
    assert C.is_slot_message(data)
    assert obj["below"].flags.writeable  # in-band: an ordinary private array
    assert not obj["at"].flags.writeable  # in a slot: a read-only view
    assert in_use(pool) == 1


# -- large buffers: zero copy, read-only, held while any view lives -------------
def test_dict_of_arrays_round_trip_zero_copy(roundtrip, pool):
    src = {
        "f32": np.arange(5000, dtype=np.float32).reshape(50, 100),
        "i64": np.arange(3000, dtype=np.int64),
        "fortran": np.asfortranarray(np.arange(1200.0).reshape(30, 40)),
        "meta": {"n": 3, "tags": ["a", "b"]},
    }
    msg, data = roundtrip(src)
    assert len(data) < 1000  # only references and the skeleton travel
    assert in_use(pool) == 3
    for key in ("f32", "i64", "fortran"):
        a = msg[key]
        assert a.dtype == src[key].dtype and a.shape == src[key].shape
        assert np.array_equal(a, src[key])
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1
    assert msg["fortran"].flags.f_contiguous
    assert msg["meta"] == src["meta"]
    del msg, a
    gc.collect()
    assert in_use(pool) == 0


def test_views_outlive_their_message(roundtrip, pool):
    original = np.arange(8192, dtype=np.float64)
    msg, _ = roundtrip({"a": original})
    a = msg["a"]
    derived = {
        "slice": a[100:200],
        "strided": a[::7],
        "reshaped": a.reshape(64, 128),
        "transposed": a.reshape(64, 128).T,
        "as_bytes": a.view(np.uint8),
        "memoryview": memoryview(a),
        "asarray": np.asarray(a),
        "subclass": a.view(np.ma.MaskedArray),
        "frombuffer": np.frombuffer(a, np.float64),
    }
    del msg, a
    gc.collect()
    expected = {
        "slice": original[100:200],
        "strided": original[::7],
        "reshaped": original.reshape(64, 128),
        "transposed": original.reshape(64, 128).T,
        "as_bytes": original.view(np.uint8),
        "memoryview": original,
        "asarray": original,
        "subclass": original,
        "frombuffer": original,
    }
    for name in list(derived):
        assert in_use(pool) == 1, f"slot returned while {name!r} (and others) still view it"
        # Reuse would overwrite the slot: prove the data is still the original.
        got = np.asarray(derived[name])
        assert np.array_equal(got, expected[name]), name
        del derived[name], got
        gc.collect()
    assert in_use(pool) == 0


def test_slot_is_reused_only_after_the_last_view_is_gone(pool):
    one_slot = SlotPool.create(1 << 16, 1)
    try:
        resolve = {one_slot.name: one_slot}.__getitem__
        data, lease = C.encode(np.full(8192, 1.0), one_slot, threshold=THRESHOLD)
        lease.sent()
        view = C.decode(data, resolve)[::2]
        with pytest.raises(shmq.Full):
            C.encode(np.full(8192, 2.0), one_slot, threshold=THRESHOLD, timeout=0.05)
        assert np.all(view == 1.0)
        del view
        gc.collect()
        data, lease = C.encode(np.full(8192, 2.0), one_slot, threshold=THRESHOLD, timeout=5)
        lease.sent()
        assert np.all(C.decode(data, resolve) == 2.0)
    finally:
        one_slot.close()
        one_slot.unlink()


def test_copy_gives_private_writable_arrays_and_returns_slots_at_once(roundtrip, pool):
    msg, _ = roundtrip({"a": np.arange(4096.0), "b": b"q" * 10000}, copy=True)
    assert in_use(pool) == 0
    msg["a"][0] = 42.0
    assert msg["a"][1] == 1.0 and msg["a"].flags.writeable
    raw, _ = roundtrip(np.arange(4096.0), copy=True)
    assert raw.flags.writeable and raw.flags.owndata is False  # backed by its own bytearray
    assert in_use(pool) == 0


def test_top_level_bytes_like_travel_raw(pool):
    resolve = {pool.name: pool}.__getitem__
    for obj in (b"b" * 10000, bytearray(b"y" * 10000), memoryview(b"m" * 10000)):
        data, lease = C.encode(obj, pool, threshold=THRESHOLD)
        lease.sent()
        assert len(data) < 64
        back = C.decode(data, resolve)
        assert isinstance(back, memoryview) and back.readonly and bytes(back) == bytes(obj)
        del back
    gc.collect()
    assert in_use(pool) == 0
    # exact_types: bytes stay bytes, bytearray stays bytearray (one copy out)
    for obj in (b"b" * 10000, bytearray(b"y" * 10000)):
        data, lease = C.encode(obj, pool, threshold=THRESHOLD)
        lease.sent()
        back = C.decode(data, resolve, exact_types=True)
        assert type(back) is type(obj) and back == obj
    assert in_use(pool) == 0


def test_oversized_and_non_contiguous_buffers_travel_in_band(roundtrip, pool):
    big = np.ones((1 << 16) // 8 + 1)  # one element more than a slot
    strided = np.arange(20000.0)[::2]  # numpy pickles non-contiguous arrays in-band
    msg, data = roundtrip({"big": big, "strided": strided, "ok": np.ones(1000)})
    assert np.array_equal(msg["big"], big) and msg["big"].flags.writeable
    assert np.array_equal(msg["strided"], strided)
    assert not msg["ok"].flags.writeable
    assert in_use(pool) == 1


def test_pickling_errors_leave_no_slot_behind(pool):
    with pytest.raises((TypeError, pickle.PicklingError, AttributeError)):
        C.encode({"a": np.ones(10000), "f": lambda: None}, pool, threshold=THRESHOLD)
    assert in_use(pool) == 0


class _OnlyForkingPickler:
    """Plain pickle refuses it; multiprocessing's ForkingPickler has a reducer."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        raise TypeError("not with plain pickle")


def _rebuild_only_forking(value):
    return _OnlyForkingPickler(value)


def test_objects_only_multiprocessing_can_pickle(pool):
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.register(_OnlyForkingPickler, lambda obj: (_rebuild_only_forking, (obj.value,)))
    with pytest.raises(TypeError, match="not with plain pickle"):
        pickle.dumps(_OnlyForkingPickler(1), protocol=5)
    data, lease = C.encode({"odd": _OnlyForkingPickler(7), "big": np.ones(5000)}, pool, threshold=THRESHOLD)
    assert lease is not None  # the fallback still puts the large buffer in a slot
    lease.sent()
    back = C.decode(data, {pool.name: pool}.__getitem__)
    assert back["odd"].value == 7 and back["big"][4999] == 1.0 and not back["big"].flags.writeable
    plain, lease = C.encode(_OnlyForkingPickler(3), pool, threshold=THRESHOLD)
    assert lease is None and C.decode(plain).value == 3


def test_abort_frees_the_slots(pool):
    data, lease = C.encode([np.ones(5000), np.ones(5000)], pool, threshold=THRESHOLD)
    assert in_use(pool) == 2
    lease.abort()
    assert in_use(pool) == 0
    with pytest.raises(shmq.SlotError, match="not in flight"):
        C.decode(data, {pool.name: pool}.__getitem__)


def test_release_tokens_returns_slots_now_and_later_views_do_not_release_again(pool):
    data, lease = C.encode(np.ones(5000), pool, threshold=THRESHOLD)
    lease.sent()
    obj, tokens = C.decode_held(data, {pool.name: pool}.__getitem__)
    assert C.release_tokens(tokens) == 1
    assert C.release_tokens(tokens) == 0
    assert in_use(pool) == 0
    del obj
    gc.collect()  # its finalizer must not release a second time
    assert pool.statistics().frees == 1


# -- corrupt messages ---------------------------------------------------------------
def test_corrupt_messages_raise_slot_errors(pool):
    resolve = {pool.name: pool}.__getitem__
    data, lease = C.encode(np.ones(5000), pool, threshold=THRESHOLD)
    lease.sent()
    head = C._HEAD.size + len(pool.name)
    index, gen, nbytes = C._REF.unpack_from(data, head)
    bad_gen = data[:head] + C._REF.pack(index, gen + 5, nbytes) + data[head + C._REF.size :]
    with pytest.raises(shmq.SlotError, match="stale or corrupt slot reference"):
        C.decode(bad_gen, resolve)
    bad_index = data[:head] + C._REF.pack(1000, gen, nbytes) + data[head + C._REF.size :]
    with pytest.raises(shmq.SlotError, match="out of range"):
        C.decode(bad_index, resolve)
    bad_size = data[:head] + C._REF.pack(index, gen, nbytes - 8) + data[head + C._REF.size :]
    with pytest.raises(shmq.SlotError, match="holds 40000 bytes, the message says 39992"):
        C.decode(bad_size, resolve)
    bad_kind = data[:3] + bytes([9]) + data[4:]
    with pytest.raises(shmq.SlotError, match="unknown kind 9"):
        C.decode(bad_kind, resolve)
    with pytest.raises(shmq.SlotError, match="needs a pool resolver"):
        C.decode(data)
    for truncated in (data[:3], data[:10], data[: head + 5]):
        with pytest.raises(shmq.SlotError, match="corrupt slot message"):
            C.decode(truncated, resolve)
    assert pool.holding(index) == 0  # every failed decode gave its holds back
    assert np.all(C.decode(data, resolve) == 1.0)  # the genuine message still decodes


# -- the codec plugged into a ring, as Queue does it -------------------------------
def _codec_consumer(ring_name, pool_name, count, out):
    ring = shmq.Ring.attach(ring_name)
    codec = C.Codec(None, ring=ring)
    sums = []
    for _ in range(count):
        codec.note_consumer()
        msg = codec.decode(ring.read(timeout=30))
        sums.append((msg["id"], float(msg["image"].sum()), int(msg["labels"][-1]), msg["image"].flags.writeable))
        del msg
    codec.close()
    ring.close()
    out.put(sums)


def test_queue_style_plug_in_across_processes(ctx):
    """The exact pattern documented for Queue.put/get: encode -> write ->
    lease.sent(); read -> decode, with pools resolved by name."""
    ring = shmq.Ring.create(1 << 16)
    pool = SlotPool.create(1 << 20, 3, link=ring.name)
    codec = C.Codec(pool, ring=ring, threshold=THRESHOLD)
    try:
        out = ctx.Queue()
        proc = ctx.Process(target=_codec_consumer, args=(ring.name, pool.name, 20, out))
        proc.start()
        expected = []
        for k in range(20):
            obj = {"id": k, "image": np.full((256, 256), k, np.float32), "labels": np.arange(k + 5000)}
            data, lease = codec.encode(obj, timeout=30)
            try:
                ring.write(data, timeout=30)
            except BaseException:
                lease.abort()
                raise
            lease.sent()
            expected.append((k, float(256 * 256 * k), k + 4999, False))
        assert out.get(timeout=60) == expected
        join_all([proc])
        assert proc.exitcode == 0
        assert pool.statistics().allocations == 40  # 2 slots per message, 3 slots: closed-loop reuse
    finally:
        codec.close()
        pool.close()
        ring.close()
        pool.unlink()
        ring.unlink()


# -- dicts of arrays through a channel -------------------------------------------------
def _channel_consumer(rx, count, out):
    got = []
    for _ in range(count):
        msg = rx.receive(timeout=30)
        got.append({k: (v.dtype.str, v.shape, float(v.sum())) for k, v in msg.items()})
    out.put(got)


def test_dicts_of_arrays_through_a_channel(ctx):
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 20, slot_count=4, threshold=THRESHOLD)
    try:
        out = ctx.Queue()
        proc = ctx.Process(target=_channel_consumer, args=(rx, 10, out))
        proc.start()
        expected = []
        for k in range(10):
            msg = {
                "x": np.full((128, 128), k, np.float32),
                "y": np.arange(10000, dtype=np.int16) % 7,
                "small": np.array([k, k + 1]),
            }
            tx.send(msg, timeout=30)
            expected.append({n: (v.dtype.str, v.shape, float(v.sum())) for n, v in msg.items()})
        assert out.get(timeout=60) == expected
        join_all([proc])
        assert proc.exitcode == 0
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def _queue_consumer(q, out):
    msg = q.get(timeout=30)
    out.put((float(msg["a"].sum()), msg["b"].shape, msg["a"].flags.writeable))


@pytest.mark.skipif(not hasattr(shmq.Queue, "_pool"), reason="Queue does not use slot pools yet")
def test_dicts_of_arrays_through_queue(ctx):
    q = shmq.Queue()
    try:
        msg = {"a": np.arange(1 << 18, dtype=np.float32), "b": np.ones((512, 512))}
        q.put(msg)
        got = q.get(timeout=30)
        assert np.array_equal(got["a"], msg["a"]) and np.array_equal(got["b"], msg["b"])
        del got
        out = ctx.Queue()
        proc = ctx.Process(target=_queue_consumer, args=(q, out))
        proc.start()
        q.put(msg)
        assert out.get(timeout=60) == (float(msg["a"].sum()), (512, 512), False)
        join_all([proc])
        assert proc.exitcode == 0
    finally:
        q.close()
        q.unlink()


# -- broadcast: one encoded message, several receivers ------------------------------
def _broadcast_consumer(ring_name, held, go, done, out):
    ring = shmq.Ring.attach(ring_name)
    codec = C.Codec(None, ring=ring)
    codec.note_consumer()
    msg = codec.decode(ring.read(timeout=30))
    out.put(float(msg["a"].sum()))
    held.set()
    assert go.wait(30)
    del msg
    gc.collect()
    done.set()
    codec.close()
    ring.close()


def test_broadcast_to_several_receivers_frees_after_the_last(pool):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    rings = [shmq.Ring.create(4096) for _ in range(3)]
    try:
        data, lease = C.encode({"a": np.ones(4096)}, pool, threshold=THRESHOLD, deliveries=3)
        for ring in rings:
            ring.write(data)
        lease.sent()
        out = ctx.Queue()
        events = [(ctx.Event(), ctx.Event(), ctx.Event()) for _ in rings]
        procs = [ctx.Process(target=_broadcast_consumer, args=(r.name, *ev, out)) for r, ev in zip(rings, events)]
        for p in procs:
            p.start()
        assert [out.get(timeout=60) for _ in procs] == [4096.0] * 3
        for k, (held, go, done) in enumerate(events):
            assert held.wait(60)
            assert in_use(pool) == 1, f"freed after {k} of 3 receivers let go"
            go.set()
            assert done.wait(60)
        join_all(procs)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        assert in_use(pool) == 0
    finally:
        for ring in rings:
            ring.close()
            ring.unlink()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(3000).astype("datetime64[ns]"),
        np.zeros(2000, dtype=[("x", "f4"), ("y", "i8"), ("s", "S4")]),
        np.arange(6000, dtype=">i4").reshape(20, 300),
        np.full((), 1.5, dtype=np.dtype((np.float64, (600,)))),
        np.arange(5000, dtype=np.complex64),
    ],
    ids=["datetime", "structured", "big-endian-2d", "subarray", "complex"],
)
def test_top_level_arrays_of_any_dtype(roundtrip, pool, array):
    back, data = roundtrip(array)
    assert C.is_slot_message(data)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert np.array_equal(back, array) and not back.flags.writeable

"""CPU torch tensors travel through the slot pool as numpy arrays do
(shmq/_torch.py).  Skipped where torch is not installed (it is not in the
test extra: its default wheel pulls gigabytes of CUDA libraries); the check
that shmq never imports torch by itself runs everywhere."""
from __future__ import annotations

import gc
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import shmq
from conftest import join_all

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_shmq_never_imports_torch_for_other_objects():
    code = (
        "import sys, numpy as np, shmq\n"
        "q = shmq.Queue()\n"
        "q.put(np.ones(1 << 18, np.float32)); q.put({'a': np.ones(1 << 18)}); q.put((1, 'x'))\n"
        "[q.get(timeout=10) for _ in range(3)]\n"
        "tx, rx = shmq.open_channel(slot_size=4 << 20)\n"
        "tx.send({'a': np.ones(1 << 18)}); rx.receive(timeout=10)\n"
        "tx.close(); rx.close(); q.close()\n"
        "assert 'torch' not in sys.modules, 'shmq imported torch'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


try:
    import torch
except ImportError:  # not installed here: every test below is skipped
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def _in_pool(t, pool) -> bool:
    """Whether ``t``'s data lies inside ``pool``'s mapping (zero-copy)."""
    base = np.frombuffer(pool.segment.buf, np.uint8).__array_interface__["data"][0]
    return base <= t.data_ptr() < base + pool.segment.buf.nbytes


def _sample():
    return {
        "f32": torch.arange(1 << 18, dtype=torch.float32).reshape(512, 512),
        "bf16": torch.linspace(0, 1, 1 << 17).to(torch.bfloat16),
        "bool": torch.arange(1 << 17) % 3 == 0,
        "c64": torch.complex(torch.arange(1 << 15, dtype=torch.float32), torch.ones(1 << 15)),
        "transposed": torch.arange(1 << 18, dtype=torch.int64).reshape(256, 1024).T,
        "scalar": torch.tensor(7),
        "empty": torch.zeros((0, 3)),
        "grad": torch.ones(1 << 16, requires_grad=True),
        "non_leaf": torch.ones(1 << 16, requires_grad=True) * 2,  # arrives as a leaf, as torch pickles it
        "list": [torch.full((1 << 15,), 2.0), "text"],
    }


def _check_sample(got):
    want = _sample()
    assert set(got) == set(want)
    for k, v in want.items():
        if k == "list":
            assert torch.equal(got[k][0], v[0]) and got[k][1] == "text"
            continue
        g = got[k]
        assert type(g) is torch.Tensor, k
        assert g.dtype == v.dtype and g.shape == v.shape and g.requires_grad == v.requires_grad, k
        assert torch.equal(g.detach(), v.detach()), k


def _digest(obj):
    """What a tensor (or a dict/list of them) holds, computed without running
    a torch kernel: a forked child must not enter torch's OpenMP pool, which
    does not survive fork once the parent used it (torch's own advice: spawn)."""
    import hashlib

    if isinstance(obj, dict):
        return {k: _digest(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_digest(v) for v in obj]
    if not isinstance(obj, torch.Tensor):
        return obj
    raw = obj.detach()
    raw = raw.contiguous() if not raw.is_contiguous() else raw
    data = raw.reshape(-1).view(torch.uint8).numpy().tobytes()
    return (type(obj).__name__, str(obj.dtype), tuple(obj.shape), obj.requires_grad, hashlib.sha256(data).hexdigest())


def _consume(q, out):
    try:
        got = q.get(timeout=60)
        out.put(("ok", _digest(got)))
    except BaseException as exc:  # report, rather than leave the parent waiting
        out.put(("error", repr(exc)))
    q.close()


@needs_torch
def test_a_tensor_through_a_queue_is_a_view_of_a_slot():
    q = shmq.Queue()
    try:
        t = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB: a record too large for the ring
        q.put(t)
        got = q.get(timeout=10)
        assert type(got) is torch.Tensor and torch.equal(got, t)
        assert q._pool is not None and _in_pool(got, q._pool), "the tensor was copied out of the slot"
        assert q._pool.statistics().allocations == 1
    finally:
        q.close()


@needs_torch
def test_dicts_of_tensors_to_a_child_every_start_method(ctx):
    q = shmq.Queue()
    out = ctx.Queue()
    p = ctx.Process(target=_consume, args=(q, out))
    p.start()
    try:
        sample = _sample()
        q.put(sample)
        assert out.get(timeout=90) == ("ok", _digest(sample))
        join_all([p])
        assert p.exitcode == 0
    finally:
        q.close()


@needs_torch
def test_channel_round_trip_and_no_warning():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, shmq, sys\n"
        "sys.path.insert(0, sys.argv[1]); from test_torch import _sample, _check_sample\n"
        "tx, rx = shmq.open_channel(slot_size=4 << 20, slot_count=8)\n"
        "tx.send(_sample())\n"
        "_check_sample(rx.receive(timeout=10))\n"
        "tx.send(torch.ones(1 << 18)); c = rx.receive(timeout=10, copy=True); c += 1\n"
        "assert float(c[0]) == 2.0\n"
        "tx.close(); rx.close(); tx.unlink()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "tests")], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


@needs_torch
def test_the_slot_stays_held_while_a_view_of_the_tensor_lives():
    tx, rx = shmq.open_channel(slot_size=1 << 20, slot_count=1)
    try:
        tx.send(torch.ones(1 << 18))
        got = rx.receive(timeout=10)
        view = got[10:20]
        del got
        gc.collect()
        with pytest.raises(shmq.Full):
            tx.send_nowait(torch.ones(1 << 18))  # the only slot is still held by `view`
        assert float(view.sum()) == 10.0
        del view
        gc.collect()
        for _ in range(5):  # every slot comes back once its tensor dies
            tx.send(torch.ones(1 << 18), timeout=5)
            assert float(rx.receive(timeout=5)[0]) == 1.0
    finally:
        tx.close()
        rx.close()
        tx.unlink()


@needs_torch
def test_tensors_torch_pickles_itself_still_travel():
    q = shmq.Queue()
    try:
        p = torch.nn.Parameter(torch.ones(1 << 16))  # a subclass: torch's own reduction
        q.put({"p": p, "t": torch.ones(1 << 16)})
        got = q.get(timeout=10)
        assert type(got["p"]) is torch.nn.Parameter and torch.equal(got["p"].detach(), p.detach())
        assert type(got["t"]) is torch.Tensor
    finally:
        q.close()

"""CPU torch tensors through slot pools, as numpy arrays.

torch pickles a CPU tensor by ``torch.save``-ing its storage into a bytes
object, in band: no pickle protocol-5 buffer, so the codec could not move it
through a slot (81 tensors/s through ``shmq.Queue`` against 1,466/s for the
same data as ``.numpy()``).  :func:`dumps` pickles with a dispatch table that
reduces a plain CPU tensor to :func:`rebuild` over its bytes as a numpy
``uint8`` array, which numpy hands to pickle as an out-of-band buffer: the
codec copies it once into a slot, like any array.

The receiver gets a tensor **over the slot** (zero-copy), held while the
tensor or any view of it lives.  torch has no read-only tensors, so nothing
stops a write into it: it changes only the copy this receiver holds (one
receiver per message for Queue and channel; every receiver of a codec-level
broadcast would see it), and the slot is reused once the tensor dies.  Treat
it as read-only; ``.clone()`` gives a private writable tensor, and
``ReceiveChannel.receive(copy=True)`` returns private tensors outright.  The
tensor is made with ``torch.from_dlpack`` (numpy >= 2.1 exports read-only
arrays through DLPack; torch then warns nothing); with an older numpy,
``torch.from_numpy`` and its one "array is not writable" warning, silenced
for this module only.

What travels: dtype (any, bfloat16 and float8 included: the bytes are
reinterpreted), shape and ``requires_grad``.  Each tensor arrives contiguous
and as its own storage (views of one storage in one message no longer share
memory, as they do with ``torch.save``).  Anything else -- tensors on other
devices, sparse, quantized or nested tensors, named tensors, subclasses
(``nn.Parameter``), tensors with Python attributes or hooks -- is pickled by
torch's own reduction, as before.  A tensor that is not a leaf of an autograd
graph arrives as a leaf with the same ``requires_grad``, as with torch's own
pickling: graphs do not cross processes.

torch is imported by nothing here: every function is reached only once torch
is in ``sys.modules`` (the codec checks) or an object in a message is a
tensor.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import sys
import warnings
from itertools import islice
from typing import Any, Callable, Optional

__all__ = ("dumps", "holds_tensor", "rebuild")

_PROTOCOL = 5
#: containers :func:`holds_tensor` looks into, and how deep
_CONTAINERS = (dict, list, tuple)
_DEPTH = 4
_WIDTH = 64
_SCALARS = frozenset((int, float, str, bytes, bool, type(None), complex))
_tensor_class: list = [None]  # torch.Tensor, once torch is imported
_quiet = [False]  # the from_numpy warning filter is installed


def _torch() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:  # unpickling a tensor in a process that has not imported torch yet
        import torch  # noqa: PLC0415
    return torch


def _reduce(t: Any) -> tuple:
    """Pickle reduction of a tensor: :func:`rebuild` over its bytes for a
    plain CPU tensor, torch's own reduction for anything else."""
    torch = sys.modules["torch"]
    try:
        if _plain_cpu(torch, t):
            flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
            data = flat.view(torch.uint8).numpy()  # shares the tensor's memory: copied once, into the slot
            return rebuild, (data, t.dtype, tuple(t.shape), t.requires_grad)
    except Exception:  # a kind of tensor this module does not know: torch's own way
        pass
    return t.__reduce_ex__(_PROTOCOL)


def _plain_cpu(torch: Any, t: Any) -> bool:
    """Whether ``t`` is a plain strided CPU tensor whose dtype, shape and
    ``requires_grad`` are all there is to it."""
    return not (
        t.device.type != "cpu"
        or t.layout != torch.strided
        or t.is_quantized
        or getattr(t, "is_nested", False)
        or t.__dict__
        or t._backward_hooks
        or any(n is not None for n in getattr(t, "names", ()))  # named tensors (gone in recent torch)
    )


def rebuild(data: Any, dtype: Any, shape: tuple, requires_grad: bool) -> Any:
    """The tensor of ``dtype`` and ``shape`` over ``data`` (a 1-D uint8 numpy
    array: a read-only view of a slot, or a private copy), without copying."""
    torch = _torch()
    if data.flags.writeable:  # a private copy (receive(copy=True)) or an in-band buffer
        t = torch.from_numpy(data)
    else:
        try:
            t = torch.from_dlpack(data)
        except (BufferError, TypeError, RuntimeError, AttributeError):  # numpy < 2.1: no read-only DLPack export
            if not _quiet[0]:
                warnings.filterwarnings(
                    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=__name__
                )
                _quiet[0] = True
            t = torch.from_numpy(data)
    t = t.view(dtype).view(shape)
    if requires_grad:
        t.requires_grad_(True)
    return t


def dumps(obj: Any, protocol: int, buffer_callback: Optional[Callable]) -> bytes:
    """``pickle.dumps(obj, protocol, buffer_callback=...)`` with plain CPU
    tensors reduced to arrays.  Call only once torch is in sys.modules."""
    table = dict(copyreg.dispatch_table)
    table[sys.modules["torch"].Tensor] = _reduce
    out = io.BytesIO()
    p = pickle.Pickler(out, protocol, buffer_callback=buffer_callback)
    p.dispatch_table = table
    p.dump(obj)
    return out.getvalue()


def holds_tensor(obj: Any) -> bool:
    """True if ``obj`` is a torch.Tensor, or a dict/list/tuple holding one
    among its first 64 items, up to four levels deep (a tensor further in,
    or inside another kind of object, is pickled by torch's own reduction:
    correct, only slower).  False at once if torch was never imported."""
    tensor = _tensor_class[0]
    if tensor is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        tensor = _tensor_class[0] = torch.Tensor
    t = type(obj)
    return t is tensor or (t not in _SCALARS and _holds(obj, tensor, _DEPTH))


def _holds(obj: Any, tensor: type, depth: int) -> bool:
    # Exact types: the dispatch table of dumps() reduces exactly torch.Tensor
    # (subclasses keep torch's reduction); OrderedDict, namedtuples and other
    # subclasses of dict/list/tuple are looked into.
    if type(obj) is tensor:
        return True
    if not depth or not isinstance(obj, _CONTAINERS):
        return False
    for x in islice(obj.values() if isinstance(obj, dict) else obj, _WIDTH):
        t = type(x)
        if t is tensor or (t not in _SCALARS and _holds(x, tensor, depth - 1)):
            return True
    return False

"""Parameters and buffers this process does not own: storage freed, metadata kept, any use an error.

On a pipeline rank, the parameters and buffers that only other ranks' stages read are never used here: their
values are trained and kept by their owner. `release(t, owner)` frees the tensor's storage (it is resized to
zero bytes, as FSDP frees unsharded parameters) and changes the object's class to `ReleasedParameter` /
`ReleasedBuffer`: the same object (the optimizer, the model and zb's runners keep their references), with its
shape, dtype, device and requires_grad, so Dynamo traces it as before. Reading its values outside zb raises a
`ZbError` naming the rank that owns it, instead of reading freed memory. zb's own code passes such tensors
around (as arguments of the compiled step) inside `zb_internal()`, where they behave as plain tensors; it never
reads their values. `restore(t)` gives a released tensor storage again (a parameter moved to this rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from zb.core import torch_internals
from zb.core.errors import ZbError

_INSIDE = [0]  # > 0 while zb's runtime handles released tensors as plain ones

# Reading metadata is fine: size, shape, dtype, device, requires_grad, grad (always None), hashing (optimizers
# keep parameters in sets). `.data` is not: it would hand out a plain tensor over the freed storage.
_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride, torch.Tensor.__hash__,
             torch_internals.TENSOR_IS_VIEW, torch.Tensor.element_size, torch.Tensor.is_floating_point,
             torch.Tensor.is_complex, torch.Tensor.requires_grad_, torch.Tensor.nelement, torch.Tensor.ndimension,
             torch.Tensor.storage_offset, torch.Tensor.is_contiguous}


class _Released:
    """The behaviour of a released parameter or buffer: metadata reads pass, any read of its values raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _INSIDE[0] or torch.compiler.is_compiling() or func in _METADATA or _is_metadata_getter(func):
            with torch_internals.torch_function_disabled():
                return func(*args, **(kwargs or {}))
        released = next((a for a in args if isinstance(a, _Released)), None)
        owner = getattr(released, "_zb_owner", "another rank")
        if func is torch.Tensor.detach:  # state_dict() detaches every entry: the alias stays released
            with torch_internals.torch_function_disabled():
                alias = func(*args, **(kwargs or {}))
            alias.__class__ = ReleasedBuffer
            alias._zb_owner = owner
            return alias
        name = getattr(func, "__name__", str(func))
        raise ZbError(
            f"this {tuple(released.shape) if released is not None else ''} tensor was released on this process: "
            f"{owner} holds and trains it (zb frees the parameters and buffers only other ranks' stages read). "
            f"'{name}' would read or write its values here. For the whole model's values use "
            "zb.full_state_dict(model); to load weights use zb.load_checkpoint (each rank loads what it holds) or, "
            "for a model built on the meta device, option init; to keep every tensor on every rank compile with "
            "options={'release': False}")


class ReleasedParameter(_Released, torch.nn.Parameter):
    """A parameter whose storage was freed on this process (module docstring)."""


class ReleasedBuffer(_Released, torch.Tensor):
    """A buffer whose storage was freed on this process (module docstring)."""


def _is_metadata_getter(func: Any) -> bool:
    """An attribute read (`t.shape`, `t.grad`, ...) other than `.data` (and its aliases)."""
    if getattr(func, "__name__", "") not in ("__get__", "__set__"):
        return False
    descriptor = getattr(func, "__self__", None)
    return getattr(descriptor, "__name__", "") not in ("data", "_base", "T", "mT", "H", "mH", "real", "imag")


def is_released(tensor: Any) -> bool:
    return isinstance(tensor, _Released)


def is_deferred(tensor: Any) -> bool:
    """A placeholder of a model built on the meta device that nothing has given values yet (zb/materialize.py)."""
    return getattr(tensor, "_zb_deferred", False)


def release(tensor: torch.Tensor, owner: str) -> int:
    """Free `tensor`'s storage (module docstring); `owner` says who holds it ("pipeline rank 1 (stage 2)").
    Returns the bytes freed."""
    if is_released(tensor):
        return 0
    freed = tensor.untyped_storage().nbytes()
    tensor.grad = None
    tensor.untyped_storage().resize_(0)
    tensor.__class__ = ReleasedParameter if isinstance(tensor, torch.nn.Parameter) else ReleasedBuffer
    tensor._zb_owner = owner
    return freed


def restore(tensor: torch.Tensor) -> None:
    """Give a released tensor storage again (uninitialised: the caller writes its values)."""
    if not is_released(tensor):
        return
    with zb_internal():
        needed = (tensor.storage_offset() + _extent(tensor)) * tensor.element_size()
        tensor.untyped_storage().resize_(needed)
    tensor.__class__ = torch.nn.Parameter if isinstance(tensor, ReleasedParameter) else torch.Tensor
    del tensor._zb_owner
    if hasattr(tensor, "_zb_deferred"):  # it gets its values from whoever restores it, not from option init
        del tensor._zb_deferred


def _extent(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


@contextlib.contextmanager
def zb_internal() -> Iterator[None]:
    """zb's runtime at work: released tensors pass as plain ones (it never reads their values)."""
    _INSIDE[0] += 1
    try:
        yield
    finally:
        _INSIDE[0] -= 1


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """The user's code called from inside zb (option init): released tensors refuse reads again."""
    saved, _INSIDE[0] = _INSIDE[0], 0
    try:
        yield
    finally:
        _INSIDE[0] = saved

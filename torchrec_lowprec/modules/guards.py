"""Guards a low-precision collection keeps against use it cannot serve correctly."""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def update_lock(module: nn.Module) -> threading.Lock:
    """The fused-update lock of ``module``. The step counter (part of the rounding key) and the
    rows are read-modify-written by an update, so concurrent backward passes (e.g. Hogwild-style
    threads) hold it in turn instead of losing steps. Kept outside the module, which therefore
    still deep-copies and pickles.

    Example::

        with update_lock(ebc):
            ...  # one fused update
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.Lock()
        return lock


def refuse_dtype_cast(module: nn.Module, fn) -> None:
    """``TypeError`` if the ``nn.Module._apply`` function ``fn`` casts floating tensors (``.half()``,
    ``.double()``, ``.to(torch.bfloat16)``): the collection's fp32 step sizes and optimizer
    state would become a type the kernels do not take, and its rows are codes anyway.
    ``.to(device)`` and ``.float()`` pass."""
    probe = fn(torch.zeros(1, dtype=torch.float32))
    if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
        raise TypeError(
            f"{type(module).__name__} keeps its own storage (int8/int4/int2/fp16/fp32 rows, fp32 step "
            f"sizes and optimizer state) and cannot be cast to {probe.dtype}; cast only the dense "
            "parts of the model (e.g. model.over_arch.half()) or use torch.autocast. Its output "
            "stays float32, as TorchRec's fused tables output their output_dtype."
        )

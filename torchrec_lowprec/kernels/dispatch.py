"""The one place that picks a fused-update backend for a device.

CPU -> the native C++ kernel (:mod:`.cpu_native`); CUDA -> the Triton kernel
(:mod:`.triton_update`); anything else, or a machine where the kernel cannot be built (no
compiler, no triton), -> the PyTorch reference, with a one-time warning. All backends implement :mod:`.spec` and produce the same bits.
"""

from __future__ import annotations

import os
import warnings

import torch

from torchrec_lowprec.kernels.reference import reference_update
from torchrec_lowprec.kernels.spec import TableUpdate

_warned: set[str] = set()
#: Set ``TORCHREC_LOWPREC_BACKEND=reference`` to force the PyTorch reference (debugging).
_FORCE = os.environ.get("TORCHREC_LOWPREC_BACKEND", "")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def backend_for(device: torch.device) -> str:
    """Name of the backend :func:`fused_update` uses on ``device``."""
    if _FORCE == "reference":
        return "reference"
    if device.type == "cpu":
        try:
            from torchrec_lowprec.kernels import cpu_native
        except ImportError as e:  # a broken install: fall back rather than fail training
            reason = repr(e)
        else:
            if cpu_native.is_available():
                return "cpu_native"
            reason = cpu_native.load_error()
        _warn_once(
            "cpu",
            "torchrec_lowprec: the native CPU kernel could not be built "
            f"({reason}); using the PyTorch reference update, which is "
            "several times slower. To fix: a C++ compiler (e.g. `apt install g++`) and ninja "
            "(`pip install 'torchrec-lowprec[kernels]'`; in a checkout `make setup`), then "
            "`torchrec-lowprec build-kernels` builds it ahead of time and shows any error.",
        )
        return "reference"
    if device.type == "cuda":
        from torchrec_lowprec.kernels import triton_update

        if triton_update.is_available():
            return "triton"
    _warn_once(
        device.type,
        f"torchrec_lowprec: no fused-update kernel for device type {device.type!r}; "
        "using the PyTorch reference update.",
    )
    return "reference"


def fused_update(
    update: TableUpdate,
    grad: torch.Tensor,
    bounded: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> int | torch.Tensor:
    """Update one table in place (see :mod:`.spec`); returns rows skipped for non-finite grads
    (an int on CPU; on CUDA a 0-d tensor on the device, so that the step makes no host sync).

    ``bounded[0]`` (optional int64 tensor) is increased by the rows whose step hit
    ``max_step_size(bits)`` (spec step 5c). ``skip`` (optional 0-d bool tensor, a device-side
    input check's verdict, ``modules/input_check.py``): when true nothing is updated; the
    Triton update and the reference read it on the device, the C++ kernel's caller on the host
    (a CPU tensor: no device to wait for)."""
    backend = backend_for(update.rows.device)
    if skip is None:
        return _backend_function(backend)(update, grad, bounded)
    if backend == "cpu_native":
        return 0 if bool(skip) else _backend_function(backend)(update, grad, bounded)
    return _backend_function(backend)(update, grad, bounded, skip)


def _backend_function(backend: str):
    """The ``fused_update`` of a backend (all share the signature of :mod:`.spec`)."""
    if backend == "cpu_native":
        from torchrec_lowprec.kernels import cpu_native

        return cpu_native.fused_update
    if backend == "triton":
        from torchrec_lowprec.kernels import triton_update

        return triton_update.fused_update
    return reference_update


def fused_update_many(
    updates: list[TableUpdate],
    grad: torch.Tensor,
    bounded: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> list[int] | list[torch.Tensor]:
    """Update many tables in place, all reading ``grad``; the skipped-row count per table
    (ints, or device tensors from the Triton update, as :func:`fused_update`).

    Same result as calling :func:`fused_update` per update in order: on CPU with the native
    kernel, one batched call (one parallel region across all the tables); elsewhere (CUDA,
    the reference), one call per update. Tables must not share the memory they write.
    ``bounded[i]`` (optional int64 tensor ``[len(updates)]``) is increased by table ``i``'s
    rows whose step hit ``max_step_size(bits)``. ``skip``: as :func:`fused_update`.
    """
    if not updates:
        return []
    if backend_for(grad.device) == "cpu_native" and all(u.rows.device.type == "cpu" for u in updates):
        from torchrec_lowprec.kernels import cpu_native

        if skip is not None and bool(skip):  # a CPU tensor: no device to wait for
            return [0] * len(updates)
        return cpu_native.fused_update_many(updates, grad, bounded)
    return [
        fused_update(u, grad, None if bounded is None else bounded[i : i + 1], skip)
        for i, u in enumerate(updates)
    ]

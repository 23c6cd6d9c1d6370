"""LSQ+ fake quantization for the MPE bit-width search (differentiable; no storage).

``q = s * clamp(round((w - o) / s), Qn, Qp) + o`` with a learnable step ``s`` and offset ``o``
(LSQ+, Bhalgat et al., 2020), the straight-through estimator for ``round`` and LSQ's
gradient scale on ``s`` and ``o``. Autograd then gives LSQ's step gradient exactly:
``round(v) - v`` inside the grid, ``Qn`` / ``Qp`` where clipped.
"""

from __future__ import annotations

import math

import torch

# Widths the search may consider: 0 (pruned), 1..8 (integer grid), 16 (fp16), 32 (fp32).
from torchrec_lowprec.types import SEARCH_BITS


def signed_range(bits: int) -> tuple[int, int]:
    """``(Qn, Qp)`` of a signed ``bits``-bit grid (1 bit: {-1, 0})."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass, ``scale * grad`` in the backward pass."""
    return (x - x * scale).detach() + x * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def lsq_plus_fake_quant(
    w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, bits: int, grad_scale: float = 1.0
) -> torch.Tensor:
    """Fake-quantize ``w`` ``[N, D]`` to ``bits`` (0 -> zeros, 16 -> fp16 values, 32 -> ``w``).

    ``step`` is a scalar tensor, ``offset`` ``[D]``; both receive LSQ gradients multiplied by
    ``grad_scale`` (LSQ uses ``1 / sqrt(numel * Qp)``).
    """
    if bits not in SEARCH_BITS:
        raise ValueError(f"bits={bits} is not a search candidate; allowed: {list(SEARCH_BITS)}")
    if bits in (0, 16, 32):
        return float_fake_quant(w, bits)
    qn, qp = signed_range(bits)
    s = scale_grad(step, grad_scale)
    o = scale_grad(offset, grad_scale)
    v = torch.clamp((w - o) / s, qn, qp)
    return round_ste(v) * s + o


def float_fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The widths with no step: 0 -> zeros, 16 -> fp16 values (identity gradient), 32 -> ``w``."""
    if bits == 0:
        return torch.zeros_like(w)
    if bits == 16:
        return w + (w.to(torch.float16).to(w.dtype) - w).detach()
    if bits == 32:
        return w
    raise ValueError(f"bits={bits} has a quantization step: use lsq_plus_fake_quant")


def lsq_plus_init_step(w: torch.Tensor, bits: int) -> float:
    """LSQ's initial step ``2 * mean|w| / sqrt(Qp)`` (``Qp`` >= 1; floored at 1e-6)."""
    qp = max(signed_range(bits)[1], 1)
    return max(2.0 * float(w.abs().mean()) / math.sqrt(qp), 1e-6)


def lsq_grad_scale_for(numel: int, bits: int) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel * Qp)`` for a step shared by ``numel`` values."""
    return 1.0 / math.sqrt(max(numel, 1) * max(signed_range(bits)[1], 1))

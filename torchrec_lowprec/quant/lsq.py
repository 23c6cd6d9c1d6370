"""Step sizes: initialisation and the LSQ gradient that ALPT learns them with.

For a row ``x`` (D values) and step ``s`` with grid ``[Qn, Qp]``, LSQ (Esser et al., 2020)
defines ``x_hat = s * clamp(round(x / s), Qn, Qp)`` and, through the straight-through
estimator,

    d x_hat_d / d s = round(v_d) - v_d   if Qn < v_d < Qp     (v_d = x_d / s)
                    = Qn                  if v_d <= Qn
                    = Qp                  if v_d >= Qp

so ``dL/ds = g_scale * sum_d g_d * (d x_hat_d / d s)`` with ``g_d = dL/d x_hat_d`` and the
LSQ gradient scale ``g_scale = 1 / sqrt(D * Qp)`` (D values share one step size).
"""

from __future__ import annotations

import math

import torch

from torchrec_lowprec.quant.layout import code_range

#: Step sizes are kept at or above this value: fp16 still holds it (as a subnormal), and a
#: zero or negative step would make the row unrecoverable.
MIN_STEP_SIZE = 1e-6
#: The largest finite fp16 value: a step the row could not store would turn it into inf.
MAX_STEP_SIZE = 65504.0


def lsq_grad_scale(bits: int, dim: int) -> float:
    """``1 / sqrt(D * Qp)``, the LSQ gradient scale for a step shared by one row."""
    return 1.0 / math.sqrt(dim * code_range(bits)[1])


def lsq_step_size_grad(
    x: torch.Tensor, step_size: torch.Tensor, grad: torch.Tensor, bits: int
) -> torch.Tensor:
    """``dL/ds`` per row for rows ``x`` ``[N, D]``, steps ``[N]``, grads ``[N, D]``, LSQ-scaled.

    The sum over D is sequential (column 0 first) so that every backend gets the same bits.
    """
    qmin, qmax = code_range(bits)
    inv = 1.0 / step_size
    v = x * inv[:, None]
    inner = torch.floor(v + 0.5) - v
    dxs = torch.where(v <= qmin, float(qmin), torch.where(v >= qmax, float(qmax), inner))
    prod = grad * dxs
    acc = torch.zeros_like(step_size)
    for d in range(x.shape[1]):
        acc = acc + prod[:, d]
    return acc * lsq_grad_scale(bits, x.shape[1])


def init_step_size(x: torch.Tensor, bits: int, method: str | float) -> torch.Tensor:
    """Initial per-row step sizes for fp32 rows ``[N, D]``.

    ``"lsq"``: ``2 * mean|x| / sqrt(Qp)`` (the LSQ / ALPT initialisation);
    ``"absmax"``: ``max|x| / Qp`` (no value clipped); a float: that constant for every row.
    Rows of zeros get the floor :data:`MIN_STEP_SIZE` rather than 0.
    """
    qmax = code_range(bits)[1]
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        s = torch.full((x.shape[0],), float(method), dtype=torch.float32, device=x.device)
    elif method == "lsq":
        s = 2.0 * x.abs().mean(dim=1) / math.sqrt(qmax)
    elif method == "absmax":
        s = x.abs().amax(dim=1) / qmax
    else:
        raise ValueError(f"step_size_init must be 'lsq', 'absmax' or a float, got {method!r}")
    return torch.clamp(s.to(torch.float32), min=MIN_STEP_SIZE, max=MAX_STEP_SIZE)

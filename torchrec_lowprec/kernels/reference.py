"""Plain PyTorch implementation of the fused update: the oracle the fast kernels are tested
against (see :mod:`torchrec_lowprec.kernels.spec` for the contract).

Vectorised over touched rows, sequential where the contract fixes a summation order.
"""

from __future__ import annotations

import torch

from torchrec_lowprec.kernels.spec import TableUpdate, UpdateSpec
from torchrec_lowprec.quant.layout import code_range, dequantize_rows, encode_rows, row_bytes
from torchrec_lowprec.quant.lsq import lsq_step_size_grad
from torchrec_lowprec.quant.rounding import MASK32, round_to_grid, row_keys, uniform_from_counter
from torchrec_lowprec.types import OptimizerType


def aggregate_row_grads(
    ids: torch.Tensor,
    grad_offsets: torch.Tensor,
    occ_weights: torch.Tensor,
    grad: torch.Tensor,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique touched rows (ascending) and their summed gradients ``[U, D]`` in occurrence order."""
    sorted_ids, perm = torch.sort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    flat = grad.reshape(-1)
    cols = torch.arange(dim, device=grad.device)
    acc = torch.zeros(uniq.numel(), dim, dtype=torch.float32, device=grad.device)
    max_count = int(counts.max()) if counts.numel() else 0
    for k in range(max_count):
        live = counts > k
        occ = perm[starts[live] + k]
        g = flat[grad_offsets[occ, None] + cols]
        if occ_weights.numel():
            g = occ_weights[occ, None] * g
        acc[live] = acc[live] + g
    return uniq, acc


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (via fp64: double rounding is exact for sqrt).

    ``torch.sqrt`` on CPU goes through MKL's vmsSqrt, 1 ulp off for some inputs; CUDA's
    ``sqrt.rn`` and C++'s ``std::sqrt`` are IEEE. The oracle uses IEEE so that every backend,
    on every device, can produce the same bits.
    """
    return torch.sqrt(t.double()).float()


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(t.shape[0], dtype=torch.float32, device=t.device)
    for d in range(t.shape[1]):
        acc = acc + t[:, d]
    return acc


def _apply_optimizer(
    x: torch.Tensor,
    g: torch.Tensor,
    rows: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    spec: UpdateSpec,
) -> torch.Tensor:
    o = spec.optimizer
    lr, _, eps, b1, omb1, b2, omb2, bc1, bc2 = spec.float_args()[:9]
    if o.kind == OptimizerType.SGD:
        return x - lr * g
    if o.kind == OptimizerType.ADAGRAD:
        h = state1[rows] + g * g
        state1[rows] = h
        den = _sqrt(h) + eps
        return x - _zero_where(den, (lr * g) / den)
    if o.kind == OptimizerType.ROWWISE_ADAGRAD:
        h = state1[rows] + _row_sum(g * g) / float(spec.dim)
        state1[rows] = h
        den = _sqrt(h) + eps
        return x - _zero_where(den, lr / den)[:, None] * g
    m = b1 * state1[rows] + omb1 * g
    v = b2 * state2[rows] + omb2 * (g * g)
    state1[rows] = m
    state2[rows] = v
    den = _sqrt(v / bc2) + eps
    return x - _zero_where(den, lr * (m / bc1) / den)


def _zero_where(den: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t`` with 0 where ``den == 0`` (eps = 0 and a zero state: no step instead of NaN/inf)."""
    return torch.where(den == 0.0, torch.zeros((), dtype=t.dtype, device=t.device), t)


def _fp16_stochastic(x: torch.Tensor, noise_bits: torch.Tensor, dither: int = 0) -> torch.Tensor:
    """fp32 -> fp16 by adding random bits below fp16's mantissa and truncating them
    (``dither``: the spec's 24-bit offset; its top 13 bits shift the random bits)."""
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    bits = (bits + (((noise_bits & 0x1FFF) + (dither >> 11)) & 0x1FFF)) & 0xFFFFE000
    trunc = bits.to(torch.int32).view(torch.float32)
    finite = torch.isfinite(x)
    return torch.where(finite, trunc, x).to(torch.float16)


def reference_update(
    update: TableUpdate,
    grad: torch.Tensor,
    bounded: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> int:
    """Apply one fused update in place; returns the number of rows skipped (non-finite grad).

    ``bounded`` (optional, an int64 tensor): ``bounded[0]`` is increased by the number of rows
    whose step size hit ``max_step_size(bits)`` (spec step 5c). ``skip`` (optional 0-d bool
    tensor): when true, no row is touched.
    """
    rows, step_size, state1, state2, ids, grad_offsets, occ_weights, grad = update.tensors(grad)
    spec = update.spec
    if ids.numel() == 0:
        return 0
    bits, dim = spec.bits, spec.dim
    ids = ids.to(torch.int64)  # the hash needs 64-bit arithmetic
    uniq, g = aggregate_row_grads(ids, grad_offsets, occ_weights, grad, dim)
    finite = torch.isfinite(g).all(dim=1)
    skipped = int((~finite).sum())
    if skip is not None:
        finite = finite & ~skip
    uniq, g = uniq[finite], g[finite]
    if uniq.numel() == 0:
        return skipped
    nbytes = row_bytes(bits, dim)
    stored = rows[uniq, :nbytes]
    x = dequantize_rows(stored, bits, dim)
    f = spec.float_args()
    wd = f[1]
    g_opt = g + wd * x if wd != 0.0 else g
    x = _apply_optimizer(x, g_opt, uniq, state1, state2, spec)

    need_noise = spec.stochastic and bits != 32
    if need_noise:
        keys = row_keys(spec.key, uniq + spec.row_offset)[:, None]
        gcols = torch.arange(dim, device=rows.device, dtype=torch.int64) + spec.col_offset
    if bits == 32:
        rows[uniq, :nbytes] = x.contiguous().view(torch.uint8)
        return skipped
    if bits == 16:
        if need_noise:
            from torchrec_lowprec.quant.rounding import mix32

            h = mix32((keys + gcols * 0x9E3779B9) & MASK32)
            x16 = _fp16_stochastic(x, h, spec.dither)
        else:
            x16 = x.to(torch.float16)
        rows[uniq, :nbytes] = x16.contiguous().view(torch.uint8)
        return skipped

    s16_old = stored[:, 0:2].contiguous().view(torch.float16).reshape(-1).to(torch.float32)
    qmin, qmax = code_range(bits)
    if spec.learn_step_size:
        s = step_size[uniq]
        s = s - f[9] * lsq_step_size_grad(x, s, g, bits)
        s = torch.clamp(s, min=f[11], max=f[12])
    else:
        s = s16_old
    if spec.grow_step:
        need = torch.maximum(x.amax(dim=1) / float(qmax), x.amin(dim=1) / float(qmin))
        s = torch.where(need > f[13] * s, torch.clamp(need, max=f[12]), s)
    if spec.learn_step_size:
        step_size[uniq] = s
    if bounded is not None and (spec.learn_step_size or spec.grow_step):
        bounded[0] += int((s >= f[12]).sum())
    s16 = s.to(torch.float16).to(torch.float32)
    noise = uniform_from_counter(keys, gcols, spec.dither) if need_noise else None
    q = round_to_grid(x * (1.0 / s16)[:, None], qmin, qmax, noise)
    rows[uniq, :nbytes] = encode_rows(q, s16, bits)
    return skipped

"""The contract every fused-update backend implements (reference, C++, Triton).

One call updates one table (or one shard of it) in place, for the occurrences of its rows
in a batch. Each occurrence ``i`` contributes ``occ_weights[i] * grad[grad_offsets[i] : +D]``
to the gradient of row ``ids[i]``; a row's contributions are summed in occurrence order
(stable by position), in fp32. Then, per touched row and in this order:

1. If the summed gradient ``g`` has a NaN/Inf, the row is left untouched and counted.
2. ``x = dequantize(row)`` (``scale16 * q`` for b-bit rows; the floats for 16/32-bit rows).
3. Weight decay: ``g_opt = g + weight_decay * x``.
4. Optimizer (fp32, states fp32):
   SGD ``x -= lr * g_opt``;
   Adagrad ``h += g_opt^2; x -= (lr * g_opt) / (sqrt(h) + eps)``;
   RowWiseAdagrad ``h += (sum_d g_opt_d^2) / D; x -= (lr * (1 / (sqrt(h) + eps))) * g_opt``;
   Adam ``m = b1*m + (1-b1)*g_opt; v = b2*v + (1-b2)*g_opt^2;
   x -= lr * (m / bc1) / (sqrt(v / bc2) + eps)`` with ``bc = 1 - beta^step``.
   A zero denominator (``sqrt(.) + eps == 0``: only with ``eps = 0`` and a zero state, e.g.
   an exactly-zero gradient) makes that element's (row's, for RowWiseAdagrad) step 0 instead
   of ``0/0 = NaN`` or ``inf * 0``; with ``eps > 0`` it never happens and nothing changes.
5. ALPT (b-bit rows with a learned step): ``s = clamp(s - step_lr * lsq_grad(x, s, g),
   min_step, max_step)`` with ``max_step = quant.layout.max_step_size(bits)`` (the largest
   step whose fp16 bias ``-2^(b-1) * s`` is finite) and the LSQ gradient of :mod:`torchrec_lowprec.quant.lsq`
   evaluated at the updated row, the raw loss gradient ``g`` and the fp32 master ``s``.
5b. Growth (b-bit rows, ``grow_step``): with ``hi = max_d x_d`` and ``lo = min_d x_d``,
   ``need = max(hi / Qp, lo / Qn)``; if ``need > growth_threshold * s`` then
   ``s = min(need, max_step)`` (``s``
   is the fp32 master after 5, or the row's stored fp16 step when the step is not learned;
   the master is updated too).
5c. Rows whose step after 5/5b equals ``max_step`` are counted ("hit the step bound"; only
   when 5 or 5b runs) in the optional ``bounded`` counter every backend accepts.
6. Write back: ``s16 = fp16(s)``; ``q = clamp(floor(x * (1/s16) + u), Qn, Qp)``, ``u`` the
   counter-based draw of (key, global row, global column) for stochastic rounding or 0.5
   for nearest; the row gets ``s16``, ``bias = -2^(b-1) * s16`` and the packed codes.
   16-bit rows: fp16 by stochastic rounding (random low 13 mantissa bits added, then
   truncated; exact for values in fp16's normal range) or nearest; 32-bit rows as is.
   Dithered draws (``dither`` != 0, ``rounding="dithered"``): ``u = ((h >> 8) + dither) mod
   2^24 * 2^-24`` for b-bit rows and random bits ``((h & 0x1FFF) + (dither >> 11)) & 0x1FFF``
   for 16-bit rows, ``h`` the element's 32-bit hash; ``dither = 0`` is plain stochastic.

Sums over ``d`` (row-wise Adagrad, LSQ) are sequential from column 0, square roots are
correctly rounded (IEEE), divisions are IEEE, and nothing is fused into an FMA, so the
backends produce the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchrec_lowprec.types import INT_BITS, OPTIMIZERS, OptimizerType

#: The integer each backend switches on, per optimizer (read from ``types.OPTIMIZERS``).
OPTIMIZER_CODES = {kind: entry.code for kind, entry in OPTIMIZERS.items()}


@dataclass(frozen=True)
class OptimizerParams:
    """The numbers a fused update needs, resolved from a config or an in-backward optimizer
    (``optim.fused.resolve_optimizer``)."""

    kind: OptimizerType
    lr: float
    weight_decay: float = 0.0
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999


@dataclass(frozen=True)
class UpdateSpec:
    """Scalars of one fused update call (see the module docstring for the math)."""

    bits: int
    dim: int
    optimizer: OptimizerParams
    step: int
    stochastic: bool
    learn_step_size: bool
    step_size_lr: float
    key: int
    row_offset: int = 0
    col_offset: int = 0
    grow_step: bool = False
    growth_threshold: float = 2.0
    #: 24-bit offset added to the stochastic-rounding draws (``quant.rounding.dither_offset``;
    #: 0: plain stochastic rounding)
    dither: int = 0

    @property
    def bias_corrections(self) -> tuple[float, float]:
        o = self.optimizer
        return 1.0 - o.beta1**self.step, 1.0 - o.beta2**self.step

    def float_args(self) -> list[float]:
        """``[lr, wd, eps, b1, 1-b1, b2, 1-b2, bc1, bc2, step_lr, lsq_scale, min_s, max_s,
        growth_threshold]``."""
        from torchrec_lowprec.quant.layout import max_step_size
        from torchrec_lowprec.quant.lsq import MAX_STEP_SIZE, MIN_STEP_SIZE, lsq_grad_scale

        o = self.optimizer
        bc1, bc2 = self.bias_corrections
        lsq = lsq_grad_scale(self.bits, self.dim) if self.bits in INT_BITS else 0.0
        return [
            o.lr, o.weight_decay, o.eps, o.beta1, 1.0 - o.beta1, o.beta2, 1.0 - o.beta2,
            bc1, bc2, self.step_size_lr, lsq, MIN_STEP_SIZE, min(MAX_STEP_SIZE, max_step_size(self.bits)),
            self.growth_threshold,
        ]  # fmt: skip

    def int_args(self) -> list[int]:
        """``[bits, dim, optimizer code, stochastic, learn_step_size, key, row_offset, col_offset,
        grow_step, dither]``."""
        return [
            self.bits, self.dim, OPTIMIZER_CODES[self.optimizer.kind], int(self.stochastic),
            int(self.learn_step_size and self.bits in INT_BITS), self.key, self.row_offset, self.col_offset,
            int(self.grow_step and self.bits in INT_BITS), int(self.dither) & 0xFFFFFF,
        ]  # fmt: skip


@dataclass(frozen=True)
class TableUpdate:
    """One table (or shard) of a fused update: its storage, the occurrences of its rows in the
    batch, and the scalars. Every backend's ``fused_update(update, grad, bounded=None)`` and
    ``fused_update_many(updates, grad, bounded=None)`` take these; ``grad`` (the pooled output
    gradient, ``[*, D]`` fp32, read at ``grad_offsets``) is shared by the tables of one batch.

    Fields: ``rows`` (uint8 ``[R, >= row_bytes]``, written in place), ``step_size`` (fp32
    master steps ``[R]``, or empty), ``state1`` / ``state2`` (the optimizer's fp32 state,
    ``types.OPTIMIZERS[kind].state`` order, or empty), ``ids`` (row of each occurrence),
    ``grad_offsets`` (element offset of each occurrence's gradient in ``grad``),
    ``occ_weights`` (per-occurrence weight, or empty for 1), ``spec``.

    Example::

        update = TableUpdate(rows, steps, m1, empty, ids, offsets, empty, spec)
        skipped = fused_update(update, grad)
    """

    rows: torch.Tensor
    step_size: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor
    ids: torch.Tensor
    grad_offsets: torch.Tensor
    occ_weights: torch.Tensor
    spec: UpdateSpec

    def tensors(self, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The eight tensors in the native kernels' argument order."""
        return (
            self.rows, self.step_size, self.state1, self.state2, self.ids, self.grad_offsets,
            self.occ_weights, grad,
        )  # fmt: skip

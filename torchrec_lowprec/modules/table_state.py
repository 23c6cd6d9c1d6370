"""Per-table state of a low-precision collection: master step sizes, optimizer state, and the
handle parameter through which TorchRec-style in-backward optimizers are configured."""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules.table_layout import TableLayout
from torchrec_lowprec.optim.fused import allocate_state
from torchrec_lowprec.quant.layout import FP16_MAX, dequantize_rows, quantize_rows
from torchrec_lowprec.quant.lsq import init_step_size
from torchrec_lowprec.quant.rounding import hash_key, table_hash
from torchrec_lowprec.types import INT_BITS, OptimizerType

#: Rows quantized per chunk when (re)initialising, to bound temporary fp32 memory.
INIT_CHUNK_ROWS = 1 << 16


def has_default_init(table: EmbeddingBagConfig) -> bool:
    """Whether ``table.init_fn`` is the one ``EmbeddingBagConfig`` sets when none is given
    (``uniform_`` over ``[weight_init_min, weight_init_max]``)."""
    f = table.init_fn
    return f is None or (
        isinstance(f, partial)
        and f.func is torch.nn.init.uniform_
        and not f.args
        and f.keywords == {"a": table.get_weight_init_min(), "b": table.get_weight_init_max()}
    )


class TableState(nn.Module):
    """Buffers of one table: ``step_size`` (fp32 master, ALPT only), ``momentum1``/``momentum2``
    (optimizer state, fp32), and ``handle``, an empty ``[0, dim]`` parameter that carries autograd
    into the fused backward and the tags of ``apply_optimizer_in_backward``.

    Example::

        state = ebc.tables["t_user"]
        state.step_size.shape        # [num_embeddings] when learn_step_size and bits <= 8
    """

    def __init__(self, layout: TableLayout, config: LowPrecisionConfig, device: torch.device) -> None:
        super().__init__()
        self.layout = layout
        self.config = config
        # [0, dim]: holds nothing, but is 2-D like an embedding weight, so that optimizers built
        # on it by ``apply_optimizer_in_backward`` (e.g. RowWiseAdagrad's ``mean(axis=1)``) construct.
        self.handle = nn.Parameter(torch.empty(0, layout.dim, device=device))
        n = layout.rows if config.keeps_master_step_size else 0
        self.register_buffer("step_size", torch.zeros(n, dtype=torch.float32, device=device))
        self.optimizer_kind = OptimizerType(config.optimizer)
        self._set_state(*allocate_state(self.optimizer_kind, layout.rows, layout.dim, device))

    def extra_repr(self) -> str:
        lay = self.layout
        return f"rows={lay.rows}, dim={lay.dim}, bits={lay.bits}, row_stride={lay.stride}"

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "handle", None)  # holds nothing; not part of a checkpoint

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "handle" in missing_keys:
            missing_keys.remove(prefix + "handle")

    def _set_state(self, s1: torch.Tensor, s2: torch.Tensor) -> None:
        self.register_buffer("momentum1", s1)
        self.register_buffer("momentum2", s2)

    @property
    def state1(self) -> torch.Tensor:
        return self.momentum1

    @property
    def state2(self) -> torch.Tensor:
        return self.momentum2

    def ensure_optimizer(self, kind: OptimizerType, fresh: bool) -> None:
        """Switch the optimizer state to ``kind`` (allowed before the first update only)."""
        if kind == self.optimizer_kind:
            return
        if not fresh:
            raise RuntimeError(
                f"table {self.layout.name!r} has trained with {self.optimizer_kind.value} and is now asked "
                f"to use {kind.value}; set the in-backward optimizer before the first training step"
            )
        self.optimizer_kind = kind
        self._set_state(*allocate_state(kind, self.layout.rows, self.layout.dim, self.momentum1.device))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of this table's state-dict entries (``qweight`` included)."""
        return {
            "qweight": (self.layout.rows, self.layout.row_bytes),
            "step_size": tuple(self.step_size.shape),
            "momentum1": tuple(self.momentum1.shape),
            "momentum2": tuple(self.momentum2.shape),
        }

    def dequantize(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.layout.rows, self.layout.dim, dtype=torch.float32, device=rows.device)
        for a in range(0, self.layout.rows, INIT_CHUNK_ROWS):
            b = min(a + INIT_CHUNK_ROWS, self.layout.rows)
            out[a:b] = dequantize_rows(rows[a:b], self.layout.bits, self.layout.dim)
        return out

    def write_float(self, rows: torch.Tensor, start: int, weight: torch.Tensor) -> None:
        """Quantize fp32 rows ``weight`` into ``rows[start:]`` (nearest rounding, fresh step sizes)."""
        lay = self.layout
        if weight.dim() != 2 or weight.shape[1] != lay.dim or start + weight.shape[0] > lay.rows:
            raise ValueError(
                f"table {lay.name!r}: weight of shape {tuple(weight.shape)} does not fit rows "
                f"[{start}, {start + weight.shape[0]}) of a {lay.rows} x {lay.dim} table"
            )
        saturated = 0
        for a in range(0, weight.shape[0], INIT_CHUNK_ROWS):
            x = weight[a : a + INIT_CHUNK_ROWS].to(device=rows.device, dtype=torch.float32)
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0]) + start + a
                raise ValueError(
                    f"table {lay.name!r}: the float weight has NaN/Inf values (first in row {bad}); "
                    "fix the source table before converting it"
                )
            # Every stored width holds at most fp16's range (an IntNBit row's bias is -2^(b-1) * s
            # in fp16): larger values saturate there, counted and reported below.
            over = (x.abs() > FP16_MAX).any(dim=1) if lay.bits != 32 else None
            if over is not None and bool(over.any()):
                saturated += int(over.sum())
                x = x.clamp(-FP16_MAX, FP16_MAX)
            r0 = start + a
            if lay.bits in INT_BITS:
                s = init_step_size(x, lay.bits, self.config.step_size_init)
                rows[r0 : r0 + x.shape[0], : lay.row_bytes] = quantize_rows(x, s, lay.bits)
                if self.step_size.numel():
                    self.step_size[r0 : r0 + x.shape[0]] = s.to(torch.float16).to(torch.float32)
            else:
                rows[r0 : r0 + x.shape[0], : lay.row_bytes] = quantize_rows(x, None, lay.bits)
        if saturated:
            warnings.warn(
                f"table {lay.name!r}: {saturated} row(s) hold values beyond +-{FP16_MAX:g}, the largest a "
                f"{lay.bits}-bit row stores; they were saturated to that range",
                RuntimeWarning,
                stacklevel=3,
            )

    def init_rows(self, rows: torch.Tensor, table: EmbeddingBagConfig) -> None:
        """Initialise as TorchRec does, then quantize: ``table.init_fn`` applied to an fp32
        ``[rows, dim]`` tensor (this table, or this shard of it), or, for TorchRec's default
        init (uniform in the config's range), the same distribution drawn from a generator
        seeded per table and shard (so a sharded model starts where the unsharded one does,
        without one fp32 copy of the whole table)."""
        if not has_default_init(table):
            x = torch.empty(self.layout.rows, self.layout.dim, dtype=torch.float32)
            out = table.init_fn(x)
            x = out if isinstance(out, torch.Tensor) else x
            shape = (self.layout.rows, self.layout.dim)
            if tuple(x.shape) != shape or not torch.isfinite(x).all():
                raise ValueError(
                    f"table {table.name!r}: init_fn must fill the {list(shape)} fp32 weight it is given "
                    f"(in place, or return one of that shape) with finite values; got shape "
                    f"{list(x.shape)}, finite: {bool(torch.isfinite(x).all())}"
                )
            self.write_float(rows, 0, x)
            return
        o = self.layout.origin
        gen = torch.Generator().manual_seed(
            hash_key(self.config.seed, table_hash(o.table), o.row_offset ^ (o.col_offset << 40))
        )
        lo, hi = table.get_weight_init_min(), table.get_weight_init_max()
        for a in range(0, self.layout.rows, INIT_CHUNK_ROWS):
            n = min(INIT_CHUNK_ROWS, self.layout.rows - a)
            x = torch.empty(n, self.layout.dim).uniform_(lo, hi, generator=gen)
            self.write_float(rows, a, x)

"""``LowPrecisionEmbeddingBagCollection``: a drop-in ``torchrec.EmbeddingBagCollection`` whose
tables are stored as 8/4/2-bit codes (or fp16/fp32) and trained by a fused sparse optimizer
in the backward pass (LPT / ALPT)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.kernels.dispatch import fused_update_many
from torchrec_lowprec.kernels.lookup import (
    FeatureSlot,
    FusedPooledLookup,
    row_alignment_for,
    table_buffer,
)
from torchrec_lowprec.kernels.spec import TableUpdate, UpdateSpec
from torchrec_lowprec.modules.bounds import check_ids, ordered_with_totals
from torchrec_lowprec.modules.checkpoint import validate_all_entries, validate_checkpoint, validate_values
from torchrec_lowprec.modules.data_type import config_from_data_type, with_data_type
from torchrec_lowprec.modules.fused_optimizer import FusedOptimizerMixin
from torchrec_lowprec.modules.guards import refuse_dtype_cast, update_lock
from torchrec_lowprec.modules.table_layout import (
    CollectionAccessors,
    ShardOrigin,
    check_collection_args,
    plan_layout,
    table_summary,
    validate_table,
)
from torchrec_lowprec.modules.table_state import TableState
from torchrec_lowprec.optim.fused import resolve_optimizer
from torchrec_lowprec.optim.keyed import FusedTableOptimizer
from torchrec_lowprec.quant.pooling import MeanColumns
from torchrec_lowprec.quant.rounding import hash_key, table_hash


class _FusedLookupFunction(torch.autograd.Function):
    """Pooled lookup whose backward runs the fused optimizer instead of returning weight grads."""

    @staticmethod
    def forward(ctx, module, totals, values, offsets, lengths, weights, *handles):  # type: ignore[override]
        ctx.module = module
        ctx.totals = totals
        ctx.num_handles = len(handles)
        ctx.save_for_backward(values, lengths, weights)
        return module._pooled(values, offsets, weights)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, lengths, weights = ctx.saved_tensors
        ctx.module._fused_backward(grad_out, values, lengths, weights, ctx.totals)
        return (None,) * (6 + ctx.num_handles)


class LowPrecisionEmbeddingBagCollection(
    FusedOptimizerMixin, CollectionAccessors, EmbeddingBagCollectionInterface
):
    """An ``EmbeddingBagCollection`` with tables stored in low precision and trained in place.

    Tables use FBGEMM's IntNBit row layout (fp16 step size and bias, then packed codes), so the
    forward pass is FBGEMM's fused quantized kernel (on CPU: our native lookup, which gives the
    same bits on all threads; see ``kernels/lookup.py``). The backward pass runs the fused optimizer
    on the touched rows (dequantize, fp32 step, ALPT step-size update, stochastic or nearest
    rounding) and returns no weight gradient, like TorchRec's fused TBE optimizers. Output
    keys, order and shapes match ``torchrec.EmbeddingBagCollection``.

    The positional arguments are ``torchrec.EmbeddingBagCollection``'s (``tables, is_weighted,
    device``); everything else is keyword-only.

    Args:
        tables: the TorchRec table configs (SUM or MEAN pooling, any dims).
        config: the default :class:`LowPrecisionConfig` of every table. ``None``: each table's
            width comes from its ``data_type`` (``DataType.INT8/INT4/INT2/FP16/FP32``, TorchRec's
            default FP32 included) with the other settings at their defaults.
        per_table_configs: table name -> config, overriding ``config`` (and ``data_type``) for
            that table. ``embedding_bag_configs()`` reports each table's real width as its
            ``data_type``.
        is_weighted: use KJT weights as per-sample weights (as TorchRec's ``is_weighted``).
        device: where the tables live (``meta`` allocates nothing).
        config: the default :class:`LowPrecisionConfig` of every table.
        per_table_configs: table name -> config, overriding ``config`` for that table.
        init_weights: fill the tables with TorchRec's default uniform init (quantized).
        shard_origins: for the sharded lookup: table name -> where this local table sits in
            its global table (keys the rounding draws by global table, row and column).

    Example::

        tables = [EmbeddingBagConfig(name="t_user", embedding_dim=64, num_embeddings=1000,
                                     feature_names=["user"])]
        ebc = LowPrecisionEmbeddingBagCollection(tables, config=LowPrecisionConfig(bits=4))
        pooled = ebc(kjt)               # KeyedTensor with key "user", [B, 64]
        pooled.values().sum().backward()  # the int4 table is updated in place
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        *,
        config: LowPrecisionConfig | None = None,
        per_table_configs: dict[str, LowPrecisionConfig] | None = None,
        init_weights: bool = True,
        shard_origins: dict[str, ShardOrigin] | None = None,
    ) -> None:
        super().__init__()
        check_collection_args(type(self).__name__, tables, is_weighted, device, config, per_table_configs)
        per_table_configs = dict(per_table_configs or {})
        names = [t.name for t in tables]
        if not tables:
            raise ValueError("LowPrecisionEmbeddingBagCollection needs at least one table")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        unknown = set(per_table_configs) - set(names)
        if unknown:
            raise ValueError(f"per_table_configs names unknown tables {sorted(unknown)}; tables: {names}")
        self._configs = {
            t.name: per_table_configs.get(t.name) or config or config_from_data_type(t) for t in tables
        }
        tables = [with_data_type(t, self._configs[t.name].bits) for t in tables]
        for t in tables:
            validate_table(t, self._configs[t.name])
        for t in tables:
            if len(set(t.feature_names)) != len(t.feature_names):
                raise ValueError(f"table {t.name!r} lists a feature twice: {t.feature_names}")

        self._embedding_bag_configs = tables
        self._is_weighted = is_weighted
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._row_alignment = row_alignment_for(device)
        self._layouts, total_bytes = plan_layout(tables, self._configs, self._row_alignment, shard_origins)
        self._table_index = {lay.name: i for i, lay in enumerate(self._layouts)}
        self.register_buffer("_flat", table_buffer(total_bytes, device), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        self.tables = nn.ModuleDict(
            {lay.name: TableState(lay, self._configs[lay.name], device) for lay in self._layouts}
        )
        self._nonfinite_rows = dict.fromkeys(names, 0)
        # Learning-rate param groups (table -> group dict) of the fused optimizer, once made
        # (``fused_optimizer``, or the sharded parent's); ``_lr_base``: the lr they started from.
        self._lr_groups: dict[str, dict[str, Any]] = {}
        self._lr_base: dict[str, float] = {}
        self._fused_optim: FusedTableOptimizer | None = None
        self._bounded_total = torch.zeros(len(names), dtype=torch.int64)  # per table, see step_bound_rows
        self._step_seen = (-1, -1, 0)  # (step buffer data_ptr, _version, value): see _host_step
        self._build_lookups()
        if init_weights and device.type != "meta":
            for lay in self._layouts:
                self.tables[lay.name].init_rows(self._rows_of(lay.name), tables[self._table_index[lay.name]])

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        refuse_dtype_cast(self, fn)
        return super()._apply(fn, recurse)

    # ----- structure -----
    def _build_lookups(self) -> None:
        """Group features by pooling mode (one FBGEMM call each) and record column offsets.

        A *slot* is one (table, feature) pair: a feature read by two tables is two slots, looked
        up twice (the KJT permute repeats its ids) and named ``feature@table`` in the output,
        as ``torchrec.EmbeddingBagCollection`` names it (``get_embedding_names_by_table``)."""
        self._feature_names = [f for lay in self._layouts for f in lay.feature_names]
        self._embedding_names = [n for names in get_embedding_names_by_table(self._layouts) for n in names]
        self._lengths_per_embedding = [lay.dim for lay in self._layouts for _ in lay.feature_names]
        col = 0
        out_cols: dict[tuple[int, str], int] = {}  # (table index, feature) -> first output column
        for i, lay in enumerate(self._layouts):
            for f in lay.feature_names:
                out_cols[(i, f)] = col
                col += lay.dim
        self._total_dim = col
        groups: dict[PoolingMode, list[int]] = {}
        for i, lay in enumerate(self._layouts):
            mode = PoolingMode.MEAN if lay.pooling == PoolingType.MEAN else PoolingMode.SUM
            groups.setdefault(mode, []).append(i)
        self._groups = []
        slots: list[tuple[int, str]] = []  # in the order FBGEMM sees them
        for mode, idx in groups.items():
            lays = [self._layouts[i] for i in idx]
            fbgemm_slots = [
                FeatureSlot(lay.offset, lay.bits, lay.dim, lay.rows)
                for lay in lays
                for _ in lay.feature_names
            ]
            self._groups.append(
                (mode, lays, FusedPooledLookup(fbgemm_slots, mode, self._row_alignment, self._flat.device))
            )
            slots.extend((i, f) for i in idx for f in self._layouts[i].feature_names)
        self._lookup_order = [f for _, f in slots]  # KJT keys in lookup order (repeats if shared)
        self._lookup_tables = [self._layouts[i] for i, _ in slots]  # the table of each slot
        self._lookup_cols = torch.tensor([out_cols[s] for s in slots], dtype=torch.int64)
        self._lookup_dims = [lay.dim for lay in self._lookup_tables]
        # MEAN bags' gradients are divided by the bag length in backward (quant/pooling.py).
        self._mean_columns = MeanColumns.of(
            [lay.pooling == PoolingType.MEAN for lay in self._lookup_tables],
            self._lookup_dims,
            [out_cols[s] for s in slots],
        )
        if len(self._groups) > 1:
            pieces = [torch.arange(out_cols[s], out_cols[s] + d) for s, d in zip(slots, self._lookup_dims)]
            self._col_perm = torch.argsort(torch.cat(pieces))
        else:
            self._col_perm = None

    def _rows_of(self, name: str) -> torch.Tensor:
        return self._layouts[self._table_index[name]].view(self._flat)

    def _handles(self) -> list[nn.Parameter]:
        return [self.tables[lay.name].handle for lay in self._layouts]

    @property
    def device(self) -> torch.device:
        return self._flat.device

    def extra_repr(self) -> str:
        return table_summary(
            (lay.name, lay.rows, lay.dim, lay.bits, self.memory_bytes(per_table=True)[lay.name]["total"])
            for lay in self._layouts
        )

    # ----- forward -----
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.variable_stride_per_key():
            raise ValueError("variable batch size per feature (VBE) KJTs are not supported")
        features, totals = ordered_with_totals(features, self._lookup_order, self._is_weighted)
        batch = features.stride()
        values = features.values()
        lengths = features.lengths()
        weights = features.weights().float() if self._is_weighted else None
        rows = [lay.rows for lay in self._lookup_tables]
        values, lengths, weights = check_ids(
            values,
            lengths,
            weights,
            self._lookup_order,
            rows,
            batch,
            self._bounds_modes(),
            self._table_names_by_feature(),
        )
        if lengths is not features.lengths():  # ids were dropped (bounds_check warn/ignore)
            totals = lengths.view(len(totals), batch).sum(dim=1).tolist()
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
        values = values.to(offsets.dtype) if values.dtype != offsets.dtype else values
        handles = [h for h in self._handles() if h.requires_grad]
        if torch.is_grad_enabled() and handles:
            out = _FusedLookupFunction.apply(self, totals, values, offsets, lengths, weights, *handles)
        else:
            out = self._pooled(values, offsets, weights)
        out = out.view(batch, self._total_dim) if out.numel() else out.reshape(batch, self._total_dim)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=out)

    def _bounds_modes(self) -> list[str]:
        return [self._configs[lay.name].bounds_check for lay in self._lookup_tables]

    def _table_names_by_feature(self) -> list[str]:
        return [lay.name for lay in self._lookup_tables]

    def _pooled(
        self, values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, total_dim]`` pooled embeddings in output (table) order."""
        if len(self._groups) == 1:
            return self._groups[0][2](self._flat, values, offsets, weights)
        batch = (offsets.numel() - 1) // len(self._lookup_order)
        outs, f0 = [], 0
        for _, lays, lookup in self._groups:
            nf = sum(len(lay.feature_names) for lay in lays)
            o = offsets[f0 * batch : (f0 + nf) * batch + 1]
            v = values[o[0] : o[-1]]
            w = weights[o[0] : o[-1]] if weights is not None else None
            outs.append(lookup(self._flat, v, o - o[0], w))
            f0 += nf
        return torch.cat(outs, dim=1)[:, self._col_perm.to(values.device)]

    # ----- backward: the fused update -----
    def _fused_backward(self, *args) -> None:
        with update_lock(self):  # concurrent backward passes: serialised, no step lost
            self._fused_backward_locked(*args)

    def _fused_backward_locked(
        self,
        grad_out: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        per_feature: list[int],
    ) -> None:
        grad = grad_out.contiguous().to(torch.float32)
        n_features = len(self._lookup_order)
        batch = lengths.numel() // n_features
        step = self._host_step() + 1
        dev = values.device
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths)
        feat = torch.div(bag, batch, rounding_mode="floor")
        goff = (bag - feat * batch) * self._total_dim + self._lookup_cols.to(dev)[feat]
        grad = self._mean_columns.divide(grad, lengths)
        occ_w = weights
        occ_w = occ_w.contiguous() if occ_w is not None else torch.empty(0, device=dev)
        items, idx = [], []
        start = f = 0
        for _, lays, _ in self._groups:
            for lay in lays:
                nf = len(lay.feature_names)
                end = start + sum(per_feature[f : f + nf])
                f += nf
                if end > start and self.tables[lay.name].handle.requires_grad:  # frozen: skip
                    w = occ_w[start:end] if occ_w.numel() else occ_w
                    items.append(self._table_update(lay, step, values[start:end], goff[start:end], w))
                    idx.append(self._table_index[lay.name])
                start = end
        # One call for all tables: one parallel region, rows of all tables in one work queue.
        # Counters stay on the device (no host sync per step): step_bound_rows() reads them.
        bounded = torch.zeros(len(items), dtype=torch.int64, device=dev)
        for i, skipped in zip(idx, fused_update_many(items, grad, bounded)):
            if skipped:
                self._report_nonfinite(self._layouts[i].name, skipped, step)
        if self._bounded_total.device != dev:
            self._bounded_total = self._bounded_total.to(dev)
        self._bounded_total.index_add_(0, torch.tensor(idx, dtype=torch.int64, device=dev), bounded)
        self.step.fill_(step)
        self._step_seen = (self.step.data_ptr(), self.step._version, step)

    def _host_step(self) -> int:
        """The step counter without a host sync: the value this module last wrote, unless the
        buffer was written or replaced since (a checkpoint load, ``.to()``, a sharded parent's
        copy), in which case it is read once."""
        ptr, version, value = self._step_seen
        if (self.step.data_ptr(), self.step._version) != (ptr, version):
            value = int(self.step)
            self._step_seen = (self.step.data_ptr(), self.step._version, value)
        return value

    def _table_update(self, lay, step: int, ids, goff, occ_w) -> TableUpdate:
        """The fused update of one table (see kernels/spec.py)."""
        state: TableState = self.tables[lay.name]
        cfg = self._configs[lay.name]
        opt = self._table_optimizer(lay.name)
        state.ensure_optimizer(opt.kind, fresh=step == 1)
        spec = UpdateSpec(
            bits=lay.bits, dim=lay.dim, optimizer=opt, step=step, stochastic=cfg.rounding == "stochastic",
            learn_step_size=cfg.keeps_master_step_size, step_size_lr=cfg.step_size_lr,
            key=hash_key(cfg.seed, table_hash(lay.origin.table), step),
            row_offset=lay.origin.row_offset, col_offset=lay.origin.col_offset,
            grow_step=cfg.grow_step_size, growth_threshold=cfg.growth_threshold,
        )  # fmt: skip
        rows = self._rows_of(lay.name)
        return TableUpdate(
            rows, state.step_size, state.state1, state.state2, ids.to(torch.int64), goff, occ_w, spec
        )

    def _report_nonfinite(self, name: str, skipped: int, step: int) -> None:
        if self._nonfinite_rows[name] == 0:
            warnings.warn(
                f"table {name!r}: {skipped} row(s) got a NaN/Inf gradient at step {step}; their "
                "update was skipped (the rows are unchanged). See nonfinite_rows_skipped().",
                RuntimeWarning,
                stacklevel=2,
            )
        self._nonfinite_rows[name] += skipped

    def _resolve_optimizers(self) -> None:
        """Bring each table's optimizer state in line with its in-backward optimizer tag
        (``_apply_optimizer_in_backward`` may be called after construction)."""
        fresh = int(self.step) == 0
        for lay in self._layouts:
            state: TableState = self.tables[lay.name]
            state.ensure_optimizer(resolve_optimizer(state.handle, self._configs[lay.name]).kind, fresh)

    def nonfinite_rows_skipped(self) -> dict[str, int]:
        """Per table, how many row updates were skipped because their gradient was NaN/Inf."""
        return dict(self._nonfinite_rows)

    def step_bound_rows(self) -> dict[str, int]:
        """Per table, how many row updates clamped the step size at ``max_step_size(bits)`` (the
        largest step whose fp16 bias stays finite; see ``kernels/spec.py``, step 5c)."""
        return dict(zip((lay.name for lay in self._layouts), self._bounded_total.tolist()))

    # ----- weights in and out -----
    def dequantized_weight(self, name: str) -> torch.Tensor:
        """Table ``name`` as fp32 ``[rows, dim]`` (exactly what the forward pass reads)."""
        return self.tables[name].dequantize(self._rows_of(name))

    def load_float_weight(self, name: str, weight: torch.Tensor) -> None:
        """Quantize fp32 ``weight`` ``[rows, dim]`` into table ``name`` (step sizes re-initialised)."""
        self.tables[name].write_float(self._rows_of(name), 0, weight)

    def quantized_weight(self, name: str) -> torch.Tensor:
        """Table ``name``'s stored rows ``[rows, row_bytes]`` uint8 (FBGEMM IntNBit layout, no padding)."""
        lay = self._layouts[self._table_index[name]]
        return self._rows_of(name)[:, : lay.row_bytes]

    # ----- accounting -----
    def memory_bytes(self, per_table: bool = False) -> int | dict[str, dict[str, int]]:
        """Bytes held: stored rows (codes + fp16 scale/bias, padding included), fp32 master step
        sizes, optimizer state. ``per_table=True`` gives a breakdown per table."""
        self._resolve_optimizers()
        report = {}
        for lay in self._layouts:
            st: TableState = self.tables[lay.name]
            parts = {
                "rows": lay.nbytes,
                "step_size": st.step_size.numel() * st.step_size.element_size(),
                "optimizer": sum(t.numel() * t.element_size() for t in (st.state1, st.state2)),
            }
            parts["total"] = sum(parts.values())
            report[lay.name] = parts
        if per_table:
            return report
        return sum(p["total"] for p in report.values())

    # ----- checkpoints -----
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "tables": {
                lay.name: {"rows": lay.rows, "dim": lay.dim, "bits": lay.bits,
                           "optimizer": self.tables[lay.name].optimizer_kind.value,
                           "learn_step_size": self._configs[lay.name].keeps_master_step_size,
                           "column_shards": [0]}
                for lay in self._layouts
            },
            "nonfinite_rows": dict(self._nonfinite_rows),
        }  # fmt: skip

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._nonfinite_rows.update(state.get("nonfinite_rows", {}))

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[override]
        self._resolve_optimizers()
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for lay in self._layouts:
            destination[f"{prefix}tables.{lay.name}.qweight"] = self.quantized_weight(lay.name)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        # Every table (and its state) is checked before anything is copied: a mismatched
        # checkpoint raises ValueError naming the table and leaves the tables untouched.
        self._resolve_optimizers()
        validate_checkpoint(self, state_dict, prefix)
        validate_all_entries(self, state_dict, prefix)
        validate_values(self, state_dict, prefix)
        for lay in self._layouts:
            key = f"{prefix}tables.{lay.name}.qweight"
            if key in state_dict:
                # Popped (torch hands each module its own copy of the dict) so that the
                # TableState child does not report it as unexpected.
                self.quantized_weight(lay.name).copy_(state_dict.pop(key))
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

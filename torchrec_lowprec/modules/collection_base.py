"""What every low-precision collection holds and does apart from its forward: the packed
tables in one flat buffer, their configs and state, the fused update of the touched rows,
weights in and out, byte accounting and checkpoints.

``LowPrecisionEmbeddingBagCollection`` (pooled) and ``LowPrecisionEmbeddingCollection``
(one embedding per id) differ only in how they read rows and where each occurrence's
gradient sits; both hand the fused update a list of :class:`TableSpan`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.kernels.dispatch import fused_update_many
from torchrec_lowprec.kernels.lookup import row_alignment_for, table_buffer
from torchrec_lowprec.kernels.spec import TableUpdate, UpdateSpec
from torchrec_lowprec.modules import input_check
from torchrec_lowprec.modules.bounds import describe_report, id_report, ordered_on_device, ordered_with_totals
from torchrec_lowprec.modules.checkpoint import validate_all_entries, validate_checkpoint, validate_values
from torchrec_lowprec.modules.data_type import config_from_data_type, with_data_type
from torchrec_lowprec.modules.fused_optimizer import FusedOptimizerMixin
from torchrec_lowprec.modules.guards import refuse_dtype_cast, update_lock
from torchrec_lowprec.modules.input_check import REPORT_OK, DeferredInputErrors, combined
from torchrec_lowprec.modules.table_layout import (
    ShardOrigin,
    TableLayout,
    plan_layout,
    table_summary,
    validate_table,
)
from torchrec_lowprec.modules.table_state import TableState
from torchrec_lowprec.optim.fused import resolve_optimizer
from torchrec_lowprec.optim.keyed import FusedTableOptimizer
from torchrec_lowprec.quant.rounding import dither_offset, hash_key, table_hash


@dataclass(frozen=True)
class TableSpan:
    """The occurrences ``[start, end)`` of the (table-ordered) ids that belong to ``layout``."""

    layout: TableLayout
    start: int
    end: int


class LowPrecisionTables(FusedOptimizerMixin, nn.Module):
    """Storage, fused update and checkpoints shared by the low-precision collections.

    Not used on its own: a collection calls :meth:`_init_tables` from its constructor, builds its
    lookups over ``self._flat`` and, in its backward, calls :meth:`_fused_backward` with the
    per-occurrence gradient offsets and the :class:`TableSpan` of each table.

    Example::

        ec = LowPrecisionEmbeddingCollection(tables, config=LowPrecisionConfig(bits=4))
        ec.memory_bytes(per_table=True)["t_item"]["rows"]  # the packed bytes of one table
    """

    _configs: dict[str, LowPrecisionConfig]
    _layouts: list[TableLayout]

    def _init_tables(
        self,
        tables: list[BaseEmbeddingConfig],
        device: torch.device | str | None,
        config: LowPrecisionConfig | None,
        per_table_configs: dict[str, LowPrecisionConfig] | None,
        init_weights: bool,
        shard_origins: dict[str, ShardOrigin] | None,
    ) -> list[BaseEmbeddingConfig]:
        """Validate ``tables``, allocate the flat buffer and state, initialise the rows; returns
        the tables with ``data_type`` set to each table's real width."""
        per_table_configs = dict(per_table_configs or {})
        owner = type(self).__name__
        names = [t.name for t in tables]
        if not tables:
            raise ValueError(f"{owner} needs at least one table")
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
            if len(set(t.feature_names)) != len(t.feature_names):
                raise ValueError(f"table {t.name!r} lists a feature twice: {t.feature_names}")
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
        # Skipped-row counts a device kernel (Triton) left on the device: read by
        # nonfinite_rows_skipped() / a checkpoint, never in the step (no host sync).
        self._nonfinite_pending = torch.zeros(len(names), dtype=torch.int64)
        self._table_indices: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}
        self._step_seen = (-1, -1, 0)  # (step buffer data_ptr, _version, value): see _host_step
        self._input_errors = DeferredInputErrors()  # reports of device-side input checks
        if init_weights and device.type != "meta":
            for lay in self._layouts:
                self.tables[lay.name].init_rows(self._rows_of(lay.name), tables[self._table_index[lay.name]])
        return tables

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        refuse_dtype_cast(self, fn)
        return super()._apply(fn, recurse)

    def _rows_of(self, name: str) -> torch.Tensor:
        return self._layouts[self._table_index[name]].view(self._flat)

    def _handles(self) -> list[nn.Parameter]:
        return [self.tables[lay.name].handle for lay in self._layouts]

    @property
    def device(self) -> torch.device:
        return self._flat.device

    def table_config(self, name: str) -> LowPrecisionConfig:
        """The :class:`LowPrecisionConfig` of table ``name``."""
        return self._configs[name]

    def extra_repr(self) -> str:
        return table_summary(
            (lay.name, lay.rows, lay.dim, lay.bits, self.memory_bytes(per_table=True)[lay.name]["total"])
            for lay in self._layouts
        )

    def _bounds_modes(self, layouts: list[TableLayout]) -> list[str]:
        return [self._configs[lay.name].bounds_check for lay in layouts]

    # ----- input checks on the device -----
    def _checked_on_device(
        self,
        features: KeyedJaggedTensor,
        weighted: bool,
        known: list[int] | None,
        skip: torch.Tensor | None = None,
    ) -> tuple[KeyedJaggedTensor, list[int], torch.Tensor, torch.Tensor | None] | None:
        """``(KJT in lookup order, ids per slot, ids safe to look up, skip)`` for a batch
        whose checks run on the device (``input_check.checks_on_device``, every table's
        ``bounds_check`` ``"raise"``), or ``None`` (the caller checks on the host). ``skip``:
        the device verdict the fused update reads (the batch updates nothing when it is bad);
        the report is queued and raised by a later forward or :meth:`check_inputs`. An
        earlier batch's error is raised here. ``skip`` given: a verdict reached before (a
        sharded lookup's: every rank's global check), or-ed into this one."""
        lookup_tables = self._lookup_tables
        if not input_check.checks_on_device(self.device) or any(
            m != "raise" for m in self._bounds_modes(lookup_tables)
        ):
            return None
        kjt_keys = features.keys()
        if known is not None:  # a sharded lookup's input: checked before TorchRec's input dist
            features, totals = ordered_with_totals(features, self._lookup_order, weighted, known)
            if skip is not None:  # on the device, agreed by every rank: bad ids went out as row 0
                return features, totals, features.values(), skip
            report = None
        self._input_errors.poll()
        if known is None:
            features, totals, report = ordered_on_device(features, self._lookup_order, weighted)
        values = features.values()
        rows = [lay.rows for lay in lookup_tables]
        if values.numel():
            values, ids = id_report(values, features.lengths(), rows, features.stride())
            report = combined(report, ids)
        if report is None:
            return features, totals, values, skip
        names = [lay.name for lay in lookup_tables]
        describe = describe_report(kjt_keys, self._lookup_order, names, rows, self.device)
        self._input_errors.record(report, self._host_step() + 1, describe)
        bad = report[0] != REPORT_OK
        return features, totals, values, bad if skip is None else bad | skip

    def check_inputs(self) -> None:
        """Raise the error of any batch whose inputs were checked on the device and found bad
        (on CUDA, ``bounds_check="raise"``: see ``modules/input_check.py``); waits for the
        device. The forward raises it too, a step or more after the batch, without waiting.
        On CPU the checks raise in the step itself and this does nothing."""
        self._input_errors.flush()

    # ----- backward: the fused update -----
    def _fused_backward(
        self,
        grad: torch.Tensor,
        ids: torch.Tensor,
        goff: torch.Tensor,
        occ_w: torch.Tensor,
        spans: list[TableSpan],
        skip: torch.Tensor | None = None,
    ) -> None:
        """One fused update of every table that has occurrences: ``ids[s.start:s.end]`` of
        table ``s.layout`` read their gradient row (``dim`` floats) at ``grad.view(-1)[goff]``,
        scaled by ``occ_w`` (empty: 1). ``skip``: a device-side input check's verdict (true:
        nothing is updated; the step still counts)."""
        with update_lock(self):  # concurrent backward passes: serialised, no step lost
            step = self._host_step() + 1
            dev = ids.device
            items, idx = [], []
            for s in spans:
                if s.end > s.start and self.tables[s.layout.name].handle.requires_grad:  # frozen: skip
                    w = occ_w[s.start : s.end] if occ_w.numel() else occ_w
                    items.append(
                        self._table_update(s.layout, step, ids[s.start : s.end], goff[s.start : s.end], w)
                    )
                    idx.append(self._table_index[s.layout.name])
            # One call for all tables: one parallel region, rows of all tables in one work queue.
            # Counters stay on the device (no host sync per step): step_bound_rows() reads them.
            bounded = torch.zeros(len(items), dtype=torch.int64, device=dev)
            skipped = fused_update_many(items, grad, bounded, skip)
            if self._bounded_total.device != dev:
                self._bounded_total = self._bounded_total.to(dev)
                self._nonfinite_pending = self._nonfinite_pending.to(dev)
            index = self._table_index_tensor(idx, dev)
            self._bounded_total.index_add_(0, index, bounded)
            if skipped and isinstance(skipped[0], torch.Tensor):  # counted on the device
                self._nonfinite_pending.index_add_(0, index, torch.stack(skipped).to(torch.int64))
            else:
                for i, n in zip(idx, skipped):
                    if n:
                        self._report_nonfinite(self._layouts[i].name, n, f"at step {step}")
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

    def _table_update(self, lay: TableLayout, step: int, ids, goff, occ_w) -> TableUpdate:
        """The fused update of one table (see kernels/spec.py)."""
        state: TableState = self.tables[lay.name]
        cfg = self._configs[lay.name]
        opt = self._table_optimizer(lay.name)
        state.ensure_optimizer(opt.kind, fresh=step == 1)
        dithered = cfg.rounding == "dithered"  # a key fixed over steps, a golden-ratio offset per step
        spec = UpdateSpec(
            bits=lay.bits, dim=lay.dim, optimizer=opt, step=step, stochastic=cfg.rounding != "nearest",
            learn_step_size=cfg.keeps_master_step_size, step_size_lr=cfg.step_size_lr,
            key=hash_key(cfg.seed, table_hash(lay.origin.table), 0 if dithered else step),
            row_offset=lay.origin.row_offset, col_offset=lay.origin.col_offset,
            grow_step=cfg.grow_step_size, growth_threshold=cfg.growth_threshold,
            dither=dither_offset(step) if dithered else 0,
        )  # fmt: skip
        rows = self._rows_of(lay.name)
        return TableUpdate(
            rows, state.step_size, state.state1, state.state2, ids.to(torch.int64), goff, occ_w, spec
        )

    def _table_index_tensor(self, idx: list[int], dev: torch.device) -> torch.Tensor:
        """``idx`` as a tensor on ``dev``, made once per set of tables (a host-to-device copy
        of a new list waits for the device)."""
        key = (dev, tuple(idx))
        if key not in self._table_indices:
            self._table_indices[key] = torch.tensor(idx, dtype=torch.int64, device=dev)
        return self._table_indices[key]

    def _report_nonfinite(self, name: str, skipped: int, when: str) -> None:
        if self._nonfinite_rows[name] == 0:
            warnings.warn(
                f"table {name!r}: {skipped} row(s) got a NaN/Inf gradient {when}; their "
                "update was skipped (the rows are unchanged). See nonfinite_rows_skipped().",
                RuntimeWarning,
                stacklevel=3,
            )
        self._nonfinite_rows[name] += skipped

    def _read_device_nonfinite(self) -> None:
        """Fold the skipped-row counts a device kernel left on the device into the host
        counts, warning for tables that had none (one host sync: outside the step)."""
        counts = self._nonfinite_pending.tolist()
        if any(counts):
            self._nonfinite_pending.zero_()
            for lay, n in zip(self._layouts, counts):
                if n:
                    self._report_nonfinite(lay.name, n, f"by step {self._host_step()}")

    def _resolve_optimizers(self) -> None:
        """Bring each table's optimizer state in line with its in-backward optimizer tag
        (``_apply_optimizer_in_backward`` may be called after construction)."""
        fresh = self.step.device.type == "meta" or int(self.step) == 0  # meta: no step was taken
        for lay in self._layouts:
            state: TableState = self.tables[lay.name]
            state.ensure_optimizer(resolve_optimizer(state.handle, self._configs[lay.name]).kind, fresh)

    def nonfinite_rows_skipped(self) -> dict[str, int]:
        """Per table, how many row updates were skipped because their gradient was NaN/Inf.

        On CPU the first skip of a table warns in the step that made it; on CUDA the Triton
        update counts on the device (reading the count would stall the step), so the warning
        comes when this method, or a checkpoint save, reads the counts."""
        self._read_device_nonfinite()
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
        self._read_device_nonfinite()
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

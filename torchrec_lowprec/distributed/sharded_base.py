"""What the sharded low-precision collections (pooled EBC and sequence EC) share on top of
TorchRec's sharded modules: the per-rank lookups, the sharding view of the module, the fused
optimizer, the copy from the unsharded module, and the state dict as ShardedTensors (:mod:`.state`).

``ShardedLowPrecisionEmbeddingBagCollection`` and ``ShardedLowPrecisionEmbeddingCollection``
put :class:`ShardedLowPrecisionMixin` before TorchRec's ``ShardedEmbeddingBagCollection`` /
``ShardedEmbeddingCollection`` and differ only in where TorchRec keeps their tables and shardings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.distributed.global_input import AgreedCheck, check_global_input, check_global_on_device
from torchrec_lowprec.distributed.lookup import LowPrecisionShardLookup, collection_tables
from torchrec_lowprec.distributed.state import TableMeta, build_sharded_state, load_into_shards
from torchrec_lowprec.distributed.validate import validate_sharded_checkpoint
from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.modules.input_check import DeferredInputErrors
from torchrec_lowprec.optim.fused import OPTIMIZER_STATE_NAMES, config_with_fused_params, resolve_optimizer
from torchrec_lowprec.optim.keyed import FusedTableOptimizer
from torchrec_lowprec.transform import copy_in_backward_tags, in_backward_tags


class ShardingView:
    """What TorchRec's sharded-module constructors read from the module they shard: configs,
    and a ``<prefix>.<t>.weight`` per table (meta, [rows, dim]) carrying the tags of
    ``_apply_optimizer_in_backward``. Our tables hold no float weight to show it. ``prefix``:
    ``"embedding_bags"`` (EBC) or ``"embeddings"`` (EC).

    Example::

        ShardedEmbeddingCollection.__init__(self, ShardingView(lp_ec, "embeddings"), plan, env)
    """

    def __init__(self, module: LowPrecisionTables, prefix: str) -> None:
        self._module = module
        self.device = torch.device("meta")
        self._params: dict[str, nn.Parameter] = {}
        for t in collection_tables(module):
            p = nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim, device="meta"))
            copy_in_backward_tags(module.tables[t.name].handle, p)
            self._params[f"{prefix}.{t.name}.weight"] = p

    def embedding_bag_configs(self):
        return self._module.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self._module.is_weighted()

    def embedding_configs(self):
        return self._module.embedding_configs()

    def embedding_names_by_table(self) -> list[list[str]]:
        return self._module.embedding_names_by_table()

    def embedding_dim(self) -> int:
        return self._module.embedding_dim()

    def need_indices(self) -> bool:
        return self._module.need_indices()

    def use_gather_select(self) -> bool:
        return False

    def use_gather_select_per_sharding(self) -> None:
        return None

    def named_parameters(self, *args, **kwargs):
        return iter(self._params.items())

    def state_dict(self, *args, **kwargs):
        return dict(self._params)


def local_grouped_configs(sharding: Any) -> list[GroupedEmbeddingConfig]:
    """This rank's grouped configs of a TorchRec embedding sharding (TW/RW/CW/TWCW/TWRW)."""
    if hasattr(sharding, "_grouped_embedding_configs_per_rank") and hasattr(sharding, "_rank"):
        return sharding._grouped_embedding_configs_per_rank[sharding._rank]
    return sharding._grouped_embedding_configs


class ShardedLowPrecisionMixin:
    """The low-precision half of a sharded collection (see the module docstring).

    A subclass calls :meth:`_lp_prepare` before TorchRec's constructor and :meth:`_lp_finish`
    after it, and says where TorchRec keeps its tables (:meth:`_lp_tables`) and shardings
    (:meth:`_lp_shardings`); ``_lp_sequence`` picks the pooled or the sequence lookup.

    Example::

        class ShardedLowPrecisionEmbeddingCollection(ShardedLowPrecisionMixin, ShardedEmbeddingCollection):
            _lp_sequence = True
    """

    _lp_sequence: bool = False
    _lookups: list[nn.Module]
    module_sharding_plan: dict

    def _lp_tables(self) -> list[BaseEmbeddingConfig]:
        raise NotImplementedError

    def _lp_shardings(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def _lp_prepare(
        self, module: LowPrecisionTables, fused_params: dict[str, Any] | None, device: torch.device | None
    ) -> None:
        # The sharder's fused_params are the tables' defaults over their LowPrecisionConfig;
        # in-backward tags still win (TorchRec's merge_fused_params order).
        names = [t.name for t in collection_tables(module)]
        self._lp_configs = {n: config_with_fused_params(module.table_config(n), fused_params) for n in names}
        self._lp_tags = {n: in_backward_tags(module.tables[n].handle) for n in names}
        self._lp_device = device or torch.device("cpu")
        self._lp_input_errors = DeferredInputErrors()  # the global checks made on the device

    def _lp_finish(self, module: LowPrecisionTables, env: ShardingEnv) -> None:
        self._lp_metas = self._table_metas()
        self._lp_pg = env.process_group
        if module.device.type != "meta":
            with torch.no_grad():
                self._copy_from_unsharded(module)
        self._lp_state = build_sharded_state(self._lp_metas, self._lp_lookups(), self._lp_pg, self._lp_device)
        self._optim = CombinedOptimizer([self._fused_table_optimizer()])

    def _fused_table_optimizer(self) -> FusedTableOptimizer:
        """One lr group per global table, shared with every local shard's module (so the lr a
        schedule sets reaches all shards); state = the sharded momentum entries of the state dict."""
        params = {f"tables.{n}": self._lp_state[f"tables.{n}.qweight"] for n in self._lp_metas}
        groups = {
            n: {"params": [params[f"tables.{n}"]], "lr": resolve_optimizer(_tagged(self._lp_tags[n]), cfg).lr}
            for n, cfg in self._lp_configs.items()
        }
        for lookup in self._lp_lookups():
            if lookup.local is not None:
                lookup.local.attach_lr_groups({s.local_name: groups[s.table] for s in lookup.shards})

        def state() -> dict:
            return {
                params[f"tables.{n}"]: {
                    k: self._lp_state[f"tables.{n}.{k}"] for k in OPTIMIZER_STATE_NAMES[m.optimizer]
                }
                for n, m in self._lp_metas.items()
            }

        return FusedTableOptimizer(params, list(groups.values()), state)

    # ----- TorchRec hooks -----
    def _create_lookups(self) -> None:
        for sharding_type, sharding in self._lp_shardings():
            if sharding_type == ShardingType.DATA_PARALLEL.value:
                raise ValueError(
                    "DATA_PARALLEL is not supported for low-precision tables: replicas would need "
                    "the whole batch's rows to stay bit-identical. Use TABLE_WISE for small tables."
                )
            self._lookups.append(
                LowPrecisionShardLookup(
                    local_grouped_configs(sharding),
                    sharding_type,
                    self._lp_configs,
                    self._lp_device,
                    self._lp_tags,
                    sequence=self._lp_sequence,
                )
            )

    def input_dist(self, ctx, features):  # type: ignore[override]
        # Checked here, on global ids, before TorchRec buckets them into shard-local ids.
        if isinstance(features, KeyedJaggedTensor):
            weighted = bool(getattr(self, "_is_weighted", False))
            self._lp_input_errors.poll()  # an earlier batch's device-side verdict, if read back
            on_device = check_global_on_device(
                features, self._lp_tables(), self._lp_configs, weighted, self._lp_pg
            )
            if on_device is not None:
                features, ctx._lp_input_check = on_device
            else:
                features = check_global_input(
                    features, self._lp_tables(), self._lp_configs, weighted, keep_positions=self._lp_sequence
                )
        return super().input_dist(ctx, features)  # type: ignore[misc]

    # TorchRec runs the lookups from either (a pipeline calls compute_and_output_dist).
    def compute(self, ctx, dist_input):  # type: ignore[override]
        with self._lp_agreed_skip(ctx):
            return super().compute(ctx, dist_input)  # type: ignore[misc]

    def compute_and_output_dist(self, ctx, input):  # type: ignore[override]
        with self._lp_agreed_skip(ctx):
            return super().compute_and_output_dist(ctx, input)  # type: ignore[misc]

    @contextlib.contextmanager
    def _lp_agreed_skip(self, ctx):
        """While the lookups run: every lookup reads the verdict all ranks agreed on for the
        batch of ``ctx`` (a batch checked on the device, see ``distributed/global_input.py``).
        The verdict travels with TorchRec's per-batch context, so a pipeline that runs the input
        dist of the next batch before this batch's lookups keeps each batch's own."""
        check: AgreedCheck | None = getattr(ctx, "_lp_input_check", None)
        if check is None:
            yield
            return
        ctx._lp_input_check = None  # read once (compute_and_output_dist may call compute)
        lookups = self._lp_lookups()
        steps = [lk.local._host_step() for lk in lookups if lk.local is not None]
        skip = check.skip(self._lp_input_errors, max(steps, default=0) + 1)
        for lk in lookups:
            lk.input_skip = skip
        try:
            yield
        finally:
            for lk in lookups:
                lk.input_skip = None

    def init_data_parallel(self) -> None:
        pass

    def _lp_lookups(self) -> list[LowPrecisionShardLookup]:
        return [lk for lk in self._lookups if isinstance(lk, LowPrecisionShardLookup)]

    def _table_metas(self) -> dict[str, TableMeta]:
        metas = {}
        for t in self._lp_tables():
            cfg = self._lp_configs[t.name]
            ps = self.module_sharding_plan[t.name]
            cols = (
                sorted({int(s.shard_offsets[1]) for s in ps.sharding_spec.shards})
                if ps.sharding_spec
                else [0]
            )
            if ps.sharding_type not in (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value):
                cols = [0]
            kind = resolve_optimizer(_tagged(self._lp_tags[t.name]), cfg).kind
            metas[t.name] = TableMeta(
                t.num_embeddings, t.embedding_dim, cfg.bits, tuple(cols), cfg.keeps_master_step_size, kind
            )
        return metas

    # ----- state -----
    def _copy_from_unsharded(self, module: LowPrecisionTables) -> None:
        module._resolve_optimizers()
        for lookup in self._lp_lookups():
            for s in lookup.shards:
                meta = self._lp_metas[s.table]
                rows = slice(s.row_offset, s.row_offset + s.rows)
                src, dst = module.tables[s.table], lookup.local.tables[s.local_name]
                lookup.local.step.copy_(module.step)  # rounding draws and Adam's bias correction go on
                if meta.column_sharded:
                    # One step size per row per block (the scale rule): re-quantize the block;
                    # the optimizer state is per row (RowWiseAdagrad) or per element: copied.
                    cols = slice(s.col_offset, s.col_offset + s.cols)
                    lookup.local.load_float_weight(
                        s.local_name, module.dequantized_weight(s.table)[rows, cols]
                    )
                    for name in ("momentum1", "momentum2"):
                        t = getattr(src, name)
                        if getattr(dst, name).numel():
                            getattr(dst, name).copy_(t[rows] if t.dim() == 1 else t[rows, cols])
                    continue
                lookup.local.quantized_weight(s.local_name).copy_(module.quantized_weight(s.table)[rows])
                for name in ("step_size", "momentum1", "momentum2"):
                    if getattr(dst, name).numel():
                        getattr(dst, name).copy_(getattr(src, name)[rows])

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for key, value in self._lp_state.items():
            destination[prefix + key] = value
        destination[prefix + "step"] = self._step_tensor().clone()
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def _step_tensor(self) -> torch.Tensor:
        steps = [lk.local.step for lk in self._lp_lookups() if lk.local is not None]
        local = max(steps, key=int).clone() if steps else torch.zeros((), dtype=torch.int64)
        # Ranks without shards of a sharding type still agree on the step.
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self._lp_pg)
        return local

    def get_extra_state(self) -> dict:
        return {
            "format": 1,
            "tables": {
                n: {"rows": m.rows, "dim": m.dim, "bits": m.bits, "optimizer": m.optimizer.value,
                    "learn_step_size": m.learn_step_size, "column_shards": list(m.col_starts)}
                for n, m in self._lp_metas.items()
            },
            "nonfinite_rows": {n: self.nonfinite_rows_skipped().get(n, 0) for n in self._lp_metas},
        }  # fmt: skip

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        missing = validate_sharded_checkpoint(self._lp_metas, state_dict, prefix)
        if missing:  # none of ours in the checkpoint: load_state_dict(strict=True) reports them
            missing_keys.extend(missing)
            return
        load_into_shards(self._lp_metas, self._lp_lookups(), state_dict, prefix)
        step = state_dict.get(prefix + "step")
        if step is not None:
            for lk in self._lp_lookups():
                if lk.local is not None:
                    lk.local.step.copy_(step)

    def state_dict(self, *args, **kwargs):
        return nn.Module.state_dict(self, *args, **kwargs)  # type: ignore[arg-type]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)  # type: ignore[arg-type]

    def memory_bytes(self, per_table: bool = False) -> int | dict[str, dict[str, int]]:
        """Bytes this rank holds for its shards (rows, step sizes, optimizer state); ``per_table``:
        local shard name -> parts with a ``"total"``."""
        report: dict[str, dict[str, int]] = {}
        for lk in self._lp_lookups():
            if lk.local is not None:
                report.update(lk.local.memory_bytes(per_table=True))
        return report if per_table else sum(p["total"] for p in report.values())

    def nonfinite_rows_skipped(self) -> dict[str, int]:
        """Per global table, row updates this rank skipped for a NaN/Inf gradient."""
        out: dict[str, int] = {}
        for lk in self._lp_lookups():
            if lk.local is not None:
                for s in lk.shards:
                    out[s.table] = out.get(s.table, 0) + lk.local.nonfinite_rows_skipped()[s.local_name]
        return out

    def check_inputs(self) -> None:
        """Raise the error of any batch checked on the device and found bad, by this rank or
        (named so) by another rank of the step (see ``distributed/global_input.py``), then of
        this rank's lookups (see ``LowPrecisionTables.check_inputs``); waits for the device."""
        self._lp_input_errors.flush()
        for lk in self._lp_lookups():
            if lk.local is not None:
                lk.local.check_inputs()


def _tagged(tags: dict) -> torch.Tensor:
    t = torch.empty(0)
    for k, v in tags.items():
        setattr(t, k, v)
    return t

"""``ShardedLowPrecisionEmbeddingBagCollection``: a low-precision collection under TorchRec's
``DistributedModelParallel``.

It is TorchRec's ``ShardedEmbeddingBagCollection`` (same input dist, output dist, awaitables,
pipelining, quantized comms) with its per-rank lookups replaced by
:class:`~torchrec_lowprec.distributed.lookup.LowPrecisionShardLookup` and its state dict by
ShardedTensors over our storage (:mod:`.state`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.distributed.lookup import LowPrecisionShardLookup, check_global_input
from torchrec_lowprec.distributed.state import TableMeta, build_sharded_state, load_into_shards
from torchrec_lowprec.distributed.validate import validate_sharded_checkpoint
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.optim.fused import OPTIMIZER_STATE_NAMES, config_with_fused_params, resolve_optimizer
from torchrec_lowprec.optim.keyed import FusedTableOptimizer
from torchrec_lowprec.transform import copy_in_backward_tags, in_backward_tags


class _ShardingView:
    """What ``ShardedEmbeddingBagCollection.__init__`` reads from the module it shards: configs,
    and a ``embedding_bags.<t>.weight`` per table (meta, [rows, dim]) carrying the tags of
    ``_apply_optimizer_in_backward``. Our tables hold no float weight to show it."""

    def __init__(self, module: LowPrecisionEmbeddingBagCollection) -> None:
        self._module = module
        self.device = torch.device("meta")
        self._params: dict[str, nn.Parameter] = {}
        for t in module.embedding_bag_configs():
            p = nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim, device="meta"))
            copy_in_backward_tags(module.tables[t.name].handle, p)
            self._params[f"embedding_bags.{t.name}.weight"] = p

    def embedding_bag_configs(self):
        return self._module.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self._module.is_weighted()

    def named_parameters(self, *args, **kwargs):
        return iter(self._params.items())

    def state_dict(self, *args, **kwargs):
        return dict(self._params)


def local_grouped_configs(sharding: Any) -> list[GroupedEmbeddingConfig]:
    """This rank's grouped configs of a TorchRec embedding sharding (TW/RW/CW/TWCW/TWRW)."""
    if hasattr(sharding, "_grouped_embedding_configs_per_rank") and hasattr(sharding, "_rank"):
        return sharding._grouped_embedding_configs_per_rank[sharding._rank]
    return sharding._grouped_embedding_configs


class ShardedLowPrecisionEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """The sharded form of :class:`LowPrecisionEmbeddingBagCollection` (built by
    :class:`~torchrec_lowprec.distributed.sharder.LowPrecisionEmbeddingBagCollectionSharder`).

    Each rank stores only its shards, in the same packed layout, and runs the fused update on
    them in the backward pass. If the unsharded module holds data (not ``meta``), its rows,
    step sizes and optimizer state are copied into the shards (exactly; column-wise shards
    re-quantize each column block with its own step size).

    Example::

        dmp = DistributedModelParallel(model, plan=plan, sharders=lp.sharders(), device=dev)
    """

    def __init__(
        self,
        module: LowPrecisionEmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict | None = None,
        module_fqn: str | None = None,
    ) -> None:
        # The sharder's fused_params are the tables' defaults over their LowPrecisionConfig;
        # in-backward tags still win (TorchRec's merge_fused_params order).
        self._lp_configs = {
            t.name: config_with_fused_params(module.table_config(t.name), fused_params)
            for t in module.embedding_bag_configs()
        }
        self._lp_tags = {
            t.name: in_backward_tags(module.tables[t.name].handle) for t in module.embedding_bag_configs()
        }
        self._lp_device = device or torch.device("cpu")
        super().__init__(
            _ShardingView(module),  # type: ignore[arg-type]
            table_name_to_parameter_sharding,
            env,
            fused_params=None,
            device=device,
            qcomm_codecs_registry=qcomm_codecs_registry,
            module_fqn=module_fqn,
        )
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
            if lookup.ebc is not None:
                lookup.ebc.attach_lr_groups({s.local_name: groups[s.table] for s in lookup.shards})

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
        for sharding_type, sharding in zip(self._sharding_types, self._embedding_shardings):
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
                )
            )

    def input_dist(self, ctx, features):  # type: ignore[override]
        # Checked here, on global ids, before TorchRec buckets them into shard-local ids.
        if isinstance(features, KeyedJaggedTensor):
            features = check_global_input(
                features, self._embedding_bag_configs, self._lp_configs, self._is_weighted
            )
        return super().input_dist(ctx, features)

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        # Our state dict is built from the lookups (see __init__ / state_dict), not from
        # TorchRec's float-weight machinery.
        self.embedding_bags = nn.ModuleDict()

    def init_data_parallel(self) -> None:
        pass

    def _lp_lookups(self) -> list[LowPrecisionShardLookup]:
        return [lk for lk in self._lookups if isinstance(lk, LowPrecisionShardLookup)]

    def _table_metas(self) -> dict[str, TableMeta]:
        metas = {}
        for t in self._embedding_bag_configs:
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
    def _copy_from_unsharded(self, module: LowPrecisionEmbeddingBagCollection) -> None:
        module._resolve_optimizers()
        for lookup in self._lp_lookups():
            for s in lookup.shards:
                meta = self._lp_metas[s.table]
                rows = slice(s.row_offset, s.row_offset + s.rows)
                src, dst = module.tables[s.table], lookup.ebc.tables[s.local_name]
                lookup.ebc.step.copy_(module.step)  # rounding draws and Adam's bias correction go on
                if meta.column_sharded:
                    # One step size per row per block (the scale rule): re-quantize the block;
                    # the optimizer state is per row (RowWiseAdagrad) or per element: copied.
                    cols = slice(s.col_offset, s.col_offset + s.cols)
                    lookup.ebc.load_float_weight(s.local_name, module.dequantized_weight(s.table)[rows, cols])
                    for name in ("momentum1", "momentum2"):
                        t = getattr(src, name)
                        if getattr(dst, name).numel():
                            getattr(dst, name).copy_(t[rows] if t.dim() == 1 else t[rows, cols])
                    continue
                lookup.ebc.quantized_weight(s.local_name).copy_(module.quantized_weight(s.table)[rows])
                for name in ("step_size", "momentum1", "momentum2"):
                    if getattr(dst, name).numel():
                        getattr(dst, name).copy_(getattr(src, name)[rows])

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[override]
        for key, value in self._lp_state.items():
            destination[prefix + key] = value
        destination[prefix + "step"] = self._step_tensor().clone()
        destination[prefix + "_extra_state"] = self.get_extra_state()

    def _step_tensor(self) -> torch.Tensor:
        steps = [lk.ebc.step for lk in self._lp_lookups() if lk.ebc is not None]
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
    ):  # type: ignore[override]
        missing = validate_sharded_checkpoint(self._lp_metas, state_dict, prefix)
        if missing:  # none of ours in the checkpoint: load_state_dict(strict=True) reports them
            missing_keys.extend(missing)
            return
        load_into_shards(self._lp_metas, self._lp_lookups(), state_dict, prefix)
        step = state_dict.get(prefix + "step")
        if step is not None:
            for lk in self._lp_lookups():
                if lk.ebc is not None:
                    lk.ebc.step.copy_(step)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        return nn.Module.state_dict(self, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def memory_bytes(self, per_table: bool = False) -> int | dict[str, dict[str, int]]:
        """Bytes this rank holds for its shards (rows, step sizes, optimizer state); ``per_table``:
        local shard name -> parts with a ``"total"``."""
        report: dict[str, dict[str, int]] = {}
        for lk in self._lp_lookups():
            if lk.ebc is not None:
                report.update(lk.ebc.memory_bytes(per_table=True))
        return report if per_table else sum(p["total"] for p in report.values())

    def nonfinite_rows_skipped(self) -> dict[str, int]:
        """Per global table, row updates this rank skipped for a NaN/Inf gradient."""
        out: dict[str, int] = {}
        for lk in self._lp_lookups():
            if lk.ebc is not None:
                for s in lk.shards:
                    out[s.table] = out.get(s.table, 0) + lk.ebc.nonfinite_rows_skipped()[s.local_name]
        return out


def _tagged(tags: dict) -> torch.Tensor:
    t = torch.empty(0)
    for k, v in tags.items():
        setattr(t, k, v)
    return t

"""The per-rank lookup of a sharded low-precision collection: the shards this rank holds, for
one sharding type, stored and trained by a local ``LowPrecisionEmbeddingBagCollection``
(pooled) or ``LowPrecisionEmbeddingCollection`` (sequence)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig, ShardedEmbeddingTable
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection
from torchrec_lowprec.modules.table_layout import ShardOrigin

# Row-wise shards return partial sums that TorchRec reduce-scatters and then divides for MEAN
# pooling (its mean-pooling callback), so the local lookup must SUM.
_SUM_LOCALLY = {ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value}


@dataclass(frozen=True)
class LocalShard:
    """One shard held by this rank: which global table, where in it, and its local name."""

    local_name: str
    table: str
    row_offset: int
    col_offset: int
    rows: int
    cols: int
    col_starts: tuple[int, ...]  # column offsets of all column shards of the table, sorted


def collection_tables(module: LowPrecisionTables) -> list[BaseEmbeddingConfig]:
    """The table configs of a low-precision collection, pooled (EBC) or sequence (EC)."""
    if isinstance(module, LowPrecisionEmbeddingCollection):
        return module.embedding_configs()
    return module.embedding_bag_configs()


def _col_starts(t: ShardedEmbeddingTable) -> tuple[int, ...]:
    if t.global_metadata is None:
        return (0,)
    return tuple(sorted({m.shard_offsets[1] for m in t.global_metadata.shards_metadata}))


class LowPrecisionShardLookup(nn.Module):
    """The lookup over this rank's shards of one sharding type (TorchRec's lookup slot).

    Takes the KJT TorchRec's input dist produces for this rank (features in grouped-config
    order, a feature repeated once per column shard) and returns, in that order, the pooled
    embeddings ``[B, sum of local dims]`` as ``GroupedPooledEmbeddingsLookup`` does, or with
    ``sequence=True`` one row per id, ``[ids, local dim]``, as ``GroupedEmbeddingsLookup`` does.
    The backward pass runs the fused update on the local shards; rounding draws are keyed by the
    global table, row and column, so a row's update does not depend on the plan.

    Example::

        lookup = LowPrecisionShardLookup(sharding._grouped_embedding_configs, "row_wise", cfgs, dev)
        pooled = lookup(rank_kjt)
    """

    def __init__(
        self,
        grouped_configs: list[GroupedEmbeddingConfig],
        sharding_type: str,
        table_configs: dict[str, LowPrecisionConfig],
        device: torch.device,
        in_backward_tags: dict[str, tuple] | None = None,
        sequence: bool = False,
    ) -> None:
        super().__init__()
        self.sharding_type = sharding_type
        self.sequence = sequence
        tables: list[BaseEmbeddingConfig] = []
        per_table: dict[str, LowPrecisionConfig] = {}
        origins: dict[str, ShardOrigin] = {}
        self.shards: list[LocalShard] = []
        self._keys: list[str] = []
        is_weighted = False
        seen: dict[str, int] = {}
        for gc in grouped_configs:
            is_weighted = is_weighted or gc.is_weighted
            for t in gc.embedding_tables:
                k = seen.get(t.name, 0)
                seen[t.name] = k + 1
                local = t.name if k == 0 else f"{t.name}@{k}"
                feats = [f"{local}:{f}" for f in t.feature_names]
                off = t.local_metadata.shard_offsets if t.local_metadata is not None else [0, 0]
                common = dict(
                    name=local,
                    embedding_dim=t.local_cols,
                    num_embeddings=t.local_rows,
                    feature_names=feats,
                    weight_init_min=t.weight_init_min,
                    weight_init_max=t.weight_init_max,
                )
                if sequence:
                    tables.append(EmbeddingConfig(**common))
                else:
                    pooling = PoolingType.SUM if sharding_type in _SUM_LOCALLY else t.pooling
                    tables.append(EmbeddingBagConfig(**common, pooling=pooling))
                cfg = table_configs[t.name]
                if sequence and cfg.bounds_check == "warn":
                    # Warned on global ids before the input dist; bad ids arrive here as -1.
                    cfg = cfg.replace(bounds_check="ignore")
                per_table[local] = cfg
                origins[local] = ShardOrigin(t.name, int(off[0]), int(off[1]))
                self.shards.append(
                    LocalShard(
                        local, t.name, int(off[0]), int(off[1]), t.local_rows, t.local_cols, _col_starts(t)
                    )
                )
                self._keys.extend(feats)
        #: The local collection holding this rank's shards (None: this rank holds none).
        self.local: LowPrecisionTables | None = None
        if tables:
            kw = dict(
                config=next(iter(per_table.values())),
                per_table_configs=per_table,
                device=device,
                init_weights=device.type != "meta",
                shard_origins=origins,
            )
            if sequence:
                self.local = LowPrecisionEmbeddingCollection(tables, **kw)
            else:
                self.local = LowPrecisionEmbeddingBagCollection(tables, is_weighted=is_weighted, **kw)
            for s in self.shards:
                handle = self.local.tables[s.local_name].handle
                for tag, value in (in_backward_tags or {}).get(s.table, {}).items():
                    setattr(handle, tag, value)
            self.local._resolve_optimizers()
        self.register_buffer("_dummy", torch.empty(0, device=device), persistent=False)
        #: Set by the sharded module while it runs the lookups of a batch checked on the device:
        #: the verdict all ranks agreed on (true: no shard is updated by this batch).
        self.input_skip: torch.Tensor | None = None

    @property
    def ebc(self) -> LowPrecisionTables | None:
        """The local collection (its name from when only EBCs were sharded)."""
        return self.local

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        if self.local is None:
            # This rank holds no table of this sharding type. The output must still require
            # grad, or this rank would skip the all-to-all's backward that the others run.
            shape = (0,) if self.sequence else (features.stride(), 0)
            return self._dummy.new_zeros(shape).requires_grad_(True)
        kjt = KeyedJaggedTensor(
            keys=self._keys,
            values=features.values(),
            lengths=features.lengths(),
            weights=features.weights_or_none(),
            stride=features.stride(),
        )
        # TorchRec's input dist output carries its ids per key on the host, and the global KJT
        # was checked before it (distributed/global_input.py): no second check, no host sync here.
        known = features.length_per_key_or_none()
        if self.sequence:
            return self.local._sequence_embeddings(kjt, known, self.input_skip)[0]
        return self.local._pooled_forward(kjt, known, self.input_skip).values()

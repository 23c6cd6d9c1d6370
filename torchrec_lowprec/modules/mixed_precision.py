"""``MixedPrecisionEmbeddingBagCollection``: several bit widths inside one logical table.

A :class:`~torchrec_lowprec.types.PrecisionPlan` splits each table's frequency-ranked rows
into groups with their own bit width (MPE). Runs of groups with equal bits become one
*physical* table of an inner :class:`LowPrecisionEmbeddingBagCollection` (so the forward is
one FBGEMM call, the backward one fused update, and ``distributed/`` shards the physical
tables like any others); pruned groups (0 bits) have no storage and read as zeros. The plan
handling and routing are :class:`~torchrec_lowprec.modules.row_groups.RowGroupRouting`,
shared with :class:`MixedPrecisionEmbeddingCollection`.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules.bounds import check_ids, in_feature_order
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.row_groups import (  # noqa: F401  (re-exported: the names' old home)
    GROUP_FEATURE_SEP,
    GROUP_TABLE_SEP,
    RowGroupRouting,
    check_row_map,
    physical_name,
    table_precision,
)
from torchrec_lowprec.modules.table_layout import CollectionAccessors, check_collection_args
from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.quant.pooling import MeanColumns


class MixedPrecisionEmbeddingBagCollection(
    CollectionAccessors, RowGroupRouting, EmbeddingBagCollectionInterface
):
    """A drop-in ``EmbeddingBagCollection`` whose tables hold row groups at different bit widths.

    Ids must be frequency-ranked (id 0 = most frequent; see ``data.frequency_rank`` /
    ``data.remap_by_rank``) so that a group is a contiguous id range; for a table whose plan
    entry says ``remapped``, pass ``row_maps[table]`` (raw id -> rank) and the module keeps it
    (4 bytes per row, counted in :meth:`memory_bytes`).

    Positional arguments as ``torchrec.EmbeddingBagCollection`` (``tables, is_weighted,
    device``); the rest keyword-only.

    Args:
        tables: the TorchRec table configs (SUM or MEAN pooling).
        plan: per-table group bit widths (required); a table it does not name is stored whole
            at its config's ``bits``.
        config: default :class:`LowPrecisionConfig` (its ``bits`` is replaced per group);
            ``None``, as in :class:`LowPrecisionEmbeddingBagCollection`: a table the plan does
            not name takes the width of its ``data_type``, planned tables the default knobs.
        per_table_configs: table name -> config overriding ``config``.
        is_weighted, device, init_weights: as :class:`LowPrecisionEmbeddingBagCollection`.
        row_maps: table name -> raw id -> rank, for tables planned with ``remapped=True``.

    Example::

        plan = PrecisionPlan({"t": TablePrecision(1000, 64, (100, 600, 1000), (8, 4, 0))})
        ebc = MixedPrecisionEmbeddingBagCollection(tables, plan=plan, config=LowPrecisionConfig())
        pooled = ebc(kjt)  # ids 0..99 read int8 rows, 100..599 int4, 600..999 zeros
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        *,
        plan: PrecisionPlan,
        config: LowPrecisionConfig | None = None,
        per_table_configs: dict[str, LowPrecisionConfig] | None = None,
        init_weights: bool = True,
        row_maps: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        check_collection_args(type(self).__name__, tables, is_weighted, device, config, per_table_configs)
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._embedding_bag_configs = tables
        self._is_weighted = is_weighted
        physical = self._init_row_groups(tables, plan, config, per_table_configs)
        self.row_groups = LowPrecisionEmbeddingBagCollection(
            [p.torchrec_config(EmbeddingBagConfig, pooling=PoolingType.SUM) for p in physical],
            config=config,
            per_table_configs={p.name: p.config for p in physical},
            is_weighted=is_weighted,
            device=device,
            init_weights=init_weights,
        )
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        starts = [0]
        for d in self._dims:
            starts.append(starts[-1] + d)
        self._col0 = starts[:-1]  # first output column of each slot
        self._total_dim = starts[-1]
        self._mean_columns = MeanColumns.of(
            [t.pooling == PoolingType.MEAN for t in tables for _ in t.feature_names], self._dims
        )
        self._col_maps: dict[tuple[str, ...], torch.Tensor] = {}
        self._init_row_maps(row_maps, device)

    # ----- forward -----
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        routed = self._routed_on_device(features, self._is_weighted)
        if routed is not None:  # CUDA: one read per step (see RowGroupRouting._routed_on_device)
            features, _, inner, _ = routed
            lengths = features.lengths()
        else:
            features = in_feature_order(features, self._features, self._is_weighted)
            values, lengths = features.values(), features.lengths()
            weights = features.weights().float() if self._is_weighted else None
            modes = [self._configs[t].bounds_check for t in self._table_of_feature]
            values, lengths, weights = check_ids(
                values, lengths, weights, self._features, self._rows, features.stride(), modes,
                self._table_of_feature,
            )  # fmt: skip
            inner, _ = self._route(values.to(torch.int64), lengths, weights, features.stride())
        batch = features.stride()
        pooled = self.row_groups(inner)
        out = torch.zeros(batch, self._total_dim, dtype=torch.float32, device=lengths.device)
        out = out.index_add(
            1, self._col_map(pooled.keys(), pooled.length_per_key(), out.device), pooled.values()
        )
        out = self._mean_columns.divide(out, lengths)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=out)

    def _col_map(self, keys: list[str], lengths: list[int], device: torch.device) -> torch.Tensor:
        """Inner output column -> logical output column (cached per inner key order: a sharded
        inner collection may return its keys grouped by shard)."""
        k = tuple(keys)
        cm = self._col_maps.get(k)
        if cm is None:
            pieces = []
            for key, d in zip(keys, lengths):
                c0 = self._col0[self._inner_key_slot[key]]
                pieces.append(torch.arange(c0, c0 + d))
            cm = self._col_maps[k] = torch.cat(pieces)
        return cm.to(device)

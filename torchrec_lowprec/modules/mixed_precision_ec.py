"""``MixedPrecisionEmbeddingCollection``: the sequence (unpooled) twin of
:class:`~torchrec_lowprec.modules.mixed_precision.MixedPrecisionEmbeddingBagCollection`.

Each table's frequency groups are physical tables of an inner
:class:`~torchrec_lowprec.modules.embedding_collection.LowPrecisionEmbeddingCollection` (one
dequantizing gather forward, one fused update backward); the plan handling and the routing
are :class:`~torchrec_lowprec.modules.row_groups.RowGroupRouting`, shared with the EBC. The
inner rows come back to their ids' positions, so an id of a pruned group (or one dropped by
``bounds_check="warn"/"ignore"``) is a zero row and every JaggedTensor keeps the KJT's lengths.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules.bounds import check_ids, in_range_mask, ordered_with_totals
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection
from torchrec_lowprec.modules.row_groups import RowGroupRouting
from torchrec_lowprec.modules.table_layout import SequenceAccessors, check_collection_args
from torchrec_lowprec.planner.schema import PrecisionPlan


class MixedPrecisionEmbeddingCollection(RowGroupRouting, SequenceAccessors, EmbeddingCollectionInterface):
    """A drop-in ``EmbeddingCollection`` whose tables hold row groups at different bit widths.

    Ids must be frequency-ranked (id 0 = most frequent; ``data.remap_by_rank``) so that a group
    is a contiguous id range; for a table planned ``remapped``, pass ``row_maps[table]`` (raw
    id -> rank; kept as int32, 4 bytes per row, counted in :meth:`memory_bytes`).

    The output is ``torchrec.EmbeddingCollection``'s: ``Dict[str, JaggedTensor]`` keyed by
    embedding name (``feature@table`` for a feature two tables read), in table order, one fp32
    ``[dim]`` row per id, the KJT's lengths, and the (raw) ids as ``weights`` when
    ``need_indices``. Rows of pruned groups (0 bits) are zeros and update nothing.

    Positional arguments as ``torchrec.EmbeddingCollection`` (``tables, device,
    need_indices``); the rest keyword-only. As there, every table has the same ``embedding_dim``.

    Args:
        tables: the TorchRec ``EmbeddingConfig`` s.
        device: where the tables live.
        need_indices: also return each feature's ids, as the ``weights`` of its JaggedTensor.
        plan: per-table group bit widths (required); a table it does not name is stored whole
            at its config's ``bits`` (with ``config=None``: at its ``data_type``).
        config: default :class:`LowPrecisionConfig` (its ``bits`` is replaced per group).
        per_table_configs: table name -> config overriding ``config``.
        init_weights: fill the groups as TorchRec would (``init_fn`` or uniform), quantized.
        row_maps: table name -> raw id -> rank, for tables planned with ``remapped=True``.

    Example::

        plan = PrecisionPlan({"t": TablePrecision(1000, 64, (100, 600, 1000), (8, 4, 0))})
        ec = MixedPrecisionEmbeddingCollection(tables, plan=plan, config=LowPrecisionConfig())
        out = ec(kjt)["history"]  # ids 0..99 read int8 rows, 100..599 int4, 600..999 zeros
        out.values().sum().backward()  # the touched int8/int4 rows are updated in place
    """

    def __init__(
        self,
        tables: list[EmbeddingConfig],
        device: torch.device | str | None = None,
        need_indices: bool = False,
        *,
        plan: PrecisionPlan,
        config: LowPrecisionConfig | None = None,
        per_table_configs: dict[str, LowPrecisionConfig] | None = None,
        init_weights: bool = True,
        row_maps: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_collection_args(
            owner, tables, need_indices, device, config, per_table_configs, EmbeddingConfig, "need_indices"
        )
        if len({t.embedding_dim for t in tables}) > 1:
            raise ValueError(
                f"{owner}: every table needs the same embedding_dim (as torchrec.EmbeddingCollection), got "
                f"{ {t.name: t.embedding_dim for t in tables} }; use one collection per dim"
            )
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._embedding_configs = tables
        self._need_indices = need_indices
        physical = self._init_row_groups(tables, plan, config, per_table_configs)
        self.row_groups = LowPrecisionEmbeddingCollection(
            [p.torchrec_config(EmbeddingConfig) for p in physical],
            device,
            config=config,
            per_table_configs={p.name: p.config for p in physical},
            init_weights=init_weights,
        )
        self._embedding_dim = tables[0].embedding_dim
        self._embedding_names_by_table = get_embedding_names_by_table(tables)
        self._init_row_maps(row_maps, device)

    # ----- forward -----
    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        routed = self._routed_on_device(features, False)
        if routed is not None:  # CUDA: one read per step (see RowGroupRouting._routed_on_device)
            features, totals, inner, pos = routed
            batch, values, lengths = features.stride(), features.values(), features.lengths()
        else:
            features, totals = ordered_with_totals(features, self._features)
            batch = features.stride()
            values, lengths = features.values(), features.lengths()
            modes = [self._configs[t].bounds_check for t in self._table_of_feature]
            _, kept_lengths, _ = check_ids(
                values, lengths, None, self._features, self._rows, batch, modes, self._table_of_feature
            )
            # warn/ignore dropped ids: route them nowhere, so their positions read zero rows
            valid = None if kept_lengths is lengths else in_range_mask(values, lengths, self._rows, batch)
            inner, pos = self._route(values.to(torch.int64), lengths, None, batch, valid)
        looked_up = self.row_groups(inner)
        rows = torch.cat([looked_up[k].values() for k in self._inner_keys])
        out = torch.zeros(values.numel(), self._embedding_dim, dtype=torch.float32, device=values.device)
        out = out.index_copy(0, pos, rows)
        per_slot_lengths = lengths.view(len(totals), batch)
        return {
            name: JaggedTensor(
                values=v, lengths=per_slot_lengths[i], weights=ids if self._need_indices else None
            )
            for i, (name, v, ids) in enumerate(
                zip(self._embedding_names, out.split(totals), values.split(totals))
            )
        }

"""A :class:`PrecisionPlan` read as row-group tables: the physical tables' names, each table's
plan entry, the raw id -> rank maps and each group's config (see :mod:`.row_groups`, the
mixed-precision collections' routing that builds on them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules.data_type import config_from_data_type
from torchrec_lowprec.modules.table_state import has_default_init
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

#: Physical table ``<table>__g<first group>`` holds a run of groups; its features are
#: ``<feature>@g<first group>``. A table kept in one piece keeps its own names.
GROUP_TABLE_SEP = "__g"
GROUP_FEATURE_SEP = "@g"


def physical_name(table: str, first_group: int, whole: bool) -> str:
    return table if whole else f"{table}{GROUP_TABLE_SEP}{first_group}"


def table_precision(table: BaseEmbeddingConfig, plan: PrecisionPlan, default_bits: int) -> TablePrecision:
    """The plan's entry for ``table`` (checked against its shape), or one group at ``default_bits``."""
    tp = plan.tables.get(table.name)
    if tp is None:
        return TablePrecision(
            table.num_embeddings, table.embedding_dim, (table.num_embeddings,), (default_bits,)
        )
    if (tp.rows, tp.dim) != (table.num_embeddings, table.embedding_dim):
        raise ValueError(
            f"precision plan for table {table.name!r} is for {tp.rows} x {tp.dim} rows but the table is "
            f"{table.num_embeddings} x {table.embedding_dim}; re-run the search/planner for this model"
        )
    return tp


def check_row_map(table: str, row_map: torch.Tensor, rows: int) -> torch.Tensor:
    """``row_map`` if it is a valid raw id -> rank map of ``table`` (``rows`` entries, integer,
    each rank in ``[0, rows)`` exactly once), else ``ValueError`` naming the table. A map
    pointing outside the table would read another table's rows (the forward routes ranks by
    their position in all tables); a rank missing from it would leave a row unreachable."""
    if not isinstance(row_map, torch.Tensor) or row_map.is_floating_point() or row_map.is_complex():
        raise ValueError(
            f"row_maps[{table!r}] must be an integer tensor (raw id -> rank), got {row_map!r:.80}"
        )
    if row_map.dtype == torch.bool or tuple(row_map.shape) != (rows,):
        raise ValueError(
            f"row_maps[{table!r}] has shape {tuple(row_map.shape)} and dtype {row_map.dtype}, expected "
            f"({rows},) integers: one rank per raw id of table {table!r}"
        )
    if row_map.device.type == "meta" or rows == 0:
        return row_map
    low, high = int(row_map.min()), int(row_map.max())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(
            f"row_maps[{table!r}] maps raw id {int(torch.nonzero(row_map == bad)[0])} to rank {bad}, "
            f"outside [0, {rows}) of table {table!r}"
        )
    seen = torch.bincount(row_map.to(torch.int64), minlength=rows)
    if bool((seen != 1).any()):
        rank = int(torch.nonzero(seen != 1)[0])
        raise ValueError(
            f"row_maps[{table!r}] is not a permutation of [0, {rows}): rank {rank} is given to "
            f"{int(seen[rank])} raw ids; give each rank to exactly one raw id"
        )
    return row_map


def _default_config(table: BaseEmbeddingConfig, plan: PrecisionPlan, config: LowPrecisionConfig | None):
    """A table's config when ``per_table_configs`` does not name it (the low-precision
    collection's rule: with no config, a whole table is stored at its ``data_type``)."""
    if config is not None:
        return config
    return LowPrecisionConfig() if table.name in plan.tables else config_from_data_type(table)


@dataclass(frozen=True)
class PhysicalTable:
    """One stored run of groups of ``table``: rows ``[start, end)`` at ``bits``, read by ``features``."""

    table: BaseEmbeddingConfig
    name: str
    start: int
    end: int
    features: tuple[str, ...]
    config: LowPrecisionConfig

    def torchrec_config(self, cls: type, **extra: Any) -> BaseEmbeddingConfig:
        """This run as a TorchRec table config of type ``cls`` (``EmbeddingBagConfig`` or
        ``EmbeddingConfig``), keeping the logical table's init (applied to each row group)."""
        t = self.table
        return cls(
            num_embeddings=self.end - self.start, embedding_dim=t.embedding_dim, name=self.name,
            feature_names=list(self.features), weight_init_min=t.get_weight_init_min(),
            weight_init_max=t.get_weight_init_max(), init_fn=None if has_default_init(t) else t.init_fn,
            **extra,
        )  # fmt: skip

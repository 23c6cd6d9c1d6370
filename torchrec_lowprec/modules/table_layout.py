"""Where each table lives in a collection's flat buffer, and its per-table precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.modules.embedding_configs import (
    BaseEmbeddingConfig,
    EmbeddingBagConfig,
    EmbeddingConfig,
    PoolingType,
)

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.quant.layout import RowFormat
from torchrec_lowprec.types import OptimizerType


@dataclass(frozen=True)
class ShardOrigin:
    """Where a locally held table sits in its global table (for a shard; zeros otherwise).

    The rounding draws are keyed by the global table name, global row and global column, so a
    row is updated identically whichever rank holds it.
    """

    table: str
    row_offset: int = 0
    col_offset: int = 0


@dataclass(frozen=True)
class TableLayout:
    """One table's place in the flat buffer: ``rows`` rows of ``stride`` bytes from ``offset``."""

    name: str
    rows: int
    dim: int
    bits: int
    offset: int
    stride: int
    feature_names: tuple[str, ...]
    pooling: PoolingType  # NONE: a sequence (EmbeddingCollection) table
    origin: ShardOrigin

    @property
    def format(self) -> RowFormat:
        return RowFormat(self.bits, self.dim)

    @property
    def row_bytes(self) -> int:
        return self.format.row_bytes

    @property
    def nbytes(self) -> int:
        return self.rows * self.stride

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The table's rows ``[rows, stride]`` as a view of ``flat``."""
        return flat[self.offset : self.offset + self.nbytes].view(self.rows, self.stride)


def validate_table(table: BaseEmbeddingConfig, cfg: LowPrecisionConfig) -> None:
    """Raise ``ValueError`` for a table the packed layout (or our module) cannot hold."""
    name = table.name
    if not name or "." in name:
        raise ValueError(f"table name {name!r} must be non-empty and contain no '.'")
    if table.num_embeddings <= 0 or table.embedding_dim <= 0:
        raise ValueError(
            f"table {name!r}: num_embeddings={table.num_embeddings} and embedding_dim="
            f"{table.embedding_dim} must both be > 0"
        )
    if not table.feature_names:
        raise ValueError(f"table {name!r} has no feature_names")
    if cfg.is_integer and table.embedding_dim % 4 != 0:
        raise ValueError(
            f"table {name!r}: embedding_dim={table.embedding_dim} cannot be stored at {cfg.bits} bits: "
            "FBGEMM's IntNBit kernels need a multiple of 4 for 8/4/2-bit rows; use a dim divisible by 4 "
            "or bits=16/32 for this table"
        )
    if isinstance(table, EmbeddingBagConfig) and table.pooling not in (PoolingType.SUM, PoolingType.MEAN):
        raise ValueError(f"table {name!r}: pooling {table.pooling} is not supported (SUM or MEAN)")


def plan_layout(
    tables: list[BaseEmbeddingConfig],
    configs: dict[str, LowPrecisionConfig],
    row_alignment: int,
    origins: dict[str, ShardOrigin] | None = None,
) -> tuple[list[TableLayout], int]:
    """Table layouts in order and the flat buffer's total bytes.

    Tables are packed back to back (each starts at a multiple of ``row_alignment``, since its
    rows are), so the buffer holds exactly the sum of the tables' ``rows * stride``: the bytes
    the planner counts per shard."""
    layouts = []
    offset = 0
    for t in tables:
        bits = configs[t.name].bits
        stride = RowFormat(bits, t.embedding_dim).stride(row_alignment)
        layouts.append(
            TableLayout(
                name=t.name,
                rows=t.num_embeddings,
                dim=t.embedding_dim,
                bits=bits,
                offset=offset,
                stride=stride,
                feature_names=tuple(t.feature_names),
                pooling=t.pooling if isinstance(t, EmbeddingBagConfig) else PoolingType.NONE,
                origin=(origins or {}).get(t.name, ShardOrigin(t.name)),
            )
        )
        offset += t.num_embeddings * stride
    return layouts, offset


def stored_bytes(
    rows: int, dim: int, bits: int, optimizer: OptimizerType, keeps_master_step_size: bool, row_alignment: int
) -> int:
    """Bytes a table (or a shard of ``rows`` x ``dim``) holds once allocated: padded rows,
    fp32 master step sizes (ALPT) and fp32 optimizer state (:meth:`RowFormat.bytes_per_row`).
    What :meth:`memory_bytes` reports, what TorchRec's planner is told through our sharder and
    what the precision planner counts. ``bits=0`` (pruned) holds nothing."""
    if bits == 0:
        return 0
    return rows * RowFormat(bits, dim).bytes_per_row(
        row_alignment, OptimizerType(optimizer), keeps_master_step_size
    )


def check_collection_args(
    owner: str,
    tables: object,
    is_weighted: object,
    device: object,
    config: object,
    per_table: object,
    table_type: type = EmbeddingBagConfig,
    flag: str = "is_weighted",
) -> None:
    """``TypeError`` naming the argument when a collection constructor gets the wrong kind of value
    (TorchRec's positional order is ``tables, is_weighted, device`` for an
    ``EmbeddingBagCollection``, ``tables, device, need_indices`` for an ``EmbeddingCollection``:
    ``flag`` names the bool; configs are keyword-only)."""
    if not isinstance(tables, (list, tuple)) or not all(isinstance(t, table_type) for t in tables):
        raise TypeError(
            f"{owner}: tables must be a list of torchrec.{table_type.__name__}, got {tables!r:.200}"
        )
    if not isinstance(is_weighted, bool):
        order = "(tables, is_weighted, device)" if flag == "is_weighted" else "(tables, device, need_indices)"
        raise TypeError(
            f"{owner}: {flag} must be a bool, got {type(is_weighted).__name__}; the positional "
            f"arguments are {order} as in TorchRec's collection, pass "
            "configs by keyword (config=..., per_table_configs=...)"
        )
    if device is not None and not isinstance(device, (torch.device, str)):
        raise TypeError(f"{owner}: device must be a torch.device, a str or None, got {type(device).__name__}")
    if config is not None and not isinstance(config, LowPrecisionConfig):
        hint = " (a dict of tables -> configs goes to per_table_configs=)" if isinstance(config, dict) else ""
        raise TypeError(
            f"{owner}: config must be a LowPrecisionConfig or None, got {type(config).__name__}{hint}"
        )
    if per_table is not None and (
        not isinstance(per_table, dict)
        or not all(isinstance(v, LowPrecisionConfig) for v in per_table.values())
    ):
        raise TypeError(
            f"{owner}: per_table_configs must map table name -> LowPrecisionConfig, got {per_table!r:.200}"
        )


def table_summary(rows: object) -> str:
    """``extra_repr`` lines, one per table: ``name: rows x dim, bits, bytes`` (bytes held)."""
    return "\n".join(f"{n}: {r} x {d}, {b} bits, {nbytes} bytes" for n, r, d, b, nbytes in rows)


class CollectionAccessors:
    """The ``EmbeddingBagCollectionInterface`` accessors both low-precision collections answer
    from the same three attributes (``_embedding_bag_configs``, ``_is_weighted``, ``_configs``).

    Example::

        ebc.embedding_bag_configs()[0].data_type, ebc.is_weighted(), ebc.table_config("t").bits
    """

    _embedding_bag_configs: list[EmbeddingBagConfig]
    _is_weighted: bool
    _configs: dict[str, LowPrecisionConfig]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def table_config(self, name: str) -> LowPrecisionConfig:
        """The :class:`LowPrecisionConfig` of table ``name``."""
        return self._configs[name]


class SequenceAccessors:
    """The ``EmbeddingCollectionInterface`` accessors every sequence collection (low-precision,
    mixed-precision, MPE search) answers from ``_embedding_configs``, ``_need_indices``,
    ``_embedding_dim`` and ``_embedding_names_by_table``.

    Example::

        ec.embedding_dim(), ec.need_indices(), ec.embedding_names_by_table()  # 64, False, [["history", "target"]]
    """

    _embedding_configs: list[EmbeddingConfig]
    _need_indices: bool
    _embedding_dim: int
    _embedding_names_by_table: list[list[str]]

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self._embedding_configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._embedding_dim

    def embedding_names_by_table(self) -> list[list[str]]:
        return self._embedding_names_by_table

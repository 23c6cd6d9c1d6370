"""Sequence tables (``torchrec.EmbeddingConfig``, the tables of an ``EmbeddingCollection``) in
the precision planner.

A :class:`~torchrec_lowprec.modules.embedding_collection.LowPrecisionEmbeddingCollection` stores
each table at one width (no row groups) and holds, per table, exactly the bytes of a pooled
table of the same rows, dim, width and optimizer (``table_layout.stored_bytes``: padded rows,
master step sizes, optimizer state; what its ``memory_bytes()`` reports). So the planner lowers
a sequence table as one group, never prunes it (a collection cannot hold a 0-bit table), and
lets TorchRec place it as a pooled twin of the same bytes: the shard bytes per rank are exact,
TorchRec's input/output estimate is a pooled table's. The twin's sharding is returned under the
``EmbeddingCollection``'s own path.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, PoolingType

from torchrec_lowprec.configs import LowPrecisionConfig, PerTableConfig
from torchrec_lowprec.planner.schema import PrecisionPlan


def is_sequence_table(table: BaseEmbeddingConfig) -> bool:
    """A table of an ``EmbeddingCollection`` (any config that is not an ``EmbeddingBagConfig``)."""
    return not isinstance(table, EmbeddingBagConfig)


def pooled_twins(tables: Sequence[BaseEmbeddingConfig]) -> tuple[list[EmbeddingBagConfig], list[str]]:
    """``tables`` with each sequence table replaced by an ``EmbeddingBagConfig`` of the same name,
    rows, dim and features (same stored bytes), and the names of the sequence tables.

    Example::

        bags, seq = pooled_twins([*ebc.embedding_bag_configs(), *ec.embedding_configs()])
    """
    out, names = [], []
    for t in tables:
        if not isinstance(t, BaseEmbeddingConfig):
            raise TypeError(
                f"plan_precision: tables must be torchrec EmbeddingBagConfig / EmbeddingConfig, got {type(t).__name__}"
            )
        if is_sequence_table(t):
            names.append(t.name)
            t = EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                feature_names=list(t.feature_names),
                data_type=t.data_type,
                pooling=PoolingType.SUM,
            )
        out.append(t)
    return out, names


def check_sequence_plan(
    plan: PrecisionPlan | None, names: Sequence[str], sequence_module_path: str, pooled_key: str
) -> None:
    """``ValueError`` when a starting plan splits a sequence table into row groups (or prunes it),
    or when sequence tables are planned without a path of their own for their sharding."""
    if names and (not sequence_module_path or sequence_module_path == pooled_key):
        raise ValueError(
            f"plan_precision: {list(names)} are EmbeddingCollection (sequence) tables; pass "
            "sequence_module_path= (where the LowPrecisionEmbeddingCollection sits in the model: its "
            f"sharding is keyed by it; not {pooled_key!r}, the pooled tables' key), got {sequence_module_path!r}"
        )
    for n in names:
        tp = plan.tables.get(n) if plan is not None else None
        if tp is not None and (tp.num_groups != 1 or tp.bits[0] == 0):
            raise ValueError(
                f"plan_precision: sequence table {n!r} is planned with groups {list(tp.bits)}; an "
                "EmbeddingCollection stores each table at one width (no row groups, no pruning)"
            )


def sequence_config(
    plan: PrecisionPlan, names: Sequence[str], base: LowPrecisionConfig | None = None
) -> PerTableConfig:
    """The ``PerTableConfig`` that stores the sequence tables ``names`` at their planned widths
    (``base``'s other settings); ``lp.convert(ec_or_model, it)`` applies it.

    Example::

        lp.convert(model.ec, sequence_config(mp.precision, mp.sequence_tables, cfg))
    """
    base = base or LowPrecisionConfig()
    return PerTableConfig({n: base.replace(bits=plan.tables[n].bits[0]) for n in names}, base)

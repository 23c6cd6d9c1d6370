"""Swapping TorchRec collections for low-precision ones, and back; the handlers of
:func:`torchrec_lowprec.convert` for low-precision, mixed-precision and MPE-search configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_lowprec._deprecation import warn_deprecated
from torchrec_lowprec.configs import LowPrecisionConfig, MixedPrecisionConfig, MPESearchConfig, PerTableConfig
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_search import MPESearchEmbeddingBagCollection
from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.transform import convert, copy_in_backward_tags, register_transform

__all__ = ["to_float"]


def from_float(
    ebc: EmbeddingBagCollection,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
    precision_plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> LowPrecisionEmbeddingBagCollection | MixedPrecisionEmbeddingBagCollection:
    """Deprecated (removed in 0.2): ``convert(ebc, config)`` with a
    :class:`~torchrec_lowprec.configs.LowPrecisionConfig`, ``PerTableConfig`` or
    ``MixedPrecisionConfig`` (and ``row_maps=``) does the same.
    """
    warn_deprecated(
        "from_float(ebc, ...)",
        "convert(ebc, LowPrecisionConfig(...) / PerTableConfig(...) / MixedPrecisionConfig(...))",
    )
    if not isinstance(ebc, EmbeddingBagCollection):
        raise TypeError(f"from_float expects a torchrec.EmbeddingBagCollection, got {type(ebc).__name__}")
    if precision_plan is not None:
        cfg: object = MixedPrecisionConfig(precision_plan, config, per_table_configs)
    else:
        cfg = PerTableConfig(per_table_configs or {}, config)
    return convert(ebc, cfg, row_maps=row_maps) if precision_plan is not None else convert(ebc, cfg)


def _from_float(
    ebc: EmbeddingBagCollection,
    config: LowPrecisionConfig | None,
    per_table_configs: dict[str, LowPrecisionConfig] | None,
    plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> LowPrecisionEmbeddingBagCollection | MixedPrecisionEmbeddingBagCollection:
    """What the low-/mixed-precision handlers build from one float collection."""
    tables = ebc.embedding_bag_configs()
    first = ebc.embedding_bags[tables[0].name].weight
    if plan is not None:
        out = MixedPrecisionEmbeddingBagCollection(
            tables,
            plan=plan,
            config=config,
            per_table_configs=per_table_configs,
            is_weighted=ebc.is_weighted(),
            device=first.device,
            init_weights=False,
            row_maps=row_maps,
        )
        handles = {
            t.name: [out.row_groups.tables[p].handle for p in out.group_tables(t.name)] for t in tables
        }
    else:
        out = LowPrecisionEmbeddingBagCollection(
            tables,
            config=config,
            per_table_configs=per_table_configs,
            is_weighted=ebc.is_weighted(),
            device=first.device,
            init_weights=False,
        )
        handles = {t.name: [out.tables[t.name].handle] for t in tables}
    for t in tables:
        weight = ebc.embedding_bags[t.name].weight
        if weight.device.type != "meta":
            with torch.no_grad():
                out.load_float_weight(t.name, weight.detach())
        for handle in handles.get(t.name, []):
            copy_in_backward_tags(weight, handle)
    out.train(ebc.training)
    return out


def to_float(ebc: LowPrecisionEmbeddingBagCollection) -> EmbeddingBagCollection:
    """A ``torchrec.EmbeddingBagCollection`` (fp32) holding the dequantized tables of ``ebc``.

    Example::

        float_ebc = to_float(lp_ebc)
    """
    tables = [dataclasses.replace(t, data_type=DataType.FP32) for t in ebc.embedding_bag_configs()]
    out = EmbeddingBagCollection(tables, is_weighted=ebc.is_weighted(), device=ebc.device)
    if ebc.device.type != "meta":
        with torch.no_grad():
            for t in ebc.embedding_bag_configs():
                out.embedding_bags[t.name].weight.copy_(ebc.dequantized_weight(t.name))
    return out


def _is_float_collection(module: nn.Module) -> bool:
    """A ``torchrec.EmbeddingBagCollection``, or a subclass keeping its semantics (ours are not
    subclasses of it: they implement ``EmbeddingBagCollectionInterface``)."""
    return isinstance(module, EmbeddingBagCollection)


_FLOAT = "torchrec.EmbeddingBagCollection (or subclass)"


@register_transform(PerTableConfig, is_target=_is_float_collection, targets=_FLOAT)
@register_transform(LowPrecisionConfig, is_target=_is_float_collection, targets=_FLOAT)
def _to_low_precision(
    ebc: EmbeddingBagCollection, config: LowPrecisionConfig | PerTableConfig, fqn: str
) -> LowPrecisionEmbeddingBagCollection:
    if isinstance(config, PerTableConfig):
        return _from_float(ebc, config.default, _tables_subset(ebc, config.tables))
    return _from_float(ebc, config, None)


@register_transform(
    MixedPrecisionConfig, is_target=_is_float_collection, targets=_FLOAT, inputs=("row_maps",)
)
def _to_mixed_precision(
    ebc: EmbeddingBagCollection,
    config: MixedPrecisionConfig,
    fqn: str,
    row_maps: Mapping[str, torch.Tensor] | None = None,
) -> MixedPrecisionEmbeddingBagCollection:
    names = {t.name for t in ebc.embedding_bag_configs()}
    plan = PrecisionPlan({n: p for n, p in config.plan.tables.items() if n in names})
    maps = {n: m for n, m in (row_maps or {}).items() if n in names}
    return _from_float(ebc, config.base, _tables_subset(ebc, config.per_table), plan, maps)


@register_transform(MPESearchConfig, is_target=_is_float_collection, targets=_FLOAT, inputs=("frequencies",))
def _to_mpe_search(
    ebc: EmbeddingBagCollection,
    config: MPESearchConfig,
    fqn: str,
    frequencies: Mapping[str, torch.Tensor] | None = None,
) -> MPESearchEmbeddingBagCollection:
    return MPESearchEmbeddingBagCollection.from_float(ebc, config, frequencies)


def _tables_subset(
    ebc: EmbeddingBagCollection, per_table: Mapping[str, LowPrecisionConfig] | None
) -> dict[str, LowPrecisionConfig] | None:
    """The overrides that name tables of ``ebc`` (a model may hold several collections)."""
    if not per_table:
        return None
    names = {t.name for t in ebc.embedding_bag_configs()}
    return {k: v for k, v in per_table.items() if k in names}

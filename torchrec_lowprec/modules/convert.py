"""Swapping TorchRec collections for low-precision ones, and back; the handlers of
:func:`torchrec_lowprec.convert` for low-precision, mixed-precision and MPE-search configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_search import MPESearchConfig, MPESearchEmbeddingBagCollection
from torchrec_lowprec.transform import convert, copy_in_backward_tags, register_transform
from torchrec_lowprec.types import LowPrecisionConfig, MixedPrecisionConfig, PerTableConfig, PrecisionPlan

__all__ = ["convert", "from_float", "to_float"]


def from_float(
    ebc: EmbeddingBagCollection,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
    precision_plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> LowPrecisionEmbeddingBagCollection | MixedPrecisionEmbeddingBagCollection:
    """A :class:`LowPrecisionEmbeddingBagCollection` holding ``ebc``'s current weights, quantized
    (a :class:`MixedPrecisionEmbeddingBagCollection` when ``precision_plan`` is given; its
    ``row_maps`` are passed on). ``convert`` on one collection; ``ebc`` is left as it is.

    In-backward optimizers set on ``ebc``'s weights with ``_apply_optimizer_in_backward`` carry
    over to the new tables. A collection on the ``meta`` device gives one on ``meta``.

    Example::

        lp_ebc = from_float(torchrec_ebc, LowPrecisionConfig(bits=8))
    """
    if not isinstance(ebc, EmbeddingBagCollection):
        raise TypeError(f"from_float expects a torchrec.EmbeddingBagCollection, got {type(ebc).__name__}")
    return convert(
        ebc, config, per_table_configs=per_table_configs, precision_plan=precision_plan, row_maps=row_maps
    )


def _from_float(
    ebc: EmbeddingBagCollection,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
    precision_plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> LowPrecisionEmbeddingBagCollection | MixedPrecisionEmbeddingBagCollection:
    """What the low-/mixed-precision handlers build from one float collection."""
    tables = ebc.embedding_bag_configs()
    first = ebc.embedding_bags[tables[0].name].weight
    if precision_plan is not None:
        out = MixedPrecisionEmbeddingBagCollection(
            tables,
            plan=precision_plan,
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
    return _from_float(ebc, config)


@register_transform(MixedPrecisionConfig, is_target=_is_float_collection, targets=_FLOAT)
def _to_mixed_precision(
    ebc: EmbeddingBagCollection, config: MixedPrecisionConfig, fqn: str
) -> MixedPrecisionEmbeddingBagCollection:
    names = {t.name for t in ebc.embedding_bag_configs()}
    plan = PrecisionPlan({n: p for n, p in config.plan.tables.items() if n in names})
    maps = {n: m for n, m in (config.row_maps or {}).items() if n in names}
    return _from_float(ebc, config.base, _tables_subset(ebc, config.per_table), plan, maps)


@register_transform(MPESearchConfig, is_target=_is_float_collection, targets=_FLOAT)
def _to_mpe_search(
    ebc: EmbeddingBagCollection, config: MPESearchConfig, fqn: str
) -> MPESearchEmbeddingBagCollection:
    return MPESearchEmbeddingBagCollection.from_float(ebc, config, config.frequencies)


def _tables_subset(
    ebc: EmbeddingBagCollection, per_table: Mapping[str, LowPrecisionConfig] | None
) -> dict[str, LowPrecisionConfig] | None:
    """The overrides that name tables of ``ebc`` (a model may hold several collections)."""
    if not per_table:
        return None
    names = {t.name for t in ebc.embedding_bag_configs()}
    return {k: v for k, v in per_table.items() if k in names}

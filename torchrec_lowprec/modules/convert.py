"""Swapping TorchRec collections for low-precision ones, and back."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.types import LowPrecisionConfig, PrecisionPlan

_IN_BACKWARD_TAGS = ("_optimizer_classes", "_optimizer_kwargs")


def from_float(
    ebc: EmbeddingBagCollection,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
    precision_plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> LowPrecisionEmbeddingBagCollection | MixedPrecisionEmbeddingBagCollection:
    """A :class:`LowPrecisionEmbeddingBagCollection` holding ``ebc``'s current weights, quantized
    (a :class:`MixedPrecisionEmbeddingBagCollection` when ``precision_plan`` is given; its
    ``row_maps`` are passed on).

    In-backward optimizers set on ``ebc``'s weights with ``_apply_optimizer_in_backward`` carry
    over to the new tables. A collection on the ``meta`` device gives one on ``meta``.

    Example::

        lp_ebc = from_float(torchrec_ebc, LowPrecisionConfig(bits=8))
    """
    if not isinstance(ebc, EmbeddingBagCollection):
        raise TypeError(f"from_float expects a torchrec.EmbeddingBagCollection, got {type(ebc).__name__}")
    tables = ebc.embedding_bag_configs()
    first = ebc.embedding_bags[tables[0].name].weight
    if precision_plan is not None:
        out = MixedPrecisionEmbeddingBagCollection(
            tables,
            precision_plan,
            config,
            per_table_configs,
            ebc.is_weighted(),
            first.device,
            False,
            row_maps,
        )
        handles = {
            t.name: [out.row_groups.tables[p].handle for p in out.group_tables(t.name)] for t in tables
        }
    else:
        out = LowPrecisionEmbeddingBagCollection(
            tables,
            config,
            per_table_configs,
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
            for tag in _IN_BACKWARD_TAGS:
                if hasattr(weight, tag):
                    setattr(handle, tag, getattr(weight, tag))
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


def convert(
    model: nn.Module,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
    precision_plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Swap every ``torchrec.EmbeddingBagCollection`` inside ``model`` (in place) for a
    low-precision one holding its current weights; returns ``model`` (or the new collection
    when ``model`` itself is one). With ``precision_plan`` (MPE's selection or the precision
    planner's), collections become :class:`MixedPrecisionEmbeddingBagCollection`.

    Example::

        model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables), ...)
        model = convert(model, LowPrecisionConfig(bits=4))
    """

    def swap(ebc: EmbeddingBagCollection) -> nn.Module:
        names = {t.name for t in ebc.embedding_bag_configs()}
        plan = None
        if precision_plan is not None:
            plan = PrecisionPlan({n: p for n, p in precision_plan.tables.items() if n in names})
        maps = {n: m for n, m in (row_maps or {}).items() if n in names}
        return from_float(ebc, config, _tables_subset(ebc, per_table_configs), plan, maps)

    if type(model) is EmbeddingBagCollection:
        return swap(model)
    for name, child in list(model.named_children()):
        if type(child) is EmbeddingBagCollection:
            setattr(model, name, swap(child))
        else:
            convert(child, config, per_table_configs, precision_plan, row_maps)
    return model


def _tables_subset(
    ebc: EmbeddingBagCollection, per_table: dict[str, LowPrecisionConfig] | None
) -> dict[str, LowPrecisionConfig] | None:
    """The overrides that name tables of ``ebc`` (a model may hold several collections)."""
    if not per_table:
        return None
    names = {t.name for t in ebc.embedding_bag_configs()}
    return {k: v for k, v in per_table.items() if k in names}

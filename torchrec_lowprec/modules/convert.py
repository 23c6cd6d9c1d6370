"""Swapping TorchRec collections for low-precision ones, and back."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.types import LowPrecisionConfig

_IN_BACKWARD_TAGS = ("_optimizer_classes", "_optimizer_kwargs")


def from_float(
    ebc: EmbeddingBagCollection,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
) -> LowPrecisionEmbeddingBagCollection:
    """A :class:`LowPrecisionEmbeddingBagCollection` holding ``ebc``'s current weights, quantized.

    In-backward optimizers set on ``ebc``'s weights with ``_apply_optimizer_in_backward`` carry
    over to the new tables. A collection on the ``meta`` device gives one on ``meta``.

    Example::

        lp_ebc = from_float(torchrec_ebc, LowPrecisionConfig(bits=8))
    """
    if not isinstance(ebc, EmbeddingBagCollection):
        raise TypeError(f"from_float expects a torchrec.EmbeddingBagCollection, got {type(ebc).__name__}")
    tables = ebc.embedding_bag_configs()
    first = ebc.embedding_bags[tables[0].name].weight
    out = LowPrecisionEmbeddingBagCollection(
        tables,
        config,
        per_table_configs,
        is_weighted=ebc.is_weighted(),
        device=first.device,
        init_weights=False,
    )
    for t in tables:
        weight = ebc.embedding_bags[t.name].weight
        if weight.device.type != "meta":
            with torch.no_grad():
                out.load_float_weight(t.name, weight.detach())
        handle = out.tables[t.name].handle
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
    out = EmbeddingBagCollection(
        ebc.embedding_bag_configs(), is_weighted=ebc.is_weighted(), device=ebc.device
    )
    if ebc.device.type != "meta":
        with torch.no_grad():
            for t in ebc.embedding_bag_configs():
                out.embedding_bags[t.name].weight.copy_(ebc.dequantized_weight(t.name))
    return out


def convert(
    model: nn.Module,
    config: LowPrecisionConfig | None = None,
    per_table_configs: dict[str, LowPrecisionConfig] | None = None,
) -> nn.Module:
    """Swap every ``torchrec.EmbeddingBagCollection`` inside ``model`` (in place) for a
    low-precision one holding its current weights; returns ``model`` (or the new collection
    when ``model`` itself is one).

    Example::

        model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables), ...)
        model = convert(model, LowPrecisionConfig(bits=4))
    """
    if type(model) is EmbeddingBagCollection:
        return from_float(model, config, _tables_subset(model, per_table_configs))
    for name, child in list(model.named_children()):
        if type(child) is EmbeddingBagCollection:
            setattr(model, name, from_float(child, config, _tables_subset(child, per_table_configs)))
        else:
            convert(child, config, per_table_configs)
    return model


def _tables_subset(
    ebc: EmbeddingBagCollection, per_table: dict[str, LowPrecisionConfig] | None
) -> dict[str, LowPrecisionConfig] | None:
    """The overrides that name tables of ``ebc`` (a model may hold several collections)."""
    if not per_table:
        return None
    names = {t.name for t in ebc.embedding_bag_configs()}
    return {k: v for k, v in per_table.items() if k in names}

"""Swapping TorchRec collections for low-precision ones, and back; the handlers of
:func:`torchrec_lowprec.convert` for low-precision, mixed-precision and MPE-search configs.

Low precision (``None``, ``LowPrecisionConfig``, ``PerTableConfig``) converts both TorchRec
collections: ``EmbeddingBagCollection`` -> :class:`LowPrecisionEmbeddingBagCollection` and
``EmbeddingCollection`` -> :class:`LowPrecisionEmbeddingCollection`, in one walk. Mixed
precision and the MPE search do too: ``MixedPrecisionEmbeddingBagCollection`` /
``MixedPrecisionEmbeddingCollection`` and ``MPESearchEmbeddingBagCollection`` /
``MPESearchEmbeddingCollection``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from torchrec_lowprec._deprecation import warn_deprecated
from torchrec_lowprec.configs import LowPrecisionConfig, MixedPrecisionConfig, MPESearchConfig, PerTableConfig
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mixed_precision_ec import MixedPrecisionEmbeddingCollection
from torchrec_lowprec.modules.mpe_search import MPESearchEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_search_ec import MPESearchEmbeddingCollection
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


def _float_tables(module: EmbeddingBagCollection | EmbeddingCollection) -> list[BaseEmbeddingConfig]:
    """The table configs of a float TorchRec collection (pooled or sequence)."""
    if isinstance(module, EmbeddingCollection):
        return module.embedding_configs()
    return module.embedding_bag_configs()


def _float_weight(module: EmbeddingBagCollection | EmbeddingCollection, name: str) -> nn.Parameter:
    """Table ``name``'s weight ``[rows, dim]`` of a float TorchRec collection."""
    if isinstance(module, EmbeddingCollection):
        return module.embeddings[name].weight
    return module.embedding_bags[name].weight


def _from_float(
    ebc: EmbeddingBagCollection | EmbeddingCollection,
    config: LowPrecisionConfig | None,
    per_table_configs: dict[str, LowPrecisionConfig] | None,
    plan: PrecisionPlan | None = None,
    row_maps: dict[str, torch.Tensor] | None = None,
) -> (
    LowPrecisionEmbeddingBagCollection
    | LowPrecisionEmbeddingCollection
    | MixedPrecisionEmbeddingBagCollection
    | MixedPrecisionEmbeddingCollection
):
    """What the low-/mixed-precision handlers build from one float collection (pooled or
    sequence; mixed with a ``plan``): the tables quantized from the float weights, the
    in-backward optimizer tags copied (onto every row group's handle), the train/eval mode kept."""
    tables = _float_tables(ebc)
    device = _float_weight(ebc, tables[0].name).device
    if plan is not None:
        mixed = dict(plan=plan, config=config, per_table_configs=per_table_configs, init_weights=False)
        if isinstance(ebc, EmbeddingCollection):
            out = MixedPrecisionEmbeddingCollection(
                tables, device, ebc.need_indices(), row_maps=row_maps, **mixed
            )
        else:
            out = MixedPrecisionEmbeddingBagCollection(
                tables, ebc.is_weighted(), device, row_maps=row_maps, **mixed
            )
        handles = {
            t.name: [out.row_groups.tables[p].handle for p in out.group_tables(t.name)] for t in tables
        }
    elif isinstance(ebc, EmbeddingCollection):
        out = LowPrecisionEmbeddingCollection(
            tables,
            device,
            ebc.need_indices(),
            config=config,
            per_table_configs=per_table_configs,
            init_weights=False,
        )
        handles = {t.name: [out.tables[t.name].handle] for t in tables}
    else:
        out = LowPrecisionEmbeddingBagCollection(
            tables,
            config=config,
            per_table_configs=per_table_configs,
            is_weighted=ebc.is_weighted(),
            device=device,
            init_weights=False,
        )
        handles = {t.name: [out.tables[t.name].handle] for t in tables}
    for t in tables:
        weight = _float_weight(ebc, t.name)
        if weight.device.type != "meta":
            with torch.no_grad():
                out.load_float_weight(t.name, weight.detach())
        for handle in handles.get(t.name, []):
            copy_in_backward_tags(weight, handle)
    out.train(ebc.training)
    return out


def to_float(
    ebc: LowPrecisionEmbeddingBagCollection | LowPrecisionEmbeddingCollection,
) -> EmbeddingBagCollection | EmbeddingCollection:
    """A TorchRec float collection (fp32 tables) holding the dequantized tables of ``ebc``: an
    ``EmbeddingBagCollection`` for a :class:`LowPrecisionEmbeddingBagCollection`, an
    ``EmbeddingCollection`` for a :class:`LowPrecisionEmbeddingCollection`.

    Example::

        float_ebc = to_float(lp_ebc)
        float_ec = to_float(lp_ec)  # torchrec.EmbeddingCollection, same outputs as lp_ec (fp32)
    """
    if isinstance(ebc, LowPrecisionEmbeddingCollection):
        tables = [dataclasses.replace(t, data_type=DataType.FP32) for t in ebc.embedding_configs()]
        out: nn.Module = EmbeddingCollection(tables, device=ebc.device, need_indices=ebc.need_indices())
    elif isinstance(ebc, LowPrecisionEmbeddingBagCollection):
        tables = [dataclasses.replace(t, data_type=DataType.FP32) for t in ebc.embedding_bag_configs()]
        out = EmbeddingBagCollection(tables, is_weighted=ebc.is_weighted(), device=ebc.device)
    else:
        raise TypeError(
            "to_float expects a LowPrecisionEmbeddingBagCollection or LowPrecisionEmbeddingCollection, "
            f"got {type(ebc).__name__}"
        )
    if ebc.device.type != "meta":
        with torch.no_grad():
            for t in tables:
                _float_weight(out, t.name).copy_(ebc.dequantized_weight(t.name))
    return out


def _is_float_table_collection(module: nn.Module) -> bool:
    """A ``torchrec.EmbeddingBagCollection`` or ``torchrec.EmbeddingCollection`` (or subclass)."""
    return isinstance(module, (EmbeddingBagCollection, EmbeddingCollection))


_FLOAT_ANY = "torchrec.EmbeddingBagCollection or torchrec.EmbeddingCollection (or subclass)"


@register_transform(PerTableConfig, is_target=_is_float_table_collection, targets=_FLOAT_ANY)
@register_transform(LowPrecisionConfig, is_target=_is_float_table_collection, targets=_FLOAT_ANY)
def _to_low_precision(
    ebc: EmbeddingBagCollection | EmbeddingCollection, config: LowPrecisionConfig | PerTableConfig, fqn: str
) -> LowPrecisionEmbeddingBagCollection | LowPrecisionEmbeddingCollection:
    if isinstance(config, PerTableConfig):
        return _from_float(ebc, config.default, _tables_subset(ebc, config.tables))
    return _from_float(ebc, config, None)


@register_transform(
    MixedPrecisionConfig, is_target=_is_float_table_collection, targets=_FLOAT_ANY, inputs=("row_maps",)
)
def _to_mixed_precision(
    ebc: EmbeddingBagCollection | EmbeddingCollection,
    config: MixedPrecisionConfig,
    fqn: str,
    row_maps: Mapping[str, torch.Tensor] | None = None,
) -> MixedPrecisionEmbeddingBagCollection | MixedPrecisionEmbeddingCollection:
    names = {t.name for t in _float_tables(ebc)}
    plan = PrecisionPlan({n: p for n, p in config.plan.tables.items() if n in names})
    maps = {n: m for n, m in (row_maps or {}).items() if n in names}
    return _from_float(ebc, config.base, _tables_subset(ebc, config.per_table), plan, maps)


@register_transform(
    MPESearchConfig, is_target=_is_float_table_collection, targets=_FLOAT_ANY, inputs=("frequencies",)
)
def _to_mpe_search(
    ebc: EmbeddingBagCollection | EmbeddingCollection,
    config: MPESearchConfig,
    fqn: str,
    frequencies: Mapping[str, torch.Tensor] | None = None,
) -> MPESearchEmbeddingBagCollection | MPESearchEmbeddingCollection:
    if isinstance(ebc, EmbeddingCollection):
        return MPESearchEmbeddingCollection.from_float(ebc, config, frequencies)
    return MPESearchEmbeddingBagCollection.from_float(ebc, config, frequencies)


def _tables_subset(
    ebc: EmbeddingBagCollection | EmbeddingCollection, per_table: Mapping[str, LowPrecisionConfig] | None
) -> dict[str, LowPrecisionConfig] | None:
    """The overrides that name tables of ``ebc`` (a model may hold several collections)."""
    if not per_table:
        return None
    names = {t.name for t in _float_tables(ebc)}
    return {k: v for k, v in per_table.items() if k in names}

"""One verb for every model transform: ``convert(model, config, filter_fn=None)``.

Shaped like torchao's ``quantize_``: the *type* of ``config`` picks a handler from a registry,
one walker finds the target collections, ``filter_fn(module, fqn)`` narrows them, and each
target is swapped in place for what its handler returns. Adding a transform is one config
class (in :mod:`torchrec_lowprec.configs`) and one ``@register_transform(ConfigType, ...)``
handler; the verb does not change. Tensors a transform needs (row maps, frequency counts) are
keyword inputs of the verb, declared by the handler (``inputs=``), never config fields.

=========================  ==========================================  =======================
config                     targets                                     becomes
=========================  ==========================================  =======================
``LowPrecisionConfig``,    ``torchrec.EmbeddingBagCollection``,        ``LowPrecisionEmbedding
``PerTableConfig``         ``torchrec.EmbeddingCollection`` (and       BagCollection``, ``Low
                           subclasses)                                 PrecisionEmbedding
                                                                       Collection``
``MixedPrecisionConfig``   same (input ``row_maps``)                   ``MixedPrecision...``
``MPESearchConfig``        same (input ``frequencies``)                ``MPESearch...``
``CodebookConfig``         float and low-precision collections         ``CodebookEmbedding...``
                           (input ``frequencies``)
``InferenceConfig``        low-precision collections                   ``torchrec.quant`` EBC
                                                                       / EC
=========================  ==========================================  =======================

This module sits low in the package (it imports no torchrec and no other layer at import
time): ``modules/``, ``compress/`` and ``export/`` register their handlers here, and the
registry imports them on the first call of :func:`convert`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torchrec_lowprec._deprecation import warn_deprecated

if TYPE_CHECKING:
    from torch import nn

#: Tags ``torch.distributed.optim._apply_optimizer_in_backward`` sets on a parameter.
IN_BACKWARD_TAGS = ("_optimizer_classes", "_optimizer_kwargs")

#: Modules whose import registers the built-in handlers.
_HANDLER_MODULES = (
    "torchrec_lowprec.modules.convert",
    "torchrec_lowprec.compress.api",
    "torchrec_lowprec.export.inference",
)

Handler = Callable[..., Any]
FilterFn = Callable[[Any, str], bool]


@dataclass(frozen=True)
class _Transform:
    handler: Handler
    is_target: Callable[[Any], bool]
    targets: str
    if_none: str
    precheck: Callable[[list, Any], None] | None
    finish: Callable[[Any, Any], None] | None
    inputs: tuple[str, ...]


_REGISTRY: dict[type, _Transform] = {}


def register_transform(
    config_type: type,
    *,
    is_target: Callable[[Any], bool],
    targets: str,
    if_none: str = "warn",
    precheck: Callable[[list, Any], None] | None = None,
    finish: Callable[[Any, Any], None] | None = None,
    inputs: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Register ``handler(module, config, fqn, **inputs) -> module`` for configs of ``config_type``.

    ``is_target(module)`` says which modules the handler replaces (``targets`` names them in
    messages); ``if_none`` is what a walk that finds none does (``"warn"`` or ``"raise"``);
    ``precheck(targets, config)`` runs on every ``(fqn, module)`` before anything is swapped;
    ``finish(model, config)`` after. ``inputs`` names the keyword inputs (tensors) the handler
    takes from :func:`convert`; each is passed (``None`` when not given), any other is refused.

    Example::

        @register_transform(MyConfig, is_target=lambda m: isinstance(m, EmbeddingBagCollection),
                            targets="torchrec.EmbeddingBagCollection")
        def _my_transform(ebc, config, fqn):
            return MyCollection.from_float(ebc, config)
    """
    if if_none not in ("warn", "raise"):
        raise ValueError(f"register_transform: if_none={if_none!r} must be 'warn' or 'raise'")

    def wrap(handler: Handler) -> Handler:
        _REGISTRY[config_type] = _Transform(
            handler, is_target, targets, if_none, precheck, finish, tuple(inputs)
        )
        return handler

    return wrap


def _entry(config: object) -> _Transform:
    for module in _HANDLER_MODULES:
        importlib.import_module(module)
    for cls in type(config).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    known = sorted(c.__name__ for c in _REGISTRY)
    raise TypeError(
        f"convert: no transform for a config of type {type(config).__name__}; pass one of {known} "
        "(from torchrec_lowprec.configs)"
    )


def convert(
    model: nn.Module,
    config: object = None,
    filter_fn: FilterFn | None = None,
    *,
    per_table_configs: dict | None = None,
    precision_plan: object = None,
    **inputs: Any,
) -> nn.Module:
    """Transform, in place, every collection of ``model`` that ``config``'s handler targets
    (and ``filter_fn(module, fqn)`` accepts); returns ``model``, or the new module when
    ``model`` itself is a target.

    ``config=None`` is ``PerTableConfig()``: low precision with each table's width taken from
    its ``EmbeddingBagConfig.data_type`` (TorchRec's way of naming a table's precision).
    ``inputs`` are the tensors a transform needs: ``row_maps`` (table -> raw id -> frequency
    rank) for :class:`~torchrec_lowprec.configs.MixedPrecisionConfig`, ``frequencies``
    (feature -> per-id counts) for ``MPESearchConfig`` and ``CodebookConfig``; an input the
    transform does not take is a ``TypeError``.

    ``per_table_configs`` and ``precision_plan`` are the pre-registry spelling of
    ``PerTableConfig`` / ``MixedPrecisionConfig`` (``config`` is then their base): deprecated,
    they warn and will be removed in 0.2.

    A walk that finds nothing to convert warns (low-precision, mixed-precision, MPE search:
    the model may be converted already) or raises ``ValueError`` (codebooks, inference: their
    input must hold trained tables), naming the embedding modules it did find.

    Example::

        model = convert(model, LowPrecisionConfig(bits=4))
        model = convert(model, MixedPrecisionConfig(plan), filter_fn=lambda m, fqn: "sparse" in fqn)
        model = convert(model, CodebookConfig(num_subspaces=4), frequencies=counts)
        served = convert(model, InferenceConfig())
    """
    from torchrec_lowprec.configs import MixedPrecisionConfig, PerTableConfig

    if precision_plan is not None or per_table_configs is not None:
        old = "precision_plan" if precision_plan is not None else "per_table_configs"
        warn_deprecated(
            f"convert(..., {old}=...)",
            "MixedPrecisionConfig(plan, base, per_table) or PerTableConfig(tables, default) as the config",
        )
    if precision_plan is not None:
        config = MixedPrecisionConfig(precision_plan, config, per_table_configs)
    elif per_table_configs is not None or config is None:
        config = PerTableConfig(per_table_configs or {}, config)
    if isinstance(config, dict):
        raise TypeError(
            "convert: config is a dict; pass a config object (LowPrecisionConfig(...), or "
            "PerTableConfig({table: LowPrecisionConfig(...)}) for per-table settings)"
        )
    entry = _entry(config)
    unknown = sorted(set(inputs) - set(entry.inputs))
    if unknown:
        takes = f"it takes {list(entry.inputs)}" if entry.inputs else "it takes none"
        raise TypeError(f"convert({type(config).__name__}): unexpected input(s) {unknown}; {takes}")
    given = {name: inputs.get(name) for name in entry.inputs}
    accept = filter_fn or (lambda module, fqn: True)
    if entry.is_target(model) and accept(model, ""):
        if entry.precheck is not None:
            entry.precheck([("", model)], config)
        out = entry.handler(model, config, "", **given)
        if entry.finish is not None:
            entry.finish(out, config)
        return out
    targets: list[tuple[Any, str, str, Any]] = []  # (parent, attribute, fqn, module)
    _collect(model, "", entry, accept, targets)
    if not targets:
        _nothing_found(model, config, entry, filter_fn is not None)
        return model
    if entry.precheck is not None:
        entry.precheck([(fqn, m) for _, _, fqn, m in targets], config)
    done: dict[int, Any] = {}  # a collection shared by two parents is transformed once
    for parent, attr, fqn, module in targets:
        new = done.get(id(module))
        if new is None:
            new = done[id(module)] = entry.handler(module, config, fqn, **given)
        setattr(parent, attr, new)
    if entry.finish is not None:
        entry.finish(model, config)
    return model


def _collect(module: Any, prefix: str, entry: _Transform, accept: FilterFn, out: list) -> None:
    for name, child in module.named_children():
        fqn = f"{prefix}{name}"
        if entry.is_target(child):
            if accept(child, fqn):
                out.append((module, name, fqn, child))
        else:
            _collect(child, fqn + ".", entry, accept, out)


def _nothing_found(model: Any, config: object, entry: _Transform, filtered: bool) -> None:
    seen = [
        f"{type(m).__name__} at {fqn!r}" if fqn else f"{type(m).__name__} (the model itself)"
        for fqn, m in model.named_modules()
        if "Embedding" in type(m).__name__
    ]
    found = f"it holds {', '.join(seen[:8])}" if seen else "it holds no embedding module"
    why = " (or filter_fn rejected every one)" if filtered else ""
    msg = (
        f"convert({type(config).__name__}): nothing converted: {type(model).__name__} holds no "
        f"{entry.targets}{why}; {found}"
    )
    if entry.if_none == "raise":
        raise ValueError(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def copy_in_backward_tags(src: object, dst: object) -> None:
    """Copy the in-backward optimizer tags (``_apply_optimizer_in_backward``) of ``src`` onto ``dst``."""
    for tag, value in in_backward_tags(src).items():
        setattr(dst, tag, value)


def in_backward_tags(param: object) -> dict[str, Any]:
    """The in-backward optimizer tags set on ``param`` (empty when none)."""
    return {tag: getattr(param, tag) for tag in IN_BACKWARD_TAGS if hasattr(param, tag)}

"""Which fused optimizer a table runs, and the state it keeps (fp32, with the table).

TorchRec users pick the fused embedding optimizer three ways, all honoured here:

- ``apply_optimizer_in_backward(cls, params, kwargs)`` (TorchRec's, or
  ``torch.distributed.optim._apply_optimizer_in_backward``) tags each parameter with
  ``_optimizer_classes`` / ``_optimizer_kwargs``; our collections read the tags from their
  per-table handle parameters, before or after ``convert``;
- the sharder's ``fused_params`` (``{"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5}``);
- :class:`~torchrec_lowprec.types.LowPrecisionConfig`'s optimizer fields.

Precedence, key by key, as TorchRec's ``merge_fused_params``: tag > ``fused_params`` > config.

State per row (fp32): SGD none; Adagrad D values; RowWiseAdagrad 1 value; Adam 2*D values.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.kernels.spec import OptimizerParams
from torchrec_lowprec.types import OPTIMIZERS, OptimizerType

#: Names of the state tensors each optimizer keeps, in (state1, state2) order (``types.OPTIMIZERS``).
OPTIMIZER_STATE_NAMES = {kind: entry.state_names for kind, entry in OPTIMIZERS.items()}

#: In-backward optimizer classes (by lower-case class name: torch.optim and torchrec.optim alike).
_KIND_OF_CLASS_NAME = {name: kind for kind, entry in OPTIMIZERS.items() for name in entry.class_names}
#: FBGEMM ``EmbOptimType`` values (as TorchRec writes them into tags and ``fused_params``).
_KIND_OF_EMB_OPT = {name: kind for kind, entry in OPTIMIZERS.items() for name in entry.emb_opt_types}
#: Hyper-parameters each fused update uses (FBGEMM's names; ``lr``/``betas`` are mapped).
_USES = {kind: entry.uses for kind, entry in OPTIMIZERS.items()}
#: Options accepted only at the value that leaves the math unchanged.
_NEUTRAL = {
    "momentum": 0,
    "nesterov": False,
    "maximize": False,
    "amsgrad": False,
    "lr_decay": 0,
    "initial_accumulator_value": 0,
    "decoupled_weight_decay": False,
}
#: Implementation switches of torch optimizers that cannot change the result.
_IRRELEVANT = {"foreach", "fused", "differentiable", "capturable", "dampening"}
#: FBGEMM fused_params keys that would change the update's math: refused.
_FUSED_PARAMS_REFUSED = {
    "weight_decay_mode",
    "gradient_clipping",
    "max_gradient",
    "max_norm",
    "momentum",
    "counter_based_regularization",
    "cowclip_regularization",
    "global_weight_decay",
}
_FUSED_PARAMS_HONOURED = {"optimizer", "learning_rate", "lr", "eps", "weight_decay", "beta1", "beta2"}


def allocate_state(
    kind: OptimizerType, rows: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-initialised ``(state1, state2)`` for ``kind`` (empty tensors where unused): a
    per-row state is ``[rows]``, a per-dimension one ``[rows, dim]`` (``types.OPTIMIZERS``)."""
    out = []
    for name, per_row, per_dim in OPTIMIZERS[OptimizerType(kind)].state:
        if (per_row, per_dim) not in ((1, 0), (0, 1)):
            raise NotImplementedError(f"{kind}: state {name!r} of {per_row} + {per_dim} * D floats a row")
        shape = (rows,) if per_row else (rows, dim)
        out.append(torch.zeros(shape, dtype=torch.float32, device=device))
    empty = torch.empty(0, dtype=torch.float32, device=device)
    out += [empty] * (2 - len(out))
    return out[0], out[1]


def _optimizer_kind_of_class(cls: type) -> OptimizerType:
    kind = _KIND_OF_CLASS_NAME.get(cls.__name__.lower())
    if kind is None:
        raise ValueError(
            f"optimizer class {cls.__module__}.{cls.__name__} set with apply_optimizer_in_backward "
            "has no fused low-precision version; use torch.optim.SGD, torch.optim.Adagrad, "
            "torchrec.optim.RowWiseAdagrad or torch.optim.Adam"
        )
    return kind


def kind_of_emb_opt_type(value: Any, where: str) -> OptimizerType:
    """Our optimizer for an FBGEMM ``EmbOptimType`` (or its string value)."""
    key = str(getattr(value, "value", value)).lower()
    kind = _KIND_OF_EMB_OPT.get(key)
    if kind is None:
        raise ValueError(
            f"{where}: optimizer {value!r} has no fused low-precision version; use EmbOptimType."
            f"EXACT_SGD, EXACT_ADAGRAD, EXACT_ROWWISE_ADAGRAD or ADAM"
        )
    return kind


def _check_values(where: str, kind: OptimizerType, values: dict[str, float]) -> None:
    lr = values["learning_rate"]
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where}: learning rate {lr!r} must be a finite number >= 0")
    if kind != OptimizerType.SGD and not (math.isfinite(values["eps"]) and values["eps"] > 0):
        raise ValueError(f"{where}: eps={values['eps']!r} must be a finite number > 0")
    if not (math.isfinite(values["weight_decay"]) and values["weight_decay"] >= 0):
        raise ValueError(f"{where}: weight_decay={values['weight_decay']!r} must be a finite number >= 0")
    for b in ("beta1", "beta2"):
        if kind == OptimizerType.ADAM and not 0 <= values[b] < 1:
            raise ValueError(f"{where}: {b}={values[b]!r} must be in [0, 1)")


def _hyper_parameters(kwargs: dict[str, Any], where: str) -> dict[str, float]:
    """FBGEMM-named hyper-parameters out of torch-style or FBGEMM-style ``kwargs``."""
    out: dict[str, float] = {}
    for key, value in kwargs.items():
        if key in ("lr", "learning_rate"):
            out["learning_rate"] = float(value)
        elif key == "betas":
            out["beta1"], out["beta2"] = (float(b) for b in value)
        elif key in ("eps", "weight_decay", "beta1", "beta2"):
            out[key] = float(value)
        elif key == "optimizer" or key in _IRRELEVANT:
            continue
        elif key in _NEUTRAL:
            if value != _NEUTRAL[key]:
                raise ValueError(
                    f"{where}: option {key}={value!r} is not supported by the fused low-precision "
                    f"update (only {key}={_NEUTRAL[key]!r}); remove it"
                )
        else:
            raise ValueError(f"{where}: option {key!r} is not supported by the fused low-precision update")
    return out


def resolve_optimizer(param: torch.Tensor | None, cfg: LowPrecisionConfig) -> OptimizerParams:
    """The optimizer a table runs: ``cfg``'s (with the sharder's ``fused_params`` folded in by
    :func:`config_with_fused_params`), overridden key by key by the in-backward tag on ``param``
    (TorchRec's precedence: the tag's kwargs update the fused params).

    Example::

        opt = resolve_optimizer(ebc.tables["t"].handle, ebc.table_config("t"))
        opt.kind, opt.lr
    """
    values: dict[str, float] = {
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "eps": cfg.eps,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
    }
    kind = OptimizerType(cfg.optimizer)
    where = "LowPrecisionConfig"
    classes = getattr(param, "_optimizer_classes", None) if param is not None else None
    if classes:
        if len(classes) != 1:
            raise ValueError(f"a low-precision table takes one in-backward optimizer, got {len(classes)}")
        kwargs = dict(param._optimizer_kwargs[0])
        where = f"in-backward optimizer {classes[0].__name__}"
        if "optimizer" in kwargs:  # written by TorchRec's sharders (or set explicitly), as there
            kind = kind_of_emb_opt_type(kwargs["optimizer"], where)
        else:
            kind = _optimizer_kind_of_class(classes[0])
        values.update(_hyper_parameters(kwargs, where))
    _check_values(where, kind, values)
    return OptimizerParams(
        kind=kind,
        lr=values["learning_rate"],
        weight_decay=values["weight_decay"],
        eps=values["eps"],
        beta1=values["beta1"],
        beta2=values["beta2"],
    )


def config_with_fused_params(
    cfg: LowPrecisionConfig, fused_params: dict[str, Any] | None
) -> LowPrecisionConfig:
    """``cfg`` with the optimizer entries of a sharder's ``fused_params`` applied (they win over
    the config, as TorchRec's sharder-level fused params are the tables' defaults; in-backward
    tags still win over both). See :func:`fused_params_for_optimizer` for the keys.

    Example::

        cfg = config_with_fused_params(LowPrecisionConfig(bits=4), {"optimizer": EmbOptimType.EXACT_SGD,
                                                                     "learning_rate": 0.5})
    """
    applied = fused_params_for_optimizer(fused_params, warn=False)  # the sharder warned
    if not applied:
        return cfg
    changes: dict[str, Any] = {}
    if "optimizer" in applied:
        changes["optimizer"] = kind_of_emb_opt_type(applied["optimizer"], "fused_params")
    values = _hyper_parameters({k: v for k, v in applied.items() if k != "optimizer"}, "fused_params")
    changes.update(values)
    kind = OptimizerType(changes.get("optimizer", cfg.optimizer))
    merged = {k: float(getattr(cfg, k)) for k in ("learning_rate", "weight_decay", "eps", "beta1", "beta2")}
    merged.update(values)
    _check_values("fused_params", kind, merged)
    return cfg.replace(**changes)


def optimizer_params_from_in_backward(param: torch.Tensor, cfg: LowPrecisionConfig) -> OptimizerParams:
    """The optimizer of a table: the in-backward optimizer tagged on ``param`` if any, else ``cfg``'s."""
    return resolve_optimizer(param, cfg)


def fused_params_for_optimizer(fused_params: dict[str, Any] | None, warn: bool = True) -> dict[str, Any]:
    """The entries of a sharder's ``fused_params`` that configure our fused update.

    Keys that would change the update's math and that we do not implement raise ``ValueError``;
    other FBGEMM kernel settings (caching, output dtype, stochastic rounding, ...) do not
    apply to low-precision tables and are reported with a warning, then left to TorchRec's
    float tables.
    """
    if not fused_params:
        return {}
    refused = sorted(k for k, v in fused_params.items() if k in _FUSED_PARAMS_REFUSED and v)
    if refused:
        raise ValueError(
            f"fused_params {refused} are not supported by the fused low-precision update; remove them "
            "(or give those tables float precision)"
        )
    ignored = sorted(
        k for k in fused_params if k not in _FUSED_PARAMS_HONOURED and k not in _FUSED_PARAMS_REFUSED
    )
    if ignored and warn:
        warnings.warn(
            f"fused_params {ignored} do not apply to low-precision tables (they keep their own storage, "
            "rounding and kernels); they are used by TorchRec's float tables only",
            UserWarning,
            stacklevel=3,
        )
    return {k: v for k, v in fused_params.items() if k in _FUSED_PARAMS_HONOURED}

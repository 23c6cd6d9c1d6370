"""Which fused optimizer a table runs, and the state it keeps (fp32, with the table).

TorchRec users pick the fused embedding optimizer with
``torch.distributed.optim._apply_optimizer_in_backward(cls, params, kwargs)``, which tags each
parameter with ``_optimizer_classes`` / ``_optimizer_kwargs``. Our collections read those
tags from their per-table handle parameters, so the same call configures our update.

State per row (fp32): SGD none; Adagrad D values; RowWiseAdagrad 1 value; Adam 2*D values.
"""

from __future__ import annotations

import torch

from torchrec_lowprec.quant.layout import optimizer_state_bytes
from torchrec_lowprec.types import LowPrecisionConfig, OptimizerParams, OptimizerType

#: Names of the state tensors each optimizer keeps, in (state1, state2) order.
OPTIMIZER_STATE_NAMES = {
    OptimizerType.SGD: (),
    OptimizerType.ADAGRAD: ("momentum1",),
    OptimizerType.ROWWISE_ADAGRAD: ("momentum1",),
    OptimizerType.ADAM: ("momentum1", "momentum2"),
}


def state_bytes_per_row(kind: OptimizerType, dim: int) -> int:
    """Bytes of optimizer state per row (see ``quant.layout.RowFormat``)."""
    return optimizer_state_bytes(kind, dim)


def allocate_state(
    kind: OptimizerType, rows: int, dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-initialised ``(state1, state2)`` for ``kind`` (empty tensors where unused)."""
    empty = torch.empty(0, dtype=torch.float32, device=device)
    if kind == OptimizerType.SGD:
        return empty, empty
    if kind == OptimizerType.ROWWISE_ADAGRAD:
        return torch.zeros(rows, dtype=torch.float32, device=device), empty
    full = torch.zeros(rows, dim, dtype=torch.float32, device=device)
    if kind == OptimizerType.ADAGRAD:
        return full, empty
    return full, torch.zeros(rows, dim, dtype=torch.float32, device=device)


def _optimizer_kind_of_class(cls: type) -> OptimizerType:
    name = cls.__name__.lower()
    by_name = {
        "sgd": OptimizerType.SGD,
        "adagrad": OptimizerType.ADAGRAD,
        "rowwiseadagrad": OptimizerType.ROWWISE_ADAGRAD,
        "adam": OptimizerType.ADAM,
    }
    if name not in by_name:
        raise ValueError(
            f"optimizer class {cls.__module__}.{cls.__name__} set with _apply_optimizer_in_backward "
            "has no fused low-precision version; use torch.optim.SGD, torch.optim.Adagrad, "
            "torchrec.optim.RowWiseAdagrad or torch.optim.Adam"
        )
    return by_name[name]


def optimizer_params_from_in_backward(param: torch.Tensor, cfg: LowPrecisionConfig) -> OptimizerParams:
    """The optimizer of a table: the in-backward optimizer tagged on ``param`` if any, else ``cfg``'s."""
    classes = getattr(param, "_optimizer_classes", None)
    if not classes:
        return OptimizerParams.from_config(cfg)
    kwargs = dict(param._optimizer_kwargs[0])
    kind = _optimizer_kind_of_class(classes[0])
    betas = kwargs.get("betas", (kwargs.get("beta1", cfg.beta1), kwargs.get("beta2", cfg.beta2)))
    unsupported = {k for k, v in kwargs.items() if k in ("momentum", "amsgrad", "nesterov") and v}
    if unsupported:
        raise ValueError(
            f"in-backward optimizer option(s) {sorted(unsupported)} are not supported by the fused "
            "low-precision update; remove them"
        )
    return OptimizerParams(
        kind=kind,
        # TorchRec's sharders rewrite the tag in place into FBGEMM's fused-parameter names
        # ({"lr": x} -> {"learning_rate": x}); both spellings are honoured.
        lr=float(kwargs.get("lr", kwargs.get("learning_rate", cfg.learning_rate))),
        weight_decay=float(kwargs.get("weight_decay", cfg.weight_decay)),
        eps=float(kwargs.get("eps", cfg.eps)),
        beta1=float(betas[0]),
        beta2=float(betas[1]),
    )

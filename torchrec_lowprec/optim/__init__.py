"""Fused sparse optimizers: resolving which one a table runs, and its state."""

from torchrec_lowprec.optim.fused import (
    OPTIMIZER_STATE_NAMES,
    allocate_state,
    config_with_fused_params,
    fused_params_for_optimizer,
    optimizer_params_from_in_backward,
    resolve_optimizer,
)

__all__ = [
    "OPTIMIZER_STATE_NAMES",
    "allocate_state",
    "config_with_fused_params",
    "fused_params_for_optimizer",
    "optimizer_params_from_in_backward",
    "resolve_optimizer",
]

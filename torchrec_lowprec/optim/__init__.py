"""Fused sparse optimizers: resolving which one a table runs, and its state."""

from torchrec_lowprec.optim.fused import (
    OPTIMIZER_STATE_NAMES,
    allocate_state,
    optimizer_params_from_in_backward,
    state_bytes_per_row,
)

__all__ = [
    "OPTIMIZER_STATE_NAMES",
    "allocate_state",
    "optimizer_params_from_in_backward",
    "state_bytes_per_row",
]

"""Checking a checkpoint against a collection before anything is loaded."""

from __future__ import annotations

from typing import Any

import torch


def validate_checkpoint(module: Any, state_dict: dict[str, Any], prefix: str) -> None:
    """Raise ``ValueError`` naming the first table whose entries do not match ``module``.

    Checks table names, rows, dims, bit widths, whether master step sizes are kept, and the
    shapes of the stored rows, step sizes and optimizer state.
    """
    extra = state_dict.get(f"{prefix}_extra_state")
    theirs = extra.get("tables", {}) if isinstance(extra, dict) else None
    mine = module.get_extra_state()["tables"]
    if theirs is not None:
        if set(theirs) != set(mine):
            raise ValueError(
                f"checkpoint tables {sorted(theirs)} do not match this collection's tables {sorted(mine)} "
                f"(missing: {sorted(set(mine) - set(theirs))}, extra: {sorted(set(theirs) - set(mine))})"
            )
        for name, meta in mine.items():
            for field in ("rows", "dim", "bits", "learn_step_size"):
                if theirs[name].get(field) != meta[field]:
                    raise ValueError(
                        f"table {name!r}: checkpoint has {field}={theirs[name].get(field)} but this "
                        f"collection has {field}={meta[field]}; build the module with the checkpoint's "
                        "configuration, or convert the checkpoint"
                    )
    for name in mine:
        for key, want in module.tables[name].expected_shapes().items():
            full = f"{prefix}tables.{name}.{key}"
            if full in state_dict and isinstance(state_dict[full], torch.Tensor):
                got = tuple(state_dict[full].shape)
                if got != want:
                    raise ValueError(
                        f"table {name!r}: checkpoint entry {full} has shape {got}, expected {want} "
                        "(different rows, dim, bit width or optimizer)"
                    )

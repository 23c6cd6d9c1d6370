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


def validate_all_entries(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Raise ``ValueError`` before anything is copied if any tensor entry of ``module`` (and its
    children) has another shape, or if some of its entries are there and others missing.

    A collection loads all of its entries or none: ``nn.Module.load_state_dict`` reports missing
    keys only after copying everything else (and hands ``_load_from_state_dict`` ``strict=True``
    whatever the caller asked), so a checkpoint without ``tables.<t>.qweight`` would leave new
    step sizes on old codes. A checkpoint without any entry of the collection is left to
    ``load_state_dict``'s own ``strict`` handling.
    """
    missing, wrong, present = [], [], 0
    for key, mine in module.state_dict(prefix=prefix, keep_vars=True).items():
        if key.endswith("_extra_state"):
            continue  # metadata, checked by the collection itself
        if key not in state_dict:
            missing.append(key)
            continue
        present += 1
        if isinstance(mine, torch.Tensor) and isinstance(state_dict[key], torch.Tensor):
            if tuple(state_dict[key].shape) != tuple(mine.shape):
                wrong.append(f"{key} has shape {tuple(state_dict[key].shape)}, expected {tuple(mine.shape)}")
    if wrong:
        raise ValueError(
            f"checkpoint entries do not fit this collection: {'; '.join(wrong)}; nothing was loaded"
        )
    if missing and present:
        raise ValueError(partial_message(missing))


def partial_message(missing: list[str]) -> str:
    """The error of a checkpoint holding some of a collection's entries but not ``missing``."""
    return (
        f"checkpoint lacks {len(missing)} entries of this collection: {', '.join(missing[:8])}"
        f"{' ...' if len(missing) > 8 else ''}; nothing was loaded (a collection loads all of its "
        "entries or none: drop all of its entries from the state dict to skip it)"
    )

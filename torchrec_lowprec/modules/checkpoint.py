"""Checking a checkpoint against a collection before anything is loaded."""

from __future__ import annotations

from typing import Any

import torch

from torchrec_lowprec.quant.layout import max_step_size
from torchrec_lowprec.quant.lsq import MIN_STEP_SIZE
from torchrec_lowprec.types import INT_BITS, OptimizerType


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


def _bad(t: torch.Tensor, ok: torch.Tensor) -> str:
    n = int((~ok).sum())
    first = int((~ok).nonzero()[0, 0])
    return f"{n} of {ok.numel()} values are out of range (first at row {first}: {t.reshape(ok.shape[0], -1)[first, 0].item()!r})"


def check_table_values(
    table: str, bits: int, optimizer: OptimizerType, entries: dict[str, Any], where: str = ""
) -> None:
    """Raise ``ValueError`` naming ``table`` and the entry if its values cannot be trained from:
    non-finite (or negative) optimizer state, master step sizes that are not finite or outside
    ``[MIN_STEP_SIZE, max_step_size(bits)]``, stored rows whose fp16 scale/bias or float values
    are not finite. ``entries``: ``qweight`` / ``step_size`` / ``momentum1`` / ``momentum2``
    tensors (any may be absent; a column shard's pieces work the same). One pass; a checkpoint
    loads rarely, so the reductions' host syncs do not matter."""
    q = entries.get("qweight")
    if isinstance(q, torch.Tensor) and q.dtype == torch.uint8 and q.dim() == 2 and q.numel():
        if bits in INT_BITS:
            vals, what = q[:, :4].contiguous().view(torch.float16), "fp16 scale/bias"
        else:
            dtype = torch.float16 if bits == 16 else torch.float32
            width = q.shape[1] // dtype.itemsize * dtype.itemsize  # padding bytes are zeros
            vals, what = q[:, :width].contiguous().view(dtype), f"fp{bits} values"
        ok = torch.isfinite(vals).all(dim=1)
        if not bool(ok.all()):
            raise ValueError(
                f"table {table!r}: checkpoint entry {where}qweight has non-finite {what}: " + _bad(vals, ok)
            )
    s = entries.get("step_size")
    if isinstance(s, torch.Tensor) and s.numel() and bits in INT_BITS:
        ok = torch.isfinite(s) & (s >= MIN_STEP_SIZE) & (s <= max_step_size(bits))
        if not bool(ok.all()):
            raise ValueError(
                f"table {table!r}: checkpoint entry {where}step_size must be finite and in "
                f"[{MIN_STEP_SIZE}, {max_step_size(bits)}]: " + _bad(s, ok)
            )
    for key in ("momentum1", "momentum2"):
        m = entries.get(key)
        if not isinstance(m, torch.Tensor) or not m.numel():
            continue
        # Adagrad's sums of squares and Adam's second moment are never negative.
        signed = key == "momentum1" and optimizer == OptimizerType.ADAM
        ok = torch.isfinite(m) if signed else torch.isfinite(m) & (m >= 0)
        ok = ok.reshape(m.shape[0], -1).all(dim=1)
        if not bool(ok.all()):
            raise ValueError(
                f"table {table!r}: checkpoint entry {where}{key} (optimizer state) must be finite"
                f"{'' if signed else ' and >= 0'}: " + _bad(m, ok)
            )


def validate_values(module: Any, state_dict: dict[str, Any], prefix: str) -> None:
    """:func:`check_table_values` for every table of ``module``, before anything is copied."""
    for name, state in module.tables.items():
        pre = f"{prefix}tables.{name}."
        entries = {k: state_dict.get(pre + k) for k in ("qweight", "step_size", "momentum1", "momentum2")}
        check_table_values(name, state.layout.bits, state.optimizer_kind, entries, where=pre)

"""Checking ids against table sizes before they reach a kernel."""

from __future__ import annotations

import warnings

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_ids(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    features: list[str],
    rows: list[int],
    batch: int,
    modes: list[str],
    tables: list[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``(values, lengths, weights)`` with out-of-range ids handled per feature mode.

    ``"raise"``: ``IndexError`` naming the table, feature and offending id. ``"warn"`` /
    ``"ignore"``: the id is dropped from its bag (with a warning for ``"warn"``).
    """
    if values.numel() == 0:
        return values, lengths, weights
    per_feature = lengths.view(len(features), batch).sum(dim=1)
    limit = torch.repeat_interleave(
        torch.tensor(rows, device=values.device), per_feature, output_size=values.numel()
    )
    bad = (values < 0) | (values >= limit)
    if not bool(bad.any()):
        return values, lengths, weights
    bad_pos = torch.nonzero(bad).flatten()
    first = int(bad_pos[0])
    f_of_first = int(torch.searchsorted(torch.cumsum(per_feature, 0), first, right=True))
    msg = (
        f"id {int(values[first])} of feature {features[f_of_first]!r} is out of range for table "
        f"{tables[f_of_first]!r} with {rows[f_of_first]} rows ({bad_pos.numel()} bad id(s) in this batch)"
    )
    f_bad = torch.searchsorted(torch.cumsum(per_feature, 0), bad_pos, right=True)
    if any(modes[int(f)] == "raise" for f in torch.unique(f_bad)):
        raise IndexError(msg + "; fix the ids, or set bounds_check='warn' / 'ignore' to drop them")
    if any(modes[int(f)] == "warn" for f in torch.unique(f_bad)):
        warnings.warn(msg + "; dropped from their bags", RuntimeWarning, stacklevel=3)
    keep = ~bad
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    new_lengths = torch.zeros_like(lengths).index_add_(0, bag, keep.to(lengths.dtype))
    return values[keep], new_lengths, weights[keep] if weights is not None else None


def in_feature_order(features: KeyedJaggedTensor, order: list[str]) -> KeyedJaggedTensor:
    """``features`` with its keys in ``order`` (extra keys dropped); ``ValueError`` naming any
    feature of ``order`` the KJT lacks."""
    if features.keys() == order:
        return features
    missing = [f for f in order if f not in features.keys()]
    if missing:
        raise ValueError(f"KJT lacks feature(s) {missing} of this collection; it has {features.keys()}")
    return features.permute([features.keys().index(f) for f in order])

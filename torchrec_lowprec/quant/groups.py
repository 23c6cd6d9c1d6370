"""Frequency ranks and frequency groups of table rows (MPE's grouping; pure tensor math)."""

from __future__ import annotations

import torch


def frequency_rank(counts: torch.Tensor) -> torch.Tensor:
    """Raw id -> frequency rank (0 = most frequent; ties keep id order), int64.

    Re-map ids with it in the data pipeline (:func:`remap_by_rank`) so that each frequency
    group of a mixed-precision table is a contiguous id range and needs no per-row map.

    Example::

        ranks = {f: frequency_rank(c) for f, c in counts.items()}
    """
    order = torch.argsort(-counts.to(torch.int64), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), dtype=order.dtype)
    return rank


def frequency_groups(
    counts: torch.Tensor, num_groups: int, min_rows_per_group: int = 16
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Split a table's frequency-ranked rows into equal-size groups (the MPE paper's grouping).

    Returns ``(group_ends, group_mass)``: group ``g`` is ranks ``[ends[g-1], ends[g])`` and
    ``mass[g]`` its share of all lookups. A table too small for ``num_groups`` groups of
    ``min_rows_per_group`` rows gets ``rows // min_rows_per_group`` groups (at least one).
    A table never looked up gets masses proportional to group sizes.
    """
    if num_groups < 1 or min_rows_per_group < 1:
        raise ValueError(f"num_groups={num_groups} and min_rows_per_group={min_rows_per_group} must be >= 1")
    rows = counts.numel()
    if rows == 0:
        raise ValueError("cannot group a table with no rows")
    g = max(1, min(num_groups, rows // min_rows_per_group))
    ends = tuple(round((i + 1) * rows / g) for i in range(g))
    cum = torch.cumsum(torch.sort(counts.to(torch.float64), descending=True).values, 0)
    total = float(cum[-1])
    if total <= 0:
        return ends, tuple((e - a) / rows for a, e in zip((0,) + ends, ends))
    at = [0.0] + [float(cum[e - 1]) for e in ends]
    return ends, tuple((at[i + 1] - at[i]) / total for i in range(g))


def table_counts(table, frequencies: dict[str, torch.Tensor], require_all: bool = False) -> torch.Tensor:
    """Lookups per row of ``table`` (an ``EmbeddingBagConfig``-like object with ``name``,
    ``num_embeddings``, ``feature_names``): the sum over the features that read it (they share
    its id space). A feature without counts adds zeros, or raises ``ValueError`` when
    ``require_all``."""
    counts = torch.zeros(table.num_embeddings, dtype=torch.int64)
    for f in table.feature_names:
        if f not in frequencies:
            if require_all:
                raise ValueError(
                    f"frequencies has no entry for feature {f!r} of table {table.name!r}; count them with "
                    "torchrec_lowprec.data.count_frequencies over the training data (or pass frequencies=None)"
                )
            continue
        c = frequencies[f]
        if c.numel() != table.num_embeddings:
            raise ValueError(
                f"frequencies[{f!r}] has {c.numel()} counts but table {table.name!r} has "
                f"{table.num_embeddings} rows"
            )
        counts += c.to(torch.int64).cpu()
    return counts

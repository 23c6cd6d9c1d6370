"""MEAN pooling as every collection applies it (pure tensor math, one home).

TorchRec divides a MEAN bag's sum by its length, an empty bag giving zeros. Our collections
pool sums (FBGEMM's IntNBit lookup, a codebook, the MPE search's expected rows) and divide
here; the low-precision collection also divides the *gradient* of a MEAN bag here, as
TorchRec's row-wise mean-pooling callback does after its reduce-scatter, so that a row's
update is the same bits sharded or not.

Example::

    cols = MeanColumns.of([True, False], dims=[8, 4])   # feature 0 MEAN, feature 1 SUM
    out = cols.divide(pooled_sums, kjt_lengths)         # [B, 12], feature-major lengths
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def bag_mean(sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``sums [N, D]`` of ``N`` bags divided by their ``lengths [N]`` (empty bags stay 0)."""
    return sums / lengths.clamp(min=1).to(sums.dtype).unsqueeze(1)


@dataclass(frozen=True)
class MeanColumns:
    """Which output columns of a pooled ``[B, C]`` output are MEAN-pooled, and the feature
    (its position in the lengths, feature-major) each column belongs to.

    ``mean`` is ``None`` when no feature is MEAN (``divide`` then returns its input).
    """

    mean: torch.Tensor | None
    feature: torch.Tensor
    n_features: int

    @classmethod
    def of(
        cls, is_mean: Sequence[bool], dims: Sequence[int], starts: Sequence[int] | None = None
    ) -> MeanColumns:
        """Feature ``i`` (MEAN if ``is_mean[i]``) owns columns ``starts[i] : starts[i] + dims[i]``
        (``starts`` default: the features side by side, in order)."""
        if starts is None:
            starts = [sum(dims[:i]) for i in range(len(dims))]
        total = max((s + d for s, d in zip(starts, dims)), default=0)
        feature = torch.zeros(total, dtype=torch.int64)
        for i, (s, d) in enumerate(zip(starts, dims)):
            feature[s : s + d] = i
        mean = torch.tensor(list(is_mean), dtype=torch.bool)[feature] if any(is_mean) else None
        return cls(mean, feature, len(dims))

    def divide(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``x [B, C]`` with its MEAN columns divided by their bag's length; ``lengths`` is
        ``[n_features * B]``, feature-major (a KJT's ``lengths()``)."""
        if self.mean is None:
            return x
        n = lengths.view(self.n_features, -1).t().clamp(min=1).to(x.dtype)
        return torch.where(self.mean.to(x.device), x / n[:, self.feature.to(x.device)], x)

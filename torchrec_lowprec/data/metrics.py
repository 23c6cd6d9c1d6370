"""AUC and log-loss for known probabilities: exact by sorting, or streaming with a bound.

``exact_auc`` is the Mann-Whitney statistic with ties counted one half (mid-ranks), i.e. the
same number ``sklearn.metrics.roc_auc_score`` gives. ``HistogramAUC`` streams: it bins the
*logit* into ``2**20`` equal bins over ``[-20, 20]`` (width ~3.8e-5), counts positives and
negatives per bin, and treats pairs inside one bin as ties; the error is therefore at most
``0.5 * sum_b pos_b * neg_b / (P * N)``, which it computes and returns with the AUC.
"""

from __future__ import annotations

import numpy as np


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` against binary ``labels``, ties counted one half.

    Example::

        exact_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))  # 0.75
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(labels).ravel() > 0.5
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    # Mid-rank of each run of equal scores: (first + last) / 2, 1-based.
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    mid = (starts + ends + 1) / 2.0
    ranks = np.repeat(mid, ends - starts)
    rank_sum = float(ranks[pos[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss_terms(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row binary cross-entropy of ``sigmoid(logits)``, computed stably from the logits."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z).
    return y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)


class HistogramAUC:
    """Streaming AUC over logits with a rigorous error bound.

    Example::

        h = HistogramAUC()
        h.update(np.array([-1.0, 0.5, 2.0]), np.array([0, 1, 1]))
        auc, bound = h.compute()
    """

    def __init__(self, num_bins: int = 1 << 20, limit: float = 20.0) -> None:
        self.num_bins = num_bins
        self.limit = limit
        self.pos = np.zeros(num_bins, np.int64)
        self.neg = np.zeros(num_bins, np.int64)

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        z = np.clip(np.asarray(logits, dtype=np.float64), -self.limit, self.limit)
        b = ((z + self.limit) * (self.num_bins / (2 * self.limit))).astype(np.int64)
        np.minimum(b, self.num_bins - 1, out=b)
        y = np.asarray(labels) > 0.5
        self.pos += np.bincount(b[y], minlength=self.num_bins)
        self.neg += np.bincount(b[~y], minlength=self.num_bins)

    def compute(self) -> tuple[float, float]:
        """``(auc, error_bound)``; NaN when a class is absent."""
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan"), float("nan")
        pos = self.pos.astype(np.float64)
        neg_below = np.cumsum(self.neg) - self.neg  # negatives in strictly lower bins
        wins = float((pos * neg_below).sum())
        ties = float((pos * self.neg).sum())
        denom = float(n_pos) * float(n_neg)
        return (wins + 0.5 * ties) / denom, 0.5 * ties / denom

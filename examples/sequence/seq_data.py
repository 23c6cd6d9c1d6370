"""Synthetic user histories with a planted click model, so the best reachable AUC is known.

The ground truth (drawn once from ``data_seed``; the model never sees it):

- every item ``i`` has a latent vector ``v_i ~ N(0, I_k)`` and a bias ``b_i ~ N(0, bias_sd²)``;
- a user's history is ``1..hist_max`` items (uniform length), each drawn from a Zipf(``zipf``)
  popularity over the items (hot items scattered over the id range by a permutation);
- the user's preference is a function of the history alone: the recency-weighted mean
  ``p = Σ_j γ^(age_j) v_(h_j) / Σ_j γ^(age_j)`` (``age`` 0 = the latest item, ``γ = decay``);
- the target item is drawn from the same popularity; the click probability is
  ``P(y=1) = sigmoid(scale · <p, v_t> + b_t + offset)`` and ``y ~ Bernoulli(P)``.

Since ``P`` is a function of the observed (history, target) pair, ranking by it is
Bayes-optimal: its AUC on a split (:meth:`SequenceData.bayes`) is the ceiling any model can
reach there, up to the sampling noise of the split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.data.metrics import exact_auc, log_loss_terms
from torchrec_lowprec.data.zipf import power_law_ranks

#: The features of a batch, in KJT key order (both read the one item table).
FEATURES = ("history", "target")


@dataclass(frozen=True)
class DataSpec:
    """What defines a synthetic data set (the same spec and seed give the same rows)."""

    num_items: int = 10_000
    latent_dim: int = 8
    hist_max: int = 20
    zipf: float = 1.05
    decay: float = 0.8
    scale: float = 1.2
    bias_sd: float = 0.5
    offset: float = -0.3
    train_rows: int = 300_000
    val_rows: int = 50_000
    test_rows: int = 50_000
    data_seed: int = 0


@dataclass
class Split:
    """One split's rows: histories as (values, lengths, offsets), targets, labels, true P."""

    hist_values: torch.Tensor  # int64 [sum(lengths)]
    hist_lengths: torch.Tensor  # int64 [rows]
    hist_offsets: torch.Tensor  # int64 [rows + 1]
    target: torch.Tensor  # int64 [rows]
    label: torch.Tensor  # float32 [rows]
    prob: np.ndarray  # float64 [rows], the true click probability

    @property
    def rows(self) -> int:
        return int(self.target.numel())

    def batch(self, rows: torch.Tensor | slice) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """The KJT (``history``, ``target``) and the labels of ``rows`` (a slice or an index)."""
        if isinstance(rows, slice):
            lo, hi = rows.start or 0, min(rows.stop, self.rows)
            lengths = self.hist_lengths[lo:hi]
            values = self.hist_values[self.hist_offsets[lo] : self.hist_offsets[hi]]
            target, label = self.target[lo:hi], self.label[lo:hi]
        else:
            lengths = self.hist_lengths[rows]
            starts = self.hist_offsets[rows]
            # the ids of each chosen row's history, in the order of ``rows``
            pos = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
                torch.cumsum(lengths, 0) - lengths, lengths
            )
            values = self.hist_values[torch.repeat_interleave(starts, lengths) + pos]
            target, label = self.target[rows], self.label[rows]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            list(FEATURES), torch.cat([values, target]), torch.cat([lengths, torch.ones_like(target)])
        )
        return kjt, label


class SequenceData:
    """The three splits of one :class:`DataSpec`, generated at construction (numpy, seeded)."""

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(spec.data_seed)
        self.item_vec = rng.standard_normal((spec.num_items, spec.latent_dim))
        self.item_bias = rng.normal(0.0, spec.bias_sd, spec.num_items)
        self._perm = rng.permutation(spec.num_items)  # popularity rank -> item id
        self.splits = {
            name: self._split(rng, n)
            for name, n in (("train", spec.train_rows), ("val", spec.val_rows), ("test", spec.test_rows))
        }

    def _items(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self._perm[power_law_ranks(rng, self.spec.num_items, self.spec.zipf, n)]

    def _split(self, rng: np.random.Generator, rows: int) -> Split:
        s = self.spec
        lengths = rng.integers(1, s.hist_max + 1, rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        hist = self._items(rng, int(offsets[-1]))
        target = self._items(rng, rows)
        # age of each history position: 0 for the latest (last) item of its row
        row_of = np.repeat(np.arange(rows), lengths)
        age = offsets[row_of + 1] - 1 - np.arange(hist.size)
        w = s.decay**age
        pref = np.zeros((rows, s.latent_dim))
        np.add.at(pref, row_of, w[:, None] * self.item_vec[hist])
        pref /= np.bincount(row_of, weights=w, minlength=rows)[:, None]
        logit = (
            s.scale * np.einsum("rk,rk->r", pref, self.item_vec[target]) + self.item_bias[target] + s.offset
        )
        prob = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.random(rows) < prob).astype(np.float32)
        return Split(
            torch.from_numpy(hist.astype(np.int64)),
            torch.from_numpy(lengths.astype(np.int64)),
            torch.from_numpy(offsets.astype(np.int64)),
            torch.from_numpy(target.astype(np.int64)),
            torch.from_numpy(label),
            prob,
        )

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
        """One epoch of shuffled training batches ``(kjt, labels)`` (the order from ``generator``)."""
        split = self.splits["train"]
        order = torch.randperm(split.rows, generator=generator)
        for lo in range(0, split.rows, batch_size):
            yield split.batch(order[lo : lo + batch_size])

    def bayes(self, split: str) -> dict[str, float]:
        """AUC and log-loss of the true probabilities on ``split``: the ceiling."""
        sp = self.splits[split]
        p = np.clip(sp.prob, 1e-12, 1 - 1e-12)
        logits = np.log(p) - np.log1p(-p)
        labels = sp.label.numpy()
        return {"auc": exact_auc(sp.prob, labels), "logloss": float(log_loss_terms(logits, labels).mean())}

    def describe(self) -> dict:
        """The spec and a few facts of the generated rows, for the summary."""
        tr = self.splits["train"]
        return {
            **self.spec.__dict__,
            "mean_hist_len": float(tr.hist_lengths.float().mean()),
            "train_ctr": float(tr.label.mean()),
            "distinct_train_items": int(torch.unique(torch.cat([tr.hist_values, tr.target])).numel()),
        }

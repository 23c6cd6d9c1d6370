"""Criteo-shaped synthetic CTR data from a planted model, so the best possible AUC is known.

Each row has ``num_dense`` standard-normal dense features and one bag of ids per categorical
field. Ids follow a power law over the field's vocabulary (rank ``k`` has probability close
to ``(k+1)**-s``; see :func:`power_law_ranks`), and unless ``rank_ordered_ids`` a fixed
per-field permutation maps popularity rank to id, so id 0 is not the most popular one.

The label of a row is ``Bernoulli(sigmoid(logit))`` with::

    logit = bias + sum_f mean_{i in bag_f} e_f[i]                      (per-id effects)
                 + sum_{f<g} <mean_{i in bag_f} u_f[i], mean_{j in bag_g} u_g[j]>  (rank-r)
                 + w . dense

``e_f`` and ``u_f`` are drawn once from the seed (normal), then centred and rescaled under
the field's id distribution so that, over rows, ``e_f`` has mean 0 and standard deviation
``s_f`` (``effect_scale`` spread over 0.5x..1.5x across fields) and each coordinate of
``u_f`` mean 0 and std ``tau``, with ``tau`` set so the pairwise term has standard deviation
``interaction_scale`` on one-hot rows; ``|w| = dense_scale``. (Bags average, so multi-hot
fields contribute less variance than one-hot ones.) Since ``sigmoid(logit)`` *is* the
probability of a click, scoring with it is Bayes-optimal: :meth:`SyntheticCTR.bayes_metrics`
gives its AUC and log-loss on the generated split, which no model trained on the data can
beat except by noise.

Rows are generated in chunks of ``chunk_rows``; chunk ``k`` of a split draws from a generator
seeded by ``(seed, split, k)``, so a split streams in bounded memory, any chunk can be
regenerated alone, and the row stream is the same whatever the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.datasets.utils import Batch

from .common import RowBlock, embedding_bag_configs, rebatch, split_index
from .metrics import HistogramAUC, exact_auc, log_loss_terms
from .zipf import power_law_pmf, power_law_ranks

# Criteo Kaggle's per-field cardinalities (as reported for DLRM's preprocessing), capped at
# 1M so every field's ground-truth parameters stay small; the shape (3 to 1M ids) is what
# matters for low-precision tables: a few huge, mostly-rare fields and many small ones.
CRITEO_LIKE_VOCAB_SIZES: tuple[int, ...] = (
    1460, 583, 1_000_000, 1_000_000, 305, 24, 12517, 633, 3, 93145, 5683, 1_000_000, 3194,
    27, 14992, 1_000_000, 10, 5652, 2173, 4, 1_000_000, 18, 15, 286181, 105, 142572,
)  # fmt: skip
SORT_AUC_MAX_ROWS = 20_000_000


def _per_field(value, n: int, name: str, cast) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"SyntheticCTRConfig.{name} has {len(value)} entries for {n} fields")
        return tuple(cast(v) for v in value)
    return tuple(cast(value) for _ in range(n))


@dataclass(frozen=True)
class SyntheticCTRConfig:
    """Shape, skew, planted model and split sizes of a synthetic CTR data set.

    Per-field options take one value for every field or a tuple with one per field.
    The defaults (26 Criteo-like fields, one-hot, Zipf 1.1, 13 dense) are calibrated to a
    Bayes AUC of 0.799-0.800 with 28.8% positives and a Bayes log-loss of 0.474 (seeds 0-2).

    Example::

        cfg = SyntheticCTRConfig(vocab_sizes=(1000, 50, 20000), num_dense=4,
                                 bag_max=(1, 1, 5), train_rows=100_000, seed=7)
    """

    vocab_sizes: tuple[int, ...] = CRITEO_LIKE_VOCAB_SIZES
    zipf_exponents: float | tuple[float, ...] = 1.1
    bag_min: int | tuple[int, ...] = 1
    bag_max: int | tuple[int, ...] = 1
    num_dense: int = 13
    feature_names: tuple[str, ...] | None = None
    rank_ordered_ids: bool = False
    latent_rank: int = 4
    bias: float = -1.2
    effect_scale: float | tuple[float, ...] = 0.2
    interaction_scale: float = 0.6
    dense_scale: float = 0.6
    train_rows: int = 4_000_000
    val_rows: int = 500_000
    test_rows: int = 500_000
    chunk_rows: int = 65_536
    seed: int = 0

    def __post_init__(self) -> None:
        n = len(self.vocab_sizes)
        if n == 0 or any(int(v) < 1 for v in self.vocab_sizes):
            raise ValueError("SyntheticCTRConfig.vocab_sizes needs at least one field, each with >= 1 id")
        setattr_ = object.__setattr__
        setattr_(self, "vocab_sizes", tuple(int(v) for v in self.vocab_sizes))
        setattr_(self, "zipf_exponents", _per_field(self.zipf_exponents, n, "zipf_exponents", float))
        setattr_(self, "bag_min", _per_field(self.bag_min, n, "bag_min", int))
        setattr_(self, "bag_max", _per_field(self.bag_max, n, "bag_max", int))
        if self.feature_names is None:
            setattr_(self, "feature_names", tuple(f"cat_{i}" for i in range(n)))
        setattr_(self, "feature_names", tuple(self.feature_names))
        if len(self.feature_names) != n or len(set(self.feature_names)) != n:
            raise ValueError("SyntheticCTRConfig.feature_names must be distinct, one per field")
        if not isinstance(self.effect_scale, (int, float)):
            setattr_(self, "effect_scale", _per_field(self.effect_scale, n, "effect_scale", float))
        for lo, hi in zip(self.bag_min, self.bag_max):
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError(f"bag lengths need 0 <= bag_min <= bag_max and bag_max >= 1, got {lo}..{hi}")
        if any(s < 0 for s in self.zipf_exponents):
            raise ValueError("zipf_exponents must be >= 0 (0 = uniform)")
        if self.num_dense < 0 or self.latent_rank < 1 or self.chunk_rows < 1:
            raise ValueError("num_dense >= 0, latent_rank >= 1 and chunk_rows >= 1 are required")
        if min(self.train_rows, self.val_rows, self.test_rows) < 0:
            raise ValueError("split sizes must be >= 0")

    def split_rows(self, split: str) -> int:
        """Number of rows of ``split``."""
        return (self.train_rows, self.val_rows, self.test_rows)[split_index(split)]


@dataclass
class GroundTruth:
    """The planted model, indexed by public id: ``effects[f][id]``, ``latents[f][id]`` ([V, r])."""

    bias: float
    field_scales: np.ndarray
    latent_std: float
    effects: list[np.ndarray] = field(repr=False)
    latents: list[np.ndarray] = field(repr=False)
    dense_weights: np.ndarray = field(repr=False)
    rank_to_id: list[np.ndarray | None] = field(repr=False)


def _standardize(x: np.ndarray, pmf: np.ndarray, std: float) -> np.ndarray:
    """``x`` (``[V]`` or ``[V, r]``) shifted to mean 0 and scaled to per-coordinate ``std`` under ``pmf``."""
    x64 = x.astype(np.float64)
    x64 -= pmf @ x64
    var = float(pmf @ (x64 * x64 if x64.ndim == 1 else (x64 * x64).mean(1)))
    if var > 1e-24:
        x64 *= std / math.sqrt(var)
    return x64.astype(np.float32)


def _bag_means(values: np.ndarray, lengths: np.ndarray, n: int, table: np.ndarray) -> np.ndarray:
    """Mean of ``table[values]`` over each bag (0 for an empty bag); ``[n, ...]`` float64."""
    rows = table[values].astype(np.float64)
    if rows.shape[0] == n and (lengths == 1).all():
        return rows
    owner = np.repeat(np.arange(n), lengths)
    denom = np.maximum(lengths, 1).astype(np.float64)
    if rows.ndim == 1:
        return np.bincount(owner, weights=rows, minlength=n) / denom
    cols = [np.bincount(owner, weights=rows[:, c], minlength=n) for c in range(rows.shape[1])]
    return np.stack(cols, axis=1) / denom[:, None]


class SyntheticCTR:
    """A deterministic stream of synthetic CTR batches with known Bayes-optimal metrics.

    Example::

        data = SyntheticCTR(SyntheticCTRConfig(train_rows=100_000, seed=1))
        for batch in data.batches("train", batch_size=4096):
            ...  # batch.dense_features, batch.sparse_features (KJT), batch.labels
        data.bayes_metrics("test")  # {'auc': 0.80..., 'logloss': 0.47..., ...}
        tables = data.embedding_bag_configs(dim=16)
    """

    def __init__(self, config: SyntheticCTRConfig | None = None) -> None:
        self.config = config or SyntheticCTRConfig()
        self.truth = self._draw_truth()
        self._metrics: dict[tuple[str, str], dict] = {}

    @property
    def feature_names(self) -> list[str]:
        return list(self.config.feature_names)

    @property
    def vocab_sizes(self) -> dict[str, int]:
        return dict(zip(self.config.feature_names, self.config.vocab_sizes))

    @property
    def num_dense(self) -> int:
        return self.config.num_dense

    def split_rows(self, split: str) -> int:
        return self.config.split_rows(split)

    def embedding_bag_configs(
        self, dim: int, pooling: PoolingType = PoolingType.SUM
    ) -> list[EmbeddingBagConfig]:
        """One table ``t_<field>`` per field, sized to the field's vocabulary."""
        return embedding_bag_configs(self.vocab_sizes, dim, pooling)

    # ----------------------------------------------------------------------------- truth
    def _draw_truth(self) -> GroundTruth:
        cfg = self.config
        n_fields = len(cfg.vocab_sizes)
        top = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
        if isinstance(cfg.effect_scale, tuple):
            scales = np.array(cfg.effect_scale, np.float64)
        else:
            # Fields differ in how much they matter, as real ones do; a shuffled fixed spread
            # (not random draws) keeps the total, hence the Bayes AUC, the same for every seed.
            spread = np.linspace(0.5, 1.5, n_fields) if n_fields > 1 else np.ones(1)
            scales = cfg.effect_scale * top.permutation(spread)
        dense_w = top.standard_normal(cfg.num_dense)
        if cfg.num_dense:
            dense_w *= cfg.dense_scale / max(np.linalg.norm(dense_w), 1e-12)
        pairs = n_fields * (n_fields - 1) // 2
        tau = (cfg.interaction_scale**2 / (pairs * cfg.latent_rank)) ** 0.25 if pairs else 0.0
        effects, latents, rank_to_id = [], [], []
        for f, vocab in enumerate(cfg.vocab_sizes):
            # One generator per field: changing one field's size leaves the others' draws alone.
            rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0, 1 + f)))
            eff = (rng.standard_normal(vocab, dtype=np.float32) * np.float32(scales[f])).astype(np.float32)
            lat = rng.standard_normal((vocab, cfg.latent_rank), dtype=np.float32) * np.float32(tau)
            perm = rng.permutation(vocab).astype(np.int32 if vocab < 2**31 else np.int64)
            # Centre and rescale both under the id distribution: with a skewed field a few head
            # ids carry most rows, so raw draws move the mean logit by ~0.6 between seeds
            # (positive rate 19%..30%) and the Bayes AUC by ~0.02.
            pmf = power_law_pmf(vocab, cfg.zipf_exponents[f])
            eff, lat = _standardize(eff, pmf, scales[f]), _standardize(lat, pmf, tau)
            if cfg.rank_ordered_ids:
                rank_to_id.append(None)
            else:
                # Parameters are drawn per rank; store them per id so lookups take ids.
                eff_id, lat_id = np.empty_like(eff), np.empty_like(lat)
                eff_id[perm], lat_id[perm] = eff, lat
                eff, lat = eff_id, lat_id
                rank_to_id.append(perm)
            effects.append(eff)
            latents.append(lat)
        return GroundTruth(cfg.bias, scales, tau, effects, latents, dense_w, rank_to_id)

    def _components(
        self, dense: np.ndarray, lengths: Sequence[np.ndarray], values: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = dense.shape[0]
        t = self.truth
        effects = np.empty((n, len(lengths)), np.float64)
        total = np.zeros((n, self.config.latent_rank), np.float64)
        sq = np.zeros(n, np.float64)
        for f, (lens, vals) in enumerate(zip(lengths, values)):
            effects[:, f] = _bag_means(vals, lens, n, t.effects[f])
            u = _bag_means(vals, lens, n, t.latents[f])
            total += u
            sq += np.einsum("ij,ij->i", u, u)
        # sum_{f<g} <u_f, u_g> = (|sum_f u_f|^2 - sum_f |u_f|^2) / 2
        inter = 0.5 * (np.einsum("ij,ij->i", total, total) - sq)
        dense_term = dense.astype(np.float64) @ t.dense_weights if dense.shape[1] else np.zeros(n)
        return effects, inter, dense_term

    def logit_components(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The planted model's terms for a batch: ``field_effects [B, F]``, ``interaction [B]``,
        ``dense [B]`` (float64). ``logit = bias + field_effects.sum(1) + interaction + dense``."""
        kjt: KeyedJaggedTensor = batch.sparse_features
        if list(kjt.keys()) != self.feature_names:
            raise ValueError(f"batch keys {kjt.keys()} are not this data set's {self.feature_names}")
        per_key = kjt.values().split(kjt.length_per_key())
        lengths = kjt.lengths().view(len(self.feature_names), -1).numpy()
        effects, inter, dense = self._components(
            batch.dense_features.numpy(), list(lengths), [v.numpy() for v in per_key]
        )
        return {
            "field_effects": torch.from_numpy(effects),
            "interaction": torch.from_numpy(inter),
            "dense": torch.from_numpy(dense),
        }

    def true_logits(self, batch: Batch) -> torch.Tensor:
        """The planted logit of each row of ``batch`` (float64 ``[B]``)."""
        c = self.logit_components(batch)
        return self.truth.bias + c["field_effects"].sum(1) + c["interaction"] + c["dense"]

    # ------------------------------------------------------------------------- generation
    def num_chunks(self, split: str, num_rows: int | None = None) -> int:
        rows = self._rows(split, num_rows)
        return -(-rows // self.config.chunk_rows)

    def _rows(self, split: str, num_rows: int | None) -> int:
        total = self.config.split_rows(split)
        if num_rows is None:
            return total
        if not 0 <= num_rows <= total:
            raise ValueError(f"num_rows={num_rows} outside [0, {total}] for split {split!r}")
        return num_rows

    def chunk(self, split: str, k: int) -> tuple[RowBlock, np.ndarray]:
        """Chunk ``k`` of ``split`` and its true logits; regenerable on its own."""
        cfg = self.config
        s = split_index(split)
        start = k * cfg.chunk_rows
        n = min(cfg.chunk_rows, cfg.split_rows(split) - start)
        if k < 0 or n <= 0:
            raise IndexError(f"chunk {k} is outside split {split!r}")
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1 + s, k)))
        lengths, values = [], []
        for f, vocab in enumerate(cfg.vocab_sizes):
            lo, hi = cfg.bag_min[f], cfg.bag_max[f]
            lens = np.full(n, lo, np.int32) if lo == hi else rng.integers(lo, hi + 1, n, dtype=np.int32)
            ranks = power_law_ranks(rng, vocab, cfg.zipf_exponents[f], int(lens.sum()))
            perm = self.truth.rank_to_id[f]
            lengths.append(lens)
            values.append(ranks if perm is None else perm[ranks].astype(np.int64))
        dense = rng.standard_normal((n, cfg.num_dense), dtype=np.float32)
        effects, inter, dense_term = self._components(dense, lengths, values)
        logits = cfg.bias + effects.sum(1) + inter + dense_term
        labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return RowBlock(dense, lengths, values, labels), logits

    def _chunks(self, split: str, num_rows: int | None) -> Iterator[tuple[RowBlock, np.ndarray]]:
        rows = self._rows(split, num_rows)
        for k in range(self.num_chunks(split, rows)):
            block, logits = self.chunk(split, k)
            keep = min(len(block), rows - k * self.config.chunk_rows)
            if keep < len(block):
                block, logits = block.slice(0, keep), logits[:keep]
            yield block, logits

    def batches(
        self, split: str, batch_size: int, num_rows: int | None = None, drop_last: bool = False
    ) -> Iterator[Batch]:
        """Batches over the first ``num_rows`` rows (default all) of ``split``, in row order."""
        blocks = (block for block, _ in self._chunks(split, num_rows))
        keys = self.feature_names
        for block in rebatch(blocks, batch_size, drop_last):
            yield block.to_batch(keys)

    def true_probabilities(self, split: str, num_rows: int | None = None) -> torch.Tensor:
        """``P(click)`` of every row of the split, in row order (float64, held in memory)."""
        logits = [lg for _, lg in self._chunks(split, num_rows)]
        z = np.concatenate(logits) if logits else np.zeros(0)
        return torch.sigmoid(torch.from_numpy(z))

    def bayes_metrics(self, split: str, method: str = "auto") -> dict[str, float]:
        """AUC and mean log-loss of the true probabilities on ``split`` (streamed).

        ``method="sort"`` gives the exact AUC (mid-rank ties; holds 9 bytes per row),
        ``"histogram"`` a streaming one over 2**20 logit bins whose error is at most the
        returned ``auc_error_bound`` (0 for ``sort``); ``"auto"`` sorts up to 20M rows.
        Returns ``auc, logloss, positive_rate, num_rows, auc_error_bound``.
        """
        rows = self.config.split_rows(split)
        if method == "auto":
            method = "sort" if rows <= SORT_AUC_MAX_ROWS else "histogram"
        if method not in ("sort", "histogram"):
            raise ValueError(f"method must be 'auto', 'sort' or 'histogram', got {method!r}")
        key = (split, method)
        if key not in self._metrics:
            self._metrics[key] = self._compute_metrics(split, method)
        return dict(self._metrics[key])

    def _compute_metrics(self, split: str, method: str) -> dict[str, float]:
        loss_sum, pos, n = 0.0, 0, 0
        hist = HistogramAUC() if method == "histogram" else None
        kept_z, kept_y = [], []
        for block, logits in self._chunks(split, None):
            y = block.labels
            loss_sum += float(log_loss_terms(logits, y).sum())
            pos += int(y.sum())
            n += len(y)
            if hist is not None:
                hist.update(logits, y)
            else:
                kept_z.append(logits)
                kept_y.append(y.astype(bool))
        if hist is not None:
            auc, bound = hist.compute()
        else:
            z = np.concatenate(kept_z) if kept_z else np.zeros(0)
            y = np.concatenate(kept_y) if kept_y else np.zeros(0, bool)
            # Logits rank rows exactly as the probabilities do, without sigmoid's saturation.
            auc, bound = exact_auc(z, y), 0.0
        return {
            "auc": auc,
            "logloss": loss_sum / max(n, 1),
            "positive_rate": pos / max(n, 1),
            "num_rows": float(n),
            "auc_error_bound": bound,
        }

"""Frequency counting, re-batching, and the AUC helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchrec_lowprec.data import (
    HistogramAUC,
    RowBlock,
    SyntheticCTR,
    SyntheticCTRConfig,
    count_frequencies,
    exact_auc,
    load_frequencies,
    rebatch,
    save_frequencies,
)


def small_data() -> SyntheticCTR:
    cfg = SyntheticCTRConfig(
        vocab_sizes=(300, 20, 5000), bag_max=(1, 3, 2), num_dense=2, train_rows=6000, val_rows=0, test_rows=0,
        chunk_rows=1000,
    )  # fmt: skip
    return SyntheticCTR(cfg)


def test_count_frequencies_matches_bincount_and_round_trips(tmp_path):
    data = small_data()
    counts = count_frequencies(data.batches("train", 512), data.vocab_sizes)
    all_batches = list(data.batches("train", 6000))
    for name, rows in data.vocab_sizes.items():
        ids = torch.cat([b.sparse_features[name].values() for b in all_batches])
        assert counts[name].dtype == torch.int64 and counts[name].shape == (rows,)
        assert torch.equal(counts[name], torch.bincount(ids, minlength=rows))
    only = count_frequencies(data.batches("train", 512), {"cat_1": 20})
    assert list(only) == ["cat_1"] and torch.equal(only["cat_1"], counts["cat_1"])
    save_frequencies(counts, tmp_path / "f.pt")
    back = load_frequencies(tmp_path / "f.pt")
    assert back.keys() == counts.keys() and all(torch.equal(back[k], counts[k]) for k in counts)
    with pytest.raises(ValueError, match="outside"):
        count_frequencies(data.batches("train", 512), {"cat_2": 10})
    with pytest.raises(ValueError, match="no feature"):
        count_frequencies(data.batches("train", 512), {"nope": 10})
    with pytest.raises(FileNotFoundError):
        load_frequencies(tmp_path / "none.pt")


def test_rebatch_keeps_rows_in_order():
    rng = np.random.default_rng(0)
    blocks, total = [], 0
    for _ in range(7):
        n = int(rng.integers(0, 50))
        lens = rng.integers(0, 3, n).astype(np.int32)
        vals = np.arange(total * 10, total * 10 + int(lens.sum()))
        blocks.append(
            RowBlock(
                np.arange(total, total + n, dtype=np.float32)[:, None],
                [lens],
                [vals],
                np.zeros(n, np.float32),
            )
        )
        total += n
    whole = RowBlock.concat(blocks)
    out = list(rebatch(blocks, 16))
    assert [len(b) for b in out] == [16] * (total // 16) + ([total % 16] if total % 16 else [])
    again = RowBlock.concat(out)
    assert np.array_equal(again.dense, whole.dense) and np.array_equal(again.values[0], whole.values[0])
    assert np.array_equal(again.lengths[0], whole.lengths[0])
    assert [len(b) for b in rebatch(blocks, 16, drop_last=True)] == [16] * (total // 16)


def test_exact_auc_with_ties_and_histogram_bound():
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.4])
    labels = np.array([0, 0, 1, 1, 1, 0])
    # Pairs (pos, neg): 3 positives x 3 negatives; brute force with ties = 1/2.
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert exact_auc(scores, labels) == pytest.approx(brute, abs=1e-15)
    rng = np.random.default_rng(1)
    z = rng.normal(size=50_000)
    y = rng.random(50_000) < 1 / (1 + np.exp(-z))
    h = HistogramAUC()
    h.update(z[:20_000], y[:20_000])
    h.update(z[20_000:], y[20_000:])
    auc, bound = h.compute()
    assert 0 < bound < 1e-3 and abs(auc - exact_auc(z, y)) <= bound

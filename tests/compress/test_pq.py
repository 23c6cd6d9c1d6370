"""MEC code learning: popularity weighting, code balance, determinism, bad parameters."""

from __future__ import annotations

import pytest
import torch

from torchrec_lowprec.compress import CodebookConfig, code_entropy, learn_pq, popularity_weights, reconstruct


def _zipf_table(n=2000, dim=8, seed=0, accesses=2e4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    counts = (accesses * ranks**-1.1 / (ranks**-1.1).sum()).floor().to(torch.int64)
    return x, counts


def test_popularity_weighting_lowers_the_error_of_frequent_rows():
    x, counts = _zipf_table()
    top = torch.arange(30)  # the 1.5% most frequent rows (~45% of all accesses)
    top_err, access_err, all_err = {}, {}, {}
    for mode in ("log", "count", "uniform"):
        cfg = CodebookConfig(num_subspaces=2, codebook_size=32, steps=100, popularity=mode, seed=1)
        res = learn_pq(x, counts, cfg)
        err = ((reconstruct(res.codes, res.codebooks) - x) ** 2).sum(1)
        top_err[mode] = float(err[top].mean())
        access_err[mode] = float((err * counts).sum() / counts.sum())
        all_err[mode] = float(err.mean())
    # Measured: top rows 1.57 (log) / 0.51 (count) / 1.81 (uniform).
    assert top_err["log"] < 0.9 * top_err["uniform"], top_err
    assert top_err["count"] < 0.4 * top_err["uniform"], top_err
    # The error the model sees (per access) follows; the plain row average pays a little.
    assert access_err["count"] < access_err["log"] < access_err["uniform"], access_err
    assert all_err["log"] < 1.02 * all_err["uniform"] and all_err["count"] < 1.2 * all_err["uniform"], all_err


def test_balance_term_spreads_code_usage():
    x, counts = _zipf_table(n=2000)
    ent = {}
    for bw in (0.0, 1.0):
        # Random codewords off the data: without a balance term most of them are never used.
        cfg = CodebookConfig(
            num_subspaces=2, codebook_size=16, steps=300, init="random", balance_weight=bw,
            contrastive_weight=0.0, refit=False, seed=2,
        )  # fmt: skip
        ent[bw] = sum(learn_pq(x, counts, cfg).entropy_bits) / 2
    assert ent[1.0] > ent[0.0] + 0.3, ent


def test_contrastive_negatives_differ_and_the_term_does_not_hurt():
    x, counts = _zipf_table(n=2000)
    base = CodebookConfig(num_subspaces=2, codebook_size=16, steps=150, contrastive_weight=0.0, seed=3)
    with_c = CodebookConfig(num_subspaces=2, codebook_size=16, steps=150, contrastive_weight=0.5, seed=3)
    a, b = learn_pq(x, counts, base), learn_pq(x, counts, with_c)
    assert b.weighted_mse < 1.05 * a.weighted_mse
    assert min(b.entropy_bits) > 3.5  # of log2(16) = 4


def test_learning_is_deterministic_and_codes_are_narrow():
    x, counts = _zipf_table(n=1000, dim=16)
    cfg = CodebookConfig(num_subspaces=4, codebook_size=8, steps=30, seed=5)
    a, b = learn_pq(x, counts, cfg), learn_pq(x, counts, cfg)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
    assert a.codes.dtype == torch.uint8 and a.codes.shape == (1000, 4)
    assert a.codebooks.shape == (4, 8, 4)
    big = learn_pq(
        x[:600], counts[:600], CodebookConfig(num_subspaces=4, codebook_size=512, steps=2, kmeans_iters=1)
    )
    assert big.codes.dtype == torch.uint16 and int(big.codes.to(torch.int64).max()) < 512


def test_learned_codes_beat_kmeans_alone():
    x, counts = _zipf_table(n=2000)
    km = learn_pq(x, counts, CodebookConfig(num_subspaces=2, codebook_size=16, steps=0, seed=4))
    learned = learn_pq(x, counts, CodebookConfig(num_subspaces=2, codebook_size=16, steps=200, seed=4))
    # Measured: weighted error 1.656 vs 1.681, entropy 3.88 vs 3.81 bits (of 4).
    assert learned.weighted_mse < 0.995 * km.weighted_mse
    assert sum(learned.entropy_bits) > sum(km.entropy_bits)


def test_helpers():
    w = popularity_weights(torch.tensor([0, 1, 9]), 3, "log")
    torch.testing.assert_close(w, 1 + torch.log1p(torch.tensor([0.0, 1.0, 9.0])))
    assert torch.equal(popularity_weights(None, 3, "log"), torch.ones(3))
    with pytest.raises(ValueError, match="3 entries for a table of 4 rows"):
        popularity_weights(torch.ones(3), 4, "log")
    ent = code_entropy(torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0]]), 4)
    torch.testing.assert_close(ent, torch.tensor([2.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"codebook_size": 100}, r"codebook_size=100 must be a power of two > 1"),
        ({"codebook_size": 1}, r"codebook_size=1 must be a power of two"),
        ({"codebook_size": 2**17}, r"codebook_size=131072 exceeds 65536"),
        ({"num_subspaces": 0}, r"num_subspaces=0 must be an int >= 1"),
        ({"lr": 0.0}, r"lr=0.0 must be finite and > 0"),
        ({"balance_weight": -1.0}, r"balance_weight=-1.0 must be finite and >= 0"),
        (
            {"popularity": "sqrt"},
            r"popularity='sqrt' is not supported; allowed: \['log', 'count', 'uniform'\]",
        ),
        ({"init": "pca"}, r"init='pca' is not supported"),
        ({"batch_size": 0}, r"batch_size=0 must be an int >= 1"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookConfig(**kwargs)


def test_subspaces_must_divide_the_dim():
    with pytest.raises(
        ValueError, match=r"num_subspaces=3 does not divide embedding_dim=8 .*choose one of \[1, 2, 4, 8\]"
    ):
        learn_pq(torch.randn(10, 8), None, CodebookConfig(num_subspaces=3))

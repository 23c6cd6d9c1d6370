"""Synthetic CTR data: determinism, streaming, known Bayes metrics, skew, KJT shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchrec_lowprec.data import (
    SyntheticCTR,
    SyntheticCTRConfig,
    exact_auc,
    log_loss_terms,
    power_law_pmf,
)


def small_config(**kw) -> SyntheticCTRConfig:
    base = dict(
        vocab_sizes=(1000, 50, 20000, 7, 3000),
        bag_min=(1, 1, 0, 1, 2),
        bag_max=(1, 1, 4, 1, 6),
        num_dense=3,
        train_rows=20_000,
        val_rows=3_000,
        test_rows=5_000,
        chunk_rows=4096,
        seed=11,
    )
    base.update(kw)
    return SyntheticCTRConfig(**base)


def flatten(batches):
    """Concatenate a batch stream into (dense, per-feature lengths, per-feature values, labels)."""
    dense, labels, lengths, values = [], [], {}, {}
    for b in batches:
        dense.append(b.dense_features)
        labels.append(b.labels)
        for k, jt in b.sparse_features.to_dict().items():
            lengths.setdefault(k, []).append(jt.lengths())
            values.setdefault(k, []).append(jt.values())
    cat = torch.cat
    return (
        cat(dense),
        {k: cat(v) for k, v in lengths.items()},
        {k: cat(v) for k, v in values.items()},
        cat(labels),
    )


def assert_streams_equal(a, b):
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[3], b[3])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
        assert torch.equal(a[2][k], b[2][k]), k


def test_same_seed_same_batches_and_batch_size_does_not_change_the_stream():
    cfg = small_config()
    one = flatten(SyntheticCTR(cfg).batches("val", 512))
    again = flatten(SyntheticCTR(cfg).batches("val", 512))
    other_size = flatten(SyntheticCTR(cfg).batches("val", 37))
    assert one[3].numel() == cfg.val_rows
    assert_streams_equal(one, again)
    assert_streams_equal(one, other_size)
    different = flatten(SyntheticCTR(small_config(seed=12)).batches("val", 512))
    assert not torch.equal(one[0], different[0])
    # Splits are different streams.
    test = flatten(SyntheticCTR(cfg).batches("test", 512, num_rows=cfg.val_rows))
    assert not torch.equal(one[0], test[0])


def test_any_chunk_regenerates_alone_and_num_rows_is_a_prefix():
    data = SyntheticCTR(small_config())
    full = flatten(data.batches("train", 1000))
    block, _ = SyntheticCTR(small_config()).chunk("train", 2)
    start = 2 * 4096
    assert np.array_equal(block.dense, full[0][start : start + 4096].numpy())
    assert np.array_equal(block.labels, full[3][start : start + 4096].numpy())
    prefix = flatten(data.batches("train", 300, num_rows=5000))
    assert torch.equal(prefix[0], full[0][:5000])
    with pytest.raises(ValueError):
        next(data.batches("train", 10, num_rows=10**9))
    with pytest.raises(ValueError):
        next(data.batches("dev", 10))


def test_kjt_layout_and_multi_hot_lengths():
    cfg = small_config()
    data = SyntheticCTR(cfg)
    batches = list(data.batches("test", 1024, drop_last=True))
    assert len(batches) == cfg.test_rows // 1024
    for b in batches:
        kjt = b.sparse_features
        B = 1024
        assert b.dense_features.shape == (B, 3) and b.dense_features.dtype == torch.float32
        assert b.labels.shape == (B,) and b.labels.dtype == torch.float32
        assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
        assert kjt.keys() == data.feature_names == ["cat_0", "cat_1", "cat_2", "cat_3", "cat_4"]
        assert kjt.lengths().numel() == len(data.feature_names) * B
        assert torch.equal(kjt.offsets()[1:], torch.cumsum(kjt.lengths(), 0).to(kjt.offsets().dtype))
        assert int(kjt.offsets()[-1]) == kjt.values().numel() == sum(kjt.length_per_key())
        for f, (k, jt) in enumerate(kjt.to_dict().items()):
            lens = jt.lengths()
            assert int(lens.min()) >= cfg.bag_min[f] and int(lens.max()) <= cfg.bag_max[f]
            assert int(jt.values().min()) >= 0 and int(jt.values().max()) < data.vocab_sizes[k]
    # Variable bags really vary, and an empty bag (bag_min=0) occurs.
    lens2 = torch.cat([b.sparse_features["cat_2"].lengths() for b in batches])
    assert set(lens2.unique().tolist()) == {0, 1, 2, 3, 4}


def test_bayes_metrics_of_the_default_config_are_calibrated_and_exact():
    cfg = SyntheticCTRConfig(train_rows=0, val_rows=0, test_rows=200_000)
    data = SyntheticCTR(cfg)
    m = data.bayes_metrics("test")
    assert 0.78 <= m["auc"] <= 0.82
    assert 0.25 <= m["positive_rate"] <= 0.35
    assert m["num_rows"] == 200_000 and m["auc_error_bound"] == 0.0

    p = data.true_probabilities("test")
    labels = torch.cat([b.labels for b in data.batches("test", 50_000)])
    assert p.shape == labels.shape == (200_000,)
    assert abs(exact_auc(p.numpy(), labels.numpy()) - m["auc"]) < 1e-12
    logloss = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean().item()
    assert abs(logloss - m["logloss"]) < 1e-9
    assert abs(labels.double().mean().item() - m["positive_rate"]) < 1e-12
    try:
        from torchmetrics.classification import BinaryAUROC
    except ImportError:  # the sort-based cross-check above stands alone
        BinaryAUROC = None
    if BinaryAUROC is not None:
        metric = BinaryAUROC()
        metric.update(p, labels.long())
        assert abs(metric.compute().item() - m["auc"]) < 1e-6

    h = data.bayes_metrics("test", method="histogram")
    assert 0 < h["auc_error_bound"] < 1e-4
    assert abs(h["auc"] - m["auc"]) <= h["auc_error_bound"] + 1e-12
    assert h["logloss"] == pytest.approx(m["logloss"], abs=1e-12)


def test_true_logits_of_a_batch_match_the_generated_probabilities():
    data = SyntheticCTR(small_config())
    p = data.true_probabilities("val")
    got = torch.cat([torch.sigmoid(data.true_logits(b)) for b in data.batches("val", 700)])
    assert torch.allclose(got, p, rtol=0, atol=1e-12)


def test_logistic_model_on_true_features_reaches_but_does_not_beat_bayes():
    cfg = small_config(train_rows=60_000, test_rows=60_000, chunk_rows=20_000)
    data = SyntheticCTR(cfg)

    def features(split):
        xs, ys, zs = [], [], []
        for b in data.batches(split, 20_000):
            c = data.logit_components(b)
            xs.append(
                torch.cat([c["field_effects"], c["interaction"][:, None], b.dense_features.double()], 1)
            )
            ys.append(b.labels.double())
            zs.append(data.true_logits(b))
        return torch.cat(xs), torch.cat(ys), torch.cat(zs)

    x, y, _ = features("train")
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b0 = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b0], max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-10)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b0, y)
        loss.backward()
        return loss

    opt.step(closure)
    xt, yt, zt = features("test")
    with torch.no_grad():
        fitted = log_loss_terms((xt @ w + b0).numpy(), yt.numpy())
    bayes = log_loss_terms(zt.numpy(), yt.numpy())
    assert bayes.mean() == pytest.approx(data.bayes_metrics("test")["logloss"], abs=1e-12)
    diff = fitted - bayes
    se = diff.std() / np.sqrt(diff.size)
    assert diff.mean() > -3 * se  # cannot beat the true probabilities beyond noise
    assert diff.mean() < 2e-3  # and the planted features explain the labels
    # The planted model has weight 1 on every effect, the interaction and w on dense.
    coef = w.detach().numpy()
    assert np.allclose(coef[:6], 1.0, atol=0.15)
    assert np.allclose(coef[6:], data.truth.dense_weights, atol=0.1)
    assert b0.detach().item() == pytest.approx(cfg.bias, abs=0.1)


def test_zipf_skew_and_shuffled_ids():
    cfg = SyntheticCTRConfig(
        vocab_sizes=(10_000,), zipf_exponents=1.1, num_dense=0, train_rows=100_000, val_rows=0, test_rows=0
    )
    ids = torch.cat([b.sparse_features.values() for b in SyntheticCTR(cfg).batches("train", 25_000)])
    counts = torch.bincount(ids, minlength=10_000).sort(descending=True).values.double()
    top1pct = counts[:100].sum().item() / ids.numel()
    assert top1pct > 0.5
    pmf = power_law_pmf(10_000, 1.1)
    assert top1pct == pytest.approx(pmf[:100].sum(), abs=0.01)
    assert counts[0].item() / ids.numel() == pytest.approx(pmf[0], abs=0.01)
    most = int(torch.bincount(ids).argmax())
    assert most != 0  # the permutation hides popularity from the id

    ordered = SyntheticCTR(SyntheticCTRConfig(**{**cfg.__dict__, "rank_ordered_ids": True}))
    ids_o = torch.cat([b.sparse_features.values() for b in ordered.batches("train", 25_000)])
    freq = torch.bincount(ids_o, minlength=10_000)
    assert int(freq.argmax()) == 0 and freq[0] > freq[1] > freq[5] > freq[100]
    uniform = SyntheticCTRConfig(**{**cfg.__dict__, "zipf_exponents": 0.0})
    ids_u = torch.cat([b.sparse_features.values() for b in SyntheticCTR(uniform).batches("train", 25_000)])
    share = (
        torch.bincount(ids_u, minlength=10_000).sort(descending=True).values[:100].sum().item()
        / ids_u.numel()
    )
    assert share < 0.03


def test_config_validation_and_table_configs():
    data = SyntheticCTR(small_config())
    tables = data.embedding_bag_configs(dim=8)
    assert [t.name for t in tables] == [f"t_cat_{i}" for i in range(5)]
    assert [t.feature_names for t in tables] == [[f"cat_{i}"] for i in range(5)]
    assert [t.num_embeddings for t in tables] == [1000, 50, 20000, 7, 3000]
    assert all(t.embedding_dim == 8 for t in tables)
    assert data.vocab_sizes == {"cat_0": 1000, "cat_1": 50, "cat_2": 20000, "cat_3": 7, "cat_4": 3000}
    with pytest.raises(ValueError):
        SyntheticCTRConfig(vocab_sizes=(10, 10), bag_max=(1, 2, 3))
    with pytest.raises(ValueError):
        SyntheticCTRConfig(vocab_sizes=(10,), bag_min=3, bag_max=2)
    with pytest.raises(ValueError):
        SyntheticCTRConfig(vocab_sizes=(10, 10), feature_names=("a", "a"))


def test_batches_feed_an_embedding_bag_collection():
    from torchrec import EmbeddingBagCollection

    data = SyntheticCTR(small_config())
    ebc = EmbeddingBagCollection(tables=data.embedding_bag_configs(dim=4), device=torch.device("cpu"))
    batch = next(data.batches("train", 64))
    out = ebc(batch.sparse_features)
    assert out.keys() == data.feature_names and out.values().shape == (64, 4 * 5)
    # Sum pooling of the multi-hot field equals summing its rows by hand.
    jt = batch.sparse_features["cat_2"]
    weight = ebc.embedding_bags["t_cat_2"].weight
    by_hand = torch.stack([weight[ids].sum(0) for ids in jt.to_dense()])
    assert torch.allclose(out["cat_2"], by_hand, atol=1e-6)

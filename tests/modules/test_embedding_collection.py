"""LowPrecisionEmbeddingCollection against torchrec.EmbeddingCollection, against the EBC's fused
update on the same rows, and under bad input."""

from __future__ import annotations

import collections

import pytest
import torch
import torchrec
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import random_kjt
from tests.modules.test_host_syncs import _count_syncs


def ec_tables(dim=8, rows=(60, 40), features=(("a", "s"), ("b", "s"))):
    """Two tables at one dim; feature ``s`` is read by both (named ``s@t0`` / ``s@t1``)."""
    return [
        EmbeddingConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=list(f))
        for i, (r, f) in enumerate(zip(rows, features))
    ]


def kjt_for(tables, batch=5, max_len=6, seed=1):
    """Ids for every distinct feature, each in range of every table that reads it."""
    rows: dict[str, int] = {}
    for t in tables:
        for f in t.feature_names:
            rows[f] = min(rows.get(f, t.num_embeddings), t.num_embeddings)
    fake = [
        torchrec.EmbeddingBagConfig(name=f, embedding_dim=4, num_embeddings=r, feature_names=[f])
        for f, r in rows.items()
    ]
    return random_kjt(fake, batch=batch, max_len=max_len, gen=torch.Generator().manual_seed(seed))


def float_copy(ec: lp.LowPrecisionEmbeddingCollection) -> torchrec.EmbeddingCollection:
    ref = torchrec.EmbeddingCollection(tables=ec_tables(), need_indices=ec.need_indices())
    with torch.no_grad():
        for t in ec.embedding_configs():
            ref.embeddings[t.name].weight.copy_(ec.dequantized_weight(t.name))
    return ref


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
def test_outputs_are_torchrecs_on_the_dequantized_rows(bits):
    ec = lp.LowPrecisionEmbeddingCollection(
        ec_tables(), need_indices=True, config=lp.LowPrecisionConfig(bits=bits)
    )
    ref = float_copy(ec)
    kjt = kjt_for(ec_tables())
    ours, theirs = ec(kjt), ref(kjt)
    assert list(ours) == list(theirs) == ["a", "s@t0", "b", "s@t1"]
    for k in theirs:
        # The forward reads exactly the rows dequantized_weight() gives: bit-identical.
        assert torch.equal(ours[k].values(), theirs[k].values().float()), k
        assert torch.equal(ours[k].lengths(), theirs[k].lengths()), k
        assert torch.equal(ours[k].weights(), theirs[k].weights()), k
        assert ours[k].values().dtype == torch.float32


def test_native_lookup_equals_fbgemm_sequence_mode(monkeypatch):
    tables = ec_tables()
    ec = lp.LowPrecisionEmbeddingCollection(tables, per_table_configs={
        "t0": lp.LowPrecisionConfig(bits=4), "t1": lp.LowPrecisionConfig(bits=8)})  # fmt: skip
    kjt = kjt_for(tables, batch=64, max_len=20)
    with torch.no_grad():
        native = ec(kjt)
        assert ec._lookup.backend == "cpu_native"
        ec._lookup.backend = "fbgemm"  # FBGEMM's int_nbit lookup, PoolingMode.NONE
        fbgemm = ec(kjt)
    for k in native:
        assert torch.equal(native[k].values(), fbgemm[k].values()), k


def _one_id_per_bag(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same ids, each in a bag of its own (batch = ids per key, padded with empty bags)."""
    per_key = kjt.length_per_key()
    batch = max(max(per_key), 1)
    lengths = torch.cat(
        [
            torch.cat([torch.ones(n, dtype=torch.int64), torch.zeros(batch - n, dtype=torch.int64)])
            for n in per_key
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=kjt.values(), lengths=lengths)


@pytest.mark.parametrize("bits,optimizer", [(8, "sgd"), (4, "rowwise_adagrad"), (2, "adam"), (16, "adagrad")])
def test_training_equals_the_ebc_update_on_the_same_rows(bits, optimizer):
    """An EC step is the EBC's fused update with each id a bag of its own: the same rows, the
    same gradient rows, the same rounding draws, so the tables end bit for bit equal."""
    cfg = lp.LowPrecisionConfig(bits=bits, optimizer=optimizer, learning_rate=0.05)
    ec_t = ec_tables(features=(("a",), ("b",)))
    ebc_t = [torchrec.EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                                         feature_names=list(t.feature_names)) for t in ec_t]  # fmt: skip
    ec = lp.LowPrecisionEmbeddingCollection(ec_t, config=cfg)
    ebc = lp.LowPrecisionEmbeddingBagCollection(ebc_t, config=cfg)
    ebc.load_state_dict(ec.state_dict())
    target = torch.randn(60, 8, generator=torch.Generator().manual_seed(3))
    for step in range(4):
        kjt = kjt_for(ec_t, seed=step)
        out = ec(kjt)
        loss = sum(((jt.values() - target[: jt.values().shape[0]]) ** 2).sum() for jt in out.values())
        loss.backward()
        bags = _one_id_per_bag(kjt)
        pooled = ebc(bags).to_dict()
        ref_loss = sum(
            ((pooled[k][: kjt[k].values().numel()] - target[: kjt[k].values().numel()]) ** 2).sum()
            for k in pooled
        )
        ref_loss.backward()
    for t in ec_t:
        assert torch.equal(ec.quantized_weight(t.name), ebc.quantized_weight(t.name)), t.name
        assert torch.equal(ec.tables[t.name].step_size, ebc.tables[t.name].step_size)
    assert int(ec.step) == int(ebc.step) == 4


def test_fp32_sgd_matches_torchrec_with_duplicate_ids_summed():
    tables = ec_tables(features=(("a",), ("b",)))
    ec = lp.LowPrecisionEmbeddingCollection(
        tables, config=lp.LowPrecisionConfig(bits=32, optimizer="sgd", learning_rate=0.1)
    )
    ref = torchrec.EmbeddingCollection(tables=ec_tables(features=(("a",), ("b",))))
    with torch.no_grad():
        for t in tables:
            ref.embeddings[t.name].weight.copy_(ec.dequantized_weight(t.name))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([3, 3, 5, 3, 7, 7]), lengths=torch.tensor([2, 2, 1, 1])
    )
    w = torch.arange(6 * 8, dtype=torch.float32).view(6, 8) / 10
    for m in (ec, ref):
        out = m(kjt)
        (out["a"].values() * w[:4]).sum().add((out["b"].values() * w[4:]).sum()).backward()
    with torch.no_grad():
        for t in tables:
            p = ref.embeddings[t.name].weight
            p -= 0.1 * p.grad
            torch.testing.assert_close(ec.dequantized_weight(t.name), p, rtol=0, atol=1e-6)


def test_resume_equals_uninterrupted():
    cfg = lp.LowPrecisionConfig(bits=4, optimizer="rowwise_adagrad", learning_rate=0.1)
    tables = ec_tables()

    def train(ec, steps):
        for s in steps:
            out = ec(kjt_for(tables, seed=s))
            sum(jt.values().pow(2).sum() for jt in out.values()).backward()

    full = lp.LowPrecisionEmbeddingCollection(tables, config=cfg)
    train(full, range(6))
    first = lp.LowPrecisionEmbeddingCollection(tables, config=cfg)
    train(first, range(3))
    resumed = lp.LowPrecisionEmbeddingCollection(tables, config=cfg, init_weights=False)
    resumed.load_state_dict(first.state_dict())
    train(resumed, range(3, 6))
    for k, v in full.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed.state_dict()[k]), k


def test_lr_schedule_and_in_backward_tags_drive_the_update():
    tables = ec_tables()
    ec = lp.LowPrecisionEmbeddingCollection(
        tables, config=lp.LowPrecisionConfig(bits=8, optimizer="sgd", learning_rate=0.5)
    )
    kjt = kjt_for(tables)
    opt = ec.fused_optimizer
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = {t.name: ec.quantized_weight(t.name).clone() for t in tables}
    sum(jt.values().sum() for jt in ec(kjt).values()).backward()
    assert all(torch.equal(before[n], ec.quantized_weight(n)) for n in before)  # lr 0: rows unchanged
    # TorchRec's in-backward tag, set before training: the table runs Adagrad at the tag's lr.
    from torch.distributed.optim import _apply_optimizer_in_backward

    tagged = lp.LowPrecisionEmbeddingCollection(tables, config=lp.LowPrecisionConfig(bits=8, optimizer="sgd"))
    _apply_optimizer_in_backward(torch.optim.Adagrad, [tagged.tables["t1"].handle], {"lr": 0.1})
    sum(jt.values().sum() for jt in tagged(kjt).values()).backward()
    assert tagged.tables["t1"].optimizer_kind.value == "adagrad"
    assert tagged.tables["t0"].optimizer_kind.value == "sgd"
    assert tagged.fused_optimizer.param_groups[1]["lr"] == 0.1
    assert list(in_backward_optimizer_filter(tagged.named_parameters()))  # TorchRec sees the tag
    # After a step, another optimizer would silently misread the state: refused, naming both.
    _apply_optimizer_in_backward(torch.optim.Adam, [tagged.tables["t0"].handle], {"lr": 0.1})
    with pytest.raises(RuntimeError, match="'t0' has trained with sgd and is now asked to use adam"):
        sum(jt.values().sum() for jt in tagged(kjt).values()).backward()


def test_frozen_table_is_not_updated_and_no_host_sync_per_step():
    tables = ec_tables()
    ec = lp.LowPrecisionEmbeddingCollection(tables, config=lp.LowPrecisionConfig(bits=8, learning_rate=0.5))
    ec.tables["t0"].handle.requires_grad_(False)
    kjt = kjt_for(tables)
    before = ec.quantized_weight("t0").clone()
    sum(jt.values().sum() for jt in ec(kjt).values()).backward()
    calls = _count_syncs(lambda: sum(jt.values().sum() for jt in ec(kjt).values()).backward())
    assert calls == collections.Counter()
    assert torch.equal(before, ec.quantized_weight("t0"))
    assert int(ec.step) == 2


def test_memory_bytes_counts_rows_step_sizes_and_state():
    from torchrec_lowprec.modules.table_layout import stored_bytes
    from torchrec_lowprec.types import OptimizerType

    tables = ec_tables(dim=64, rows=(1000, 500))
    ec = lp.LowPrecisionEmbeddingCollection(
        tables, config=lp.LowPrecisionConfig(bits=4, optimizer="rowwise_adagrad")
    )
    want = sum(stored_bytes(t.num_embeddings, 64, 4, OptimizerType.ROWWISE_ADAGRAD, True, 1) for t in tables)
    assert ec.memory_bytes() == want
    assert ec.memory_bytes(per_table=True)["t0"]["rows"] == 1000 * (32 + 4)
    # int4 codes (32 B) + fp16 scale/bias (4 B) + fp32 master step size (4 B) + row-wise state (4 B)
    assert ec.memory_bytes() == 1500 * 44


def test_bad_input_is_refused_clearly():
    tables = ec_tables()
    with pytest.raises(ValueError, match="same embedding_dim"):
        lp.LowPrecisionEmbeddingCollection(
            [EmbeddingConfig(name="x", embedding_dim=8, num_embeddings=5, feature_names=["a"]),
             EmbeddingConfig(name="y", embedding_dim=16, num_embeddings=5, feature_names=["b"])]
        )  # fmt: skip
    with pytest.raises(TypeError, match="EmbeddingConfig"):
        lp.LowPrecisionEmbeddingCollection(
            [torchrec.EmbeddingBagConfig(name="x", embedding_dim=8, num_embeddings=5, feature_names=["a"])]
        )
    with pytest.raises(TypeError, match="need_indices must be a bool"):
        lp.LowPrecisionEmbeddingCollection(tables, None, lp.LowPrecisionConfig())
    with pytest.raises(ValueError, match="multiple of 4"):
        lp.LowPrecisionEmbeddingCollection(ec_tables(dim=6), config=lp.LowPrecisionConfig(bits=4))
    ec = lp.LowPrecisionEmbeddingCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    bad = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "s"], values=torch.tensor([1, 99, 2]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(IndexError, match="id 99 of feature 'b' is out of range for table 't1' with 40 rows"):
        ec(bad)
    with pytest.raises(ValueError, match=r"lacks feature\(s\) \['s'\]"):
        ec(
            KeyedJaggedTensor.from_lengths_sync(
                keys=["a", "b"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1])
            )
        )


def test_out_of_range_ids_in_warn_mode_give_zero_rows_and_keep_lengths():
    tables = ec_tables()
    ec = lp.LowPrecisionEmbeddingCollection(
        tables, config=lp.LowPrecisionConfig(bits=8, bounds_check="warn", learning_rate=0.5)
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "s"], values=torch.tensor([1, 2, 99, 3, 7]), lengths=torch.tensor([2, 2, 1])
    )
    before = {t.name: ec.dequantized_weight(t.name).clone() for t in tables}
    with pytest.warns(RuntimeWarning, match="id 99 of feature 'b'"):
        out = ec(kjt)
    assert out["b"].lengths().tolist() == [2]
    assert torch.equal(out["b"].values()[0], torch.zeros(8))  # the bad id: zeros
    assert torch.equal(out["b"].values()[1], before["t1"][3])
    sum(jt.values().sum() for jt in out.values()).backward()
    moved = {
        n: (ec.dequantized_weight(n) != before[n]).any(dim=1).nonzero().flatten().tolist() for n in before
    }
    assert moved == {"t0": [1, 2, 7], "t1": [3, 7]}  # t1: b's id 3 and s's id 7; nothing for 99

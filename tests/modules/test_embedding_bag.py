import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.modules.convert import to_float

BITS = [8, 4, 2, 16, 32]
SUM, MEAN = torchrec.PoolingType.SUM, torchrec.PoolingType.MEAN


def _pair(bits, tables, weighted=False, **cfg):
    fl = torchrec.EmbeddingBagCollection(tables, is_weighted=weighted)
    ebc = lp.convert(fl, lp.LowPrecisionConfig(bits=bits, **cfg))
    return ebc, to_float(ebc)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("pooling", [(SUM, SUM), (MEAN, MEAN), (SUM, MEAN)])
def test_forward_equals_float_reference(bits, pooling):
    tables = make_tables(pooling=pooling)
    ebc, ref = _pair(bits, tables)
    kjt = random_kjt(tables, batch=7)
    out, want = ebc(kjt), ref(kjt)
    assert out.keys() == want.keys() == ["a", "b", "c"]
    assert out.length_per_key() == want.length_per_key()
    assert out.values().shape == want.values().shape == (7, 8 + 8 + 16)
    torch.testing.assert_close(out.values(), want.values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weighted_sum_and_mean(bits):
    tables = make_tables()
    ebc, ref = _pair(bits, tables, weighted=True)
    kjt = random_kjt(tables, weighted=True)
    torch.testing.assert_close(ebc(kjt).values(), ref(kjt).values(), rtol=1e-6, atol=1e-6)
    # Weighted MEAN (TorchRec's nn.EmbeddingBag cannot): sum(w * e) / bag length.
    mean_tables = make_tables(pooling=(MEAN, MEAN))
    ebc = lp.convert(
        torchrec.EmbeddingBagCollection(mean_tables, is_weighted=True), lp.LowPrecisionConfig(bits=bits)
    )
    kjt = random_kjt(mean_tables, weighted=True)
    got = ebc(kjt).to_dict()
    for t in mean_tables:
        w = ebc.dequantized_weight(t.name)
        for f in t.feature_names:
            jt = kjt[f]
            want = torch.stack([
                (w[v] * wt[:, None]).sum(0) / max(len(v), 1) if len(v) else torch.zeros(t.embedding_dim)
                for v, wt in zip(jt.to_dense(), jt.to_dense_weights())
            ])  # fmt: skip
            torch.testing.assert_close(got[f], want, rtol=1e-6, atol=1e-6)


def test_all_empty_bags_and_key_order():
    tables = make_tables()
    ebc, _ = _pair(8, tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["c", "a", "b"],
        values=torch.tensor([], dtype=torch.int64),
        lengths=torch.zeros(9, dtype=torch.int64),
    )
    out = ebc(kjt)
    assert out.keys() == ["a", "b", "c"] and torch.equal(out.values(), torch.zeros(3, 32))
    out.values().sum().backward()  # nothing to update, no error
    kjt = random_kjt(tables)
    perm = kjt.permute([2, 0, 1])
    torch.testing.assert_close(ebc(perm).values(), ebc(kjt).values())


def test_memory_bytes_matches_tensors():
    tables = make_tables(dims=(64, 32), rows=(1000, 500))
    cfgs = {"t1": lp.LowPrecisionConfig(bits=4, optimizer="adam", learn_step_size=False)}
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=8), per_table_configs=cfgs
    )
    rep = ebc.memory_bytes(per_table=True)
    # int8 dim 64: 64 codes + 4 bytes fp16 scale/bias; fp32 master step; RowWiseAdagrad 4 bytes.
    assert rep["t0"] == {"rows": 1000 * 68, "step_size": 1000 * 4, "optimizer": 1000 * 4, "total": 1000 * 76}
    # int4 dim 32, fixed step (no master), Adam: 2 x 32 fp32 per row.
    assert rep["t1"] == {"rows": 500 * 20, "step_size": 0, "optimizer": 500 * 256, "total": 500 * 276}
    held = sum(ebc.quantized_weight(n).numel() for n in ("t0", "t1"))
    held += sum(b.numel() * b.element_size() for name, b in ebc.named_buffers() if name.startswith("tables."))
    assert ebc.memory_bytes() == held


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match=r"bits=3 .*allowed: \[32, 16, 8, 4, 2\]"):
        lp.LowPrecisionConfig(bits=3)
    with pytest.raises(ValueError, match="rounding"):
        lp.LowPrecisionConfig(rounding="up")
    with pytest.raises(ValueError, match="optimizer"):
        lp.LowPrecisionConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="embedding_dim=6 cannot be stored at 4 bits"):
        lp.LowPrecisionEmbeddingBagCollection(make_tables(dims=(6, 8)), config=lp.LowPrecisionConfig(bits=4))
    with pytest.raises(ValueError, match="unknown tables"):
        lp.LowPrecisionEmbeddingBagCollection(
            make_tables(), per_table_configs={"nope": lp.LowPrecisionConfig()}
        )
    # dims that are not a multiple of 4 are fine in float precision
    lp.LowPrecisionEmbeddingBagCollection(make_tables(dims=(6, 8)), config=lp.LowPrecisionConfig(bits=16))


def _kjt_with(values, tables, batch=2):
    keys = [f for t in tables for f in t.feature_names]
    lengths = torch.zeros(len(keys) * batch, dtype=torch.int64)
    lengths[0] = len(values)
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.tensor(values), lengths=lengths)


def test_out_of_range_ids():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables)
    with pytest.raises(IndexError, match=r"id 60 of feature 'a' is out of range for table 't0' with 60 rows"):
        ebc(_kjt_with([1, 60], tables))
    with pytest.raises(IndexError, match="id -1 of feature 'a'"):
        ebc(_kjt_with([-1], tables))
    for mode in ("warn", "ignore"):
        ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bounds_check=mode))
        with pytest.warns(RuntimeWarning, match="dropped") if mode == "warn" else _no_warning():
            out = ebc(_kjt_with([1, 60, 2], tables)).to_dict()["a"]
        want = ebc.dequantized_weight("t0")[[1, 2]].sum(0)
        torch.testing.assert_close(out[0], want)


class _no_warning:
    def __enter__(self):
        import warnings

        self._c = warnings.catch_warnings()
        self._c.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *a):
        self._c.__exit__(*a)


def test_nonfinite_gradients_are_skipped_and_counted():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables)
    before = ebc.quantized_weight("t0").clone()
    out = ebc(_kjt_with([3, 4], tables)).values()
    with pytest.warns(RuntimeWarning, match="NaN/Inf gradient"):
        (out * float("nan")).sum().backward()
    assert ebc.nonfinite_rows_skipped()["t0"] == 2
    assert torch.equal(ebc.quantized_weight("t0"), before)


def _train(ebc, tables, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        kjt = random_kjt(tables, gen=gen)
        ebc(kjt).values().pow(2).sum().backward()


@pytest.mark.parametrize("bits", [8, 4, 2, 16])
def test_training_is_reproducible_and_seeded(bits):
    tables = make_tables()
    a, b, c = (
        lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=bits, seed=s))
        for s in (1, 1, 2)
    )
    c.load_state_dict(a.state_dict())  # same start, different rounding seed
    for m in (a, b, c):
        _train(m, tables)
    for t in ("t0", "t1"):
        assert torch.equal(a.quantized_weight(t), b.quantized_weight(t))
        assert torch.equal(a.tables[t].step_size, b.tables[t].step_size)
    assert not torch.equal(a.quantized_weight("t0"), c.quantized_weight("t0"))
    assert int(a.step) == 3


@pytest.mark.parametrize("bits", [4, 16])
def test_dithered_rounding_is_reproducible_and_draws_differ_from_stochastic(bits):
    tables = make_tables()
    a, b, c = (
        lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=bits, rounding=r))
        for r in ("dithered", "dithered", "stochastic")
    )
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    for m in (a, b, c):
        _train(m, tables)
    assert torch.equal(a.quantized_weight("t0"), b.quantized_weight("t0"))
    assert not torch.equal(a.quantized_weight("t0"), c.quantized_weight("t0"))
    assert lp.LowPrecisionConfig.from_dict(a._configs["t0"].to_dict()).rounding == "dithered"


def test_update_touches_only_batch_rows_and_moves_loss():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=8, optimizer="sgd", learning_rate=0.05)
    )
    before = {t: ebc.dequantized_weight(t) for t in ("t0", "t1")}
    kjt = random_kjt(tables)
    loss0 = ebc(kjt).values().pow(2).sum()
    loss0.backward()
    touched = {
        "t0": set(kjt["a"].values().tolist()) | set(kjt["b"].values().tolist()),
        "t1": set(kjt["c"].values().tolist()),
    }
    for t in ("t0", "t1"):
        changed = set(torch.nonzero((ebc.dequantized_weight(t) != before[t]).any(1)).flatten().tolist())
        assert changed and changed <= touched[t]
    with torch.no_grad():
        assert ebc(kjt).values().pow(2).sum() < loss0


def test_in_backward_optimizer_is_used():
    from torch.distributed.optim import _apply_optimizer_in_backward

    tables = make_tables()
    fl = torchrec.EmbeddingBagCollection(tables)
    _apply_optimizer_in_backward(torch.optim.SGD, fl.parameters(), {"lr": 0.5})
    tagged = lp.convert(fl, lp.LowPrecisionConfig(bits=8, rounding="nearest", learn_step_size=False))
    plain = lp.convert(
        torchrec.EmbeddingBagCollection(tables),
        lp.LowPrecisionConfig(
            bits=8, rounding="nearest", learn_step_size=False, optimizer="sgd", learning_rate=0.5
        ),
    )
    plain.load_state_dict(tagged.state_dict())
    _train(tagged, tables)
    _train(plain, tables)
    assert tagged.tables["t0"].optimizer_kind == lp.OptimizerType.SGD
    assert tagged.memory_bytes(per_table=True)["t0"]["optimizer"] == 0
    for t in ("t0", "t1"):
        assert torch.equal(tagged.quantized_weight(t), plain.quantized_weight(t))
    # Applied on our own parameters, after construction, it works too.
    ours = lp.LowPrecisionEmbeddingBagCollection(tables)
    _apply_optimizer_in_backward(torch.optim.Adam, ours.parameters(), {"lr": 0.01})
    _train(ours, tables, steps=1)
    assert ours.tables["t0"].optimizer_kind == lp.OptimizerType.ADAM
    assert ours.tables["t0"].momentum2.abs().sum() > 0


def test_frozen_table_is_not_updated_and_others_train():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=8, optimizer="sgd", learning_rate=0.1)
    )
    ebc.tables["t1"].handle.requires_grad_(False)  # freeze t1 only
    q0, q1 = ebc.quantized_weight("t0").clone(), ebc.quantized_weight("t1").clone()
    ebc(random_kjt(tables)).values().pow(2).sum().backward()
    assert not torch.equal(ebc.quantized_weight("t0"), q0)
    assert torch.equal(ebc.quantized_weight("t1"), q1)
    assert int(ebc.step) == 1
    # Freezing every table: no autograd path, nothing changes.
    ebc.tables["t0"].handle.requires_grad_(False)
    q0 = ebc.quantized_weight("t0").clone()
    out = ebc(random_kjt(tables)).values()
    assert not out.requires_grad and torch.equal(ebc.quantized_weight("t0"), q0)


# ----- constructor mirrors torchrec.EmbeddingBagCollection; repr -----
def test_positional_arguments_are_torchrecs():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, True, torch.device("cpu"))
    assert ebc.is_weighted() and ebc.device == torch.device("cpu")
    kjt = random_kjt(tables, weighted=True)
    ref = torchrec.EmbeddingBagCollection(tables, True, torch.device("cpu"))
    assert ebc(kjt).keys() == ref(kjt).keys()


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((lp.LowPrecisionConfig(),), {}, "is_weighted must be a bool, got LowPrecisionConfig"),
        (
            (),
            {"config": {"t0": lp.LowPrecisionConfig()}},
            "config must be a LowPrecisionConfig or None, got dict",
        ),
        ((), {"config": True}, "config must be a LowPrecisionConfig or None, got bool"),
        ((), {"per_table_configs": {"t0": 4}}, "per_table_configs must map table name"),
        ((False, 3), {}, "device must be a torch.device"),
    ],
)
def test_wrong_argument_types_raise_type_error(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        lp.LowPrecisionEmbeddingBagCollection(make_tables(), *args, **kwargs)


def test_configs_are_keyword_only():
    with pytest.raises(TypeError):
        lp.LowPrecisionEmbeddingBagCollection(make_tables(), False, None, lp.LowPrecisionConfig())


def test_repr_shows_rows_dim_bits_bytes_per_table():
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        make_tables(dims=(8, 16)),
        config=lp.LowPrecisionConfig(bits=4, learn_step_size=False, optimizer="sgd"),
    )
    text = repr(ebc)
    # int4, dim 8: 4 B codes + 4 B scale/bias = 8 B (CPU: no row padding); SGD keeps no state.
    assert "t0: 60 x 8, 4 bits, 480 bytes" in text
    # dim 16: 8 + 4 = 12 B per row.
    assert "t1: 40 x 16, 4 bits, 480 bytes" in text
    assert ebc.memory_bytes() == 960

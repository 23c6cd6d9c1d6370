"""Mixed precision inside one table: forward against a float reference, gradient routing,
checkpoints carrying the plan, row maps, bad plans."""

import copy

import pytest
import torch
import torchrec

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.data import frequency_rank
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mixed_precision import physical_name
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

SUM, MEAN = torchrec.PoolingType.SUM, torchrec.PoolingType.MEAN


def _plan():
    # t0: 60 rows in 4 groups (8, 4, 4, pruned); t1: 40 rows, 2 then 16 bits.
    return PrecisionPlan(
        {
            "t0": TablePrecision(60, 8, (10, 30, 45, 60), (8, 4, 4, 0), (0.6, 0.3, 0.08, 0.02)),
            "t1": TablePrecision(40, 16, (8, 40), (2, 16)),
        }
    )


def _reference(ebc, tables, weighted=False):
    ref = torchrec.EmbeddingBagCollection(tables, is_weighted=weighted)
    with torch.no_grad():
        for t in tables:
            ref.embedding_bags[t.name].weight.copy_(ebc.dequantized_weight(t.name))
    return ref


@pytest.mark.parametrize(
    "pooling, weighted",
    [((SUM, SUM), False), ((MEAN, SUM), False), ((MEAN, MEAN), False), ((SUM, SUM), True)],
)
def test_forward_equals_float_reference(pooling, weighted):
    tables = make_tables(pooling=pooling)
    ebc = MixedPrecisionEmbeddingBagCollection(
        tables, plan=_plan(), config=lp.LowPrecisionConfig(), is_weighted=weighted
    )
    kjt = random_kjt(tables, batch=9, weighted=weighted)
    out, want = ebc(kjt), _reference(ebc, tables, weighted)(kjt)
    assert out.keys() == want.keys() == ["a", "b", "c"]
    torch.testing.assert_close(out.values(), want.values(), rtol=1e-6, atol=1e-6)
    w0 = ebc.dequantized_weight("t0")
    assert torch.count_nonzero(w0[45:]) == 0 and torch.count_nonzero(w0[:45]) > 0  # pruned rows read 0
    # Stored bytes: only the stored groups, each at its own width (+ fp32 master step, RowWiseAdagrad).
    per = ebc.memory_bytes(per_table=True)
    assert set(per) == {"t0__g0", "t0__g1", "t1__g0", "t1__g1"}
    assert per["t0__g0"]["rows"] == 10 * (4 + 8) and per["t0__g1"]["rows"] == 35 * (4 + 4)
    assert per["t1__g0"]["rows"] == 8 * (4 + 4) and per["t1__g1"]["rows"] == 32 * 16 * 2


def test_single_group_plan_is_bit_identical_to_a_uniform_collection():
    # SUM: FBGEMM's MEAN scales inside its kernel, ours after the group sum (1 ulp apart).
    tables = make_tables(pooling=(SUM, SUM))
    cfg = lp.LowPrecisionConfig(bits=4, learning_rate=0.2, step_size_lr=1e-3)
    plan = PrecisionPlan.uniform({"t0": (60, 8), "t1": (40, 16)}, 4)
    mixed = MixedPrecisionEmbeddingBagCollection(tables, plan=plan, config=cfg)
    plain = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg)
    for step in range(3):
        kjt = random_kjt(tables, batch=8, gen=torch.Generator().manual_seed(step))
        a, b = mixed(kjt), plain(kjt)
        assert torch.equal(a.values(), b.values())
        (a.values() ** 2).sum().backward()
        (b.values() ** 2).sum().backward()
    for t in ("t0", "t1"):
        assert torch.equal(mixed.row_groups.quantized_weight(t), plain.quantized_weight(t))
        assert torch.equal(mixed.row_groups.tables[t].step_size, plain.tables[t].step_size)


def test_gradients_reach_the_right_rows_of_each_group():
    tables = make_tables(pooling=(SUM, MEAN))
    cfg = lp.LowPrecisionConfig(
        rounding="nearest", learn_step_size=False, optimizer="sgd", learning_rate=0.05
    )
    ebc = MixedPrecisionEmbeddingBagCollection(tables, plan=_plan(), config=cfg)
    ref = _reference(ebc, tables)
    before = {t.name: ebc.dequantized_weight(t.name) for t in tables}
    kjt = random_kjt(tables, batch=16)
    up = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    (ebc(kjt).values() * up).sum().backward()
    (ref(kjt).values() * up).sum().backward()
    for t in tables:
        tp = _plan().tables[t.name]
        grad = ref.embedding_bags[t.name].weight.grad
        target = before[t.name] - 0.05 * grad
        after = ebc.dequantized_weight(t.name)
        segs = tp.segments()
        for first, a, e, bits in segs:
            touched = grad[a:e].abs().sum(1) > 0
            assert touched.any()
            if bits == 0:
                assert torch.count_nonzero(after[a:e]) == 0
                continue
            assert torch.equal(after[a:e][~touched], before[t.name][a:e][~touched])  # untouched: unchanged
            if bits == 16:
                torch.testing.assert_close(after[a:e][touched], target[a:e][touched], rtol=1e-3, atol=1e-3)
                continue
            # Nearest rounding on the row's fixed step: within half a step of the fp32 update.
            rows = ebc.row_groups.quantized_weight(physical_name(t.name, first, len(segs) == 1))
            step = rows[:, :2].contiguous().view(torch.float16).float().flatten()
            err = (after[a:e] - target[a:e]).abs().max(dim=1).values
            assert torch.all(err[touched] <= 0.5 * step[touched] * (1 + 1e-3) + 1e-7)


def test_checkpoint_round_trip_and_plan_mismatch_loads_nothing():
    tables = make_tables()
    ebc = MixedPrecisionEmbeddingBagCollection(tables, plan=_plan(), config=lp.LowPrecisionConfig())
    kjt = random_kjt(tables)
    ebc(kjt).values().sum().backward()
    sd = ebc.state_dict()
    assert sd["_extra_state"]["precision_plan"] == _plan().to_dict()
    fresh = MixedPrecisionEmbeddingBagCollection(tables, plan=_plan(), config=lp.LowPrecisionConfig(seed=3))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(kjt).values(), ebc(kjt).values())
    other = PrecisionPlan({**_plan().tables, "t1": TablePrecision(40, 16, (8, 40), (4, 16))})
    wrong = MixedPrecisionEmbeddingBagCollection(tables, plan=other, config=lp.LowPrecisionConfig())
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(ValueError, match=r"different precision plan \(tables \['t1'\]"):
        wrong.load_state_dict(sd)
    after = wrong.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_row_maps_route_raw_ids_and_are_counted():
    tables = make_tables()
    counts = torch.randint(0, 100, (60,), generator=torch.Generator().manual_seed(0))
    rank = frequency_rank(counts)
    plan = PrecisionPlan({"t0": TablePrecision(60, 8, (10, 60), (8, 2), remapped=True)})
    weight = torch.randn(60, 8)
    ebc = MixedPrecisionEmbeddingBagCollection(
        tables, plan=plan, config=lp.LowPrecisionConfig(), row_maps={"t0": rank}
    )
    ebc.load_float_weight("t0", weight)
    # The 10 most frequent raw ids sit in the int8 group: their rows are closer to fp32.
    ranked = ebc.dequantized_weight("t0")
    raw_view = ranked[rank]
    err = (raw_view - weight).abs().max(dim=1).values
    hot = rank < 10
    assert err[hot].max() < err[~hot].mean()
    kjt = random_kjt(tables, batch=8)
    ref = torchrec.EmbeddingBagCollection(tables)
    with torch.no_grad():
        ref.embedding_bags["t0"].weight.copy_(raw_view)
        ref.embedding_bags["t1"].weight.copy_(ebc.dequantized_weight("t1"))
    torch.testing.assert_close(ebc(kjt).values(), ref(kjt).values(), rtol=1e-6, atol=1e-6)
    assert ebc.memory_bytes(per_table=True)["t0.row_map"]["total"] == 60 * 4
    with pytest.raises(ValueError, match="remapped=True but no row_maps"):
        MixedPrecisionEmbeddingBagCollection(tables, plan=plan, config=lp.LowPrecisionConfig())


def test_bad_plans_and_ids_are_refused():
    tables = make_tables()
    with pytest.raises(ValueError, match="is for 50 x 8 rows but the table is 60 x 8"):
        MixedPrecisionEmbeddingBagCollection(
            tables, plan=PrecisionPlan({"t0": TablePrecision(50, 8, (50,), (8,))})
        )
    with pytest.raises(ValueError, match="not in"):
        MixedPrecisionEmbeddingBagCollection(
            tables, plan=PrecisionPlan({"zz": TablePrecision(5, 8, (5,), (8,))})
        )
    with pytest.raises(ValueError, match="not storable"):
        TablePrecision(60, 8, (10, 60), (8, 3))
    with pytest.raises(ValueError, match="increase strictly"):
        TablePrecision(60, 8, (30, 20), (8, 4))
    ebc = MixedPrecisionEmbeddingBagCollection(tables, plan=_plan())
    kjt = random_kjt(tables)
    bad = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=kjt.values().clone().fill_(60), lengths=kjt.lengths()
    )
    with pytest.raises(IndexError, match="table 't0' with 60 rows"):
        ebc(bad)


def test_convert_with_a_precision_plan_keeps_weights_and_in_backward_optimizer():
    from torch.distributed.optim import _apply_optimizer_in_backward

    tables = make_tables()
    fl = torchrec.EmbeddingBagCollection(tables)
    _apply_optimizer_in_backward(torch.optim.SGD, fl.parameters(), {"lr": 0.5})
    model = torch.nn.Sequential()
    model.add_module("ebc", fl)
    w0 = fl.embedding_bags["t0"].weight.detach().clone()
    lp.convert(model, lp.MixedPrecisionConfig(_plan(), lp.LowPrecisionConfig()))
    ebc = model.ebc
    assert isinstance(ebc, MixedPrecisionEmbeddingBagCollection)
    err = (ebc.dequantized_weight("t0") - w0).abs()
    assert err[:10].max() < 0.01 and torch.count_nonzero(ebc.dequantized_weight("t0")[45:]) == 0
    for name in ebc.group_tables("t0"):
        assert ebc.row_groups.tables[name].handle._optimizer_kwargs[0]["lr"] == 0.5
    # PrecisionPlan JSON round trip
    p = _plan()
    assert PrecisionPlan.from_dict(p.to_dict()) == p


def test_constructor_mirrors_torchrec_and_repr_shows_groups():
    tables = make_tables()
    ebc = MixedPrecisionEmbeddingBagCollection(tables, True, plan=_plan())
    assert ebc.is_weighted()
    with pytest.raises(TypeError, match="required keyword-only argument: 'plan'"):
        MixedPrecisionEmbeddingBagCollection(tables, _plan())
    with pytest.raises(TypeError, match="is_weighted must be a bool, got PrecisionPlan"):
        MixedPrecisionEmbeddingBagCollection(tables, _plan(), plan=_plan())
    with pytest.raises(TypeError, match="plan= .keyword. must be a PrecisionPlan, got dict"):
        MixedPrecisionEmbeddingBagCollection(tables, plan={})
    text = repr(ebc)
    assert "t0: 60 x 8, rows 0-10: 8 bits, rows 10-45: 4 bits, rows 45-60: 0 bits" in text
    assert "t1: 40 x 16, rows 0-8: 2 bits, rows 8-40: 16 bits" in text

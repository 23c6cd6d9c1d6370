"""MixedPrecisionEmbeddingCollection: per-group outputs against a float reference quantized at
each group's width, pruned rows, the fused update, bytes, checkpoints, row maps, convert, errors.

Tolerances: int8/4/2 groups equal the reference quantizer bit for bit and lie within half a
row step (+0.1%) of the float weight clipped to the row's grid; fp16 groups within 2^-11 relative; fp32 groups exact."""

import copy

import pytest
import torch
import torchrec
from torch.distributed.optim import _apply_optimizer_in_backward

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.data import frequency_rank
from torchrec_lowprec.kernels.lookup import row_alignment_for
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection, MixedPrecisionEmbeddingCollection
from torchrec_lowprec.modules.mixed_precision import physical_name
from torchrec_lowprec.modules.table_layout import stored_bytes
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision
from torchrec_lowprec.quant.layout import dequantize_rows, quantize_rows
from torchrec_lowprec.quant.lsq import init_step_size

DIM = 8


def _tables():
    # "a" is read by both tables: TorchRec names its outputs a@t0 and a@t1.
    return [
        torchrec.EmbeddingConfig(name="t0", embedding_dim=DIM, num_embeddings=60, feature_names=["a", "b"]),
        torchrec.EmbeddingConfig(name="t1", embedding_dim=DIM, num_embeddings=40, feature_names=["c", "a"]),
    ]


def _plan(remapped=False):
    return PrecisionPlan(
        {
            "t0": TablePrecision(60, DIM, (10, 30, 45, 60), (8, 4, 32, 0), remapped=remapped),
            "t1": TablePrecision(40, DIM, (8, 20, 40), (2, 16, 8)),
        }
    )


def _kjt(batch=6, seed=1):
    # ids of a < 40 (t1's rows), b < 60, c < 40; some empty sequences
    feats = make_tables(dims=(DIM, DIM), rows=(40, 60), features=(("a", "c"), ("b",)))
    return random_kjt(feats, batch=batch, max_len=5, gen=torch.Generator().manual_seed(seed))


def _float_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"t0": torch.randn(60, DIM, generator=g) * 0.3, "t1": torch.randn(40, DIM, generator=g) * 0.3}


def _reference(ec, need_indices=False):
    """torchrec.EmbeddingCollection holding ``ec``'s dequantized tables (indexed by raw id)."""
    ref = torchrec.EmbeddingCollection(_tables(), need_indices=need_indices)
    with torch.no_grad():
        for t in _tables():
            w = ec.dequantized_weight(t.name)
            if t.name in ec._remapped:
                w = w[getattr(ec, f"row_map_{t.name}").long()]
            ref.embeddings[t.name].weight.copy_(w)
    return ref


def _row_steps(ec, table, first):
    segs = ec.plan.tables[table].segments()
    rows = ec.row_groups.quantized_weight(physical_name(table, first, len(segs) == 1))
    return rows[:, :2].contiguous().view(torch.float16).float().flatten()


def test_each_group_reads_the_float_weight_quantized_at_its_width():
    cfg = lp.LowPrecisionConfig()
    ec = MixedPrecisionEmbeddingCollection(_tables(), need_indices=True, plan=_plan(), config=cfg)
    weights = _float_weights()
    for name, w in weights.items():
        ec.load_float_weight(name, w)
    for name, w in weights.items():
        got = ec.dequantized_weight(name)
        for first, a, e, bits in ec.plan.tables[name].segments():
            wg, gg = w[a:e], got[a:e]
            if bits == 0:
                assert torch.count_nonzero(gg) == 0
            elif bits == 32:
                assert torch.equal(gg, wg)
            elif bits == 16:
                torch.testing.assert_close(gg, wg, rtol=2**-11, atol=1e-7)
            else:
                step = init_step_size(wg, bits, cfg.step_size_init)
                want = dequantize_rows(quantize_rows(wg, step, bits), bits, DIM)
                assert torch.equal(gg, want), (name, first, bits)
                # independent of the quantizer: the nearest point of the row's signed grid
                # {-2^(b-1), ..., 2^(b-1)-1} * step (values beyond it saturate at its ends)
                s = _row_steps(ec, name, first)[:, None]
                clipped = torch.maximum(torch.minimum(wg, (2 ** (bits - 1) - 1) * s), -(2 ** (bits - 1)) * s)
                assert torch.all((gg - clipped).abs() <= 0.5 * s * (1 + 1e-3))
    # The forward reads exactly those rows; layout, lengths and indices are TorchRec's.
    kjt = _kjt()
    out, want = ec(kjt), _reference(ec, need_indices=True)(kjt)
    assert list(out) == list(want) == ["a@t0", "b", "c", "a@t1"]
    for k in want:
        assert torch.equal(out[k].values(), want[k].values())
        assert torch.equal(out[k].lengths(), want[k].lengths())
        assert torch.equal(out[k].weights(), want[k].weights())
        assert out[k].values().dtype == torch.float32 and out[k].values().shape[1] == DIM
    # Ids 45..59 of t0 are pruned: zero rows where they occur, lengths unchanged.
    ids = out["b"].weights()
    assert (ids >= 45).any() and (ids < 45).any()
    assert torch.count_nonzero(out["b"].values()[ids >= 45]) == 0
    assert torch.all(out["b"].values()[ids < 45].abs().sum(1) > 0)


def test_dropped_ids_read_zero_rows_and_keep_positions():
    cfg = lp.LowPrecisionConfig(bounds_check="ignore")
    ec = MixedPrecisionEmbeddingCollection(_tables(), plan=_plan(), config=cfg)
    kjt = _kjt()
    values = kjt.values().clone()
    values[::3] = 1000
    bad = torchrec.KeyedJaggedTensor.from_lengths_sync(kjt.keys(), values, kjt.lengths())
    good, out = ec(kjt), ec(bad)
    for k in good:
        assert torch.equal(out[k].lengths(), good[k].lengths())
    feat_ids = bad.to_dict()["c"].values()
    c = out["c"].values()
    assert torch.count_nonzero(c[feat_ids == 1000]) == 0
    assert torch.equal(c[feat_ids != 1000], good["c"].values()[feat_ids != 1000])
    with pytest.raises(
        IndexError, match="id 1000 of feature 'a' is out of range for table 't0' with 60 rows"
    ):
        MixedPrecisionEmbeddingCollection(_tables(), plan=_plan())(bad)


def test_training_moves_only_the_touched_rows_of_stored_groups():
    cfg = lp.LowPrecisionConfig(
        rounding="nearest", learn_step_size=False, optimizer="sgd", learning_rate=0.05
    )
    ec = MixedPrecisionEmbeddingCollection(_tables(), plan=_plan(), config=cfg)
    for name, w in _float_weights().items():
        ec.load_float_weight(name, w)
    ref = _reference(ec)
    before = {t: ec.dequantized_weight(t) for t in ("t0", "t1")}
    kjt = _kjt(batch=12)
    out, rout = ec(kjt), ref(kjt)
    g = torch.Generator().manual_seed(3)
    ups = {k: torch.randn(v.values().shape, generator=g) for k, v in rout.items()}
    sum((out[k].values() * u).sum() for k, u in ups.items()).backward()
    sum((rout[k].values() * u).sum() for k, u in ups.items()).backward()
    assert int(ec.row_groups.step) == 1
    assert all(h.grad is None for h in ec.row_groups._handles())  # fused: no weight gradient
    for name in ("t0", "t1"):
        grad = ref.embeddings[name].weight.grad
        target = before[name] - 0.05 * grad
        after = ec.dequantized_weight(name)
        for first, a, e, bits in ec.plan.tables[name].segments():
            touched = grad[a:e].abs().sum(1) > 0
            assert touched.any(), (name, first)
            if bits == 0:
                assert torch.count_nonzero(after[a:e]) == 0
                continue
            assert torch.equal(after[a:e][~touched], before[name][a:e][~touched])
            if bits == 32:
                torch.testing.assert_close(after[a:e], target[a:e], rtol=1e-6, atol=1e-7)
                assert not torch.equal(after[a:e][touched], before[name][a:e][touched])
            elif bits == 16:
                torch.testing.assert_close(after[a:e], target[a:e], rtol=2**-10, atol=1e-6)
            else:  # nearest rounding on the row's fixed step: within half a step of the fp32 update
                err = (after[a:e] - target[a:e]).abs().max(dim=1).values
                half = 0.5 * _row_steps(ec, name, first) * (1 + 1e-3) + 1e-7
                assert torch.all(err[touched] <= half[touched])


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_memory_bytes_is_the_planners_stored_bytes_plus_row_maps(optimizer):
    cfg = lp.LowPrecisionConfig(optimizer=optimizer)
    rank = frequency_rank(torch.arange(60) % 7)
    ec = MixedPrecisionEmbeddingCollection(
        _tables(), plan=_plan(remapped=True), config=cfg, row_maps={"t0": rank}
    )
    align = row_alignment_for("cpu")
    want = 60 * 4  # t0's raw id -> rank map, int32
    for tp in ec.plan.tables.values():
        for a, e, bits in zip(tp.group_starts(), tp.group_ends, tp.bits):
            g = cfg.replace(bits=bits) if bits else cfg
            want += stored_bytes(e - a, DIM, bits, cfg.optimizer, g.keeps_master_step_size, align)
    assert ec.memory_bytes() == want
    per = ec.memory_bytes(per_table=True)
    assert set(per) == {"t0__g0", "t0__g1", "t0__g2", "t1__g0", "t1__g1", "t1__g2", "t0.row_map"}
    assert per["t0__g1"]["rows"] == 20 * (4 + DIM // 2) and per["t0__g2"]["rows"] == 15 * DIM * 4


def test_state_dict_round_trip_and_a_different_plan_loads_nothing():
    cfg = lp.LowPrecisionConfig(learning_rate=0.1)
    ec = MixedPrecisionEmbeddingCollection(_tables(), plan=_plan(), config=cfg)
    kjt = _kjt()
    sum(v.values().sum() for v in ec(kjt).values()).backward()
    sd = ec.state_dict()
    assert sd["_extra_state"]["precision_plan"] == _plan().to_dict()
    fresh = MixedPrecisionEmbeddingCollection(_tables(), plan=_plan(), config=cfg)
    fresh.load_state_dict(sd)
    for a, b in ((ec, fresh),):
        outs = [a(kjt), b(kjt)]
        for k in outs[0]:
            assert torch.equal(outs[0][k].values(), outs[1][k].values())
        for o in outs:  # one more (stochastic) step on each: same state, same draws
            sum((v.values() ** 2).sum() for v in o.values()).backward()
    for t in ("t0", "t1"):
        assert torch.equal(ec.dequantized_weight(t), fresh.dequantized_weight(t))
    other = PrecisionPlan({**_plan().tables, "t1": TablePrecision(40, DIM, (8, 20, 40), (4, 16, 8))})
    wrong = MixedPrecisionEmbeddingCollection(_tables(), plan=other, config=cfg)
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(ValueError, match=r"different precision plan \(tables \['t1'\]"):
        wrong.load_state_dict(sd)
    after = wrong.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_row_maps_route_raw_ids_and_bad_maps_are_refused():
    counts = torch.randint(0, 100, (60,), generator=torch.Generator().manual_seed(0))
    rank = frequency_rank(counts)
    plan = _plan(remapped=True)
    ec = MixedPrecisionEmbeddingCollection(
        _tables(), plan=plan, config=lp.LowPrecisionConfig(), row_maps={"t0": rank}
    )
    w = _float_weights()["t0"]
    ec.load_float_weight("t0", w)
    raw_view = ec.dequantized_weight("t0")[rank]
    pruned = rank >= 45
    assert torch.count_nonzero(raw_view[pruned]) == 0
    assert torch.equal(raw_view[rank >= 30][~pruned[rank >= 30]], w[(rank >= 30) & ~pruned])  # fp32 group
    kjt = _kjt()
    out, want = ec(kjt), _reference(ec)(kjt)
    for k in want:
        assert torch.equal(out[k].values(), want[k].values())
    with pytest.raises(ValueError, match="remapped=True but no row_maps"):
        MixedPrecisionEmbeddingCollection(_tables(), plan=plan)
    with pytest.raises(ValueError, match=r"row_maps given for table\(s\) \['t1'\]"):
        MixedPrecisionEmbeddingCollection(_tables(), plan=plan, row_maps={"t0": rank, "t1": torch.arange(40)})
    with pytest.raises(ValueError, match="not a permutation of \\[0, 60\\): rank 0 is given to 2"):
        MixedPrecisionEmbeddingCollection(_tables(), plan=plan, row_maps={"t0": torch.arange(60) // 2 * 2})
    with pytest.raises(ValueError, match="has shape \\(59,\\)"):
        MixedPrecisionEmbeddingCollection(_tables(), plan=plan, row_maps={"t0": torch.arange(59)})


def test_bad_plans_and_arguments_are_refused():
    tables = _tables()
    with pytest.raises(ValueError, match="is for 50 x 8 rows but the table is 60 x 8"):
        MixedPrecisionEmbeddingCollection(
            tables, plan=PrecisionPlan({"t0": TablePrecision(50, 8, (50,), (8,))})
        )
    with pytest.raises(ValueError, match="names tables \\['zz'\\] that are not in"):
        MixedPrecisionEmbeddingCollection(
            tables, plan=PrecisionPlan({"zz": TablePrecision(5, 8, (5,), (8,))})
        )
    with pytest.raises(ValueError, match="prunes every row of every table"):
        MixedPrecisionEmbeddingCollection(
            tables, plan=PrecisionPlan.uniform({"t0": (60, 8), "t1": (40, 8)}, 0)
        )
    with pytest.raises(TypeError, match="plan= .keyword. must be a PrecisionPlan, got dict"):
        MixedPrecisionEmbeddingCollection(tables, plan={})
    with pytest.raises(TypeError, match="required keyword-only argument: 'plan'"):
        MixedPrecisionEmbeddingCollection(tables, None, _plan())
    with pytest.raises(TypeError, match="need_indices must be a bool, got PrecisionPlan"):
        MixedPrecisionEmbeddingCollection(tables, None, _plan(), plan=_plan())
    with pytest.raises(TypeError, match="list of torchrec.EmbeddingConfig"):
        MixedPrecisionEmbeddingCollection(make_tables(), plan=_plan())
    odd = [
        tables[0],
        torchrec.EmbeddingConfig(name="t1", embedding_dim=16, num_embeddings=40, feature_names=["c"]),
    ]
    with pytest.raises(ValueError, match="same embedding_dim"):
        MixedPrecisionEmbeddingCollection(odd, plan=PrecisionPlan({}))
    text = repr(MixedPrecisionEmbeddingCollection(tables, plan=_plan()))
    assert (
        "t0: 60 x 8, rows 0-10: 8 bits, rows 10-30: 4 bits, rows 30-45: 32 bits, rows 45-60: 0 bits" in text
    )


def test_convert_swaps_collections_of_both_kinds_keeping_weights_and_optimizer_tags():
    bag_tables = [
        torchrec.EmbeddingBagConfig(name="u", embedding_dim=16, num_embeddings=40, feature_names=["d"])
    ]
    ebc = torchrec.EmbeddingBagCollection(bag_tables)
    ec = torchrec.EmbeddingCollection(_tables())
    _apply_optimizer_in_backward(torch.optim.SGD, ec.parameters(), {"lr": 0.5})
    model = torch.nn.ModuleDict({"pooled": ebc, "seq": ec})
    w0 = ec.embeddings["t0"].weight.detach().clone()
    wu = ebc.embedding_bags["u"].weight.detach().clone()
    rank = torch.arange(60).flip(0)  # raw id i -> rank 59 - i
    plan = PrecisionPlan({**_plan(remapped=True).tables, "u": TablePrecision(40, 16, (8, 40), (8, 32))})
    lp.convert(model, lp.MixedPrecisionConfig(plan), row_maps={"t0": rank})
    assert isinstance(model["seq"], MixedPrecisionEmbeddingCollection)
    assert isinstance(model["pooled"], MixedPrecisionEmbeddingBagCollection)
    assert set(model["seq"].plan.tables) == {"t0", "t1"} and set(model["pooled"].plan.tables) == {"u"}
    mixed = model["seq"]
    raw = mixed.dequantized_weight("t0")[rank]  # back in raw id order
    fp32 = (rank >= 30) & (rank < 45)
    assert torch.equal(raw[fp32], w0[fp32])
    assert torch.count_nonzero(raw[rank >= 45]) == 0
    assert (raw[rank < 10] - w0[rank < 10]).abs().max() < 0.01
    assert torch.equal(model["pooled"].dequantized_weight("u")[8:], wu[8:])
    for name in mixed.group_tables("t0"):
        assert mixed.row_groups.tables[name].handle._optimizer_kwargs[0]["lr"] == 0.5


def test_a_training_step_syncs_the_host_as_often_as_the_bag_collection():
    from tests.modules.test_host_syncs import _count_syncs

    ec = MixedPrecisionEmbeddingCollection(_tables(), plan=_plan())
    bags = [
        torchrec.EmbeddingBagConfig(name=t.name, embedding_dim=DIM, num_embeddings=t.num_embeddings,
                                    feature_names=t.feature_names)
        for t in _tables()
    ]  # fmt: skip
    ebc = MixedPrecisionEmbeddingBagCollection(bags, plan=_plan())
    kjt = _kjt()

    def ec_step():
        sum(v.values().sum() for v in ec(kjt).values()).backward()

    def ebc_step():
        ebc(kjt).values().sum().backward()

    ec_step(), ebc_step()  # first steps set up optimizer state
    assert _count_syncs(ec_step) == _count_syncs(ebc_step)


def test_convert_finding_no_collection_names_both_kinds():
    both = r"holds no torchrec.EmbeddingBagCollection or torchrec.EmbeddingCollection \(or subclass\)"
    with pytest.warns(UserWarning, match=both):
        lp.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), lp.MixedPrecisionConfig(_plan()))
    with pytest.warns(UserWarning, match=both):
        lp.convert(torch.nn.Sequential(torch.nn.Linear(2, 2)), lp.MPESearchConfig())

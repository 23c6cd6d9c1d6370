import io

import pytest
import torch

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt


def _train(ebc, tables, gen, steps):
    for _ in range(steps):
        ebc(random_kjt(tables, gen=gen)).values().pow(2).sum().backward()


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_resume_equals_uninterrupted(optimizer):
    tables = make_tables()
    cfg = lp.LowPrecisionConfig(bits=4, optimizer=optimizer)
    full = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg)
    first = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg)
    first.load_state_dict(full.state_dict())
    g_full, g_first = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _train(full, tables, g_full, 6)
    _train(first, tables, g_first, 3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg.replace(seed=0))
    resumed.load_state_dict(torch.load(buf))
    assert int(resumed.step) == 3  # the rounding RNG position travels with the checkpoint
    _train(resumed, tables, g_first, 3)
    for key, v in full.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed.state_dict()[key]), key


def test_state_dict_entries():
    tables = make_tables()
    sd = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8)).state_dict()
    assert sd["tables.t0.qweight"].shape == (60, 8 + 4) and sd["tables.t0.qweight"].dtype == torch.uint8
    assert sd["tables.t0.step_size"].shape == (60,) and sd["tables.t0.momentum1"].shape == (60,)
    assert sd["_extra_state"]["tables"]["t1"] == {
        "rows": 40,
        "dim": 16,
        "bits": 8,
        "optimizer": "rowwise_adagrad",
        "learn_step_size": True,
        "column_shards": [0],
    }


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bits": 4}, r"table 't0': checkpoint has bits=8 but this collection has bits=4"),
        ({"learn_step_size": False}, "learn_step_size"),
    ],
)
def test_mismatched_checkpoint_is_refused_and_nothing_loads(change, match):
    tables = make_tables()
    src = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    cfg = lp.LowPrecisionConfig(bits=8)
    dst = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=cfg, per_table_configs={"t0": cfg.replace(**change)}
    )
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        dst.load_state_dict(src.state_dict())
    for k, v in dst.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), f"{k} was partially loaded"


def test_mismatched_dims_and_names():
    src = lp.LowPrecisionEmbeddingBagCollection(make_tables())
    with pytest.raises(ValueError, match=r"table 't1': checkpoint has dim=16 but this collection has dim=32"):
        lp.LowPrecisionEmbeddingBagCollection(make_tables(dims=(8, 32))).load_state_dict(src.state_dict())
    other = make_tables()
    other[1].name = "t_other"
    with pytest.raises(ValueError, match=r"missing: \['t_other'\], extra: \['t1'\]"):
        lp.LowPrecisionEmbeddingBagCollection(other).load_state_dict(src.state_dict())


def _tensors(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _unchanged(module, before: dict) -> None:
    after = _tensors(module)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda sd: sd.pop("tables.t1.qweight"),
            r"checkpoint lacks 1 entries of this collection: tables.t1.qweight;",
        ),
        (
            lambda sd: sd.pop("tables.t1.momentum1"),
            r"lacks 1 entries .*tables.t1.momentum1; nothing was loaded",
        ),
        (
            lambda sd: sd.__setitem__("tables.t1.step_size", torch.ones(7)),
            r"tables.t1.step_size has shape \(7,\), expected \(40,\)",
        ),
    ],
)
def test_partial_checkpoint_loads_nothing(edit, match):
    tables = make_tables()
    src = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=4))
    _train(src, tables, torch.Generator().manual_seed(1), 2)
    sd = src.state_dict()
    edit(sd)
    dst = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=4, seed=9))
    before = _tensors(dst)
    with pytest.raises(ValueError, match=match):
        dst.load_state_dict(sd)
    _unchanged(dst, before)
    with pytest.raises(ValueError, match=match):  # also under strict=False: all or nothing
        dst.load_state_dict(sd, strict=False)
    _unchanged(dst, before)
    # Without any of the collection's entries, load_state_dict's own strict handling applies.
    sd = {k: v for k, v in sd.items() if k == "_extra_state"}
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict(sd)


def test_partial_checkpoint_of_a_mixed_precision_collection_loads_nothing():
    from tests.modules.test_mixed_precision import _plan
    from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection

    tables = make_tables()
    src = MixedPrecisionEmbeddingBagCollection(tables, plan=_plan(), config=lp.LowPrecisionConfig())
    _train(src, tables, torch.Generator().manual_seed(2), 2)
    sd = src.state_dict()
    last = sorted(k for k in sd if k.endswith(".qweight"))[-1]  # a group loaded after the others
    del sd[last]
    dst = MixedPrecisionEmbeddingBagCollection(tables, plan=_plan(), config=lp.LowPrecisionConfig(seed=4))
    before = _tensors(dst)
    with pytest.raises(ValueError, match=rf"lacks 1 entries of this collection: {last}; nothing was loaded"):
        dst.load_state_dict(sd)
    _unchanged(dst, before)

"""TorchRec behaviours the collections keep: init_fn, features shared by tables, and the
mixed-precision collection's defaults."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torchrec
from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision


def _float_reference(ebc, tables):
    """A torchrec.EmbeddingBagCollection holding ``ebc``'s dequantized tables."""
    ref = torchrec.EmbeddingBagCollection(tables)
    with torch.no_grad():
        for t in tables:
            ref.embedding_bags[t.name].weight.copy_(ebc.dequantized_weight(t.name))
    return ref


def _table(name, rows, dim, features, **kw):
    return torchrec.EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, **kw
    )


@pytest.mark.parametrize("bits", [32, 8])
def test_init_fn_initialises_the_rows(bits):
    init = partial(torch.nn.init.constant_, val=0.25)
    tables = [_table("t0", 30, 8, ["a"], init_fn=init), _table("t1", 20, 8, ["b"])]
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=bits))
    w = ebc.dequantized_weight("t0")
    # int8: within half of the LSQ initial step, 2 * mean|x| / sqrt(127) = 0.0444
    torch.testing.assert_close(w, torch.full_like(w, 0.25), rtol=0, atol=0 if bits == 32 else 0.0223)
    # The default init (no init_fn) keeps its seeded uniform draw in the config's range.
    lo, hi = tables[1].get_weight_init_min(), tables[1].get_weight_init_max()
    w1 = ebc.dequantized_weight("t1")
    slack = 0.0 if bits == 32 else 0.02  # int8: the LSQ grid may step past the range by a fraction
    assert w1.min() >= lo - slack and w1.max() <= hi + slack and w1.std() > 0.1 * (hi - lo)
    # A returning init_fn (e.g. torch.nn.init.normal_) is honoured too; a wrong one is refused.
    torch.manual_seed(0)
    normal = lp.LowPrecisionEmbeddingBagCollection(
        [_table("t", 4000, 8, ["a"], init_fn=partial(torch.nn.init.normal_, std=0.02))],
        config=lp.LowPrecisionConfig(bits=32),
    )
    assert abs(normal.dequantized_weight("t").std().item() - 0.02) < 1e-3
    with pytest.raises(ValueError, match=r"init_fn must fill the \[30, 8\] fp32 weight"):
        lp.LowPrecisionEmbeddingBagCollection([_table("t", 30, 8, ["a"], init_fn=lambda w: torch.zeros(3))])


def test_a_feature_shared_by_two_tables_is_looked_up_by_both_as_torchrec_does():
    tables = [
        _table("t0", 20, 8, ["a", "b"]),
        _table("t1", 30, 4, ["a"], pooling=PoolingType.MEAN),
    ]
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=32, optimizer="sgd", learning_rate=0.5, rounding="nearest")
    )
    ref = _float_reference(ebc, tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5, 19]), lengths=torch.tensor([1, 2, 1, 2])
    )
    out, want = ebc(kjt), ref(kjt)
    assert out.keys() == want.keys() == ["a@t0", "b", "a@t1"]
    torch.testing.assert_close(out.values(), want.values(), rtol=0, atol=0)
    # One SGD step: both tables get the gradient of their own lookup of "a".
    g = torch.randn_like(want.values())
    (out.values() * g).sum().backward()
    (want.values() * g).sum().backward()
    for t in tables:
        w = ref.embedding_bags[t.name].weight
        torch.testing.assert_close(
            ebc.dequantized_weight(t.name), w.detach() - 0.5 * w.grad, rtol=0, atol=1e-6
        )


def test_mixed_precision_collection_needs_its_plan_and_reads_data_type_without_config():
    tables = [_table("t0", 40, 8, ["a"]), _table("t1", 20, 8, ["b"], data_type=DataType.INT4)]
    plan = PrecisionPlan({"t0": TablePrecision(40, 8, (10, 40), (8, 2))})
    with pytest.raises(TypeError, match="plan"):
        lp.MixedPrecisionEmbeddingBagCollection(tables)
    ebc = lp.MixedPrecisionEmbeddingBagCollection(tables, plan=plan)
    assert ebc.plan.tables["t0"].bits == (8, 2)
    assert ebc.plan.tables["t1"].bits == (4,)  # not in the plan: its data_type, as the LP collection
    low = lp.LowPrecisionEmbeddingBagCollection(tables)
    assert low.table_config("t1").bits == 4


def test_mixed_precision_reads_a_shared_feature_in_both_tables():
    tables = [_table("t0", 20, 8, ["a", "b"]), _table("t1", 30, 4, ["a"])]
    plan = PrecisionPlan(
        {"t0": TablePrecision(20, 8, (5, 20), (32, 16)), "t1": TablePrecision(30, 4, (30,), (32,))}
    )
    ebc = lp.MixedPrecisionEmbeddingBagCollection(tables, plan=plan)
    ref = _float_reference(ebc, tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 12, 3, 4, 5, 19]), lengths=torch.tensor([2, 1, 1, 2])
    )
    out, want = ebc(kjt), ref(kjt)
    assert out.keys() == want.keys() == ["a@t0", "b", "a@t1"]
    torch.testing.assert_close(out.values(), want.values(), rtol=0, atol=0)


def test_search_and_codebook_collections_name_shared_features_as_torchrec():
    tables = [_table("t0", 200, 8, ["a"]), _table("t1", 20, 8, ["a", "b"])]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 12, 3, 4, 5, 19]), lengths=torch.tensor([2, 1, 1, 2])
    )
    fl = torchrec.EmbeddingBagCollection(tables)
    want = fl(kjt)
    search = lp.convert(torchrec.EmbeddingBagCollection(tables), lp.MPESearchConfig(num_groups=2))
    assert search(kjt).keys() == want.keys() == ["a@t0", "a@t1", "b"]
    # t0 compressed, t1 kept: the kept collection's own "a" is this collection's a@t1.
    cfg = lp.CodebookConfig(num_subspaces=2, codebook_size=4, min_rows=100, steps=0)
    coded = lp.convert(fl, cfg)
    got = coded(kjt)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got["a@t1"], want["a@t1"], rtol=0, atol=0)
    torch.testing.assert_close(got["b"], want["b"], rtol=0, atol=0)

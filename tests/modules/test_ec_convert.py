"""convert() swaps torchrec.EmbeddingCollection for LowPrecisionEmbeddingCollection: weights
quantized as for the EBC, optimizer tags kept, filter_fn honoured, EBCs and ECs in one call."""

from __future__ import annotations

import pytest
import torch
import torchrec
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.modules import MixedPrecisionEmbeddingCollection
from torchrec_lowprec.modules.convert import to_float
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision
from torchrec_lowprec.quant.layout import code_range

DIM = 8


def _ec_tables(data_types=(DataType.FP32, DataType.FP32)):
    # s1 shares feature "h" with s0: their outputs are named "h@s0" and "h@s1".
    feats = (["h"], ["h", "q"])
    return [
        torchrec.EmbeddingConfig(
            name=f"s{i}", embedding_dim=DIM, num_embeddings=40 + 10 * i, feature_names=f, data_type=d
        )
        for i, (f, d) in enumerate(zip(feats, data_types))
    ]


def _float_ec(tables=None, need_indices=False, seed=0) -> torchrec.EmbeddingCollection:
    torch.manual_seed(seed)
    ec = torchrec.EmbeddingCollection(
        tables or _ec_tables(), device=torch.device("cpu"), need_indices=need_indices
    )
    with torch.no_grad():  # values well inside fp16's range, varied per row
        for emb in ec.embeddings.values():
            emb.weight.copy_(torch.randn_like(emb.weight.float()).to(emb.weight.dtype))
    return ec


def _kjt(tables, seed=1) -> KeyedJaggedTensor:
    """Each feature once, its ids in range of every table reading it (a shared feature too)."""
    rows: dict[str, int] = {}
    for t in tables:
        for f in t.feature_names:
            rows[f] = min(rows.get(f, t.num_embeddings), t.num_embeddings)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(rows) * 5,), generator=gen)
    per_key = lengths.view(len(rows), 5).sum(1).tolist()
    values = torch.cat([torch.randint(0, r, (n,), generator=gen) for r, n in zip(rows.values(), per_key)])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(rows), values=values, lengths=lengths)


def _step_bound(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per element: half the row's ``absmax`` step (nearest rounding) plus the fp16 scale's error."""
    qmax = code_range(bits)[1]
    step = weight.abs().amax(dim=1, keepdim=True) / qmax
    return 0.5 * step * (1 + 2.0**-8) + 1e-7


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
def test_converted_outputs_match_the_float_ec_within_each_width(bits):
    tables = _ec_tables()
    ec = _float_ec(tables, need_indices=True)
    kjt = _kjt(tables)
    ref = ec(kjt)
    model = nn.Sequential(ec)
    cfg = lp.LowPrecisionConfig(bits=bits, step_size_init="absmax")  # absmax: no value clipped
    assert lp.convert(model, cfg) is model
    lpec = model[0]
    assert isinstance(lpec, lp.LowPrecisionEmbeddingCollection) and lpec.need_indices()
    out = lpec(kjt)
    assert list(out) == list(ref) == ["h@s0", "h@s1", "q"]
    for name, t in (("h@s0", "s0"), ("h@s1", "s1"), ("q", "s1")):
        got, want = out[name], ref[name]
        assert torch.equal(got.lengths(), want.lengths()) and torch.equal(got.weights(), want.weights())
        ids = want.weights()
        w = ec.embeddings[t].weight.detach()
        if bits == 32:
            assert torch.equal(got.values(), want.values())
        elif bits == 16:
            torch.testing.assert_close(got.values(), want.values(), rtol=2.0**-11, atol=0)
        else:
            err = (got.values() - want.values()).abs()
            assert bool((err <= _step_bound(w, bits)[ids]).all()), float(err.max())
        # What the forward reads is the stored table.
        assert torch.equal(got.values(), lpec.dequantized_weight(t)[ids])


def test_data_type_decides_with_no_config_and_per_table_overrides():
    tables = _ec_tables((DataType.INT4, DataType.FP16))
    model = nn.Sequential(_float_ec(tables))
    lp.convert(model)
    assert {n: model[0].table_config(n).bits for n in ("s0", "s1")} == {"s0": 4, "s1": 16}
    assert [t.data_type for t in model[0].embedding_configs()] == [DataType.INT4, DataType.FP16]
    model = nn.Sequential(_float_ec(tables))
    lp.convert(model, lp.PerTableConfig({"s1": lp.LowPrecisionConfig(bits=2)}, lp.LowPrecisionConfig(bits=8)))
    assert {n: model[0].table_config(n).bits for n in ("s0", "s1")} == {"s0": 8, "s1": 2}


def test_ec_rows_are_quantized_exactly_as_the_ebc_handler_does():
    tables = _ec_tables()
    ec = _float_ec(tables)
    bags = [
        torchrec.EmbeddingBagConfig(
            name=t.name, embedding_dim=DIM, num_embeddings=t.num_embeddings, feature_names=t.feature_names
        )
        for t in tables
    ]
    ebc = torchrec.EmbeddingBagCollection(bags)
    with torch.no_grad():
        for t in tables:
            ebc.embedding_bags[t.name].weight.copy_(ec.embeddings[t.name].weight)
    model = nn.ModuleDict({"ec": ec, "ebc": ebc})
    lp.convert(model, lp.LowPrecisionConfig(bits=4))  # both kinds in one call
    assert isinstance(model["ec"], lp.LowPrecisionEmbeddingCollection)
    assert isinstance(model["ebc"], lp.LowPrecisionEmbeddingBagCollection)
    for t in tables:
        assert torch.equal(model["ec"].quantized_weight(t.name), model["ebc"].quantized_weight(t.name))


def test_in_backward_tags_filter_fn_training_mode_and_to_float():
    tables = _ec_tables()
    tagged, plain = _float_ec(tables), _float_ec(tables)
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, tagged.parameters(), {"lr": 0.5})
    plain.eval()
    model = nn.ModuleDict({"tagged": tagged, "plain": plain})
    lp.convert(model, lp.LowPrecisionConfig(bits=8), filter_fn=lambda m, fqn: fqn == "tagged")
    assert model["plain"] is plain  # rejected by filter_fn: untouched
    lpec = model["tagged"]
    assert lpec.training
    for t in tables:
        handle = lpec.tables[t.name].handle
        assert handle._optimizer_classes == [torchrec.optim.RowWiseAdagrad]
        assert handle._optimizer_kwargs == [{"lr": 0.5}]
    # The tag decides the fused optimizer: row-wise Adagrad keeps one fp32 per row.
    assert lpec.memory_bytes(per_table=True)["s0"]["optimizer"] == 40 * 4
    kjt = _kjt(tables)
    before = lpec.quantized_weight("s0").clone()
    sum(jt.values().sum() for jt in lpec(kjt).values()).backward()
    assert not torch.equal(lpec.quantized_weight("s0"), before)  # trained in place
    back = to_float(lpec.eval())
    assert type(back) is torchrec.EmbeddingCollection and back.need_indices() == lpec.need_indices()
    assert [t.data_type for t in back.embedding_configs()] == [DataType.FP32] * 2
    want, got = lpec(kjt), back(kjt)
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k].values(), want[k].values())


def test_meta_ec_converts_without_weights():
    ec = torchrec.EmbeddingCollection(_ec_tables(), device=torch.device("meta"))
    out = lp.convert(ec, lp.LowPrecisionConfig(bits=4))
    assert isinstance(out, lp.LowPrecisionEmbeddingCollection) and out.device.type == "meta"
    assert out.memory_bytes(per_table=True)["s0"]["rows"] == 40 * (DIM // 2 + 4)


def test_messages_for_what_convert_cannot_do():
    # A converted model: nothing left to convert, and the warning names the new module.
    model = nn.Sequential(_float_ec())
    lp.convert(model, lp.LowPrecisionConfig(bits=8))
    with pytest.warns(
        UserWarning, match=r"EmbeddingCollection \(or subclass\).*LowPrecisionEmbeddingCollection at '0'"
    ):
        lp.convert(model, lp.LowPrecisionConfig(bits=8))
    # Mixed precision converts sequence collections too (tests/modules/test_mixed_precision_ec.py):
    # beside an EBC, both are swapped in one walk; a table the plan does not name stays whole.
    plan = PrecisionPlan({"b": TablePrecision(10, 4, (10,), (8,))})
    ebc = torchrec.EmbeddingBagCollection(
        [torchrec.EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=10, feature_names=["u"])]
    )
    both = nn.ModuleDict({"ebc": ebc, "ec": _float_ec()})
    lp.convert(both, lp.MixedPrecisionConfig(plan))
    assert isinstance(both["ec"], MixedPrecisionEmbeddingCollection)
    assert all(len(tp.bits) == 1 for tp in both["ec"].plan.tables.values())
    # Wrong config types and widths a table cannot hold.
    with pytest.raises(TypeError, match="config is a dict"):
        lp.convert(nn.Sequential(_float_ec()), {"s0": lp.LowPrecisionConfig()})
    with pytest.raises(TypeError, match="no transform for a config of type int"):
        lp.convert(nn.Sequential(_float_ec()), 4)
    bf16 = _ec_tables((DataType.BF16, DataType.FP32))
    with pytest.raises(ValueError, match="table 's0': data_type BF16 cannot be stored"):
        lp.convert(nn.Sequential(torchrec.EmbeddingCollection(bf16, device=torch.device("meta"))))
    odd = [torchrec.EmbeddingConfig(name="o", embedding_dim=6, num_embeddings=5, feature_names=["o"])]
    with pytest.raises(ValueError, match="embedding_dim=6 cannot be stored at 4 bits"):
        lp.convert(
            torchrec.EmbeddingCollection(odd, device=torch.device("meta")), lp.LowPrecisionConfig(bits=4)
        )
    with pytest.raises(TypeError, match="to_float expects"):
        to_float(_float_ec())

"""Export of a LowPrecisionEmbeddingCollection to torchrec.quant.EmbeddingCollection: the same
rows byte for byte, the same outputs bit for bit (keys, order, lengths, ids, values)."""

from __future__ import annotations

import pytest
import torch
import torchrec
from torch import nn
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.quant.embedding_modules import EmbeddingCollection as QuantEC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.configs import InferenceConfig
from torchrec_lowprec.export import (
    KeyOrderedEmbeddingCollection,
    export_collection,
    export_embedding_collection,
)

DIM = 8
# Widths interleave (int8, int4, fp32, int2, fp16, int8), and "a" / "c" are each read by two
# tables of different widths (named a@t0, a@t2, c@t1, c@t5).
BITS = {"t0": 8, "t1": 4, "t2": 32, "t3": 2, "t4": 16, "t5": 8}
FEATURES = {"t0": ["a", "b"], "t1": ["c"], "t2": ["a"], "t3": ["d"], "t4": ["e"], "t5": ["c"]}
DATA_TYPES = {8: DataType.INT8, 4: DataType.INT4, 32: DataType.FP32, 2: DataType.INT2, 16: DataType.FP16}


def _tables(names=tuple(BITS)):
    return [
        torchrec.EmbeddingConfig(
            name=n, embedding_dim=DIM, num_embeddings=20 + 7 * i, feature_names=FEATURES[n]
        )
        for i, n in enumerate(names)
    ]


def _kjt(tables, batch=6, seed=0, dtype=torch.int64) -> KeyedJaggedTensor:
    rows: dict[str, int] = {}
    for t in tables:
        for f in t.feature_names:
            rows[f] = min(rows.get(f, t.num_embeddings), t.num_embeddings)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (len(rows) * batch,), generator=gen)
    lengths[:batch] = 0  # an empty feature's worth of sequences
    per_key = lengths.view(len(rows), batch).sum(1).tolist()
    values = torch.cat([torch.randint(0, r, (n,), generator=gen) for r, n in zip(rows.values(), per_key)])
    return KeyedJaggedTensor.from_lengths_sync(keys=list(rows), values=values.to(dtype), lengths=lengths)


def _trained_ec(names=tuple(BITS), need_indices=True) -> lp.LowPrecisionEmbeddingCollection:
    tables = _tables(names)
    cfgs = {n: lp.LowPrecisionConfig(bits=BITS[n]) for n in names}
    ec = lp.LowPrecisionEmbeddingCollection(tables, need_indices=need_indices, per_table_configs=cfgs)
    for s in range(3):  # trained rows and step sizes, not the init
        out = ec(_kjt(tables, seed=10 + s))
        sum((jt.values() ** 2).sum() for jt in out.values()).backward()
    return ec.eval()


def _assert_same(out: dict, ref: dict) -> None:
    assert list(out) == list(ref)
    for k in ref:
        assert torch.equal(out[k].lengths(), ref[k].lengths()), k
        assert out[k].values().dtype == torch.float32 and torch.equal(out[k].values(), ref[k].values()), k
        if ref[k].weights_or_none() is None:
            assert out[k].weights_or_none() is None
        else:
            assert torch.equal(out[k].weights(), ref[k].weights()), k


@pytest.mark.parametrize("row_alignment", [None, 16])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_export_is_bit_exact_for_every_width_and_shared_features(row_alignment, dtype):
    ec = _trained_ec()
    kjt = _kjt(ec.embedding_configs(), dtype=dtype)
    with torch.no_grad():
        ref = ec(kjt)
    assert list(ref) == ["a@t0", "b", "c@t1", "a@t2", "d", "e", "c@t5"]
    served = export_embedding_collection(ec, row_alignment=row_alignment)
    assert isinstance(served, KeyOrderedEmbeddingCollection) and isinstance(served.collection, QuantEC)
    assert not served.training and served.need_indices()
    _assert_same(served(kjt), ref)
    # Without the wrapper: TorchRec's key order (grouped by width), the same tensors per key.
    bare = export_embedding_collection(ec, keep_key_order=False)
    assert isinstance(bare, QuantEC)
    out = bare(kjt)
    assert list(out) == ["a@t0", "b", "c@t5", "c@t1", "a@t2", "d", "e"]
    _assert_same({k: out[k] for k in ref}, ref)


def test_exported_rows_are_the_trained_bytes_and_grouped_widths_need_no_wrapper():
    ec = _trained_ec(("t1", "t0", "t5", "t2"), need_indices=False)  # int4, int8, int8, fp32
    qec = export_embedding_collection(ec)
    assert type(qec) is QuantEC  # widths already grouped: TorchRec's module itself
    assert {t.name: t.data_type for t in qec.embedding_configs()} == {
        n: DATA_TYPES[BITS[n]] for n in BITS if n in ("t0", "t1", "t2", "t5")
    }
    checked = 0
    for tbe in qec._emb_modules:
        for spec, (codes, scale_bias) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
            ours = ec.quantized_weight(spec[0])
            held = codes if scale_bias is None else torch.cat([scale_bias, codes], dim=1)
            assert torch.equal(held, ours)
            checked += 1
    assert checked == 4
    kjt = _kjt(ec.embedding_configs())
    with torch.no_grad():
        _assert_same(qec(kjt), ec(kjt))


def test_fp16_output_is_within_fp16_rounding():
    ec = _trained_ec()
    kjt = _kjt(ec.embedding_configs())
    with torch.no_grad():
        ref = ec(kjt)
    out = export_embedding_collection(ec, output_dtype=torch.float16)(kjt)
    for k in ref:
        assert out[k].values().dtype == torch.float16
        torch.testing.assert_close(out[k].values().float(), ref[k].values(), rtol=2.0**-11, atol=2.0**-24)


def test_convert_exports_ebcs_and_ecs_of_a_model_in_one_call():
    ec = _trained_ec()
    bags = [torchrec.EmbeddingBagConfig(name="bag", embedding_dim=4, num_embeddings=30, feature_names=["u"])]
    ebc = lp.LowPrecisionEmbeddingBagCollection(bags, config=lp.LowPrecisionConfig(bits=4))
    model = nn.ModuleDict({"ec": ec, "ebc": ebc}).train()
    kjt = _kjt(ec.embedding_configs())
    ukjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["u"], values=torch.tensor([1, 2, 29]), lengths=torch.tensor([2, 1])
    )
    with torch.no_grad():
        ref, pooled = ec.eval()(kjt), ebc.eval()(ukjt)
    assert lp.convert(model, InferenceConfig()) is model and not model.training
    assert isinstance(model["ec"], KeyOrderedEmbeddingCollection)
    assert isinstance(model["ebc"], QuantEBC)
    _assert_same(model["ec"](kjt), ref)
    assert torch.equal(model["ebc"](ukjt).values(), pooled.values())


def test_what_cannot_be_exported_is_refused_clearly():
    with pytest.raises(
        ValueError, match="holds no LowPrecisionEmbeddingBagCollection or LowPrecisionEmbeddingCollection"
    ):
        lp.convert(
            nn.Sequential(torchrec.EmbeddingCollection(_tables(), device=torch.device("cpu"))),
            InferenceConfig(),
        )
    meta = lp.LowPrecisionEmbeddingCollection(_tables(), device="meta", config=lp.LowPrecisionConfig(bits=4))
    with pytest.raises(ValueError, match="meta device"):
        export_embedding_collection(meta)
    with pytest.raises(ValueError, match="output_dtype=torch.bfloat16"):
        export_embedding_collection(_trained_ec(("t0",)), output_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="output_dtype='bfloat16' must be 'float32' or 'float16'"):
        InferenceConfig(output_dtype="bfloat16")
    with pytest.raises(TypeError, match="expects a LowPrecisionEmbeddingCollection, got EmbeddingCollection"):
        export_embedding_collection(torchrec.EmbeddingCollection(_tables(), device=torch.device("cpu")))
    with pytest.raises(TypeError, match=r"got LowPrecisionEmbeddingCollection \(export_embedding_collection"):
        export_collection(_trained_ec(("t0",)))


def test_served_module_does_not_refuse_out_of_range_ids():
    """TorchRec's module reads row 0 for an id past the table (FBGEMM logs an error); the
    trained module raised. This pins the difference docs/failure-modes.md describes."""
    ec = _trained_ec(("t1",), need_indices=False)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["c"], values=torch.tensor([1, 99]), lengths=torch.tensor([2])
    )
    with pytest.raises(IndexError, match="id 99 of feature 'c' is out of range for table 't1'"):
        ec(kjt)
    out = export_embedding_collection(ec)(kjt)["c"].values()
    assert torch.equal(out[1], ec.dequantized_weight("t1")[0])


def test_fx_trace_and_jit_script_of_the_served_collection():
    from torchrec.fx import symbolic_trace

    ec = _trained_ec()
    kjt = _kjt(ec.embedding_configs())
    with torch.no_grad():
        ref = ec(kjt)
    traced = symbolic_trace(export_embedding_collection(ec, register_tbes=True))
    _assert_same(traced(kjt), ref)
    _assert_same(torch.jit.script(traced)(kjt), ref)

"""CodebookEmbeddingBagCollection: lookup, bytes, checkpoints, fine-tuning, the codebook transform on models."""

from __future__ import annotations

import io

import pytest
import torch
import torchrec
from torch import nn
from torchrec.modules.embedding_configs import PoolingType

import torchrec_lowprec as lp
from tests.helpers import random_kjt
from torchrec_lowprec.compress import (
    CodebookConfig,
    CodebookEmbeddingBagCollection,
    codebook_parameters,
    finetune_codebooks,
)
from torchrec_lowprec.configs import InferenceConfig


def _compress(model, frequencies, config=None):
    """The codebook transform, as users call it."""
    return lp.convert(model, config or CodebookConfig(), frequencies=frequencies)


FAST = dict(steps=20, kmeans_iters=3, batch_size=256)


def _tables(pooling=(PoolingType.SUM, PoolingType.MEAN, PoolingType.SUM)):
    spec = [("big0", 16, 400, ["a", "b"]), ("small", 8, 30, ["c"]), ("big1", 12, 300, ["d"])]
    return [
        torchrec.EmbeddingBagConfig(name=n, embedding_dim=d, num_embeddings=r, feature_names=f, pooling=p)
        for (n, d, r, f), p in zip(spec, pooling)
    ]


def _freqs(tables, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        f: torch.randint(0, 50, (t.num_embeddings,), generator=gen) for t in tables for f in t.feature_names
    }


def _reference(cebc: CodebookEmbeddingBagCollection, src: nn.Module, kjt, weighted: bool) -> dict:
    """Plain-torch pooled lookup of the reconstructed tables (gather + segment sum)."""
    out = {}
    per = kjt.to_dict()
    for t in cebc.embedding_bag_configs():
        if t.name in cebc.compressed:
            table = cebc.compressed[t.name].reconstruct()
        elif isinstance(src, lp.LowPrecisionEmbeddingBagCollection):
            table = src.dequantized_weight(t.name)
        else:
            table = src.embedding_bags[t.name].weight
        for f in t.feature_names:
            jt = per[f]
            rows = table[jt.values()]
            if weighted:
                rows = rows * jt.weights()[:, None]
            segs = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths())
            pooled = torch.zeros(jt.lengths().numel(), t.embedding_dim).index_add_(0, segs, rows)
            if t.pooling == PoolingType.MEAN:
                pooled = pooled / jt.lengths().clamp(min=1)[:, None]
            out[f] = pooled
    return out


@pytest.mark.parametrize("kind", ["lp", "float"])
@pytest.mark.parametrize("weighted", [False, True])
def test_lookup_equals_gather_and_pool_reference(kind, weighted):
    # torchrec's float EBC (nn.EmbeddingBag) refuses per-sample weights with MEAN pooling.
    tables = _tables((PoolingType.SUM,) * 3) if kind == "float" and weighted else _tables()
    if kind == "lp":
        src = lp.LowPrecisionEmbeddingBagCollection(
            tables, config=lp.LowPrecisionConfig(bits=8), per_table_configs={"small": lp.LowPrecisionConfig(bits=4)},
            is_weighted=weighted,
        )  # fmt: skip
    else:
        src = torchrec.EmbeddingBagCollection(tables, is_weighted=weighted)
    kjt = random_kjt(tables, batch=7, weighted=weighted)
    with torch.no_grad():
        before = src(kjt)
    cebc = _compress(
        src, _freqs(tables), CodebookConfig(num_subspaces=4, codebook_size=16, min_rows=100, **FAST)
    )
    assert isinstance(cebc, CodebookEmbeddingBagCollection)
    assert sorted(cebc.compressed) == ["big0", "big1"]
    assert type(cebc.uncompressed) is type(src)  # the small table stays in its original form
    out = cebc(kjt)
    assert out.keys() == before.keys() and out.length_per_key() == before.length_per_key()
    ref = _reference(cebc, cebc.uncompressed, kjt, weighted)
    got = out.to_dict()
    for f in out.keys():
        torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-6)
    # The small table is served exactly as before.
    torch.testing.assert_close(got["c"], before.to_dict()["c"], rtol=0, atol=0)


def test_bytes_accounting_matches_tensor_sizes():
    tables = _tables()
    src = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    small_bytes = src.memory_bytes(per_table=True)["small"]["total"]
    cebc = _compress(
        src, _freqs(tables), CodebookConfig(num_subspaces=4, codebook_size=16, min_rows=100, **FAST)
    )
    per = cebc.memory_bytes(per_table=True)
    assert per["big0"]["total"] == 400 * 4 * 1 + 4 * 16 * 4 * 4  # uint8 codes + fp32 codebooks [L, K, d]
    assert per["big1"]["total"] == 300 * 4 * 1 + 4 * 16 * 3 * 4
    assert per["uncompressed"] == {"total": small_bytes}
    tensors = sum(t.numel() * t.element_size() for t in cebc.compressed.state_dict().values())
    assert cebc.memory_bytes() == tensors + small_bytes
    # K > 256: uint16 codes (the table must be larger than its codebook)
    big = [
        torchrec.EmbeddingBagConfig(name="big0", embedding_dim=16, num_embeddings=600, feature_names=["a"])
    ]
    wide = _compress(
        torchrec.EmbeddingBagCollection(big), None, CodebookConfig(num_subspaces=2, codebook_size=512, min_rows=100,
                                                                   steps=1, kmeans_iters=1)
    )  # fmt: skip
    assert wide.compressed["big0"].codes.dtype == torch.uint16
    assert wide.memory_bytes(per_table=True)["big0"] == {
        "codes": 600 * 2 * 2,
        "codebooks": 2 * 512 * 8 * 4,
        "total": 600 * 2 * 2 + 2 * 512 * 8 * 4,
    }


def test_state_dict_round_trip_and_validation():
    tables = _tables()
    cfg = CodebookConfig(num_subspaces=4, codebook_size=16, min_rows=100, **FAST)
    a = _compress(lp.LowPrecisionEmbeddingBagCollection(tables), _freqs(tables), cfg)
    b = _compress(lp.LowPrecisionEmbeddingBagCollection(tables), _freqs(tables, seed=1), cfg)
    kjt = random_kjt(tables, batch=5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(a(kjt).values(), b(kjt).values())
    other = _compress(lp.LowPrecisionEmbeddingBagCollection(tables), None, CodebookConfig(num_subspaces=2,
                      codebook_size=16, min_rows=100, **FAST))  # fmt: skip
    snapshot = {k: v.clone() for k, v in b.state_dict().items() if not k.endswith("_extra_state")}
    with pytest.raises(ValueError, match="table 'big0': checkpoint has num_subspaces=2, this collection 4"):
        b.load_state_dict(other.state_dict())
    for k, v in b.state_dict().items():  # nothing was copied
        if k in snapshot:
            assert torch.equal(v, snapshot[k])


def test_finetuning_changes_codebooks_not_codes_nor_other_weights():
    tables = _tables(pooling=(PoolingType.SUM,) * 3)
    src = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    model = nn.ModuleDict({"ebc": src, "head": nn.Linear(36 + 8, 1)})
    _compress(model, _freqs(tables), CodebookConfig(num_subspaces=4, codebook_size=16, min_rows=100, **FAST))
    cebc = model["ebc"]
    codes = {n: t.codes.clone() for n, t in cebc.compressed.items()}
    books = [p.detach().clone() for p in codebook_parameters(model)]
    small = cebc.uncompressed.quantized_weight("small").clone()
    head = model["head"].weight.detach().clone()

    def loss_fn(kjt):
        pooled = cebc(kjt).to_dict()
        x = torch.cat([pooled["a"] + pooled["b"], pooled["c"], pooled["d"], pooled["a"][:, :8]], dim=1)
        return (model["head"](x) - 1.0).pow(2).mean()

    batches = [random_kjt(tables, batch=16, gen=torch.Generator().manual_seed(i)) for i in range(5)]
    assert finetune_codebooks(model, batches, loss_fn, lr=1e-2) == 5
    for n, t in cebc.compressed.items():
        assert torch.equal(t.codes, codes[n])
    assert all(not torch.equal(p, q) for p, q in zip(codebook_parameters(model), books))
    assert torch.equal(cebc.uncompressed.quantized_weight("small"), small)
    assert torch.equal(model["head"].weight, head)
    assert model["head"].weight.requires_grad  # restored after fine-tuning


def test_compress_in_a_model_keeps_small_collections_and_refuses_bad_input():
    tables = _tables()
    tiny = [torchrec.EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=10, feature_names=["z"])]
    model = nn.ModuleDict(
        {"big": lp.LowPrecisionEmbeddingBagCollection(tables), "tiny": torchrec.EmbeddingBagCollection(tiny)}
    )
    tiny_mod = model["tiny"]
    _compress(model, {**_freqs(tables), "z": torch.ones(10)}, CodebookConfig(num_subspaces=4, codebook_size=16,
                                                                         min_rows=100, **FAST))  # fmt: skip
    assert isinstance(model["big"], CodebookEmbeddingBagCollection)
    assert model["tiny"] is tiny_mod  # no table above min_rows: untouched
    with pytest.raises(ValueError, match="holds no EmbeddingBagCollection"):
        _compress(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"num_subspaces=5 does not divide embedding_dim=16 of table 'big0'"):
        _compress(
            lp.LowPrecisionEmbeddingBagCollection(tables), None, CodebookConfig(num_subspaces=5, min_rows=100)
        )
    with pytest.raises(ValueError, match="no entry for feature 'b' of table 'big0'"):
        _compress(lp.LowPrecisionEmbeddingBagCollection(tables), {"a": torch.ones(400)},
                  CodebookConfig(num_subspaces=4, codebook_size=16, min_rows=100, **FAST))  # fmt: skip
    cebc = model["big"]
    bad = random_kjt(tables, batch=3)
    bad = torchrec.KeyedJaggedTensor(
        keys=bad.keys(), values=bad.values().clone().fill_(999), lengths=bad.lengths()
    )
    with pytest.raises(IndexError, match="id 999 outside"):
        cebc(bad)


def test_to_inference_converts_the_uncompressed_lp_tables_inside_a_compressed_collection():
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    tables = _tables()
    model = nn.ModuleDict(
        {"ebc": lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=4))}
    )
    _compress(model, _freqs(tables), CodebookConfig(num_subspaces=4, codebook_size=16, min_rows=100, **FAST))
    kjt = random_kjt(tables, batch=6)
    with torch.no_grad():
        ref = model["ebc"](kjt)
    lp.convert(model, InferenceConfig())
    assert isinstance(model["ebc"], CodebookEmbeddingBagCollection)
    assert isinstance(model["ebc"].uncompressed, QuantEBC)
    assert torch.equal(model["ebc"](kjt).values(), ref.values())

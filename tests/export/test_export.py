"""Export to TorchRec's quantized inference collection: same bytes, same outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchrec
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import DataType, PoolingType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import random_kjt
from torchrec_lowprec.configs import InferenceConfig
from torchrec_lowprec.data.metrics import exact_auc
from torchrec_lowprec.data.synthetic import SyntheticCTR, SyntheticCTRConfig
from torchrec_lowprec.export import KeyOrderedCollection, check_servable, export_collection

MIXED_BITS = {"t0": 8, "t1": 4, "t2": 32, "t3": 2, "t4": 16}


def _mixed_tables(interleaved_pooling: bool):
    spec = [(8, 60, ["a", "b"]), (16, 40, ["c"]), (12, 30, ["d"]), (4, 20, ["e"]), (8, 10, ["g"])]
    out = []
    for i, (d, r, f) in enumerate(spec):
        pooling = PoolingType.MEAN if interleaved_pooling and i % 2 else PoolingType.SUM
        out.append(
            torchrec.EmbeddingBagConfig(
                name=f"t{i}", embedding_dim=d, num_embeddings=r, feature_names=f, pooling=pooling
            )
        )
    return out


def _mixed_ebc(tables, weighted: bool) -> lp.LowPrecisionEmbeddingBagCollection:
    cfgs = {k: lp.LowPrecisionConfig(bits=b) for k, b in MIXED_BITS.items()}
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, per_table_configs=cfgs, is_weighted=weighted)
    # A few training steps so that scales and codes are trained values, not the init.
    for s in range(3):
        ebc(
            random_kjt(tables, batch=16, weighted=weighted, gen=torch.Generator().manual_seed(s))
        ).values().pow(2).sum().backward()
    return ebc.eval()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("row_alignment", [None, 16])
def test_export_is_bit_exact_for_mixed_bits_pooling_and_weights(weighted, interleaved, row_alignment):
    tables = _mixed_tables(interleaved)
    ebc = _mixed_ebc(tables, weighted)
    kjt = random_kjt(tables, batch=9, weighted=weighted, gen=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = ebc(kjt)
    served = export_collection(ebc, row_alignment=row_alignment)
    assert isinstance(served, KeyOrderedCollection if interleaved else QuantEBC)
    out = served(kjt)
    assert out.keys() == ref.keys()
    assert out.length_per_key() == ref.length_per_key()
    # Same bytes through the same FBGEMM kernel and fp32 output: equal, not just close.
    assert torch.equal(out.values(), ref.values())


def test_exported_tables_hold_the_trained_bytes_and_data_types():
    tables = _mixed_tables(False)
    ebc = _mixed_ebc(tables, False)
    qebc = export_collection(ebc)
    assert {t.name: t.data_type for t in qebc.embedding_bag_configs()} == {
        "t0": DataType.INT8,
        "t1": DataType.INT4,
        "t2": DataType.FP32,
        "t3": DataType.INT2,
        "t4": DataType.FP16,
    }
    tbe = qebc._emb_modules[0]
    for spec, (codes, scale_bias) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
        ours = ebc.quantized_weight(spec[0])
        if scale_bias is None:
            assert torch.equal(codes, ours)
        else:
            assert torch.equal(torch.cat([scale_bias, codes], dim=1), ours)


def test_fp16_output_is_within_fp16_rounding():
    tables = _mixed_tables(False)
    ebc = _mixed_ebc(tables, False)
    kjt = random_kjt(tables, batch=9)
    with torch.no_grad():
        ref = ebc(kjt).values()
    out = export_collection(ebc, output_dtype=torch.float16)(kjt).values()
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, rtol=2**-10, atol=1e-4)


class _RenamingWrapper(nn.Module):
    """Stands in for a wrapper (e.g. mixed precision) that holds an LP collection as a child
    and rewrites the KJT before calling it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, kjt: KeyedJaggedTensor):
        renamed = KeyedJaggedTensor(
            keys=[f"in_{k}" for k in kjt.keys()], values=kjt.values(), lengths=kjt.lengths()
        )
        return self.inner(renamed)


def test_to_inference_replaces_nested_collections_and_keeps_parents():
    tables = [
        torchrec.EmbeddingBagConfig(name="p0", embedding_dim=8, num_embeddings=30, feature_names=["in_x"]),
        torchrec.EmbeddingBagConfig(name="p1", embedding_dim=8, num_embeddings=20, feature_names=["in_y"]),
    ]
    inner = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=4), per_table_configs={"p1": lp.LowPrecisionConfig(bits=8)}
    )
    model = nn.Sequential(nn.Identity(), _RenamingWrapper(inner)).eval()
    outer_tables = [
        torchrec.EmbeddingBagConfig(name=t.name, embedding_dim=8, num_embeddings=t.num_embeddings,
                                    feature_names=[t.feature_names[0][3:]])
        for t in tables
    ]  # fmt: skip
    kjt = random_kjt(outer_tables, batch=5)
    with torch.no_grad():
        ref = model(kjt)
    wrapper = model[1]
    assert lp.convert(model, InferenceConfig()) is model
    assert model[1] is wrapper
    assert isinstance(wrapper.inner, QuantEBC)
    assert torch.equal(model(kjt).values(), ref.values())


def test_bad_input_gives_one_clear_error():
    model = nn.Sequential(torchrec.EmbeddingBagCollection(_mixed_tables(False)))
    with pytest.raises(ValueError, match="holds no LowPrecisionEmbeddingBagCollection"):
        lp.convert(model, InferenceConfig())
    with pytest.raises(ValueError, match="embedding_dim=6 at 4 bits.*multiple of 4"):
        check_servable("t", 4, 6)
    with pytest.raises(ValueError, match="bits=3"):
        check_servable("t", 3, 8)
    with pytest.raises(TypeError, match="LowPrecisionEmbeddingBagCollection"):
        export_collection(torchrec.EmbeddingBagCollection(_mixed_tables(False)))


# ----- a trained DLRM, before and after export -----
DIM = 16
MIXED = {"t_cat_0": 4, "t_cat_1": 8, "t_cat_2": 4, "t_cat_3": 8}
WITH_FLOAT = {"t_cat_0": 4, "t_cat_1": 8, "t_cat_2": 2, "t_cat_3": 16}


@pytest.fixture(scope="module")
def ctr_data() -> SyntheticCTR:
    cfg = SyntheticCTRConfig(
        vocab_sizes=(2000, 500, 100, 20), num_dense=4, train_rows=60_000, val_rows=0, test_rows=8_000, seed=3
    )
    return SyntheticCTR(cfg)


@pytest.fixture(scope="module")
def trained(ctr_data):
    """One trained DLRM per bit assignment, trained once for the module; tests get copies."""
    cache: dict[tuple, DLRMTrain] = {}

    def get(bits: dict[str, int]) -> DLRMTrain:
        key = tuple(sorted(bits.items()))
        if key not in cache:
            # Small ops: one thread (two were up to 50x slower on the shared 2-core machine).
            old = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cache[key] = _train_dlrm(ctr_data, bits)
            finally:
                torch.set_num_threads(old)
        return copy.deepcopy(cache[key])

    return get


def _train_dlrm(data: SyntheticCTR, per_table_bits: dict[str, int]) -> DLRMTrain:
    torch.manual_seed(0)
    ebc = torchrec.EmbeddingBagCollection(data.embedding_bag_configs(DIM))
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=data.num_dense,
            dense_arch_layer_sizes=[32, DIM],
            over_arch_layer_sizes=[32, 1],
        )
    )
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    cfgs = {k: lp.LowPrecisionConfig(bits=b) for k, b in per_table_bits.items()}
    lp.convert(model, lp.PerTableConfig(cfgs, lp.LowPrecisionConfig(bits=8)))
    dense = [p for p in model.parameters() if not hasattr(p, "_optimizer_classes")]
    opt = torch.optim.Adam(dense, lr=3e-3)
    for batch in data.batches("train", 256):  # 235 steps
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _predict(dlrm: nn.Module, data: SyntheticCTR) -> tuple[torch.Tensor, np.ndarray]:
    logits, labels = [], []
    with torch.no_grad():
        for b in data.batches("test", 4096):
            logits.append(dlrm(b.dense_features, b.sparse_features).reshape(-1))
            labels.append(b.labels.numpy())
    return torch.cat(logits), np.concatenate(labels)


@pytest.mark.parametrize(
    "bits",
    [
        {"t_cat_0": 8, "t_cat_1": 8, "t_cat_2": 8, "t_cat_3": 8},
        {"t_cat_0": 4, "t_cat_1": 4, "t_cat_2": 4, "t_cat_3": 4},
        MIXED,
    ],
    ids=["int8", "int4", "mixed"],
)
def test_trained_dlrm_predicts_identically_after_export(ctr_data, trained, bits):
    train = trained(bits)
    dlrm = train.model
    before, labels = _predict(dlrm, ctr_data)
    assert exact_auc(before.double().numpy(), labels) > 0.62  # it learned something
    lp.convert(dlrm, InferenceConfig())
    assert isinstance(dlrm.sparse_arch.embedding_bag_collection, QuantEBC)
    after, _ = _predict(dlrm, ctr_data)
    assert torch.equal(after, before)


def test_fx_trace_and_jit_script_of_the_served_model(ctr_data, trained):
    from torchrec.fx import symbolic_trace

    dlrm = trained(WITH_FLOAT).model
    batch = next(iter(ctr_data.batches("test", 512)))
    args = (batch.dense_features, batch.sparse_features)
    with torch.no_grad():
        ref = dlrm(*args)
    lp.convert(dlrm, InferenceConfig(register_tbes=True))
    traced = symbolic_trace(dlrm)
    assert torch.equal(traced(*args), ref)
    scripted = torch.jit.script(traced)
    assert torch.equal(scripted(*args), ref)


@pytest.fixture
def propagate_device():
    """TorchRec's inference sharding builds its TBEs (and moves inputs) to "cuda" unless this
    global flag is on, both when sharding and in forward."""
    from torchrec.distributed.global_settings import get_propogate_device, set_propogate_device

    old = get_propogate_device()
    set_propogate_device(True)
    yield
    set_propogate_device(old)


def _shard_table_wise_on_cpu(dlrm: nn.Module) -> nn.Module:
    import copy

    from torchrec.distributed.quant_embeddingbag import QuantEmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan
    from torchrec.inference.modules import shard_quant_model

    qebc = dlrm.sparse_arch.embedding_bag_collection
    plan = construct_module_sharding_plan(
        qebc,
        per_param_sharding={
            t.name: table_wise(rank=0, device="cpu", compute_kernel="quant")
            for t in qebc.embedding_bag_configs()
        },
        sharder=QuantEmbeddingBagCollectionSharder(),
        local_size=1,
        world_size=1,
        device_type="cpu",
    )
    sharded, _ = shard_quant_model(
        copy.deepcopy(dlrm),
        world_size=1,
        compute_device="cpu",
        sharding_device="cpu",
        sharding_plan=ShardingPlan({"sparse_arch.embedding_bag_collection": plan}),
    )
    return sharded


def test_table_wise_quant_sharding_on_cpu_serves_the_same_predictions(ctr_data, trained, propagate_device):
    from torchrec.inference.modules import assign_weights_to_tbe, get_table_to_weights_from_tbe

    dlrm = trained(MIXED).model
    batch = next(iter(ctr_data.batches("test", 512)))
    args = (batch.dense_features, batch.sparse_features)
    with torch.no_grad():
        ref = dlrm(*args)
    lp.convert(dlrm, InferenceConfig(register_tbes=True))
    sharded = _shard_table_wise_on_cpu(dlrm)
    # The sharded model is built empty: copy the served tables into its TBEs.
    assign_weights_to_tbe(sharded, get_table_to_weights_from_tbe(dlrm))
    with torch.no_grad():
        assert torch.equal(sharded(*args), ref)


def test_torchrec_quant_sharding_still_rejects_float_tables(trained, propagate_device):
    """TorchRec 1.8's sharded quant state dict assumes every table has a scale/bias, so FP16/FP32
    tables crash it (quant_state.py). When this starts passing, docs/serving.md can drop the caveat."""
    dlrm = trained(WITH_FLOAT).model
    lp.convert(dlrm, InferenceConfig(register_tbes=True))
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'shape'"):
        _shard_table_wise_on_cpu(dlrm)

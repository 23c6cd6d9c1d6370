"""Sharded (2 gloo ranks) against unsharded: same outputs, same tables, same step sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchrec
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder

pytestmark = pytest.mark.slow
B = 4  # per-rank batch
STEPS = 3


class Wrap(nn.Module):
    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.ebc(kjt).to_dict()


def tables(pooling=torchrec.PoolingType.SUM):
    return [
        torchrec.EmbeddingBagConfig(
            name="t0", embedding_dim=16, num_embeddings=40, feature_names=["f0", "f1"], pooling=pooling
        ),
        torchrec.EmbeddingBagConfig(
            name="t1", embedding_dim=8, num_embeddings=30, feature_names=["f2"], pooling=pooling
        ),
        torchrec.EmbeddingBagConfig(
            name="t2", embedding_dim=16, num_embeddings=50, feature_names=["f3"], pooling=pooling
        ),
    ]


def global_batch(tbls, step: int, world: int, weighted: bool = False) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(100 + step)
    keys, lengths, values = [], [], []
    for t in tbls:
        for f in t.feature_names:
            ln = torch.randint(0, 4, (B * world,), generator=g)
            keys.append(f)
            lengths.append(ln)
            values.append(torch.randint(0, t.num_embeddings, (int(ln.sum()),), generator=g))
    v = torch.cat(values)
    w = torch.rand(v.numel(), generator=g) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=v, lengths=torch.cat(lengths), weights=w)


def rank_slice(kjt: KeyedJaggedTensor, rank: int) -> KeyedJaggedTensor:
    """Rows [rank*B, (rank+1)*B) of every feature."""
    d = kjt.to_dict()
    keys, lengths, values, weights = [], [], [], []
    for k in kjt.keys():
        jt = d[k]
        off = jt.offsets()
        lo, hi = int(off[rank * B]), int(off[(rank + 1) * B])
        keys.append(k)
        lengths.append(jt.lengths()[rank * B : (rank + 1) * B])
        values.append(jt.values()[lo:hi])
        if kjt.weights_or_none() is not None:
            weights.append(jt.weights()[lo:hi])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weights else None,
    )


def loss_weights(tbls):
    g = torch.Generator().manual_seed(7)
    return {f: torch.randn(t.embedding_dim, generator=g) for t in tbls for f in t.feature_names}


def check_and_backward(out, ref_out, W, rank: int, world: int) -> None:
    """This rank's sharded outputs equal its slice of the unsharded reference's; then both
    backward: the reference on the global loss / world size (TorchRec divides sharded
    embedding gradients by the world size, as DDP averages)."""
    for k in out:
        torch.testing.assert_close(out[k], ref_out[k][rank * B : (rank + 1) * B], rtol=0, atol=1e-6)
    (sum((ref_out[k] * W[k]).sum() for k in ref_out) / world).backward()
    sum((out[k] * W[k]).sum() for k in out).backward()


def _check_state_equal(sharded_sd: dict, ref_sd: dict, prefix: str, float_rtol: float = 0.0) -> int:
    """Every local shard equals the same region of the unsharded state: codes bit for bit, fp32
    state (step sizes, optimizer) bit for bit or within ``float_rtol``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    checked = 0
    for key, v in sharded_sd.items():
        if not key.startswith(prefix) or not isinstance(v, ShardedTensor):
            continue
        ref = ref_sd[key[len(prefix) :]]
        for shard in v.local_shards():
            idx = tuple(
                slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
            )
            if float_rtol and shard.tensor.is_floating_point():
                torch.testing.assert_close(shard.tensor, ref[idx], rtol=float_rtol, atol=0)
            else:
                assert torch.equal(shard.tensor, ref[idx]), f"{key} differs at {shard.metadata.shard_offsets}"
            checked += 1
    return checked


def _body(
    rank: int,
    world: int,
    plan_kind: str,
    cfg: lp.LowPrecisionConfig,
    per_table: dict,
    pooling: str,
    weighted: bool,
    float_rtol: float = 0.0,
) -> None:
    torch.manual_seed(0)
    pool = torchrec.PoolingType[pooling]
    tbls = tables(pool)
    unsharded = lp.LowPrecisionEmbeddingBagCollection(
        tbls, config=cfg, per_table_configs=per_table, is_weighted=weighted
    )
    ref = copy.deepcopy(unsharded)
    sharder = LowPrecisionEmbeddingBagCollectionSharder()
    specs = {
        "tw": {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=1)},
        "rw": {"t0": row_wise(), "t1": row_wise(), "t2": row_wise()},
        "cw": {"t0": column_wise(ranks=[0, 1]), "t1": table_wise(rank=0), "t2": column_wise(ranks=[1, 0])},
        "twrw": {
            "t0": table_row_wise(host_index=0),
            "t1": table_row_wise(host_index=0),
            "t2": table_row_wise(host_index=0),
        },
    }[plan_kind]
    module_plan = construct_module_sharding_plan(
        unsharded, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    model = DistributedModelParallel(
        Wrap(unsharded),
        plan=ShardingPlan({"ebc": module_plan}),
        sharders=lp.sharders(),
        device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
    )
    if plan_kind == "cw":
        _column_wise_against_blocks(rank, world, model, unsharded, cfg, tbls)
        return
    W = loss_weights(tbls)
    for step in range(STEPS):
        gkjt = global_batch(tbls, step, world, weighted)
        out = model(rank_slice(gkjt, rank))
        if ref is not None:
            check_and_backward(out, Wrap(ref)(gkjt), W, rank, world)
        else:
            sum((out[k] * W[k]).sum() for k in out).backward()
    sd = model.state_dict()
    if ref is not None:
        checked = _check_state_equal(sd, ref.state_dict(), "ebc.", float_rtol)
        assert checked > 0
        assert int(sd["ebc.step"]) == STEPS


def _column_wise_against_blocks(rank, world, model, unsharded, cfg, tbls) -> None:
    """The CW rule (one step size per row per column shard) reproduced unsharded: each column
    block of t0/t2 is its own table, keyed for rounding as the shard is (global table, column
    offset). Sharded and unsharded must then agree bit for bit."""
    from torchrec_lowprec.modules.table_layout import ShardOrigin

    blocked = {"t0": 2, "t2": 2}
    ref_tables, origins, keys, src = [], {}, [], []
    base_keys = [f for t in tbls for f in t.feature_names]
    for t in tbls:
        n = blocked.get(t.name, 1)
        w = t.embedding_dim // n
        for k in range(n):
            name = f"{t.name}@{k}" if n > 1 else t.name
            feats = [f"{f}@{k}" if n > 1 else f for f in t.feature_names]
            ref_tables.append(
                torchrec.EmbeddingBagConfig(
                    name=name, embedding_dim=w, num_embeddings=t.num_embeddings, feature_names=feats
                )
            )
            origins[name] = ShardOrigin(t.name, 0, k * w)
            keys += feats
            src += [base_keys.index(f) for f in t.feature_names]
    ref = lp.LowPrecisionEmbeddingBagCollection(
        ref_tables, config=cfg, init_weights=False, shard_origins=origins
    )
    with torch.no_grad():
        for t in ref_tables:
            base, _, k = t.name.partition("@")
            if k:  # what sharding does to a column shard: re-quantize the block
                w = t.embedding_dim
                ref.load_float_weight(
                    t.name, unsharded.dequantized_weight(base)[:, int(k) * w : (int(k) + 1) * w]
                )
            else:
                ref.quantized_weight(t.name).copy_(unsharded.quantized_weight(t.name))
                ref.tables[t.name].step_size.copy_(unsharded.tables[t.name].step_size)
    W = loss_weights(tbls)
    for step in range(STEPS):
        gkjt = global_batch(tbls, step, world)
        out = model(rank_slice(gkjt, rank))
        p = gkjt.permute(src)
        ref_kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=p.values(), lengths=p.lengths())
        r = Wrap(ref)(ref_kjt)
        ref_out = {f: torch.cat([r[k] for k in keys if k.split("@")[0] == f], dim=1) for f in base_keys}
        check_and_backward(out, ref_out, W, rank, world)
    # The reference in the sharded checkpoint layout: blocks side by side.
    rsd = ref.state_dict()
    merged = {}
    for t in tbls:
        n = blocked.get(t.name, 1)
        names = [f"{t.name}@{k}" for k in range(n)] if n > 1 else [t.name]
        merged[f"tables.{t.name}.qweight"] = torch.cat([rsd[f"tables.{m}.qweight"] for m in names], dim=1)
        for key in ("step_size", "momentum1"):
            parts = [rsd[f"tables.{m}.{key}"] for m in names]
            merged[f"tables.{t.name}.{key}"] = torch.stack(parts, dim=1) if n > 1 else parts[0]
    assert _check_state_equal(model.state_dict(), merged, "ebc.") > 0


ALPT8_NEAREST = lp.LowPrecisionConfig(
    bits=8, rounding="nearest", optimizer="sgd", learning_rate=0.1, step_size_lr=1e-3
)
ALPT_SR = lp.LowPrecisionConfig(bits=8, rounding="stochastic", learning_rate=0.05, step_size_lr=1e-3)


@pytest.mark.parametrize("plan_kind", ["tw", "rw", "twrw"])
def test_sharded_equals_unsharded_nearest(plan_kind):
    run_multiprocess(_body, plan_kind, ALPT8_NEAREST, {"t1": ALPT8_NEAREST.replace(bits=4)}, "SUM", False)


@pytest.mark.parametrize("plan_kind", ["tw", "rw"])
def test_sharded_equals_unsharded_stochastic_mixed_bits(plan_kind):
    per = {
        "t1": ALPT_SR.replace(bits=4, optimizer="adam"),
        "t2": ALPT_SR.replace(bits=2, optimizer="adagrad"),
    }
    run_multiprocess(_body, plan_kind, ALPT_SR, per, "SUM", True)


def test_sharded_equals_unsharded_dithered_rounding():
    # The dithered draws are keyed by global row and column like the stochastic ones.
    dith = ALPT_SR.replace(rounding="dithered")
    run_multiprocess(
        _body, "rw", dith, {"t1": dith.replace(bits=4), "t2": dith.replace(bits=16)}, "SUM", True
    )


def test_row_wise_mean_pooling():
    # TorchRec divides row-wise MEAN bags after its reduce-scatter (its mean-pooling callback);
    # the codes stay bit-identical, the fp32 optimizer state agrees to a few ulp.
    run_multiprocess(_body, "rw", ALPT_SR, {}, "MEAN", False, 1e-5)


def test_column_wise_trains():
    run_multiprocess(_body, "cw", ALPT_SR, {}, "SUM", False)

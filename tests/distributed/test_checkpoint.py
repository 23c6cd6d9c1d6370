"""Checkpoints that reshard: save under TABLE_WISE on 2 ranks, load under ROW_WISE on 2 ranks
and into one unsharded process; training then continues exactly like an uninterrupted run."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_sharding import (
    ALPT_SR,
    Wrap,
    _check_state_equal,
    global_batch,
    loss_weights,
    rank_slice,
    tables,
)
from torchrec_lowprec.distributed import checkpoint
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder

pytestmark = pytest.mark.slow
PER_TABLE = {"t1": ALPT_SR.replace(bits=4, optimizer="adam"), "t2": ALPT_SR.replace(bits=2)}


def _dmp(module, specs, world):
    plan = construct_module_sharding_plan(
        module,
        specs,
        local_size=world,
        world_size=world,
        device_type="cpu",
        sharder=LowPrecisionEmbeddingBagCollectionSharder(),
    )
    return DistributedModelParallel(
        Wrap(module), plan=ShardingPlan({"ebc": plan}), sharders=lp.sharders(), device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
    )  # fmt: skip


def _step(model, ref, step, rank, world, tbls, W):
    g = global_batch(tbls, step, world)
    out = model(rank_slice(g, rank))
    sum((out[k] * W[k]).sum() for k in out).backward()
    ref_out = Wrap(ref)(g)
    (sum((ref_out[k] * W[k]).sum() for k in ref_out) / world).backward()


def _reshard_body(rank: int, world: int, path: str) -> None:
    tbls = tables()
    W = loss_weights(tbls)
    src = lp.LowPrecisionEmbeddingBagCollection(tbls, config=ALPT_SR, per_table_configs=PER_TABLE)
    ref = copy.deepcopy(src)
    tw = _dmp(src, {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=0)}, world)
    for step in range(2):
        _step(tw, ref, step, rank, world, tbls, W)
    checkpoint.save(tw, path)
    if rank == 0:
        torch.save(ref.state_dict(), os.path.join(path, "..", "ref_after_2.pt"))

    # A different init and a different plan: everything must come from the checkpoint.
    other = lp.LowPrecisionEmbeddingBagCollection(
        tbls, config=ALPT_SR.replace(seed=0), per_table_configs=PER_TABLE
    )
    with torch.no_grad():
        for t in tbls:
            other.load_float_weight(t.name, torch.randn(t.num_embeddings, t.embedding_dim))
    rw = _dmp(other, {"t0": row_wise(), "t1": row_wise(), "t2": row_wise()}, world)
    checkpoint.load(rw, path)
    assert _check_state_equal(rw.state_dict(), ref.state_dict(), "ebc.") > 0
    for step in range(2, 4):
        _step(rw, ref, step, rank, world, tbls, W)
    assert _check_state_equal(rw.state_dict(), ref.state_dict(), "ebc.") > 0
    assert int(rw.state_dict()["ebc.step"]) == 4
    # Back into a TABLE_WISE model where each rank lacks some tables (DCP's default load
    # planner fails on exactly that).
    checkpoint.save(rw, path + "-rw")
    again = lp.LowPrecisionEmbeddingBagCollection(
        tbls, config=ALPT_SR.replace(seed=5), per_table_configs=PER_TABLE
    )
    tw2 = _dmp(again, {"t0": table_wise(rank=1), "t1": table_wise(rank=1), "t2": table_wise(rank=0)}, world)
    checkpoint.load(tw2, path + "-rw")
    assert _check_state_equal(tw2.state_dict(), ref.state_dict(), "ebc.") > 0


def test_table_wise_checkpoint_loads_row_wise_and_unsharded(tmp_path):
    path = str(tmp_path / "ckpt")
    run_multiprocess(_reshard_body, path)
    # One process, no process group: the 2-rank checkpoint into an unsharded module.
    tbls = tables()
    single = lp.LowPrecisionEmbeddingBagCollection(
        tbls, config=ALPT_SR.replace(seed=0), per_table_configs=PER_TABLE
    )
    checkpoint.load(Wrap(single), path)
    want = torch.load(tmp_path / "ref_after_2.pt")
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, want[key]), key


def test_mismatched_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "ckpt")
    tbls = tables()
    src = lp.LowPrecisionEmbeddingBagCollection(tbls, config=ALPT_SR, per_table_configs=PER_TABLE)
    checkpoint.save(Wrap(src), path)
    wrong = lp.LowPrecisionEmbeddingBagCollection(
        tbls, config=ALPT_SR, per_table_configs={**PER_TABLE, "t2": ALPT_SR.replace(bits=4)}
    )
    before = {k: v.clone() for k, v in wrong.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(
        ValueError,
        match=r"table 't2': checkpoint entry tables.t2.qweight has shape \(50, 8\), the model expects \(50, 12\)",
    ):
        checkpoint.load(Wrap(wrong), path)
    for k, v in wrong.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k])
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.load(Wrap(wrong), str(tmp_path / "nope"))


def _partial_body(rank: int, world: int) -> None:
    src = lp.LowPrecisionEmbeddingBagCollection(tables(), config=ALPT_SR, per_table_configs=PER_TABLE)
    rw = _dmp(src, {"t0": row_wise(), "t1": row_wise(), "t2": table_wise(rank=1)}, world)
    sd = rw.state_dict()
    other = lp.LowPrecisionEmbeddingBagCollection(
        tables(), config=ALPT_SR.replace(seed=3), per_table_configs=PER_TABLE
    )
    dst = _dmp(other, {"t0": row_wise(), "t1": row_wise(), "t2": table_wise(rank=1)}, world)

    def local() -> dict:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        return {
            (k, i): s.tensor.clone()
            for k, v in dst.state_dict().items()
            if isinstance(v, ShardedTensor)
            for i, s in enumerate(v.local_shards())
        }

    before = local()
    partial = {k: v for k, v in sd.items() if k != "ebc.tables.t1.qweight"}
    with pytest.raises(
        ValueError, match=r"lacks 1 entries of this collection: (ebc\.)?tables.t1.qweight; nothing"
    ):
        dst.load_state_dict(partial)
    after = local()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # None of the collection's entries: reported as missing under strict=True (was: never).
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"(ebc\.)?tables.t0.qweight\""):
        dst.load_state_dict({k: v for k, v in sd.items() if not k.startswith("ebc.")})
    dst.load_state_dict(sd)  # the whole state dict loads
    assert any(not torch.equal(v, before[k]) for k, v in local().items())
    # A non-finite master step size in this rank's shard: refused before any shard is copied.
    sd["ebc.tables.t0.step_size"].local_shards()[0].tensor[0] = float("nan")
    before = local()
    with pytest.raises(
        ValueError, match=r"table 't0': checkpoint entry (ebc\.)?tables.t0.step_size must be finite"
    ):
        dst.load_state_dict(sd)
    after = local()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_sharded_partial_state_dict_loads_nothing_and_missing_keys_are_reported():
    run_multiprocess(_partial_body)

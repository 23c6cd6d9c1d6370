"""TorchRec's planner, constructed with defaults and given only ``lp.sharders()``, sizes
low-precision shards by the bytes the sharded model then allocates, exactly (2 gloo ranks)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import torchrec
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.shard_estimators import _calculate_storage_specific_sizes
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan, get_tensor_size_bytes

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_sharding import Wrap, global_batch, rank_slice
from torchrec_lowprec.configs import PerTableConfig
from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection

pytestmark = pytest.mark.slow

# Odd row counts, every width, every optimizer, ALPT on and off.
TABLES = [
    torchrec.EmbeddingBagConfig(name="t0", embedding_dim=32, num_embeddings=5001, feature_names=["f0"]),
    torchrec.EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=3001, feature_names=["f1"]),
    torchrec.EmbeddingBagConfig(name="t2", embedding_dim=12, num_embeddings=777, feature_names=["f2"]),
    torchrec.EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=2003, feature_names=["f3"]),
]
CONFIGS = PerTableConfig(
    {
        "t0": lp.LowPrecisionConfig(bits=4),  # RowWiseAdagrad, ALPT
        "t1": lp.LowPrecisionConfig(bits=8, optimizer="adam"),
        "t2": lp.LowPrecisionConfig(bits=2, optimizer="sgd", learn_step_size=False),
        "t3": lp.LowPrecisionConfig(bits=16, optimizer="adagrad"),
    }
)


def _model() -> torch.nn.Module:
    ebc = torchrec.EmbeddingBagCollection(TABLES, device=torch.device("meta"))
    return lp.convert(Wrap(ebc), CONFIGS)


def _planned_tensor_bytes(plan: ShardingPlan, sharder, module, world: int) -> list[int]:
    """TorchRec's storage formula (what EmbeddingStorageEstimator adds to I/O) per rank, applied to
    the parameters our sharder hands the planner."""
    params = sharder.shardable_parameters(module)
    per_rank = [0] * world
    for ps_by_table in plan.plan.values():
        for name, ps in ps_by_table.items():
            p = params[name]
            shards = ps.sharding_spec.shards
            sizes = _calculate_storage_specific_sizes(
                storage=get_tensor_size_bytes(p),
                shape=p.shape,
                shard_sizes=[list(s.shard_sizes) for s in shards],
                sharding_type=ps.sharding_type,
                optimizer_class=getattr(p, "_optimizer_classes", [None])[0],
            )
            for s, nbytes in zip(shards, sizes):
                per_rank[s.placement.rank()] += nbytes
    return per_rank


def _allocated_bytes(model: torch.nn.Module) -> int:
    """nbytes of the tensors this rank's low-precision shards hold: the flat row buffer, step
    sizes and optimizer state (measured, not computed)."""
    total = 0
    for m in model.modules():
        if isinstance(m, ShardedLowPrecisionEmbeddingBagCollection):
            for lk in m._lp_lookups():
                if lk.ebc is None:
                    continue
                total += lk.ebc._flat.nbytes
                total += sum(
                    t.nbytes for t in list(lk.ebc.tables.parameters()) + list(lk.ebc.tables.buffers())
                )
    return total


def _train_one_step(model: torch.nn.Module, rank: int, world: int) -> None:
    out = model(rank_slice(global_batch(TABLES, 0, world), rank))
    sum(v.sum() for v in out.values()).backward()  # allocates the optimizer state


def _body(rank: int, world: int) -> None:
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    model = _model()
    sharders = lp.sharders()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"))
    plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    planned = _planned_tensor_bytes(plan, sharders[0], model.ebc, world)
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders, device=torch.device("cpu"), env=env)
    _train_one_step(dmp, rank, world)
    assert _allocated_bytes(dmp) == planned[rank], (rank, planned)
    assert dmp.module.ebc.memory_bytes() == planned[rank]

    # Row-wise shards (uneven: 5001 rows over 2 ranks), the same check.
    model = _model()
    module_plan = construct_module_sharding_plan(
        model.ebc, {t.name: row_wise() for t in TABLES}, local_size=world, world_size=world,
        device_type="cpu", sharder=sharders[0],
    )  # fmt: skip
    plan = ShardingPlan({"ebc": module_plan})
    planned = _planned_tensor_bytes(plan, sharders[0], model.ebc, world)
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders, device=torch.device("cpu"), env=env)
    _train_one_step(dmp, rank, world)
    assert _allocated_bytes(dmp) == planned[rank], (rank, planned)


def test_default_planner_bytes_equal_allocated_bytes_per_rank():
    run_multiprocess(_body)

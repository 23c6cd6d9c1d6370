"""TorchRec's planner with default construction sizes low-precision tables by real bytes."""

from __future__ import annotations

import copy

import torch
import torchrec
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.types import get_tensor_size_bytes

import torchrec_lowprec as lp
from torchrec_lowprec.distributed.sharder import PlannerParameter

GiB = 1 << 30


def _model(bits: int) -> torch.nn.Module:
    tables = [
        torchrec.EmbeddingBagConfig(
            name="big", embedding_dim=128, num_embeddings=40_000_000, feature_names=["f0"]
        ),
        torchrec.EmbeddingBagConfig(
            name="small", embedding_dim=128, num_embeddings=10_000_000, feature_names=["f1"]
        ),
    ]
    ebc = torchrec.EmbeddingBagCollection(tables, device=torch.device("meta"))
    return lp.convert(torch.nn.Sequential(ebc), lp.LowPrecisionConfig(bits=bits))


def test_int4_40m_plus_10m_rows_plans_with_default_planner():
    # fp32 would be 25.6 GB; int4 on CUDA: 80 B padded row + 4 B step + 4 B row-wise state.
    model = _model(4)
    sharders = lp.sharders()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=2, compute_device="cuda", hbm_cap=8 * GiB)
    )
    plan = planner.plan(model, sharders)
    assert set(plan.plan["0"]) == {"big", "small"}
    params = sharders[0].shardable_parameters(model[0])
    assert get_tensor_size_bytes(params["big"]) == 40_000_000 * (80 + 4 + 4)
    assert get_tensor_size_bytes(params["small"]) == 10_000_000 * 88
    # The planner's own per-shard storage (tensor + I/O) holds exactly the table's bytes.
    by_name = {so.name: so for so in planner._best_plan}
    big = by_name["big"]
    assert sum(s.storage.hbm for s in big.shards) >= 40_000_000 * 88
    assert sum(s.storage.hbm for s in big.shards) < 40_000_000 * 88 * 1.01


def test_planner_parameter_bytes_follow_the_planned_device_and_survive_deepcopy():
    model = _model(8)
    sharder = lp.sharders()[0]
    p = sharder.shardable_parameters(model[0])["small"]
    assert isinstance(p, PlannerParameter) and p.shape == (10_000_000, 128) and p.element_size() == 4
    sharder.sharding_types("cpu")  # int8 dim 128: 132 B rows, no padding on CPU
    assert get_tensor_size_bytes(p) == 10_000_000 * (132 + 4 + 4)
    sharder.sharding_types("cuda")  # padded to 144 B
    assert get_tensor_size_bytes(copy.deepcopy(p)) == 10_000_000 * (144 + 4 + 4)

"""DistributedModelParallel integration: a mixed float/int8/int4 DLRM planned by TorchRec's
planner with lp.sharders(), trained by TrainPipelineSparseDist; bad plans are refused early."""

from __future__ import annotations

import pytest
import torch
import torchrec
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, table_wise
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from torchrec_lowprec.distributed import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder

pytestmark = pytest.mark.slow
DIM = 8


class TwoCollections(nn.Module):
    """A DLRM whose sparse arch reads one float and one low-precision collection."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        float_tables = [
            torchrec.EmbeddingBagConfig(
                name="f_float", embedding_dim=DIM, num_embeddings=30, feature_names=["a"]
            )
        ]
        lp_tables = [
            torchrec.EmbeddingBagConfig(
                name="f_int8", embedding_dim=DIM, num_embeddings=40, feature_names=["b"]
            ),
            torchrec.EmbeddingBagConfig(
                name="f_int4", embedding_dim=DIM, num_embeddings=50, feature_names=["c"]
            ),
        ]
        self.float_ebc = torchrec.EmbeddingBagCollection(float_tables, device=device)
        self.lp_ebc = lp.LowPrecisionEmbeddingBagCollection(
            lp_tables,
            config=lp.LowPrecisionConfig(bits=8),
            per_table_configs={"f_int4": lp.LowPrecisionConfig(bits=4)},
            device=device,
        )
        self.over = nn.Linear(3 * DIM + 2, 1, device=device)

    def forward(self, batch: Batch):
        f = self.float_ebc(batch.sparse_features).to_dict()
        q = self.lp_ebc(batch.sparse_features).to_dict()
        x = torch.cat([f["a"], q["b"], q["c"], batch.dense_features], dim=1)
        logits = self.over(x).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


def _batches(n, rank, b=8):
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, 3, (3 * b,), generator=g)
        values = torch.cat(
            [
                torch.randint(0, r, (int(lengths[i * b : (i + 1) * b].sum()),), generator=g)
                for i, r in enumerate((30, 40, 50))
            ]
        )
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=values, lengths=lengths)
        out.append(
            Batch(
                dense_features=torch.randn(b, 2, generator=g),
                sparse_features=kjt,
                labels=torch.randint(0, 2, (b,), generator=g).float(),
            )
        )
    return out


def _pipeline_body(rank: int, world: int) -> None:
    from torch.distributed.optim import _apply_optimizer_in_backward

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = TwoCollections(torch.device("meta"))
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, model.float_ebc.parameters(), {"lr": 0.05})
    pg = torch.distributed.group.WORLD
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"))
    plan = planner.collective_plan(model, lp.sharders(), pg)
    assert plan.get_plan_for_module("lp_ebc")["f_int8"].compute_kernel == "fused"
    dmp = DistributedModelParallel(
        model, plan=plan, sharders=lp.sharders(), device=device, env=ShardingEnv.from_process_group(pg)
    )
    assert isinstance(dmp.module.lp_ebc, ShardedLowPrecisionEmbeddingBagCollection)
    dense_opt = torch.optim.Adam(
        [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=1e-2
    )
    before = {
        k: v.local_shards()[0].tensor.clone()
        for k, v in dmp.state_dict().items()
        if "qweight" in k and v.local_shards()
    }
    pipeline = TrainPipelineSparseDist(dmp, dense_opt, device)
    it = iter(_batches(6, rank))
    losses = []
    while True:
        try:
            out = pipeline.progress(it)
        except StopIteration:
            break
        losses.append(out)
    assert len(losses) == 6
    after = dmp.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k].local_shards()[0].tensor, v)]
    assert changed, "the pipeline did not update the low-precision tables"
    assert dmp.module.lp_ebc.memory_bytes() > 0


def test_planner_mixed_model_and_train_pipeline():
    run_multiprocess(_pipeline_body)


def _refusal_body(rank: int, world: int) -> None:
    module = lp.LowPrecisionEmbeddingBagCollection(
        [torchrec.EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])]
    )
    sharder = LowPrecisionEmbeddingBagCollectionSharder()
    env = ShardingEnv.from_process_group(torch.distributed.group.WORLD)
    assert "data_parallel" not in sharder.sharding_types("cpu")
    assert "row_wise" in sharder.sharding_types("cuda") and "row_wise" not in sharder.sharding_types("cpu")
    plan = construct_module_sharding_plan(
        module, {"t": data_parallel()}, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    with pytest.raises(ValueError, match="sharding type 'data_parallel' is not supported"):
        sharder.shard(module, plan, env)
    plan = construct_module_sharding_plan(
        module,
        {"t": table_wise(rank=0)},
        local_size=world,
        world_size=world,
        device_type="cpu",
        sharder=sharder,
    )
    plan["t"].compute_kernel = "fused_uvm_caching"
    with pytest.raises(ValueError, match="compute kernel 'fused_uvm_caching' is not supported"):
        sharder.shard(module, plan, env)


def test_unsupported_plans_are_refused_before_any_collective():
    run_multiprocess(_refusal_body)

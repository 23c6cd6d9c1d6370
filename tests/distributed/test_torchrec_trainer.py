"""A TorchRec-style trainer driving low-precision tables with TorchRec's own knobs only (issue 11,
"Done when"): DLRM built on the meta device with INT8 / INT4 tables (``data_type``),
``lp.convert``, ``apply_optimizer_in_backward`` after it, the default ``EmbeddingShardingPlanner``,
``DistributedModelParallel(sharders=lp.sharders())``, ``TrainPipelineSparseDist`` and a
``WarmupOptimizer`` schedule on ``dmp.fused_optimizer``; 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torchrec
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import DataType
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess

pytestmark = pytest.mark.slow
DIM, ROWS, B, STEPS, WARMUP = 8, 100, 16, 24, 8
TABLES = {"t_int8": DataType.INT8, "t_int4": DataType.INT4}


def _batches(rank: int, n: int = 4) -> list[Batch]:
    """``n`` batches (cycled): the label is whether f0's id is in the lower half of its table."""
    g = torch.Generator().manual_seed(10 + rank)
    out = []
    for _ in range(n):
        ids0 = torch.randint(0, ROWS, (B,), generator=g)
        ids1 = torch.randint(0, ROWS, (B,), generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f0", "f1"], values=torch.cat([ids0, ids1]), lengths=torch.ones(2 * B, dtype=torch.int64)
        )
        out.append(Batch(torch.randn(B, 4, generator=g), kjt, (ids0 < ROWS // 2).float()))
    return out


def _body(rank: int, world: int) -> None:
    torch.manual_seed(0)
    device, pg = torch.device("cpu"), torch.distributed.group.WORLD
    tables = [
        torchrec.EmbeddingBagConfig(
            name=n, embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f{i}"], data_type=d
        )
        for i, (n, d) in enumerate(TABLES.items())
    ]
    ebc = torchrec.EmbeddingBagCollection(tables, device=torch.device("meta"))
    model = DLRMTrain(DLRM(ebc, 4, [16, DIM], [16, 1], dense_device=torch.device("meta")))
    model = lp.convert(model)
    apply_optimizer_in_backward(RowWiseAdagrad, model.model.sparse_arch.parameters(), {"lr": 0.02})
    lp_ebc = model.model.sparse_arch.embedding_bag_collection
    assert [lp_ebc.table_config(n).bits for n in TABLES] == [8, 4]

    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"))
    plan = planner.collective_plan(model, lp.sharders(), pg)
    dmp = DistributedModelParallel(
        model, plan=plan, sharders=lp.sharders(), device=device, env=ShardingEnv.from_process_group(pg)
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.Adagrad(ps, lr=0.1)
    )
    fused = WarmupOptimizer(
        dmp.fused_optimizer, [WarmupStage(WarmupPolicy.LINEAR, max_iters=WARMUP, value=0.1)], lr=0.02
    )
    assert len(dmp.fused_optimizer.param_groups) == 2
    pipeline = TrainPipelineSparseDist(dmp, CombinedOptimizer([fused, dense]), device)
    sharded = dmp.module.model.sparse_arch.embedding_bag_collection
    local = [(lk.ebc, s.local_name) for lk in sharded._lp_lookups() if lk.ebc is not None for s in lk.shards]
    assert local, "the default plan gave this rank no table"
    batches = _batches(rank)
    it = iter([batches[i % len(batches)] for i in range(STEPS)])
    losses, applied = [], []
    for _ in range(STEPS):
        # What the next backward pass will use: the schedule's lr, as the tables resolve it.
        applied.append({ebc._table_optimizer(name).lr for ebc, name in local})
        losses.append(float(pipeline.progress(it)[0]))
    want = [0.02 * (0.1 + 0.9 * min(i, WARMUP) / WARMUP) for i in range(STEPS)]
    for got, w in zip(applied, want):
        assert len(got) == 1 and abs(next(iter(got)) - w) < 1e-12, (got, w)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, losses


def test_torchrec_trainer_loop_int8_int4():
    run_multiprocess(_body)

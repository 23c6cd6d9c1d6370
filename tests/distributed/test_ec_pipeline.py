"""A sharded LowPrecisionEmbeddingCollection trained by TorchRec's ``TrainPipelineSparseDist``
(which runs the next batch's input dist ahead of the current step) equals the same model
trained by a plain loop over the same batches, bit for bit: losses, and every rank's table
shards, step sizes and optimizer state; TW and RW, int8 and int4 tables, 2 gloo ranks, with the
input checks on the host and (the CUDA path) on the device. A pipelined step makes no host sync
from our code."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.distributed as dist
import torchrec
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.modules.test_host_syncs import _count_syncs
from torchrec_lowprec.kernels import dispatch
from torchrec_lowprec.modules import input_check

pytestmark = pytest.mark.slow
DIM, B, STEPS, MAX_LEN = 8, 8, 6, 5
SPEC = [("t_hist", 60, ["hist", "target"], 8), ("t_cat", 40, ["cat"], 4)]  # name, rows, features, bits


class SequenceModel(nn.Module):
    """Sum of each feature's sequence, concatenated with the dense features, to one logit."""

    def __init__(self, ec: nn.Module) -> None:
        super().__init__()
        self.ec = ec
        self.head = nn.Linear(3 * DIM + 2, 1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        seqs = self.ec(batch.sparse_features)
        pooled = [seqs[k].to_padded_dense(MAX_LEN).sum(dim=1) for k in ("hist", "target", "cat")]
        logits = self.head(torch.cat([*pooled, batch.dense_features], dim=1)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())  # as DLRMTrain: the pipeline returns the 2nd


def _batches(rank: int) -> list[Batch]:
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        lengths = torch.randint(0, MAX_LEN + 1, (3 * B,), generator=g)
        rows = [60] * (2 * B) + [40] * B
        values = torch.cat([torch.randint(0, r, (int(n),), generator=g) for r, n in zip(rows, lengths)])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["hist", "target", "cat"], values=values, lengths=lengths
        )
        out.append(Batch(torch.randn(B, 2, generator=g), kjt, torch.randint(0, 2, (B,), generator=g).float()))
    return out


def _model(world: int, sharding: str) -> DistributedModelParallel:
    torch.manual_seed(0)
    tables = [
        torchrec.EmbeddingConfig(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=f)
        for n, r, f, _ in SPEC
    ]
    ec = lp.LowPrecisionEmbeddingCollection(
        tables,
        config=lp.LowPrecisionConfig(bits=8, learning_rate=0.1),
        per_table_configs={n: lp.LowPrecisionConfig(bits=b, learning_rate=0.1) for n, _, _, b in SPEC},
    )
    model = SequenceModel(ec)
    sharder = next(s for s in lp.sharders() if s.module_type is lp.LowPrecisionEmbeddingCollection)
    specs = {n: table_wise(rank=i) if sharding == "tw" else row_wise() for i, (n, *_) in enumerate(SPEC)}
    plan = construct_module_sharding_plan(
        ec, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    return DistributedModelParallel(
        model, plan=ShardingPlan({"ec": plan}), sharders=lp.sharders(),
        device=torch.device("cpu"), env=ShardingEnv.from_process_group(dist.group.WORLD),
    )  # fmt: skip


def _optimizer(dmp: DistributedModelParallel) -> CombinedOptimizer:
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.SGD(ps, lr=0.05)
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def _state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """This rank's part of every entry (its shards of sharded ones)."""
    out = {}
    for k, v in dmp.state_dict().items():
        if isinstance(v, ShardedTensor):
            out.update({f"{k}#{i}": s.tensor.detach().clone() for i, s in enumerate(v.local_shards())})
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
    return out


def _body(rank: int, world: int, sharding: str, checks: str) -> None:
    if checks == "device":
        # The CUDA path (a spawned process: switched for the whole body): input checks on the
        # device, every rank's verdict carried by the pipeline's per-batch context to its own
        # lookups; the update on Triton (its interpreter).
        input_check.checks_on_device = lambda device: True
        dispatch.backend_for = lambda device: "triton"
    batches = _batches(rank)
    plain, piped = _model(world, sharding), _model(world, sharding)
    start = _state(piped)
    assert not [k for k, v in _state(plain).items() if not torch.equal(v, start[k])]
    opt = _optimizer(plain)
    plain_losses = []
    for batch in copy.deepcopy(batches):
        opt.zero_grad()
        loss, _ = plain(batch)
        loss.backward()
        opt.step()
        plain_losses.append(loss.detach())
    pipeline = TrainPipelineSparseDist(piped, _optimizer(piped), torch.device("cpu"))
    it = iter(copy.deepcopy(batches))
    piped_losses = [pipeline.progress(it)[0] for _ in range(STEPS - 2)]
    # A steady-state pipelined step: nothing of ours reads a tensor back to the host.
    calls = _count_syncs(lambda: piped_losses.append(pipeline.progress(it)[0]), direct=True)
    assert calls == collections.Counter(), calls
    piped_losses.append(pipeline.progress(it)[0])
    with pytest.raises(StopIteration):
        pipeline.progress(it)
    assert torch.equal(torch.stack(plain_losses), torch.stack(piped_losses)), (plain_losses, piped_losses)
    a, b = _state(plain), _state(piped)
    assert a.keys() == b.keys() and any("qweight" in k for k in a), sorted(a)
    assert [k for k in a if "qweight" in k and not torch.equal(a[k], start[k])], "no table trained"
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert int(a["ec.step"]) == int(b["ec.step"]) == STEPS


@pytest.mark.parametrize("sharding,checks", [("tw", "host"), ("rw", "host"), ("rw", "device")])
def test_train_pipeline_sparse_dist_equals_a_plain_loop(sharding, checks):
    if checks == "device":
        pytest.importorskip("triton")
    run_multiprocess(_body, sharding, checks)

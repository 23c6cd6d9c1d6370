"""Host synchronisations in a sharded training step (2 gloo ranks): torchrec_lowprec's code
makes none: the input dist's check of the global KJT reads the host tensors in place, the
lookups take their ids per key from TorchRec's input dist, and the pooled / sequence outputs
and the fused update read nothing back. Counted as tests/modules/test_host_syncs.py does, but
only calls made directly by our code (TorchRec's own syncs under our frames are not ours)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
import torchrec
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_ec_sharding import Wrap as WrapEC
from tests.distributed.test_sharding import Wrap as WrapEBC
from tests.distributed.test_sharding import global_batch, rank_slice
from tests.modules.test_host_syncs import _count_syncs

pytestmark = pytest.mark.slow


def sharded_model(rank: int, world: int, kind: str, sharding: str):
    """``(DMP, its module key, this rank's batch)``: tables t0 (40 rows, features f0, f1) and t1
    (30 rows, f2) at 4 bits, both table-wise (``"tw"``, t0 on rank 0) or row-wise (``"rw"``)."""
    cls_cfg = torchrec.EmbeddingConfig if kind == "ec" else torchrec.EmbeddingBagConfig
    tables = [
        cls_cfg(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0", "f1"]),
        cls_cfg(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["f2"]),
    ]
    cls = lp.LowPrecisionEmbeddingCollection if kind == "ec" else lp.LowPrecisionEmbeddingBagCollection
    module = cls(tables, config=lp.LowPrecisionConfig(bits=4))
    sharder = next(s for s in lp.sharders() if s.module_type is cls)
    specs = {t.name: table_wise(rank=i) if sharding == "tw" else row_wise() for i, t in enumerate(tables)}
    plan = construct_module_sharding_plan(
        module, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    key, wrap = ("ec", WrapEC) if kind == "ec" else ("ebc", WrapEBC)
    dmp = DistributedModelParallel(
        wrap(module), plan=ShardingPlan({key: plan}), sharders=lp.sharders(),
        device=torch.device("cpu"), env=ShardingEnv.from_process_group(dist.group.WORLD),
    )  # fmt: skip
    ids = [
        torchrec.EmbeddingBagConfig(name=f, embedding_dim=8, num_embeddings=30, feature_names=[f])
        for f in ("f0", "f1", "f2")
    ]
    return dmp, key, rank_slice(global_batch(ids, 0, world), rank)


def _body(rank: int, world: int, kind: str, sharding: str) -> None:
    dmp, key, kjt = sharded_model(rank, world, kind, sharding)
    sum(v.sum() for v in dmp(kjt).values()).backward()  # first step: state set up
    calls = _count_syncs(direct=True, step=lambda: sum(v.sum() for v in dmp(kjt).values()).backward())
    assert calls == collections.Counter(), calls
    assert int(dmp.state_dict()[f"{key}.step"]) == 2


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("sharding", ["tw", "rw"])
def test_a_sharded_step_makes_no_host_sync(kind, sharding):
    run_multiprocess(_body, kind, sharding)

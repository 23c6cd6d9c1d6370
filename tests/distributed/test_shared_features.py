"""A feature read by two tables (outputs ``feature@table``), sharded on 2 gloo ranks: the
sharded EBC and EC train bit for bit like the unsharded module (TorchRec's input dist takes each
feature once; the ids are checked against the smaller table)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torchrec
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_ec_sharding import Wrap as WrapEC
from tests.distributed.test_sharding import B, _check_state_equal, global_batch, rank_slice
from tests.distributed.test_sharding import Wrap as WrapEBC

pytestmark = pytest.mark.slow
CFG = lp.LowPrecisionConfig(bits=8, learning_rate=0.1)  # stochastic rounding, RowWiseAdagrad


def _tables(kind: str) -> list:
    cls = torchrec.EmbeddingConfig if kind == "ec" else torchrec.EmbeddingBagConfig
    return [
        cls(name="t0", embedding_dim=8, num_embeddings=40, feature_names=["f0", "s"]),
        cls(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["s"]),
    ]


def _rank_part(kind: str, ref_out: dict, gkjt: KeyedJaggedTensor, rank: int) -> dict:
    if kind == "ebc":
        return {k: v[rank * B : (rank + 1) * B] for k, v in ref_out.items()}
    out = {}
    for k, v in ref_out.items():
        off = gkjt[k.split("@")[0]].offsets()
        out[k] = v[int(off[rank * B]) : int(off[(rank + 1) * B])]
    return out


def _body(rank: int, world: int, kind: str, sharding: str) -> None:
    torch.manual_seed(0)
    tbls = _tables(kind)
    cls = lp.LowPrecisionEmbeddingCollection if kind == "ec" else lp.LowPrecisionEmbeddingBagCollection
    wrap = WrapEC if kind == "ec" else WrapEBC
    unsharded = cls(tbls, config=CFG)
    ref = wrap(copy.deepcopy(unsharded))
    specs = (
        {"t0": table_wise(rank=0), "t1": table_wise(rank=1)}
        if sharding == "tw"
        else {"t0": row_wise(), "t1": row_wise()}
    )
    sharder = next(s for s in lp.sharders() if s.module_type is cls)
    plan = construct_module_sharding_plan(
        unsharded, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    key = "ec" if kind == "ec" else "ebc"
    model = DistributedModelParallel(
        wrap(unsharded), plan=ShardingPlan({key: plan}), sharders=lp.sharders(),
        device=torch.device("cpu"), env=ShardingEnv.from_process_group(dist.group.WORLD),
    )  # fmt: skip
    ids = [
        torchrec.EmbeddingBagConfig(name=f, embedding_dim=8, num_embeddings=30, feature_names=[f])
        for f in ("f0", "s")
    ]
    w = torch.randn(8, generator=torch.Generator().manual_seed(3))
    for step in range(3):
        gkjt = global_batch(ids, step, world)
        out = model(rank_slice(gkjt, rank))
        ref_out = ref(gkjt)
        mine = _rank_part(kind, ref_out, gkjt, rank)
        assert sorted(out) == sorted(mine) == ["f0", "s@t0", "s@t1"]
        for k in out:
            assert torch.equal(out[k], mine[k]), (k, step)
        (sum((v * w).sum() for v in ref_out.values()) / world).backward()
        sum((v * w).sum() for v in out.values()).backward()
    assert _check_state_equal(model.state_dict(), getattr(ref, key).state_dict(), f"{key}.") > 0


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("sharding", ["tw", "rw"])
def test_a_feature_read_by_two_tables_shards_like_unsharded(kind, sharding):
    run_multiprocess(_body, kind, sharding)

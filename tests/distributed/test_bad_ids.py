"""Out-of-range ids under DistributedModelParallel (2 gloo ranks): the error names the id the
rank fed and the table's full size, not the shard-local id TorchRec's input dist makes of it
(issue 12, item 14); ``bounds_check="warn"`` drops the global id before it is distributed."""

from __future__ import annotations

import pytest
import torch
import torchrec
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder

pytestmark = pytest.mark.slow

# Per rank: the bad id it feeds and the message it must raise. Under ROW_WISE, FBGEMM's
# bucketizer turns 120 into local id 60 of a 50-row shard and -1 into 2**63 - 1.
BAD_IDS = {0: 120, 1: -1}


class Wrap(nn.Module):
    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.ebc(kjt).values()


def _model(plan_kind: str, world: int, mode: str) -> DistributedModelParallel:
    tables = [
        torchrec.EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"]),
        torchrec.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["f1"]),
    ]
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=8, bounds_check=mode)
    )
    specs = {
        "rw": {"t0": row_wise(), "t1": row_wise()},
        "tw": {"t0": table_wise(rank=1), "t1": table_wise(rank=0)},
    }[plan_kind]
    sharder = LowPrecisionEmbeddingBagCollectionSharder()
    module_plan = construct_module_sharding_plan(
        ebc, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    return DistributedModelParallel(
        Wrap(ebc),
        plan=ShardingPlan({"ebc": module_plan}),
        sharders=lp.sharders(),
        device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.GroupMember.WORLD),
    )


def _batch(f0_ids: list[int]) -> KeyedJaggedTensor:
    # Two samples; f0 gets f0_ids in sample 0, f1 one id per sample.
    return KeyedJaggedTensor(
        keys=["f0", "f1"],
        values=torch.tensor(f0_ids + [3, 29]),
        lengths=torch.tensor([len(f0_ids), 0, 1, 1]),
    )


def _raise_body(rank: int, world: int, plan_kind: str) -> None:
    model = _model(plan_kind, world, "raise")
    bad = BAD_IDS[rank]
    for train in (False, True):
        with torch.set_grad_enabled(train), pytest.raises(IndexError) as e:
            model(_batch([5, bad, 99])).sum().backward()
        msg = str(e.value)
        assert f"id {bad} of feature 'f0' is out of range for table 't0' with 100 rows" in msg, msg
        assert "9223372036854775807" not in msg and "50 rows" not in msg
    # An inconsistent KJT is refused before TorchRec's input dist touches it.
    empty = KeyedJaggedTensor(
        keys=["f0", "f1"], values=torch.tensor([], dtype=torch.int64), lengths=torch.tensor([3, 3, 0, 0])
    )
    with pytest.raises(ValueError, match=r"lengths sum to 6 but values holds 0 ids"):
        model(empty)


def _warn_body(rank: int, world: int, plan_kind: str) -> None:
    model = _model(plan_kind, world, "warn")
    with torch.no_grad():
        clean = model(_batch([5, 99]))
        with pytest.warns(RuntimeWarning, match=f"id {BAD_IDS[rank]} of feature 'f0' .* with 100 rows"):
            dropped = model(_batch([5, BAD_IDS[rank], 99]))
    assert clean.shape == (2, 16)
    assert torch.equal(dropped, clean)


@pytest.mark.parametrize("plan_kind", ["rw", "tw"])
def test_bad_id_error_names_the_global_id_and_table_size(plan_kind):
    run_multiprocess(_raise_body, plan_kind)


def test_warn_drops_the_global_id_before_the_input_dist():
    run_multiprocess(_warn_body, "rw")

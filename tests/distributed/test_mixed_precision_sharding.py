"""Mixed-precision collections sharded over 2 gloo ranks: equal to unsharded (input checks on the
host, and on the device as on CUDA), and the planner's per-rank bytes equal the bytes the
sharded model actually allocates."""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
import torchrec
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_sharding import (
    Wrap,
    _check_state_equal,
    check_and_backward,
    global_batch,
    loss_weights,
    rank_slice,
)
from tests.modules.test_host_syncs import _count_syncs
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder
from torchrec_lowprec.kernels import dispatch
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection, input_check
from torchrec_lowprec.planner import plan_precision, planned_bytes_per_rank
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

pytestmark = pytest.mark.slow
STEPS = 3


def _tables():
    return [
        torchrec.EmbeddingBagConfig(
            name="t0", embedding_dim=16, num_embeddings=40, feature_names=["f0", "f1"]
        ),
        torchrec.EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=30, feature_names=["f2"]),
    ]


PLAN = PrecisionPlan(
    {
        "t0": TablePrecision(40, 16, (10, 20, 32, 40), (8, 4, 2, 0)),
        "t1": TablePrecision(30, 8, (6, 30), (8, 4)),
    }
)
CFG = lp.LowPrecisionConfig(rounding="stochastic", learning_rate=0.05, step_size_lr=1e-3)
# docs/precision.md's int2 recipe as the DLRM example builds it from `--precision int2
# --no-learn-step-size --rounding dithered --hot-rows 0.2:8,0.5:4`
RECIPE_PLAN = PrecisionPlan.hot_rows({"t0": (40, 16), "t1": (30, 8)}, 2, [(0.2, 8), (0.5, 4)])
RECIPE_CFG = lp.LowPrecisionConfig(rounding="dithered", learn_step_size=False, learning_rate=0.05)
SETUPS = {"plan": (PLAN, CFG), "recipe": (RECIPE_PLAN, RECIPE_CFG)}


def _equal_body(rank: int, world: int, kind: str, checks: str = "host", setup: str = "plan") -> None:
    if checks == "device":
        # The CUDA path (a spawned process: switched for the whole body): the id checks and
        # the group counts in one read, the sharded row groups' global check on the device and
        # its all-reduced verdict; the update on Triton (its interpreter).
        input_check.checks_on_device = lambda device: True
        dispatch.backend_for = lambda device: "triton"
    torch.manual_seed(0)
    tbls = _tables()
    plan, cfg = SETUPS[setup]
    unsharded = MixedPrecisionEmbeddingBagCollection(tbls, plan=plan, config=cfg)
    ref = copy.deepcopy(unsharded)
    phys = [t.name for t in unsharded.row_groups.embedding_bag_configs()]
    groups = {"plan": ["t0__g0", "t0__g1", "t0__g2", "t1__g0", "t1__g1"],
              "recipe": ["t0__g0", "t0__g1", "t0__g2", "t1__g0", "t1__g1", "t1__g2"]}  # fmt: skip
    assert phys == groups[setup]
    specs = {n: (table_wise(rank=i % world) if kind == "tw" else row_wise()) for i, n in enumerate(phys)}
    module_plan = construct_module_sharding_plan(
        unsharded.row_groups, specs, local_size=world, world_size=world, device_type="cpu",
        sharder=LowPrecisionEmbeddingBagCollectionSharder(),
    )  # fmt: skip
    model = DistributedModelParallel(
        Wrap(unsharded),
        plan=ShardingPlan({"ebc.row_groups": module_plan}),
        sharders=lp.sharders(),
        device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
    )
    W = loss_weights(tbls)
    outs = []
    for step in range(STEPS):
        gkjt = global_batch(tbls, step, world)
        kjt = rank_slice(gkjt, rank)
        calls = _count_syncs(lambda kjt=kjt: outs.append(model(kjt)), direct=True)
        out = outs.pop()
        if checks == "device" and step:  # (the first step reads the copied step counter once)
            one_read = collections.Counter({("modules/row_groups.py", "_routed_on_device", "tolist"): 1})
            assert calls == one_read, calls
        check_and_backward(out, Wrap(ref)(gkjt), W, rank, world)
    checked = _check_state_equal(model.state_dict(), ref.row_groups.state_dict(), "ebc.row_groups.")
    assert checked >= 5


@pytest.mark.parametrize(
    "kind,checks,setup",
    [("tw", "host", "plan"), ("rw", "host", "plan"), ("rw", "device", "plan"), ("rw", "host", "recipe")],
)
def test_mixed_precision_sharded_equals_unsharded(kind, checks, setup):
    if checks == "device":
        pytest.importorskip("triton")
    run_multiprocess(_equal_body, kind, checks, setup)


def _bytes_body(rank: int, world: int) -> None:
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    tbls = [
        torchrec.EmbeddingBagConfig(name=f"t{i}", embedding_dim=32, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate((60_000, 20_000, 500))
    ]
    counts = {"f0": (1e6 / torch.arange(1, 60_001, dtype=torch.float64) ** 1.1).long()}
    cfg = lp.LowPrecisionConfig()  # RowWiseAdagrad, ALPT
    fp32 = 80_500 * (32 * 4 + 4)
    topo = Topology(world_size=world, compute_device="cpu", hbm_cap=0, ddr_cap=int(0.7 * fp32 / world / 0.85))
    mp = plan_precision(tbls, topo, cfg, frequencies=counts, num_groups=4, module_path="ebc", batch_size=64)
    assert any(b < 32 for tp in mp.precision.tables.values() for b in tp.bits)  # the budget forced lowering
    model = DistributedModelParallel(
        Wrap(
            MixedPrecisionEmbeddingBagCollection(
                tbls, plan=mp.precision, config=cfg, device=torch.device("meta")
            )
        ),
        plan=mp.sharding,
        sharders=lp.sharders(),
        device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
    )
    actual = model.module.ebc.row_groups.memory_bytes()
    planned = mp.per_rank_bytes[rank]
    assert actual == planned, (rank, actual, planned)
    # A row-wise plan of the same model (CPU planners do not propose RW): same check.
    unsharded = MixedPrecisionEmbeddingBagCollection(
        tbls, plan=mp.precision, config=cfg, device=torch.device("meta")
    )
    phys = [t.name for t in unsharded.row_groups.embedding_bag_configs()]
    rw = construct_module_sharding_plan(
        unsharded.row_groups, {n: row_wise() for n in phys}, local_size=world, world_size=world,
        device_type="cpu", sharder=LowPrecisionEmbeddingBagCollectionSharder(),
    )  # fmt: skip
    plan = ShardingPlan({"ebc.row_groups": rw})
    planned = planned_bytes_per_rank(plan, unsharded, world, "cpu")[rank]
    model = DistributedModelParallel(
        Wrap(unsharded), plan=plan, sharders=lp.sharders(), device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
    )  # fmt: skip
    actual = model.module.ebc.row_groups.memory_bytes()
    assert actual == planned, (rank, actual, planned)


def test_planned_bytes_match_allocated_bytes_per_rank():
    run_multiprocess(_bytes_body)

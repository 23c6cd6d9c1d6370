"""Sharder fused_params and dmp.fused_optimizer LR schedules reach sharded low-precision tables
(issue 11 items 2 and 4), against the unsharded collection configured the same way."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
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
    tables,
)

pytestmark = pytest.mark.slow
BASE = lp.LowPrecisionConfig(bits=8, rounding="stochastic", step_size_lr=1e-3)  # RowWiseAdagrad lr 0.01
FUSED = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.5, "eps": 1e-5}
# What the fused_params (+ t2's in-backward Adam tag, which wins key by key) mean as configs.
SGD = BASE.replace(optimizer="sgd", learning_rate=0.5, eps=1e-5)
ADAM = BASE.replace(optimizer="adam", learning_rate=0.02, eps=1e-5)


def _reference(tbls, lrs: dict[str, float], state: dict | None) -> lp.LowPrecisionEmbeddingBagCollection:
    ref = lp.LowPrecisionEmbeddingBagCollection(
        tbls,
        config=SGD.replace(learning_rate=lrs["t0"]),
        per_table_configs={
            "t1": SGD.replace(learning_rate=lrs["t1"]),
            "t2": ADAM.replace(learning_rate=lrs["t2"]),
        },
    )
    if state is not None:
        ref.load_state_dict(state)
    return ref


def _body(rank: int, world: int) -> None:
    torch.manual_seed(0)
    tbls = tables()
    unsharded = lp.LowPrecisionEmbeddingBagCollection(tbls, config=BASE)
    _apply_optimizer_in_backward(torch.optim.Adam, unsharded.tables["t2"].parameters(), {"lr": 0.02})
    ref = _reference(tbls, {"t0": 0.5, "t1": 0.5, "t2": 0.02}, None)
    with torch.no_grad():  # same start (rows, step sizes; the optimizer states start at zero)
        for t in tbls:
            ref.quantized_weight(t.name).copy_(unsharded.quantized_weight(t.name))
            ref.tables[t.name].step_size.copy_(unsharded.tables[t.name].step_size)
    sharders = lp.sharders(fused_params=FUSED)
    specs = {"t0": row_wise(), "t1": table_wise(rank=1), "t2": table_wise(rank=0)}
    plan = construct_module_sharding_plan(
        unsharded, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharders[0]
    )
    model = DistributedModelParallel(
        Wrap(unsharded),
        plan=ShardingPlan({"ebc": plan}),
        sharders=sharders,
        device=torch.device("cpu"),
        env=ShardingEnv.from_process_group(torch.distributed.group.WORLD),
    )
    opt = model.fused_optimizer
    keys = sorted(opt.params)
    assert keys == ["ebc.tables.t0", "ebc.tables.t1", "ebc.tables.t2"], keys
    lr_of = dict(zip(keys, (g["lr"] for g in opt.param_groups)))
    assert lr_of == {"ebc.tables.t0": 0.5, "ebc.tables.t1": 0.5, "ebc.tables.t2": 0.02}, lr_of
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.2)
    W = loss_weights(tbls)
    for step in range(4):
        lrs = {k.split(".")[-1]: g["lr"] for k, g in zip(keys, opt.param_groups)}
        if step == 2:  # the schedule changed the lr: the reference's config changes here
            assert lrs["t0"] != 0.5, lrs
            ref = _reference(tbls, lrs, ref.state_dict())
        gkjt = global_batch(tbls, step, world)
        out = model(rank_slice(gkjt, rank))
        check_and_backward(out, Wrap(ref)(gkjt), W, rank, world)
        opt.step()
        sched.step()
        if step == 1:  # fused_params run == unsharded run with that config
            assert _check_state_equal(model.state_dict(), ref.state_dict(), "ebc.") > 0
    sd = model.state_dict()
    assert _check_state_equal(sd, ref.state_dict(), "ebc.") > 0
    # The optimizer's state is the checkpoint's momentum entries (one copy).
    ostate = opt.state_dict()["state"]
    assert sorted(ostate["ebc.tables.t2"]) == ["momentum1", "momentum2"] and ostate["ebc.tables.t0"] == {}
    for name in ("momentum1", "momentum2"):
        a, b = ostate["ebc.tables.t2"][name], sd[f"ebc.tables.t2.{name}"]
        for x, y in zip(a.local_shards(), b.local_shards()):
            assert x.tensor.data_ptr() == y.tensor.data_ptr()


def test_fused_params_and_lr_schedule_reach_sharded_tables():
    run_multiprocess(_body)

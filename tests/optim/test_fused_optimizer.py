"""The tables' fused optimizer as a TorchRec KeyedOptimizer: LR schedules drive the fused update,
its state is the module's own buffers (issue 11 item 4)."""

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt

CFG = lp.LowPrecisionConfig(bits=4, rounding="stochastic", learning_rate=0.05, seed=5)


def _step(ebc, tables, step):
    ebc(random_kjt(tables, gen=torch.Generator().manual_seed(step))).values().pow(2).sum().backward()


def _state(ebc):
    return {k: v.clone() for k, v in ebc.state_dict().items() if isinstance(v, torch.Tensor)}


def _reference(tables, lrs, cfg=CFG):
    """One step per entry of ``lrs``, each run by a module whose *config* has that lr, continued
    from the previous one's checkpoint."""
    torch.manual_seed(0)
    sd = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg).state_dict()
    for i, lr in enumerate(lrs):
        ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg.replace(learning_rate=lr))
        ebc.load_state_dict(sd)
        _step(ebc, tables, i)
        sd = ebc.state_dict()
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _scheduled(tables, make_schedule, steps, cfg=CFG):
    torch.manual_seed(0)
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg)
    opt, sched = make_schedule(ebc.fused_optimizer)
    lrs = []
    for i in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        _step(ebc, tables, i)
        opt.step()
        if sched is not None:
            sched.step()
    return _state(ebc), lrs


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "name,make",
    [
        ("StepLR", lambda o: (o, torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.25))),
        ("LambdaLR", lambda o: (o, torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)))),
        (
            "WarmupOptimizer",
            lambda o: (
                WarmupOptimizer(o, [WarmupStage(WarmupPolicy.LINEAR, max_iters=3, value=0.25)], lr=0.05),
                None,
            ),
        ),
    ],
)
def test_lr_schedule_equals_config_lr_changed_at_that_step(name, make):
    tables = make_tables()
    got, lrs = _scheduled(tables, make, steps=5)
    assert len(set(lrs)) > 1, lrs  # the schedule did change the lr
    _assert_same(got, _reference(tables, lrs))
    # ... and differs from running at the config's lr throughout.
    assert not torch.equal(
        got["tables.t0.qweight"], _reference(tables, [CFG.learning_rate] * 5)["tables.t0.qweight"]
    )


def test_is_a_keyed_optimizer_over_the_module_buffers():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=CFG)
    opt = ebc.fused_optimizer
    assert isinstance(opt, KeyedOptimizer) and opt is ebc.fused_optimizer
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05]
    _step(ebc, tables, 0)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == ["tables.t0", "tables.t1"]
    # One source of truth: the optimizer's state tensors are the module's buffers.
    assert sd["state"]["tables.t0"]["momentum1"] is ebc.tables["t0"].momentum1
    assert torch.equal(sd["state"]["tables.t0"]["momentum1"], ebc.state_dict()["tables.t0.momentum1"])
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in sd["state"].items()}
    _step(ebc, tables, 1)
    assert not torch.equal(ebc.tables["t0"].momentum1, saved["tables.t0"]["momentum1"])
    opt.load_state_dict({"state": saved})  # restores into the module's buffers
    assert torch.equal(ebc.tables["t0"].momentum1, saved["tables.t0"]["momentum1"])
    assert torch.equal(ebc.state_dict()["tables.t0.momentum1"], saved["tables.t0"]["momentum1"])


def test_tag_lr_seeds_the_groups_and_its_optimizer_sets_the_state():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=CFG)
    _apply_optimizer_in_backward(torch.optim.Adam, ebc.parameters(), {"lr": 0.01})
    opt = ebc.fused_optimizer
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    _step(ebc, tables, 0)
    # Adam's two moments are the state now.
    assert sorted(opt.state_dict()["state"]["tables.t1"]) == ["momentum1", "momentum2"]


def test_mixed_precision_collection_exposes_its_row_groups_optimizer():
    from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
    from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

    tables = make_tables()
    plan = PrecisionPlan(
        {"t0": TablePrecision(60, 8, (10, 60), (8, 4)), "t1": TablePrecision(40, 16, (8, 40), (2, 8))}
    )
    cfg = lp.LowPrecisionConfig(optimizer="sgd", learning_rate=0.5, rounding="nearest", learn_step_size=False)
    ebc = MixedPrecisionEmbeddingBagCollection(tables, plan=plan, config=cfg)
    opt = ebc.fused_optimizer
    assert len(opt.param_groups) == 4 and opt is ebc.row_groups.fused_optimizer
    for g in opt.param_groups:
        g["lr"] = 0.0  # lr 0: the SGD step leaves every row where it is
    before = {t.name: ebc.dequantized_weight(t.name) for t in tables}
    _step(ebc, tables, 0)
    for t in tables:
        assert torch.equal(ebc.dequantized_weight(t.name), before[t.name])
    for g in opt.param_groups:
        g["lr"] = 0.5
    _step(ebc, tables, 0)
    assert not torch.equal(ebc.dequantized_weight("t0"), before["t0"])

"""LowPrecisionEmbeddingCollection under DistributedModelParallel (2 gloo ranks): TABLE_WISE,
ROW_WISE and COLUMN_WISE training equals the unsharded module bit for bit (outputs, codes,
step sizes, optimizer state); the fused optimizer's lr and in-backward tags reach the shards;
planner bytes are the allocated bytes; DCP checkpoints reshard; bad plans are refused."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import torch.distributed as dist
import torchrec
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embedding import ShardedEmbeddingCollection
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_default_planner_bytes import _planned_tensor_bytes
from tests.distributed.test_sharding import _check_state_equal, global_batch, rank_slice
from torchrec_lowprec.distributed import checkpoint
from torchrec_lowprec.distributed.embedding_collection import ShardedLowPrecisionEmbeddingCollection
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingCollectionSharder, validate_plan
from torchrec_lowprec.modules.table_layout import ShardOrigin

B = 4  # per-rank batch (test_sharding's rank_slice / global_batch)
DIM = 16
STEPS = 3
SR8 = lp.LowPrecisionConfig(
    bits=8, rounding="stochastic", learning_rate=0.05, step_size_lr=1e-3
)  # RowWiseAdagrad
PER_TABLE = {
    "t1": SR8.replace(bits=4, optimizer="sgd", learning_rate=0.3, bounds_check="ignore"),
    "t2": SR8.replace(bits=16, optimizer="sgd", learning_rate=0.2),  # fp16
}


class Wrap(nn.Module):
    def __init__(self, ec: nn.Module) -> None:
        super().__init__()
        self.ec = ec

    def forward(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        out = self.ec(kjt)  # a LazyAwaitable when sharded
        return {k: out[k].values() for k in out.keys()}


def tables(dim: int = DIM, suffix: str = "") -> list[torchrec.EmbeddingConfig]:
    spec = [("t0", 40, ["f0", "f1"]), ("t1", 30, ["f2"]), ("t2", 50, ["f3"])]
    return [
        torchrec.EmbeddingConfig(
            name=n + suffix, embedding_dim=dim, num_embeddings=r, feature_names=[f + suffix for f in fs]
        )
        for n, r, fs in spec
    ]


def _dmp(module: nn.Module, specs: dict, world: int, sharders=None) -> DistributedModelParallel:
    plan = construct_module_sharding_plan(
        module, specs, local_size=world, world_size=world, device_type="cpu",
        sharder=LowPrecisionEmbeddingCollectionSharder(),
    )  # fmt: skip
    return DistributedModelParallel(
        Wrap(module), plan=ShardingPlan({"ec": plan}), sharders=sharders or lp.sharders(),
        device=torch.device("cpu"), env=ShardingEnv.from_process_group(dist.group.WORLD),
    )  # fmt: skip


def _rank_rows(ref_out: dict, gkjt: KeyedJaggedTensor, rank: int) -> dict[str, torch.Tensor]:
    """The reference's rows of this rank's samples, per feature."""
    out = {}
    for k, v in ref_out.items():
        off = gkjt[k].offsets()
        out[k] = v[int(off[rank * B]) : int(off[(rank + 1) * B])]
    return out


def _train_step(model, ref_fn, gkjt, rank: int, world: int, W: dict) -> None:
    """This rank's sharded rows equal the reference's bit for bit; both backward (the reference
    on the global loss / world size: TorchRec divides sharded gradients by the world size)."""
    out = model(rank_slice(gkjt, rank))
    ref_out = ref_fn(gkjt)
    mine = _rank_rows(ref_out, gkjt, rank)
    assert out.keys() == mine.keys()
    for k in out:
        assert torch.equal(out[k], mine[k]), (k, (out[k] - mine[k]).abs().max())
    (sum((v * W[k.split("@")[0]]).sum() for k, v in ref_out.items()) / world).backward()
    sum((v * W[k]).sum() for k, v in out.items()).backward()


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f: torch.randn(DIM, generator=g) for t in tables() for f in t.feature_names}


def _body(rank: int, world: int, kind: str) -> None:
    torch.manual_seed(0)
    tbls = tables()
    unsharded = lp.LowPrecisionEmbeddingCollection(
        tbls, need_indices=kind == "tw", config=SR8, per_table_configs=PER_TABLE
    )
    if kind == "rw":  # an in-backward tag wins over the table's config, sharded or not
        _apply_optimizer_in_backward(torch.optim.SGD, unsharded.tables["t2"].parameters(), {"lr": 0.4})
    ref = copy.deepcopy(unsharded)
    if kind == "rw":
        _apply_optimizer_in_backward(torch.optim.SGD, ref.tables["t2"].parameters(), {"lr": 0.4})
    specs = {
        "tw": {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=1)},
        "rw": {"t0": row_wise(), "t1": row_wise(), "t2": row_wise()},
        "cw": {"t0": column_wise(ranks=[0, 1]), "t1": column_wise(ranks=[1, 0]), "t2": column_wise(ranks=[0, 1])},
    }[kind]  # fmt: skip
    model = _dmp(unsharded, specs, world)
    ref_fn, ref_state = Wrap(ref), ref.state_dict
    if kind == "cw":
        ref_fn, ref_state = _column_blocks(unsharded)
    opt = model.fused_optimizer
    assert sorted(opt.params) == ["ec.tables.t0", "ec.tables.t1", "ec.tables.t2"]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if kind == "rw" else None
    W = _weights()
    for step in range(STEPS):
        gkjt = global_batch(tbls, step, world)
        if kind == "rw" and step == 1:  # one id past t1 (bounds_check="ignore"): a zero row, no update
            v = gkjt.values().clone()
            v[int(gkjt.offset_per_key()[2])] = 1000
            gkjt = KeyedJaggedTensor(keys=gkjt.keys(), values=v, lengths=gkjt.lengths())
        _train_step(model, ref_fn, gkjt, rank, world, W)
        if sched is not None:  # the schedule halves every table's lr, sharded and reference alike
            sched.step()
            for g in ref.fused_optimizer.param_groups:
                g["lr"] *= 0.5
    if sched is not None:
        assert [g["lr"] for g in opt.param_groups] == [0.05 / 8, 0.3 / 8, 0.4 / 8]
    sd = model.state_dict()
    assert _check_state_equal(sd, ref_state(), "ec.") > 0
    assert int(sd["ec.step"]) == STEPS
    if kind == "tw":  # need_indices: each feature's ids come back as its JaggedTensor's weights
        mine = rank_slice(global_batch(tbls, 0, world), rank)
        with torch.no_grad():
            out = model.module.ec(mine)
            assert all(torch.equal(out[k].weights(), mine[k].values()) for k in mine.keys())


def _column_blocks(unsharded: lp.LowPrecisionEmbeddingCollection):
    """The CW rule (one step size per row per column shard) unsharded: each column block of a
    table is its own table, keyed for rounding as the shard is (global table, column offset),
    filled as sharding fills a block (re-quantized). Returns the reference's forward (outputs
    re-joined per feature) and its state in the sharded checkpoint layout (blocks side by side)."""
    w = DIM // 2
    blocks = [tables(w, f"@{k}") for k in range(2)]
    names = [t.name for blk in blocks for t in blk]
    origins = {n: ShardOrigin(n.split("@")[0], 0, int(n.split("@")[1]) * w) for n in names}
    per = {n: PER_TABLE.get(n.split("@")[0], SR8) for n in names}
    ref = lp.LowPrecisionEmbeddingCollection(
        blocks[0] + blocks[1], config=SR8, per_table_configs=per, init_weights=False, shard_origins=origins
    )
    with torch.no_grad():
        for n in names:
            base, k = n.split("@")
            ref.load_float_weight(n, unsharded.dequantized_weight(base)[:, int(k) * w : (int(k) + 1) * w])

    def forward(gkjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        keys = gkjt.keys()
        both = KeyedJaggedTensor(
            keys=[f"{f}@{k}" for k in range(2) for f in keys],
            values=torch.cat([gkjt.values()] * 2),
            lengths=torch.cat([gkjt.lengths()] * 2),
        )
        out = ref(both)
        return {f: torch.cat([out[f"{f}@0"].values(), out[f"{f}@1"].values()], dim=1) for f in keys}

    def state() -> dict[str, torch.Tensor]:
        rsd = ref.state_dict()
        merged = {}
        for t in tables():
            parts = [f"{t.name}@{k}" for k in range(2)]
            merged[f"tables.{t.name}.qweight"] = torch.cat([rsd[f"tables.{p}.qweight"] for p in parts], dim=1)
            for key in ("step_size", "momentum1"):
                got = [rsd[f"tables.{p}.{key}"] for p in parts]
                if got[0].numel():
                    merged[f"tables.{t.name}.{key}"] = torch.stack(got, dim=1)
        return merged

    return forward, state


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tw", "rw", "cw"])
def test_sharded_ec_trains_bit_for_bit_like_unsharded(kind):
    run_multiprocess(_body, kind)


class Mixed(nn.Module):
    """Low-precision EC and EBC beside TorchRec's float EC and EBC: one lp.sharders() call."""

    def __init__(self) -> None:
        super().__init__()
        meta = torch.device("meta")
        self.lp_ec = lp.LowPrecisionEmbeddingCollection(
            tables(), device=meta, config=SR8, per_table_configs=PER_TABLE
        )
        self.lp_ebc = lp.LowPrecisionEmbeddingBagCollection(
            [
                torchrec.EmbeddingBagConfig(
                    name="b0", embedding_dim=8, num_embeddings=60, feature_names=["g0"]
                )
            ],
            device=meta,
            config=SR8.replace(bits=4, optimizer="adam"),
        )
        self.ec = torchrec.EmbeddingCollection(
            [torchrec.EmbeddingConfig(name="e0", embedding_dim=8, num_embeddings=20, feature_names=["h0"])],
            device=meta,
        )
        self.ebc = torchrec.EmbeddingBagCollection(
            [
                torchrec.EmbeddingBagConfig(
                    name="e1", embedding_dim=8, num_embeddings=20, feature_names=["k0"]
                )
            ],
            device=meta,
        )

    def all_tables(self) -> list:
        return (
            tables()
            + self.lp_ebc.embedding_bag_configs()
            + self.ec.embedding_configs()
            + (self.ebc.embedding_bag_configs())
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        seq = [*self.lp_ec(kjt).values(), *self.ec(kjt).values()]
        return (
            sum(jt.values().sum() for jt in seq)
            + self.lp_ebc(kjt).values().sum()
            + self.ebc(kjt).values().sum()
        )


def _planner_body(rank: int, world: int) -> None:
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    model = Mixed()
    all_tables = model.all_tables()
    sharders = lp.sharders()
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"))
    plan = planner.collective_plan(model, sharders, dist.group.WORLD)
    planned = {
        name: _planned_tensor_bytes(
            ShardingPlan({name: plan.plan[name]}), sharder, getattr(model, name), world
        )
        for name, sharder in (("lp_ebc", sharders[0]), ("lp_ec", sharders[1]))
    }
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    dmp = DistributedModelParallel(model, plan=plan, sharders=sharders, device=torch.device("cpu"), env=env)
    kinds = {n: type(getattr(dmp.module, n)).__name__ for n in ("lp_ec", "lp_ebc", "ec", "ebc")}
    assert isinstance(dmp.module.lp_ec, ShardedLowPrecisionEmbeddingCollection), kinds
    assert type(dmp.module.ec) is ShardedEmbeddingCollection, kinds
    assert type(dmp.module.ebc) is ShardedEmbeddingBagCollection, kinds
    dmp(rank_slice(global_batch(all_tables, 0, world), rank)).backward()  # allocates optimizer state
    assert dmp.module.lp_ec.memory_bytes() == planned["lp_ec"][rank], (rank, planned)
    assert dmp.module.lp_ebc.memory_bytes() == planned["lp_ebc"][rank], (rank, planned)


@pytest.mark.slow
def test_planner_bytes_equal_memory_bytes_in_a_mixed_model():
    run_multiprocess(_planner_body)


TW = {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=0)}
RW = {"t0": row_wise(), "t1": row_wise(), "t2": row_wise()}


def _scrambled() -> lp.LowPrecisionEmbeddingCollection:
    ec = lp.LowPrecisionEmbeddingCollection(tables(), config=SR8, per_table_configs=PER_TABLE)
    with torch.no_grad():
        for t in tables():
            ec.load_float_weight(t.name, torch.randn(t.num_embeddings, t.embedding_dim))
    return ec


def _checkpoint_body(rank: int, world: int, path: str) -> None:
    tbls = tables()
    W = _weights()
    src = lp.LowPrecisionEmbeddingCollection(tbls, config=SR8, per_table_configs=PER_TABLE)
    ref = copy.deepcopy(src)
    tw = _dmp(src, TW, world)
    for step in range(2):
        _train_step(tw, Wrap(ref), global_batch(tbls, step, world), rank, world, W)
    checkpoint.save(tw, path)
    if rank == 0:
        torch.save(ref.state_dict(), path + "-ref.pt")
    # Other rows and another plan: everything must come from the checkpoint. (Same configs: the
    # rounding seed is configuration, not state.)
    rw = _dmp(_scrambled(), RW, world)
    own = rw.state_dict()
    with pytest.raises(ValueError, match=r"lacks 1 entries of this collection: (ec\.)?tables.t1.qweight"):
        rw.load_state_dict({k: v for k, v in own.items() if k != "ec.tables.t1.qweight"})
    checkpoint.load(rw, path)
    assert _check_state_equal(rw.state_dict(), ref.state_dict(), "ec.") > 0
    _train_step(rw, Wrap(ref), global_batch(tbls, 2, world), rank, world, W)  # goes on exactly
    assert _check_state_equal(rw.state_dict(), ref.state_dict(), "ec.") > 0


@pytest.mark.slow
def test_checkpoint_saved_table_wise_loads_row_wise_and_unsharded(tmp_path):
    path = str(tmp_path / "ckpt")
    run_multiprocess(_checkpoint_body, path)
    single = _scrambled()
    checkpoint.load(Wrap(single), path)
    want = torch.load(path + "-ref.pt")
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, want[key]), key
    wrong = lp.LowPrecisionEmbeddingCollection(
        tables(), config=SR8, per_table_configs={**PER_TABLE, "t2": SR8.replace(bits=4)}
    )
    with pytest.raises(ValueError, match=r"table 't2': checkpoint entry tables.t2.qweight has shape"):
        checkpoint.load(Wrap(wrong), path)


def test_bad_plans_and_fused_params_are_refused():
    ec = lp.LowPrecisionEmbeddingCollection(tables(), config=SR8, per_table_configs=PER_TABLE)
    sharder = LowPrecisionEmbeddingCollectionSharder()
    assert sharder.sharding_types("cpu") == ["table_wise", "column_wise", "row_wise"]

    def plan(specs: dict) -> dict:
        return dict(
            construct_module_sharding_plan(
                ec, specs, local_size=2, world_size=2, device_type="cpu", sharder=sharder
            )
        )

    good = plan(TW)
    validate_plan(ec, good)
    dp = {**good, "t0": dataclasses.replace(good["t0"], sharding_type="data_parallel", sharding_spec=None)}
    with pytest.raises(ValueError, match=r"table 't0': sharding type 'data_parallel' is not supported"):
        sharder.shard(ec, dp, env=None)  # refused before any collective
    with pytest.raises(ValueError, match=r"no entry for low-precision table 't1'"):
        validate_plan(ec, {k: v for k, v in good.items() if k != "t1"})
    uvm = {**good, "t2": dataclasses.replace(good["t2"], compute_kernel="fused_uvm_caching")}
    with pytest.raises(ValueError, match=r"compute kernel 'fused_uvm_caching' is not supported"):
        validate_plan(ec, uvm)
    mixed_widths = plan({**TW, "t0": column_wise(ranks=[0, 1]), "t1": column_wise(ranks=[0, 1, 0, 1])})
    with pytest.raises(ValueError, match=r"one column-shard width for every column-wise table"):
        validate_plan(ec, mixed_widths)
    with pytest.raises(ValueError, match=r"fused_params \['weight_decay_mode'\] are not supported"):
        LowPrecisionEmbeddingCollectionSharder(fused_params={"weight_decay_mode": 1})
    with pytest.raises(ValueError, match=r"fused_params \['gradient_clipping'\] are not supported"):
        lp.sharders(fused_params={"optimizer": EmbOptimType.EXACT_SGD, "gradient_clipping": True})
    with pytest.raises(ValueError, match="use_index_dedup=True is not supported"):
        LowPrecisionEmbeddingCollectionSharder(use_index_dedup=True)

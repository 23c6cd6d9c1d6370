"""The DLRM of the example: sparse part (ONE builder), dense part, process group and sharding."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torchrec
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

import torchrec_lowprec as lp
from torchrec_lowprec.data import count_frequencies, frequency_rank
from torchrec_lowprec.flags import add_recipe_flags, parse_hot_rows
from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.quant.groups import table_counts

PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model")
    g.add_argument(
        "--precision",
        default="int8",
        choices=[*PRECISION_BITS, "mpe"],
        help="table storage; mpe: search bit widths per frequency group first (one process; see --mpe-*), "
        "then train the mixed-precision tables from scratch",
    )
    g.add_argument("--mpe-bits", default="0,8", help="MPE candidate widths")
    g.add_argument("--mpe-lambda", type=float, default=1e-5, help="MPE bit regulariser weight")
    g.add_argument("--mpe-groups", type=int, default=32, help="MPE frequency groups per table")
    g.add_argument(
        "--mpe-target-bits",
        default=None,
        help="MPE at a byte budget: the plan's stored bits per value, scale/bias included (a number "
        "in (0, 32], e.g. 0.8 for 40x), or int8/int4/int2 for the bytes of every table at that width; "
        "--mpe-lambda is then where lambda's dual ascent starts (e.g. 1e-2)",
    )
    g.add_argument(
        "--mpe-plan-out", default="runs/mpe_plan.json", help="where --precision mpe writes its plan"
    )
    g.add_argument(
        "--rounding",
        default="stochastic",
        choices=["stochastic", "nearest", "dithered"],
        help="write-back rounding (the papers' LPT-DR = nearest + --no-learn-step-size, LPT-SR = "
        "stochastic + --no-learn-step-size, ALPT = stochastic + --learn-step-size, each with "
        "--no-grow-step-size; dithered: stochastic with golden-ratio draws over steps)",
    )
    add_recipe_flags(g)  # --learn-step-size, --hot-rows
    g.add_argument(
        "--step-size-lr",
        type=float,
        default=None,
        help="ALPT step-size learning rate (default: the library's)",
    )
    g.add_argument(
        "--step-size-init",
        default="lsq",
        help="each row's initial step: lsq (2 mean|w| / sqrt(Qp)), absmax (max|w| / Qp) or a float",
    )
    g.add_argument(
        "--growth-threshold",
        type=float,
        default=None,
        help="grow a row's step when it needs a grid this x wider",
    )
    g.add_argument(
        "--grow-step-size",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a row whose update leaves its grid grows its step (the library's default) instead of "
        "being clipped (--no-grow-step-size: the papers' LPT/ALPT)",
    )
    g.add_argument(
        "--precision-plan",
        help="a PrecisionPlan JSON (MPE's selection, benchmarks/mpe.py) or a `torchrec-lowprec plan` output: "
        "per-table / per-frequency-group bit widths (the tables become MixedPrecisionEmbeddingBagCollection; "
        "--precision is then the width of tables the plan does not name)",
    )
    g.add_argument("--embedding-dim", type=int, default=32, help="every table's dim (= last dense layer)")
    g.add_argument(
        "--dense-arch", default="64", help="hidden sizes of the bottom MLP (embedding dim is appended)"
    )
    g.add_argument("--over-arch", default="64,32", help="hidden sizes of the top MLP (1 is appended)")
    g.add_argument("--dcn", action="store_true", help="DLRM_DCN: a low-rank cross network over the features")
    g.add_argument("--dcn-layers", type=int, default=2)
    g.add_argument("--dcn-rank", type=int, default=16)


def _sizes(spec: str) -> list[int]:
    return [int(v) for v in spec.split(",") if v.strip()]


#: ``--emb-optimizer`` -> the optimizer class TorchRec users tag their tables with.
IN_BACKWARD_CLASS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": torchrec.optim.RowWiseAdagrad,
    "adam": torch.optim.Adam,
}


def table_config(args: argparse.Namespace) -> lp.LowPrecisionConfig:
    """The LowPrecisionConfig the flags describe (fp32/fp16 run the same fused update unquantized).

    The optimizer and its lr are set here as well as through the in-backward tag: TorchRec's
    sharding rewrites a tag's kwargs in place (``{"lr": x}`` becomes ``{"optimizer": ...,
    "learning_rate": x}``), after which the sharded tables fall back to the config's lr.
    """
    return lp.LowPrecisionConfig(
        optimizer=getattr(args, "emb_optimizer", "rowwise_adagrad"),
        learning_rate=args.emb_lr,
        bits=PRECISION_BITS.get(args.precision, 8),  # mpe: tables its plan does not split
        rounding=args.rounding,
        learn_step_size=args.learn_step_size,
        seed=args.seed,
        step_size_init=_step_size_init(getattr(args, "step_size_init", "lsq")),
        # flags left unset take the library's defaults (one place that says what they are)
        **_given(
            step_size_lr=getattr(args, "step_size_lr", None),
            grow_step_size=args.grow_step_size,
            growth_threshold=getattr(args, "growth_threshold", None),
        ),
    )


def _given(**kwargs: object) -> dict:
    """``kwargs`` without the ones that are ``None`` (flags the user did not set)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _step_size_init(v: str) -> str | float:
    """``--step-size-init``: a method name, or a number (one step for every row)."""
    try:
        return float(v)
    except ValueError:
        return v


def build_embedding_collection(
    args: argparse.Namespace,
    tables: list[EmbeddingBagConfig],
    data: object | None = None,
) -> nn.Module:
    """The sparse part of the model: every table, its storage precision and its fused optimizer.

    All precision decisions live here: TorchRec's float collection is built (TorchRec's init,
    from the current torch seed, so every precision starts from the same weights), tagged with
    its fused optimizer (``--emb-optimizer``, RowWiseAdagrad by default) through
    ``_apply_optimizer_in_backward`` as TorchRec's DLRM examples do, then swapped for a low-precision collection holding those weights quantized.
    ``data`` (the :class:`dlrm_data.DataSource`) is there for precision plans that need the
    training frequencies.
    """
    ebc = torchrec.EmbeddingBagCollection(tables, device=torch.device("cpu"))
    tag_class = IN_BACKWARD_CLASS[getattr(args, "emb_optimizer", "rowwise_adagrad")]
    _apply_optimizer_in_backward(tag_class, ebc.parameters(), {"lr": args.emb_lr})
    plan = None
    if args.precision == "mpe":
        from dlrm_mpe import search_plan  # noqa: PLC0415 (the search needs the whole model)

        plan = search_plan(args, tables, data)
    elif getattr(args, "precision_plan", None):
        plan = PrecisionPlan.load(args.precision_plan)
    elif getattr(args, "hot_rows", None):
        plan = hot_rows_plan(args, tables)
    if plan is not None:
        plan, row_maps = with_id_maps(plan, tables, data)
        return lp.convert(ebc, lp.MixedPrecisionConfig(plan, table_config(args)), row_maps=row_maps)
    return lp.convert(ebc, table_config(args))


def hot_rows_plan(args: argparse.Namespace, tables: list[EmbeddingBagConfig]) -> PrecisionPlan:
    """The plan ``--hot-rows`` describes: every table at ``--precision``, its hottest rows wider."""
    bits = PRECISION_BITS[args.precision]
    shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    return PrecisionPlan.hot_rows(shapes, bits, parse_hot_rows(args.hot_rows, bits))


def training_ranks(tables: list[EmbeddingBagConfig], data, names: set[str]) -> tuple[dict, dict]:
    """Per-feature lookup counts on the training split and, for tables in ``names``, the raw id ->
    frequency rank map (one per table: its features share its id space)."""
    feats = {f: t.num_embeddings for t in tables if t.name in names for f in t.feature_names}
    counts = count_frequencies((b.batch for b in data.train_batches(65536, 0, 1)), feats)
    return counts, {t.name: frequency_rank(table_counts(t, counts)) for t in tables if t.name in names}


def with_id_maps(plan: PrecisionPlan, tables: list[EmbeddingBagConfig], data) -> tuple[PrecisionPlan, dict]:
    """``plan`` with raw id -> frequency-rank maps for its grouped tables.

    This example's data pipeline feeds raw ids, so a table split into frequency groups gets an
    id map (4 B/row, counted in the embedding bytes) built from the training split's counts.
    """
    grouped = {n for n, tp in plan.tables.items() if tp.num_groups > 1}
    if not grouped:
        return plan, {}
    if data is None:
        raise ValueError(
            "the precision plan splits tables into frequency groups: the training data are needed"
        )
    _, maps = training_ranks(tables, data, grouped)
    remapped = {
        n: dataclasses.replace(tp, remapped=True) if n in grouped else tp for n, tp in plan.tables.items()
    }
    return PrecisionPlan(remapped), maps


def build_model(
    args: argparse.Namespace,
    tables: list[EmbeddingBagConfig],
    num_dense: int,
    data=None,
    ebc: nn.Module | None = None,
) -> DLRMTrain:
    """DLRM (or DLRM_DCN) with the collection of :func:`build_embedding_collection` (or ``ebc``),
    seeded by ``--seed``."""
    torch.manual_seed(args.seed)
    ebc = ebc if ebc is not None else build_embedding_collection(args, tables, data)
    dense = [*_sizes(args.dense_arch), args.embedding_dim]
    over = [*_sizes(args.over_arch), 1]
    if args.dcn:
        net = DLRM_DCN(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=dense,
            over_arch_layer_sizes=over,
            dcn_num_layers=args.dcn_layers,
            dcn_low_rank_dim=args.dcn_rank,
        )
    else:
        net = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=dense,
            over_arch_layer_sizes=over,
        )
    return DLRMTrain(net)


def float_equivalent_bytes(tables: list[EmbeddingBagConfig]) -> int:
    """What TorchRec/FBGEMM FP32 tables hold: fp32 rows + RowWiseAdagrad's one fp32 per row."""
    return sum(t.num_embeddings * (4 * t.embedding_dim + 4) for t in tables)


def sparse_module(model: nn.Module) -> nn.Module:
    """The (possibly sharded) embedding collection of a DLRMTrain, under DMP or not."""
    inner = getattr(model, "module", model)  # DistributedModelParallel.module is the wrapped model
    return inner.model.sparse_arch.embedding_bag_collection


# ----------------------------------------------------------------------------- distributed
@dataclass
class Env:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_env(timeout_s: float | None = None) -> Env:
    """One process, or the process group torchrun / TorchX describe (WORLD_SIZE > 1): gloo on
    CPU, nccl on CUDA, one GPU per local rank. ``timeout_s`` bounds every collective (a hung
    rank fails the job after it instead of gloo's 30-minute default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return Env(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    dist.init_process_group(backend=backend, timeout=timeout, **_attempt_store(world, timeout))
    return Env(dist.get_rank(), dist.get_world_size(), local_rank, local_world, device)


def _attempt_store(world: int, timeout: datetime.timedelta | None) -> dict:
    """The store of this restart attempt, when torchrun shares its agent's store with workers.

    torchrun (c10d rendezvous) keeps one store for the whole job and its workers write their
    gloo addresses into it under fixed keys. After a restart, a worker can read the address a
    worker of the previous attempt left there before its peer overwrites it, and the full-mesh
    connect then fails ("Connection refused"; seen in most restarts on 2 CPU ranks). Keys under
    a per-attempt prefix are always this attempt's. Other launchers: ``env://`` as usual."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout or datetime.timedelta(minutes=30),
    )
    return {
        "store": dist.PrefixStore(f"/torchrec_lowprec/attempt_{attempt}", store),
        "rank": int(os.environ["RANK"]),
        "world_size": world,
    }


def shard(model: nn.Module, env: Env) -> nn.Module:
    """``DistributedModelParallel`` with TorchRec's planner and the project's sharders.

    The model arrives with real weights on CPU, so each shard starts from the rows the
    unsharded model holds (the same init as a one-process run).
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.types import ShardingEnv

    pg = dist.group.WORLD
    topology = Topology(
        world_size=env.world, compute_device=env.device.type, local_world_size=env.local_world
    )
    plan = EmbeddingShardingPlanner(topology=topology).collective_plan(model, lp.sharders(), pg)
    return DistributedModelParallel(
        model, plan=plan, sharders=lp.sharders(), device=env.device, env=ShardingEnv.from_process_group(pg)
    )


def plan_summary(model: nn.Module) -> dict[str, dict]:
    """Table -> sharding type and ranks, for the summary (empty without DMP)."""
    plan = getattr(model, "plan", None)
    if plan is None:
        return {}
    out = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():
            out[table] = {"sharding": ps.sharding_type, "kernel": ps.compute_kernel, "ranks": ps.ranks}
    return out

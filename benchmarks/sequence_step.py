"""Forward and train-step time and state bytes of ``LowPrecisionEmbeddingCollection`` vs
TorchRec's ``EmbeddingCollection`` on FBGEMM (sequence mode: one embedding per id).

For each configuration and id distribution, in ``--procs`` fresh processes (default 3), each
building every variant and timing them **interleaved** (``--rounds`` rounds of ``--iters``
batches per variant; the helpers of ``benchmarks/embedding_step.py``), on the same ids:

- *TorchRec EC*: ``torchrec.EmbeddingCollection`` tagged with ``RowWiseAdagrad`` through
  ``_apply_optimizer_in_backward`` and sharded by ``DistributedModelParallel`` on one gloo rank
  (table-wise, ``fused`` kernel): its tables are FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen``
  with ``pooling_mode=PoolingMode.NONE`` and EXACT_ROWWISE_ADAGRAD fused into the backward,
  weights FP32 or FP16 (``data_type``) — what a TorchRec training job runs;
- *FBGEMM TBE*: the same FBGEMM module called directly (no TorchRec input/output dist), FP32
  and FP16: the kernel alone;
- *ours*: ``LowPrecisionEmbeddingCollection`` at fp32 / fp16 / int8 / int4 (int8/4: ALPT,
  stochastic rounding, RowWiseAdagrad; forward on our native ``sequence_lookup``).

A step is forward + backward of a fixed gradient of every output + the fused update. A process
reports each variant's median ms; the section gives per variant the median over processes of
the per-process ratio (FBGEMM or TorchRec time / ours: > 1 = ours is faster) and its min-max.

    python benchmarks/sequence_step.py                          # full run (~8 min on 2 cores)
    python benchmarks/sequence_step.py --quick                  # small sizes, 2 processes, writes nothing
    python benchmarks/sequence_step.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torchrec
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec import DataType, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedding_step import DISTS, add_cell_args, draw_ids, fmt_ratio, parse_dists, time_interleaved  # noqa: E402
from fresh_process import add_worker_args, rows_label, run_fresh  # noqa: E402
from report import contention, cpu_stat, machine_info, machine_section, publish  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402

LR, EPS = 0.01, 1e-8


@dataclass(frozen=True)
class Setup:
    """Tables of one size, one sequence feature each; lengths uniform in ``1..2*seq_len-1``."""

    tables: int
    rows: int
    dim: int
    batch: int
    seq_len: int

    def label(self) -> str:
        return f"{self.tables} x {rows_label(self.rows)} x {self.dim}, batch {self.batch}, ~{self.seq_len} ids/sequence"


SETUPS = [Setup(2, 1_000_000, 64, 1024, 20), Setup(4, 200_000, 128, 512, 16)]
QUICK = [Setup(2, 20_000, 32, 128, 8)]
BASE = "TorchRec EC FP32"
VARIANTS = ("TorchRec EC FP32", "TorchRec EC FP16", "FBGEMM TBE FP32", "FBGEMM TBE FP16",
            "ours fp32", "ours fp16", "ours int8", "ours int4")  # fmt: skip
OURS = [v for v in VARIANTS if v.startswith("ours")]


def make_batches(s: Setup, n: int, dist: str, seed: int) -> list[KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, 2 * s.seq_len, (s.tables * s.batch,), generator=gen)
        per = lengths.view(s.tables, s.batch).sum(1).tolist()
        values = torch.cat([draw_ids(s.rows, k, dist, gen) for k in per])
        out.append(KeyedJaggedTensor.from_lengths_sync([f"f{t}" for t in range(s.tables)], values, lengths))
    return out


def _tables(s: Setup, data_type: DataType = DataType.FP32) -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(
            name=f"t{t}",
            embedding_dim=s.dim,
            num_embeddings=s.rows,
            feature_names=[f"f{t}"],
            data_type=data_type,
        )  # fmt: skip
        for t in range(s.tables)
    ]


def _ec_fns(module, keys: list[str], grads: list[torch.Tensor]) -> tuple:
    """forward / step closures of a module returning ``Dict[str, JaggedTensor]``."""

    def fwd(kjt):
        with torch.no_grad():
            out = module(kjt)
            [out[k].values() for k in keys]

    def step(kjt):
        out = module(kjt)
        vals = [out[k].values() for k in keys]
        torch.autograd.backward(vals, [g[: v.shape[0]] for v, g in zip(vals, grads)])

    return fwd, step


def bench_torchrec(s: Setup, data_type: DataType, grads) -> dict:
    """TorchRec's EmbeddingCollection sharded by DMP on one rank: fused FBGEMM TBE, PoolingMode.NONE."""
    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv

    if not dist.is_initialized():  # one rank, an in-process store: no port, nothing shared
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tables = _tables(s, data_type)
    ec = torchrec.EmbeddingCollection(tables, device=torch.device("meta"))
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ec.parameters(), {"lr": LR, "eps": EPS})
    cons = {
        t.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for t in tables
    }
    sharders = [EmbeddingCollectionSharder()]
    plan = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=cons
    ).plan(ec, sharders)
    dmp = DistributedModelParallel(ec, plan=plan, sharders=sharders, device=torch.device("cpu"),
                                   env=ShardingEnv.from_process_group(dist.group.WORLD))  # fmt: skip
    tbes = [e._emb_module for lookup in dmp.module._lookups for e in lookup._emb_modules]
    want = SparseType.FP16 if data_type == DataType.FP16 else SparseType.FP32
    for t in tbes:  # the claim of the section, checked on the modules that run
        assert isinstance(t, SplitTableBatchedEmbeddingBagsCodegen) and t.pooling_mode == PoolingMode.NONE
        assert t.weights_precision == want and t.optimizer == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    state = sum(x.numel() * x.element_size() for t in tbes for x in (t.weights_host, t.momentum1_host))
    fwd, step = _ec_fns(dmp, [f"f{t}" for t in range(s.tables)], grads)
    return {"fwd": fwd, "step": step, "bytes": state, "keep": dmp}


def bench_tbe(s: Setup, precision: SparseType, grads) -> dict:
    """FBGEMM's TBE in sequence mode, called directly on the KJT's values and offsets."""
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(s.rows, s.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * s.tables,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=LR, eps=EPS,
        weights_precision=precision, pooling_mode=PoolingMode.NONE,
    )  # fmt: skip
    state = sum(x.numel() * x.element_size() for x in (tbe.weights_host, tbe.momentum1_host))
    grad = torch.cat(grads)

    def fwd(kjt):
        with torch.no_grad():
            tbe(kjt.values(), kjt.offsets())

    def step(kjt):
        out = tbe(kjt.values(), kjt.offsets())
        out.backward(grad[: out.shape[0]])

    return {"fwd": fwd, "step": step, "bytes": state, "keep": tbe}


def bench_ours(s: Setup, bits: int, grads) -> dict:
    cfg = lp.LowPrecisionConfig(bits=bits, learning_rate=LR, eps=EPS, optimizer="rowwise_adagrad")
    ec = lp.LowPrecisionEmbeddingCollection(_tables(s), config=cfg)
    fwd, step = _ec_fns(ec, [f"f{t}" for t in range(s.tables)], grads)
    return {"fwd": fwd, "step": step, "bytes": ec.memory_bytes(), "keep": ec}


def run_one(s: Setup, dist: str, rounds: int, iters: int, seed: int) -> dict:
    """One process's figures: every variant built, then timed interleaved (see embedding_step)."""
    batches = make_batches(s, 4, dist, seed)
    most = max(int(b.lengths().view(s.tables, s.batch).sum(1).max()) for b in batches)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(most, s.dim, generator=g) for _ in range(s.tables)]
    builders = {
        "TorchRec EC FP32": lambda: bench_torchrec(s, DataType.FP32, grads),
        "TorchRec EC FP16": lambda: bench_torchrec(s, DataType.FP16, grads),
        "FBGEMM TBE FP32": lambda: bench_tbe(s, SparseType.FP32, grads),
        "FBGEMM TBE FP16": lambda: bench_tbe(s, SparseType.FP16, grads),
        "ours fp32": lambda: bench_ours(s, 32, grads),
        "ours fp16": lambda: bench_ours(s, 16, grads),
        "ours int8": lambda: bench_ours(s, 8, grads),
        "ours int4": lambda: bench_ours(s, 4, grads),
    }
    variants = {name: builders[name]() for name in VARIANTS}
    ms = time_interleaved(variants, batches, rounds, iters)
    return {name: ms[name] | {"bytes": v["bytes"]} for name, v in variants.items()}


def spawn_runs(s: Setup, dist: str, args) -> list[dict]:
    """``args.procs`` fresh processes, one after the other, each running :func:`run_one`."""

    def steps(r: dict) -> str:
        return "step ms " + ", ".join(f"{n} {v['step']:.1f}" for n, v in r.items())

    return run_fresh(__file__, s, dist, args, describe=steps)


def summarize(runs: list[dict]) -> dict:
    """Per variant: median ms over processes; per baseline and kind the ratio base/ours per
    process, as (median, min, max)."""
    out = {}
    for name in VARIANTS:
        row = {k: statistics.median(r[name][k] for r in runs) for k in ("fwd", "step")}
        row["bytes"] = runs[0][name]["bytes"]
        for base in ("TorchRec EC FP32", "TorchRec EC FP16", "FBGEMM TBE FP32"):
            for kind in ("fwd", "step"):
                ratios = [r[base][kind] / r[name][kind] for r in runs]
                row[(base, kind)] = (statistics.median(ratios), min(ratios), max(ratios))
        out[name] = row
    return out


def section(results, args, stat0, elapsed: float) -> list[str]:
    """The markdown lines of the section (after the command line)."""
    lines = [
        f"({elapsed / 60:.1f} min)  ",
        *machine_info(args.threads),
        f"Contention: {contention(stat0, cpu_stat())}.  ",
        f"Optimizer RowWiseAdagrad (lr {LR}, eps {EPS:g}) fused into the backward on every variant. "
        f"{args.procs} fresh processes per cell, each building every variant and timing them interleaved "
        f"({args.rounds} rounds x {args.iters} batches); ms = median over processes of each process's "
        "median. Ratios are per process, base time / our time in the same process (> 1: ours is faster), "
        "shown as the median over processes (min-max). *TorchRec EC* = `torchrec.EmbeddingCollection` "
        "sharded by `DistributedModelParallel` on one gloo rank (its tables: FBGEMM "
        "`SplitTableBatchedEmbeddingBagsCodegen`, `PoolingMode.NONE`, EXACT_ROWWISE_ADAGRAD, checked in "
        "the run); *FBGEMM TBE* = that module called directly (no TorchRec input/output dist). State = "
        "weights + optimizer state (+ fp32 master step sizes for int8/4).",
        "",
    ]
    for s, dist, rows in results:
        base = rows[BASE]
        lines += [
            f"**{s.label()}; ids: {DISTS[dist]}**",
            "",
            "| variant | fwd ms | step ms | fwd vs TorchRec FP32 | step vs TorchRec FP32 | step vs TorchRec FP16 "
            "| step vs TBE FP32 | state MB | state vs FP32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['fwd']:.2f} | {r['step']:.2f} | {fmt_ratio(r[(BASE, 'fwd')])} | "
                f"{fmt_ratio(r[(BASE, 'step')])} | {fmt_ratio(r[('TorchRec EC FP16', 'step')])} | "
                f"{fmt_ratio(r[('FBGEMM TBE FP32', 'step')])} | {r['bytes'] / 2**20:.0f} | "
                f"{r['bytes'] / base['bytes']:.3f} |"
            )
        lines.append("")
    lines += verdicts(results)
    return lines


def verdicts(results) -> list[str]:
    """The targets, checked against this run's figures."""
    cells = [(s, d, n, r[n]) for s, d, r in results for n in ("ours int8", "ours int4")]
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    where = lambda c: f"{c[2]}, {c[0].label()}, {c[1]} ids"  # noqa: E731
    out = ["Verdicts (computed from the figures above):", ""]
    for base in (BASE, "FBGEMM TBE FP32"):
        worst = min(cells, key=lambda c: c[3][(base, "step")][0])
        lo = min(cells, key=lambda c: c[3][(base, "step")][1])
        out.append(
            f"- int8/int4 train step >= 1.0x {base} (median over processes) in every cell: "
            f"{met(worst[3][(base, 'step')][0] >= 1.0)}; lowest median {worst[3][(base, 'step')][0]:.2f}x "
            f"({where(worst)}); lowest single process {lo[3][(base, 'step')][1]:.2f}x ({where(lo)})."
        )
    slow_fwd = [c for c in cells if c[3][(BASE, "fwd")][0] < 1.0]
    out.append(
        "- forward slower than TorchRec FP32 in: "
        + ("; ".join(f"{where(c)} ({c[3][(BASE, 'fwd')][0]:.2f}x)" for c in slow_fwd) or "no cell")
        + "."
    )
    int8 = [r["ours int8"]["bytes"] / r[BASE]["bytes"] for _, _, r in results]
    out.append(
        f"- int8 state <= 0.30x FP32 in every cell: {met(max(int8) <= 0.30)} (largest {max(int8):.3f}x)."
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, "small sizes, 2 processes, uniform ids; writes nothing", "uniform,zipf1.05", 3)
    add_worker_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(
            json.dumps(
                run_one(Setup(**json.loads(args.worker)), args.dist, args.rounds, args.iters, args.seed)
            )
        )
        return
    dists = ["uniform"] if args.quick else parse_dists(ap, args.dists)
    if args.quick and args.write:
        ap.error("--quick writes nothing: drop --write (or --quick)")
    args.procs = args.procs or (2 if args.quick else 3)
    stat0, t0 = cpu_stat(), time.perf_counter()
    results = [
        (s, d, summarize(spawn_runs(s, d, args))) for s in (QUICK if args.quick else SETUPS) for d in dists
    ]
    lines = section(results, args, stat0, time.perf_counter() - t0)
    argv = [shlex.quote(a) for a in sys.argv[1:] if not a.endswith(".md") and a != "--write"]
    key, title = machine_section(
        "sequence_step", "Sequence (EmbeddingCollection) train step vs TorchRec/FBGEMM"
    )
    publish(args.write, key, title, "benchmarks/sequence_step.py", argv, lines)


if __name__ == "__main__":
    main()

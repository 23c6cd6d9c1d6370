"""Per-step time and bytes per rank: sharded int8/int4 tables vs TorchRec's sharded FP32 tables.

Two gloo processes on CPU (DistributedModelParallel, TABLE_WISE and ROW_WISE plans). FP32 is
TorchRec's own EmbeddingBagCollection sharded by its default sharder (FBGEMM's fused TBE with
RowWiseAdagrad fused into the backward); int8/int4 are LowPrecisionEmbeddingBagCollection
(ALPT, RowWiseAdagrad). Same ids on all. Each of ``--runs`` fresh 2-rank jobs builds the three
models of a plan and times them **interleaved** (``--rounds`` rounds of ``--iters`` steps each);
a job reports rank 0's median ms per training step (forward, backward with the fused update,
comms) per model. The section gives per model the median over jobs of the ratio to FP32 and
its min-max, the machine, and verdict lines computed from the same run.

    python benchmarks/sharded_step.py [--quick] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchrec
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedding_step import DISTS, draw_ids  # noqa: E402
from report import contention, cpu_stat, machine_info, write_section  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder  # noqa: E402

TABLES, ROWS, DIM, BATCH, IDS = 8, 500_000, 64, 1024, 8


class Wrap(nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        return self.ebc(kjt).values()


def _tables(rows: int = ROWS):
    return [
        torchrec.EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f{i}"]
        )
        for i in range(TABLES)
    ]


def _batches(rank: int, n: int, dist: str, seed: int, rows: int = ROWS):
    g = torch.Generator().manual_seed(rank + 100 * seed)
    out = []
    for _ in range(n):
        values = torch.cat([draw_ids(rows, BATCH * IDS, dist, g) for _ in range(TABLES)])
        lengths = torch.full((TABLES * BATCH,), IDS, dtype=torch.int64)
        out.append(
            torchrec.KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(TABLES)], values, lengths)
        )
    return out


def _model(kind: str, plan_kind: str, world: int, rows: int = ROWS):
    tables = _tables(rows)
    specs = {
        t.name: (table_wise(rank=i % world) if plan_kind == "table_wise" else row_wise())
        for i, t in enumerate(tables)
    }
    if kind == "fp32":
        ebc = torchrec.EmbeddingBagCollection(tables, device=torch.device("meta"))
        _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ebc.parameters(), {"lr": 0.01})
        sharder = torchrec.distributed.embeddingbag.EmbeddingBagCollectionSharder()
    else:
        ebc = lp.LowPrecisionEmbeddingBagCollection(
            tables,
            config=lp.LowPrecisionConfig(bits=int(kind[3:]), learning_rate=0.01),
            device=torch.device("meta"),
        )
        sharder = LowPrecisionEmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        ebc, specs, local_size=world, world_size=world, device_type="cpu", sharder=sharder
    )
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    return DistributedModelParallel(
        Wrap(ebc),
        plan=ShardingPlan({"ebc": plan}),
        sharders=lp.sharders(),
        device=torch.device("cpu"),
        env=env,
    )


def _bytes(dmp, kind: str) -> int:
    if kind != "fp32":
        return dmp.module.ebc.memory_bytes()
    total = 0
    for lookup in dmp.module.ebc._lookups:
        for m in lookup.modules():
            for name in ("weights_host", "momentum1_host"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


KINDS = ("fp32", "int8", "int4")
PLANS = ("table_wise", "row_wise")


def _worker(rank: int, world: int, init: str, out_q, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    batches = _batches(rank, 4, args["dist"], args["seed"], args["rows"])
    for plan_kind in PLANS:
        models = {kind: _model(kind, plan_kind, world, args["rows"]) for kind in KINDS}
        grads = {}
        for kind, dmp in models.items():  # warm-up (and the output shape for the gradient)
            out = dmp(batches[0])
            grads[kind] = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
            out.backward(grads[kind])
        samples = {kind: [] for kind in KINDS}
        for _ in range(args["rounds"]):
            for kind, dmp in models.items():
                times = []
                for i in range(args["iters"]):
                    dist.barrier()
                    t0 = time.perf_counter()
                    dmp(batches[i % len(batches)]).backward(grads[kind])
                    dist.barrier()
                    times.append(time.perf_counter() - t0)
                samples[kind].append(statistics.median(times) * 1e3)
        for kind, dmp in models.items():
            b = torch.tensor([_bytes(dmp, kind)], dtype=torch.float64)
            gathered = [torch.zeros_like(b) for _ in range(world)]
            dist.all_gather(gathered, b)
            if rank == 0:
                out_q.put(
                    (plan_kind, kind, statistics.median(samples[kind]), [int(g.item()) for g in gathered])
                )
        del models
    dist.destroy_process_group()


def one_job(args: dict) -> list:
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), q, args), nprocs=world, join=True)
    rows = []
    while not q.empty():
        rows.append(q.get())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 jobs, 1 round, 50k rows per table (smoke run)")
    ap.add_argument("--runs", type=int, default=None, help="fresh 2-rank jobs (default 5; quick 2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--dist", default="zipf1.05", choices=sorted(DISTS))
    ap.add_argument("--write", metavar="MD")
    args = ap.parse_args()
    runs = args.runs or (2 if args.quick else 5)
    rounds = 1 if args.quick else args.rounds
    rows_per_table = 50_000 if args.quick else ROWS
    stat0, t0 = cpu_stat(), time.perf_counter()
    jobs = []
    for r in range(runs):
        jobs.append(
            one_job(
                {"dist": args.dist, "seed": r, "rounds": rounds, "iters": args.iters, "rows": rows_per_table}
            )
        )
        print(f"  job {r + 1}/{runs} done", flush=True)
    ms = {(p, k): [] for p in PLANS for k in KINDS}
    ratio = {(p, k): [] for p in PLANS for k in KINDS}
    nbytes = {}
    for rows in jobs:
        by = {(p, k): (m, b) for p, k, m, b in rows}
        for p, k in ms:
            ms[p, k].append(by[p, k][0])
            ratio[p, k].append(by[p, "fp32"][0] / by[p, k][0])
            nbytes[p, k] = by[p, k][1]
    cmd = "python benchmarks/sharded_step.py " + " ".join(a for a in sys.argv[1:] if not a.endswith(".md"))
    lines = [
        f"Command: `{cmd.replace(' --write', '').strip()}` ({(time.perf_counter() - t0) / 60:.1f} min)  ",
        *machine_info(1),
        f"Contention: {contention(stat0, cpu_stat())}.  ",
        f"{TABLES} tables x {rows_per_table} rows x {DIM}, batch {BATCH} per rank, {IDS} ids per bag ({DISTS[args.dist]}), "
        f"2 gloo processes with 1 thread each; {runs} fresh jobs, each timing the three models of a plan "
        f"interleaved ({rounds} rounds x {args.iters} steps); ms = median over jobs of rank 0's median step; "
        "throughput vs FP32 = per job FP32 ms / ms, median over jobs (min-max). FP32 = TorchRec's sharded "
        "EmbeddingBagCollection (FBGEMM fused TBE, RowWiseAdagrad).",
        "",
        "| plan | tables | step ms | step throughput vs FP32 | MB rank 0 | MB rank 1 | bytes vs FP32 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p, k in ms:
        rs, b, b32 = ratio[p, k], nbytes[p, k], nbytes[p, "fp32"]
        lines.append(
            f"| {p} | {k} | {statistics.median(ms[p, k]):.1f} | {statistics.median(rs):.2f}x "
            f"({min(rs):.2f}-{max(rs):.2f}) | {b[0] / 2**20:.0f} | {b[1] / 2**20:.0f} | {sum(b) / sum(b32):.3f} |"
        )
    low = [(p, k) for p, k in ms if k != "fp32"]
    worst = min(low, key=lambda c: statistics.median(ratio[c]))
    ok = statistics.median(ratio[worst]) >= 1.0
    lines += [
        "",
        "Verdict (computed from the figures above): sharded ROW_WISE and TABLE_WISE int8/int4 step >= 1.0x of "
        f"TorchRec's sharded FP32 (median over jobs): {'**met**' if ok else '**not met**'}; lowest "
        f"{statistics.median(ratio[worst]):.2f}x ({worst[0]}, {worst[1]}); "
        f"{sum(statistics.median(ratio[c]) >= 1.0 for c in low)} of {len(low)} cells >= 1.0x.",
    ]
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(args.write, "sharded_step", "Sharded train step, 2 ranks (CPU, gloo)", md)


if __name__ == "__main__":
    main()

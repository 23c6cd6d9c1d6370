"""Per-step time and bytes per rank: sharded int8/int4 tables vs TorchRec's sharded FP32 tables.

Two gloo processes on CPU (DistributedModelParallel, TABLE_WISE then ROW_WISE plans). FP32 is
TorchRec's own EmbeddingBagCollection sharded by its default sharder (FBGEMM's fused TBE with
RowWiseAdagrad fused into the backward); int8/int4 are LowPrecisionEmbeddingBagCollection
(ALPT, RowWiseAdagrad). Same ids on both; median ms per training step (forward, backward with
the fused update, comms) on rank 0; bytes each rank holds for its shards.

    python benchmarks/sharded_step.py [--write docs/benchmarks.md]
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
from embedding_step import zipf_ids  # noqa: E402
from report import write_section  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402
from torchrec_lowprec.distributed.sharder import LowPrecisionEmbeddingBagCollectionSharder  # noqa: E402

TABLES, ROWS, DIM, BATCH, IDS = 8, 500_000, 64, 1024, 8


class Wrap(nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        return self.ebc(kjt).values()


def _tables():
    return [
        torchrec.EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f{i}"]
        )
        for i in range(TABLES)
    ]


def _batches(rank: int, n: int):
    g = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(n):
        values = torch.cat([zipf_ids(ROWS, BATCH * IDS, 1.05, g) for _ in range(TABLES)])
        lengths = torch.full((TABLES * BATCH,), IDS, dtype=torch.int64)
        out.append(
            torchrec.KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(TABLES)], values, lengths)
        )
    return out


def _model(kind: str, plan_kind: str, world: int):
    tables = _tables()
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


def _worker(rank: int, world: int, init: str, out_q, iters: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    batches = _batches(rank, 4)
    for plan_kind in ("table_wise", "row_wise"):
        for kind in ("fp32", "int8", "int4"):
            dmp = _model(kind, plan_kind, world)
            grad = None
            times = []
            for i in range(iters + 3):
                dist.barrier()
                t0 = time.perf_counter()
                out = dmp(batches[i % len(batches)])
                if grad is None:
                    grad = torch.randn_like(out)
                out.backward(grad)
                dist.barrier()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            b = torch.tensor([_bytes(dmp, kind)], dtype=torch.float64)
            gathered = [torch.zeros_like(b) for _ in range(world)]
            dist.all_gather(gathered, b)
            if rank == 0:
                out_q.put(
                    (plan_kind, kind, statistics.median(times) * 1e3, [int(g.item()) for g in gathered])
                )
            del dmp
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--write", metavar="MD")
    args = ap.parse_args()
    world = 2
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world, os.path.join(d, "init"), q, args.iters), nprocs=world, join=True)
    rows = []
    while not q.empty():
        rows.append(q.get())
    lines = [
        "Command: `python benchmarks/sharded_step.py`  ",
        f"{TABLES} tables x {ROWS} rows x {DIM}, batch {BATCH} per rank, {IDS} Zipf(1.05) ids per bag, 2 gloo "
        "processes with 1 thread each on the 2-core CPU; median ms per training step on rank 0; FP32 = TorchRec's "
        "sharded EmbeddingBagCollection (FBGEMM fused TBE, RowWiseAdagrad).",
        "",
        "| plan | tables | step ms | step throughput vs FP32 | MB rank 0 | MB rank 1 | bytes vs FP32 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {p: (ms, sum(b)) for p, k, ms, b in rows if k == "fp32"}
    for plan_kind, kind, ms, b in rows:
        bms, bb = base[plan_kind]
        lines.append(
            f"| {plan_kind} | {kind} | {ms:.1f} | {bms / ms:.2f}x | {b[0] / 2**20:.0f} | {b[1] / 2**20:.0f} | {sum(b) / bb:.3f} |"
        )
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(args.write, "sharded_step", "Sharded train step, 2 ranks (CPU, gloo)", md)


if __name__ == "__main__":
    main()

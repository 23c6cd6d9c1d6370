"""Forward and train-step time and state bytes of low-precision tables vs FBGEMM's fused FP32/FP16.

For each configuration and id distribution, in ``--procs`` fresh processes (default 5), each
building every variant and timing them **interleaved** (``--rounds`` rounds of ``--iters``
batches per variant), on the same ids:
- FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen`` with EXACT_ROWWISE_ADAGRAD fused into the
  backward, weights FP32 and FP16 (what a sharded ``torchrec.EmbeddingBagCollection`` runs);
- ``LowPrecisionEmbeddingBagCollection`` at int8 / int4 / int2 (ALPT: learned step sizes,
  stochastic rounding, RowWiseAdagrad), forward on FBGEMM's IntNBit kernel, update in the
  native kernel.
A process reports per variant its median ms; the section reports per variant the median over
processes of the ratio to FBGEMM FP32 (and FP16) and its min-max, the machine (CPU, vector
extensions, cores, page setting, versions, commit, load and steal), and verdict lines
computed from the same run.

    python benchmarks/embedding_step.py                       # full run (~15 min on 2 cores)
    python benchmarks/embedding_step.py --quick               # small sizes, 2 processes (smoke / CI)
    python benchmarks/embedding_step.py --device cuda         # the same on a GPU
    python benchmarks/embedding_step.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchrec
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fresh_process import add_worker_args, rows_label, run_fresh  # noqa: E402
from report import contention, cpu_stat, machine_info, machine_section, write_section  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402
from torchrec_lowprec.kernels.dispatch import backend_for  # noqa: E402


@dataclass(frozen=True)
class Setup:
    tables: int
    rows: int
    dim: int
    batch: int
    ids_per_bag: int

    def label(self) -> str:
        return f"{self.tables} x {rows_label(self.rows)} x {self.dim}, batch {self.batch}, {self.ids_per_bag} ids/bag"


SETUPS = [Setup(8, 1_000_000, 64, 2048, 8), Setup(26, 200_000, 128, 1024, 4)]
QUICK = [Setup(4, 100_000, 64, 512, 8)]
LR = 0.01


def zipf_ids(rows: int, n: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Ids with P(rank k) ~ 1/(k+1)^alpha (alpha=0: uniform), hot rows scattered by a permutation."""
    # Inverse-CDF of the continuous power law on [1, rows+1), then scatter ranks.
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    a = 1.0 - alpha
    if abs(a) < 1e-9:
        k = torch.exp(u * torch.log(torch.tensor(rows + 1.0, dtype=torch.float64))).long() - 1
    else:
        k = ((1 + u * ((rows + 1) ** a - 1)) ** (1 / a)).long() - 1
    perm = torch.randperm(rows, generator=gen)
    return perm[k.clamp(0, rows - 1)]


#: Id distributions: name -> description (for the section).
DISTS = {
    "uniform": "uniform over the rows",
    "zipf1.05": "Zipf, alpha 1.05 (hot rows scattered)",
    "zipf1.2": "Zipf, alpha 1.2",
    "hot": "few hot rows: 15% of lookups on one row, 15% on 9 more, 70% uniform",
}


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} fresh processes: give at least 1")
    return n


def add_cell_args(ap: argparse.ArgumentParser, quick: str, dists: str, procs: int) -> None:
    """The step benchmarks' shared flags: ``--quick`` (``quick``: what it shrinks), ``--dists``
    (default ``dists``), ``--procs`` (default ``procs``; quick 2) and ``--write``."""
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--dists", default=dists, help=f"comma-separated, of {', '.join(DISTS)}")
    ap.add_argument(
        "--procs",
        type=_at_least_one,
        default=None,
        help=f"fresh processes per cell (default {procs}; quick 2)",
    )
    ap.add_argument("--write", metavar="MD", help="replace this benchmark's section of a markdown file")


def parse_dists(ap: argparse.ArgumentParser, spec: str) -> list[str]:
    """``--dists``' names, each checked against :data:`DISTS` before anything runs."""
    out = spec.split(",")
    for d in out:
        if d not in DISTS:
            ap.error(f"unknown --dists entry {d!r}; choose from {', '.join(DISTS)}")
    return out


def draw_ids(rows: int, n: int, dist: str | float, gen: torch.Generator) -> torch.Tensor:
    """``n`` ids of one table under distribution ``dist`` (a :data:`DISTS` name or a Zipf alpha)."""
    if isinstance(dist, float):
        return zipf_ids(rows, n, dist, gen)
    if dist == "uniform":
        return torch.randint(0, rows, (n,), generator=gen)
    if dist.startswith("zipf"):
        return zipf_ids(rows, n, float(dist[4:]), gen)
    if dist == "hot":
        ids = torch.randint(0, rows, (n,), generator=gen)
        hot = torch.randperm(rows, generator=gen)[:10]
        u = torch.rand(n, generator=gen)
        ids = torch.where(u < 0.15, hot[0], ids)
        pick = hot[1:][torch.randint(0, 9, (n,), generator=gen)]
        return torch.where((u >= 0.15) & (u < 0.30), pick, ids)
    raise ValueError(f"unknown id distribution {dist!r}; one of {sorted(DISTS)} or a Zipf alpha")


def make_batches(s: Setup, n: int, dist: str | float, seed: int = 0) -> list[KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        values = torch.cat([draw_ids(s.rows, s.batch * s.ids_per_bag, dist, gen) for _ in range(s.tables)])
        lengths = torch.full((s.tables * s.batch,), s.ids_per_bag, dtype=torch.int64)
        out.append(KeyedJaggedTensor.from_lengths_sync([f"f{t}" for t in range(s.tables)], values, lengths))
    return out


def step_inputs(
    s: Setup, dist: str, seed: int, device: torch.device
) -> tuple[list[KeyedJaggedTensor], torch.Tensor]:
    """A process's 4 batches of ids and the output gradient every variant's step backpropagates."""
    batches = [b.to(device) for b in make_batches(s, 4, dist, seed)]
    gen = torch.Generator().manual_seed(seed + 1)
    return batches, torch.randn(s.batch, s.tables * s.dim, generator=gen).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, batches, warmup: int, iters: int) -> float:
    device = batches[0].values().device
    for i in range(warmup):
        fn(batches[i % len(batches)])
    times = []
    for i in range(iters):
        b = batches[i % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        fn(b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_fbgemm(s: Setup, precision: SparseType, grad: torch.Tensor) -> dict:
    cuda = grad.device.type == "cuda"
    location, compute = (
        (EmbeddingLocation.DEVICE, ComputeDevice.CUDA)
        if cuda
        else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    )
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(s.rows, s.dim, location, compute)] * s.tables,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LR,
        eps=1e-8,
        weights_precision=precision,
        pooling_mode=PoolingMode.SUM,
    )
    weights, momentum = (
        (tbe.weights_dev, tbe.momentum1_dev) if cuda else (tbe.weights_host, tbe.momentum1_host)
    )
    state = sum(t.numel() * t.element_size() for t in (weights, momentum))

    def fwd(kjt):
        with torch.no_grad():
            tbe(kjt.values(), kjt.offsets())

    def step(kjt):
        tbe(kjt.values(), kjt.offsets()).backward(grad)

    return {"fwd": fwd, "step": step, "bytes": state, "tbe": tbe}


def bench_lowprec(s: Setup, bits: int, grad: torch.Tensor) -> dict:
    tables = [
        torchrec.EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=s.dim, num_embeddings=s.rows, feature_names=[f"f{t}"]
        )
        for t in range(s.tables)
    ]
    cfg = lp.LowPrecisionConfig(bits=bits, learning_rate=LR, optimizer="rowwise_adagrad")
    return collection_variant(
        lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg, device=grad.device), grad
    )


def collection_variant(ebc, grad: torch.Tensor) -> dict:
    """An embedding-bag collection as a timed variant: forward without grad, and a train step
    (forward, backward of ``grad``; the update is fused into the backward)."""

    def fwd(kjt):
        with torch.no_grad():
            ebc(kjt)

    def step(kjt):
        ebc(kjt).values().backward(grad)

    return {"fwd": fwd, "step": step, "bytes": ebc.memory_bytes()}


def time_interleaved(
    variants: dict[str, dict], batches, rounds: int, iters: int
) -> dict[str, dict[str, float]]:
    """Per variant, the median over ``rounds`` of its ``fwd`` and ``step`` medians, each round
    timing every variant for ``iters`` batches in turn: interleaving keeps slow drifts of a
    shared machine from favouring whichever variant ran first."""
    samples = {name: {"fwd": [], "step": []} for name in variants}
    for _ in range(rounds):
        for name, v in variants.items():
            for kind in ("fwd", "step"):
                samples[name][kind].append(timed(v[kind], batches, warmup=1, iters=iters))
    return {name: {k: statistics.median(v) for k, v in kinds.items()} for name, kinds in samples.items()}


VARIANTS = ("FBGEMM FP32", "FBGEMM FP16", "lowprec int8 (ALPT)", "lowprec int4 (ALPT)", "lowprec int2 (ALPT)")


def run_one(s: Setup, dist: str, rounds: int, iters: int, device: torch.device, seed: int) -> dict:
    """One process's figures: build every variant, then time them interleaved: ``rounds``
    rounds, each timing every variant for ``iters`` batches; a variant's figure is the median of
    its round medians. Interleaving keeps slow drifts of a shared machine from favouring
    whichever variant ran first."""
    batches, grad = step_inputs(s, dist, seed, device)
    builders = {
        "FBGEMM FP32": lambda: bench_fbgemm(s, SparseType.FP32, grad),
        "FBGEMM FP16": lambda: bench_fbgemm(s, SparseType.FP16, grad),
        "lowprec int8 (ALPT)": lambda: bench_lowprec(s, 8, grad),
        "lowprec int4 (ALPT)": lambda: bench_lowprec(s, 4, grad),
        "lowprec int2 (ALPT)": lambda: bench_lowprec(s, 2, grad),
    }
    variants, peaks = {}, {}
    for name in VARIANTS:  # on CUDA: each variant's peak memory (its tables, state, one step)
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        variants[name] = builders[name]()
        if device.type == "cuda":
            variants[name]["step"](batches[0])
            _sync(device)
            peaks[name] = torch.cuda.max_memory_allocated(device) - before
    ms = time_interleaved(variants, batches, rounds, iters)
    out = {name: {**ms[name], "bytes": v["bytes"], "peak": peaks.get(name)} for name, v in variants.items()}
    del variants
    gc.collect()
    return out


def spawn_runs(s: Setup, dist: str, args, device: str) -> list[dict]:
    """``args.procs`` fresh processes, one after the other, each running :func:`run_one`."""

    def steps(r: dict) -> str:
        return "step ms " + ", ".join(
            f"{n.split()[-2] if 'lowprec' in n else n.split()[-1]} {v['step']:.1f}" for n, v in r.items()
        )

    env = {"THP_MEM_ALLOC_ENABLE": "1"} if args.huge_pages else None
    return run_fresh(__file__, s, dist, args, extra=("--device", device), env=env, describe=steps)


def summarize(runs: list[dict], names: Sequence[str] = VARIANTS) -> dict:
    """Per variant: median ms, and per ratio (to FP32 / FP16; fwd speed-up, step throughput)
    the median over processes and its min and max."""
    out = {}
    for name in names:
        row = {"fwd": statistics.median(r[name]["fwd"] for r in runs),
               "step": statistics.median(r[name]["step"] for r in runs), "bytes": runs[0][name]["bytes"],
               "peak": max((r[name].get("peak") or 0 for r in runs), default=0) or None}  # fmt: skip
        for base, tag in (("FBGEMM FP32", "32"), ("FBGEMM FP16", "16")):
            for kind in ("fwd", "step"):
                ratios = [r[base][kind] / r[name][kind] for r in runs]
                row[f"{kind}{tag}"] = (statistics.median(ratios), min(ratios), max(ratios))
        out[name] = row
    return out


def fmt_ratio(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f})"


def verdicts(results: list[tuple[Setup, str, dict]]) -> list[str]:
    """The issue's targets, checked against this run's figures."""
    low = [n for n in VARIANTS if n.startswith("lowprec")]
    cells = [(s, d, n, r[n]) for s, d, r in results for n in low]
    worst_step = min(cells, key=lambda c: c[3]["step32"][0])
    worst_min = min(cells, key=lambda c: c[3]["step32"][1])
    int8 = [c for c in cells if "int8" in c[2]]
    worst_fwd = min(int8, key=lambda c: c[3]["fwd32"][0])
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    where = lambda c: f"{c[2].split()[1]}, {c[0].label()}, {c[1]} ids"  # noqa: E731
    return [
        "Verdicts (computed from the figures above):",
        "",
        f"- int8/int4/int2 train step >= 1.0x FP32 (median over processes) in every cell: "
        f"{met(worst_step[3]['step32'][0] >= 1.0)}; lowest median {worst_step[3]['step32'][0]:.2f}x "
        f"({where(worst_step)}); {sum(c[3]['step32'][0] >= 1.0 for c in cells)} of {len(cells)} cells >= 1.0x.",
        f"- minimum over processes >= 0.9x in every cell: {met(worst_min[3]['step32'][1] >= 0.9)}; "
        f"lowest {worst_min[3]['step32'][1]:.2f}x ({where(worst_min)}).",
        f"- int8 forward >= 1.5x FP32 in every cell: {met(worst_fwd[3]['fwd32'][0] >= 1.5)}; lowest median "
        f"{worst_fwd[3]['fwd32'][0]:.2f}x ({where(worst_fwd)}); "
        f"{sum(c[3]['fwd32'][0] >= 1.5 for c in int8)} of {len(int8)} cells >= 1.5x.",
    ]


def to_markdown(results, command: str, args, device: str, stat0, elapsed: float) -> str:
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    lines = [
        f"Command: `{command}` ({elapsed / 60:.1f} min)  ",
        *machine_info(args.threads),
        f"Contention: {contention(stat0, cpu_stat())}.  ",
        f"Device: {device} ({where}); update backend `{backend_for(torch.device(device))}`; optimizer "
        f"RowWiseAdagrad, lr {LR}. {args.procs} fresh processes per cell, each building every variant and "
        f"timing them interleaved ({args.rounds} rounds x {args.iters} batches); ms = median over processes "
        "of each process's median. Ratios are per process, to FBGEMM FP32 (or FP16) in the same process: "
        "forward speed-up (base ms / ms) and train-step throughput (base ms / ms); shown as the median "
        "over processes (min-max). State = weights + optimizer state + fp32 master step sizes.",
        "",
    ]
    for s, dist, rows in results:
        base = rows["FBGEMM FP32"]
        gpu = device == "cuda"  # peak GPU memory per variant (max_memory_allocated over a step)
        lines += [
            f"**{s.label()}; ids: {DISTS[dist]}**",
            "",
            "| tables | fwd ms | fwd vs FP32 | step ms | step vs FP32 | step vs FP16 | state MB | state ratio |"
            + (" peak GPU MB | peak ratio |" if gpu else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else ""),
        ]
        for name, r in rows.items():
            peak = (
                f" {r['peak'] / 2**20:.0f} | {r['peak'] / base['peak']:.3f} |"
                if gpu and r.get("peak") and base.get("peak")
                else ""
            )
            lines.append(
                f"| {name} | {r['fwd']:.2f} | {fmt_ratio(r['fwd32'])} | {r['step']:.2f} | {fmt_ratio(r['step32'])} | "
                f"{fmt_ratio(r['step16'])} | {r['bytes'] / 2**20:.0f} | {r['bytes'] / base['bytes']:.3f} |"
                + peak
            )
        lines.append("")
    lines += verdicts(results)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, "small sizes, 2 processes, uniform+hot ids (smoke run)", ",".join(DISTS), 5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--huge-pages", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 for every variant")
    add_worker_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        r = run_one(Setup(**json.loads(args.worker)), args.dist, args.rounds, args.iters,
                    torch.device(args.device), args.seed)  # fmt: skip
        print(json.dumps(r))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no GPU is visible to torch")
    args.procs = args.procs or (2 if args.quick else 5)
    setups = QUICK if args.quick else SETUPS
    dists = (
        parse_dists(ap, args.dists)
        if not (args.quick and args.dists == ",".join(DISTS))
        else ["uniform", "hot"]
    )
    cmd = "python benchmarks/embedding_step.py " + " ".join(a for a in sys.argv[1:] if not a.endswith(".md"))
    cmd = cmd.replace(" --write", "").strip()
    stat0, t0 = cpu_stat(), time.perf_counter()
    results = [(s, d, summarize(spawn_runs(s, d, args, args.device))) for s in setups for d in dists]
    md = to_markdown(results, cmd, args, args.device, stat0, time.perf_counter() - t0)
    print(md)
    if args.write:
        key, title = machine_section(
            "embedding_step", "Embedding train step vs FBGEMM", args.device, args.quick
        )
        write_section(args.write, key, title, md)


if __name__ == "__main__":
    main()

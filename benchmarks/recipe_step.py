"""What the low-bit recipes cost per train step: the hot-rows plans against uniform tables and FBGEMM.

The recipes of docs/precision.md ("Recipes at int4's / int2's bytes") are precision plans, so
they train through ``MixedPrecisionEmbeddingBagCollection``: every table becomes one physical
table per width group, and every step routes each id to its group. This script measures that
cost on ``benchmarks/embedding_step.py``'s setups and protocol (``--procs`` fresh processes per
cell, every variant built in each and timed interleaved on the same ids; ratios are per
process, to FBGEMM FP32 in the same process, median and min-max over processes):

- FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen`` FP32 / FP16 with fused EXACT_ROWWISE_ADAGRAD;
- ``LowPrecisionEmbeddingBagCollection`` int4 / int2 (the defaults: ALPT, stochastic rounding);
- the int4 recipe (fixed step, each table's hottest 60% of rows at 8 bits) and the int2 recipe
  (fixed step, dithered rounding, hottest 20% at 8 bits and the next 50% at 4), as the DLRM
  example's ``--hot-rows`` builds them for raw ids: rows ranked by the ids' counts, a raw id ->
  rank map per table (in the state bytes).

Ids are Zipf with the hot rows scattered (``--dists``, default zipf1.05), so the id maps and the
routing do real work.

    python benchmarks/recipe_step.py --write docs/benchmarks.md       # ~6 min on 2 cores
    python benchmarks/recipe_step.py --quick                          # small sizes, 2 processes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time

import torch
import torchrec
from fbgemm_gpu.split_embedding_configs import SparseType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedding_step import (  # noqa: E402
    DISTS,
    LR,
    QUICK,
    SETUPS,
    Setup,
    add_cell_args,
    bench_fbgemm,
    bench_lowprec,
    collection_variant,
    fmt_ratio,
    parse_dists,
    step_inputs,
    summarize,
    time_interleaved,
)
from fresh_process import add_worker_args, run_fresh  # noqa: E402
from report import contention, cpu_stat, machine_info, machine_section, write_section  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402
from torchrec_lowprec.planner.schema import PrecisionPlan  # noqa: E402
from torchrec_lowprec.quant.groups import frequency_rank  # noqa: E402

#: name -> (table width, hot groups [(share, bits)], config knobs): docs/precision.md's recipes
RECIPES = {
    "int4 recipe (fixed step, hot 60% at 8b)": (4, [(0.6, 8)], {"learn_step_size": False}),
    "int2 recipe (fixed step, dithered, hot 20% at 8b + 50% at 4b)": (
        2,
        [(0.2, 8), (0.5, 4)],
        {"learn_step_size": False, "rounding": "dithered"},
    ),
}


def uniform_of(recipe: str) -> str:
    """The uniform table (ALPT) of a recipe's width: what the recipe is set beside."""
    return f"lowprec int{RECIPES[recipe][0]} (ALPT)"


#: each uniform width followed by its recipe
VARIANTS = ("FBGEMM FP32", "FBGEMM FP16", *(v for r in RECIPES for v in (uniform_of(r), r)))


def bench_recipe(s: Setup, name: str, batches, grad: torch.Tensor) -> dict:
    """A recipe's collection for raw ids: each table's rows ranked by the batches' counts."""
    bits, hot, knobs = RECIPES[name]
    tables = [
        torchrec.EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=s.dim, num_embeddings=s.rows, feature_names=[f"f{t}"]
        )
        for t in range(s.tables)
    ]
    plan = PrecisionPlan.hot_rows({t.name: (s.rows, s.dim) for t in tables}, bits, hot)
    plan = PrecisionPlan({n: dataclasses.replace(tp, remapped=True) for n, tp in plan.tables.items()})
    counts = {t.name: torch.zeros(s.rows, dtype=torch.int64) for t in tables}
    for kjt in batches:
        for t, f in zip(tables, kjt.to_dict().values()):
            counts[t.name] += torch.bincount(f.values().cpu(), minlength=s.rows)
    cfg = lp.LowPrecisionConfig(bits=bits, learning_rate=LR, optimizer="rowwise_adagrad", **knobs)
    ebc = lp.MixedPrecisionEmbeddingBagCollection(
        tables, plan=plan, config=cfg, device=grad.device,
        row_maps={n: frequency_rank(c).to(grad.device) for n, c in counts.items()},
    )  # fmt: skip
    return collection_variant(ebc, grad)


def run_one(s: Setup, dist: str, rounds: int, iters: int, device: torch.device, seed: int) -> dict:
    """One process: build every variant, then time them interleaved (see embedding_step.run_one)."""
    batches, grad = step_inputs(s, dist, seed, device)
    builders = {
        "FBGEMM FP32": lambda: bench_fbgemm(s, SparseType.FP32, grad),
        "FBGEMM FP16": lambda: bench_fbgemm(s, SparseType.FP16, grad),
        **{uniform_of(n): (lambda n=n: bench_lowprec(s, RECIPES[n][0], grad)) for n in RECIPES},
        **{n: (lambda n=n: bench_recipe(s, n, batches, grad)) for n in RECIPES},
    }
    variants = {name: builders[name]() for name in VARIANTS}
    ms = time_interleaved(variants, batches, rounds, iters)
    out = {name: {**ms[name], "bytes": v["bytes"]} for name, v in variants.items()}
    del variants
    gc.collect()
    return out


def to_markdown(results, runs_of, command: str, args, stat0, elapsed: float) -> str:
    lines = [
        f"Command: `{command}` ({elapsed / 60:.1f} min)  ",
        *machine_info(args.threads),
        f"Contention: {contention(stat0, cpu_stat())}.  ",
        f"RowWiseAdagrad, lr {LR}. {args.procs} fresh processes per cell, each building every variant and timing "
        f"them interleaved ({args.rounds} rounds x {args.iters} batches); ms = median over processes. Ratios are "
        "per process, median (min-max) over processes: train-step throughput against FBGEMM FP32 and against "
        "the uniform table of the recipe's width (ALPT), in the same process. State = weights + optimizer "
        "state + master step sizes + the recipes' raw id -> rank maps.",
        "",
    ]
    worst = []
    for s, dist, rows in results:
        lines += [
            f"**{s.label()}; ids: {DISTS[dist]}**",
            "",
            "| tables | fwd ms | fwd vs FP32 | step ms | step vs FP32 | step vs its width's uniform | state MB |"
            " state vs FP32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            vs_uniform = ""
            if name in RECIPES:
                ratios = [p[uniform_of(name)]["step"] / p[name]["step"] for p in runs_of[(s, dist)]]
                t = (statistics.median(ratios), min(ratios), max(ratios))
                vs_uniform = fmt_ratio(t)
                worst.append((r["step32"][0], t[0], name, s.label()))
            lines.append(
                f"| {name} | {r['fwd']:.2f} | {fmt_ratio(r['fwd32'])} | {r['step']:.2f} | {fmt_ratio(r['step32'])} | "
                f"{vs_uniform} | {r['bytes'] / 2**20:.0f} | {r['bytes'] / rows['FBGEMM FP32']['bytes']:.3f} |"
            )
        lines.append("")
    low = min(worst)
    lines += [
        "Verdict (computed from the figures above):",
        "",
        f"- recipes' train step >= 1.0x FBGEMM FP32 (median over processes) in every cell: "
        f"**{'met' if low[0] >= 1.0 else 'not met'}**; lowest {low[0]:.2f}x ({low[2]}, {low[3]}); against the "
        f"uniform table of the same width the recipes run at {min(w[1] for w in worst):.2f}x-"
        f"{max(w[1] for w in worst):.2f}x of its step throughput (medians).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, "small sizes, 2 processes (smoke run)", "zipf1.05", 3)
    add_worker_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        r = run_one(Setup(**json.loads(args.worker)), args.dist, args.rounds, args.iters, torch.device("cpu"),
                    args.seed)  # fmt: skip
        print(json.dumps(r))
        return
    dists = parse_dists(ap, args.dists)
    if args.write and not os.path.isfile(args.write):
        raise SystemExit(f"error: --write {args.write}: no such file (the section is replaced inside it)")
    args.procs = args.procs or (2 if args.quick else 3)
    cmd = "python benchmarks/recipe_step.py " + " ".join(a for a in sys.argv[1:] if not a.endswith(".md"))
    cmd = cmd.replace(" --write", "").strip()
    stat0, t0 = cpu_stat(), time.perf_counter()
    runs_of, results = {}, []
    for s in QUICK if args.quick else SETUPS:
        for d in dists:
            runs_of[(s, d)] = run_fresh(__file__, s, d, args)
            results.append((s, d, summarize(runs_of[(s, d)], VARIANTS)))
    md = to_markdown(results, runs_of, cmd, args, stat0, time.perf_counter() - t0)
    print(md)
    if args.write:
        key, title = machine_section("recipe_step", "Low-bit recipes: train step cost", "cpu", args.quick)
        write_section(args.write, key, title, md)


if __name__ == "__main__":
    main()

"""Where a low-precision train step spends its time, next to FBGEMM FP32's forward and backward.

For each configuration and id distribution, in one process per cell (``--procs`` of them),
interleaved rounds of: FBGEMM FP32 forward, FBGEMM FP32 backward (fused RowWiseAdagrad), and
our int8 / int4 step, the step split into phases by timing the library's own functions while
it runs (thin wrappers installed by this script only):

- KJT handling: ``modules.bounds.in_feature_order`` (reorder / regroup the KJT);
- bounds check: ``modules.bounds.check_ids``;
- lookup: the pooled forward kernel (native on CPU, FBGEMM IntNBit elsewhere; (``kernels.lookup.FusedPooledLookup.__call__``);
- gradient gathering: the backward's Python before the kernel (occurrence -> gradient offsets,
  per-table slices, update specs);
- update kernel: ``kernels.dispatch.fused_update_many`` (grouping + the fused row update);
- Python / autograd overhead: the rest of forward + backward.

Also the physical floor for random rows on this machine: gathering the touched rows
(``index_select``) of an int8 table vs an fp32 table of the same shape.

    python benchmarks/profile_step.py [--quick] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from fbgemm_gpu.split_embedding_configs import SparseType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedding_step import QUICK, SETUPS, Setup, bench_fbgemm, bench_lowprec, make_batches  # noqa: E402
from fresh_process import add_worker_args, run_fresh  # noqa: E402
from report import contention, cpu_stat, machine_info, write_section  # noqa: E402

import torchrec_lowprec.modules.collection_base as base_mod  # noqa: E402
import torchrec_lowprec.modules.embedding_bag as eb_mod  # noqa: E402
from torchrec_lowprec.kernels import lookup as lookup_mod  # noqa: E402

PHASES = (
    "KJT handling",
    "bounds check",
    "lookup",
    "gradient gathering",
    "update kernel",
    "Python/autograd",
)
_acc: dict[str, float] = defaultdict(float)


def _wrap(owner, name: str, phase: str) -> None:
    fn = getattr(owner, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _acc[phase] += time.perf_counter() - t0

    setattr(owner, name, timed)


def install() -> None:
    _wrap(eb_mod, "ordered_with_totals", "KJT handling")
    _wrap(eb_mod, "check_ids", "bounds check")
    _wrap(lookup_mod.FusedPooledLookup, "__call__", "lookup")
    _wrap(base_mod, "fused_update_many", "update kernel")
    _wrap(eb_mod.LowPrecisionEmbeddingBagCollection, "_fused_backward", "backward total")


def profile_step(step, batches, iters: int) -> dict[str, float]:
    """Median ms per phase over ``iters`` steps."""
    per = defaultdict(list)
    for i in range(iters):
        _acc.clear()
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        total = (time.perf_counter() - t0) * 1e3
        ph = {k: v * 1e3 for k, v in _acc.items()}
        ph["gradient gathering"] = ph.pop("backward total", 0.0) - ph.get("update kernel", 0.0)
        ph["Python/autograd"] = total - sum(ph.get(p, 0.0) for p in PHASES[:-1])
        ph["total"] = total
        for k, v in ph.items():
            per[k].append(v)
    return {k: statistics.median(v) for k, v in per.items()}


def gather_floor(s: Setup, batches, iters: int) -> dict[str, float]:
    """ms to gather every table's touched rows, int8 rows (D+4 bytes) vs fp32 rows (4D bytes)."""
    ids = [b.values() for b in batches]
    out = {}
    for tag, width, dtype in (("int8 rows", s.dim + 4, torch.uint8), ("fp32 rows", s.dim, torch.float32)):
        # filled (not zeros: untouched zero pages all map to one shared page and read as fast as cache)
        tables = [torch.ones(s.rows, width, dtype=dtype) for _ in range(min(s.tables, 4))]
        times = []
        for i in range(iters):
            v = ids[i % len(ids)].view(s.tables, -1)
            t0 = time.perf_counter()
            for t in range(s.tables):
                tables[t % len(tables)].index_select(0, v[t])
            times.append((time.perf_counter() - t0) * 1e3)
        out[tag] = statistics.median(times)
        del tables
    return out


def run_cell(s: Setup, dist: str, rounds: int, iters: int, seed: int) -> dict:
    install()
    batches = make_batches(s, 4, dist, seed)
    grad = torch.randn(s.batch, s.tables * s.dim, generator=torch.Generator().manual_seed(seed + 1))
    fp32 = bench_fbgemm(s, SparseType.FP32, grad)
    tbe = fp32["tbe"]
    low = {bits: bench_lowprec(s, bits, grad) for bits in (8, 4)}
    res: dict = {"fp32 fwd": [], "fp32 bwd": [], 8: [], 4: []}
    for b in batches[:2]:  # warm-up
        fp32["step"](b)
        for v in low.values():
            v["step"](b)
    for _ in range(rounds):
        f, bw = [], []
        for i in range(iters):
            kjt = batches[i % len(batches)]
            t0 = time.perf_counter()
            out = tbe(kjt.values(), kjt.offsets())
            t1 = time.perf_counter()
            out.backward(grad)
            t2 = time.perf_counter()
            f.append((t1 - t0) * 1e3)
            bw.append((t2 - t1) * 1e3)
        res["fp32 fwd"].append(statistics.median(f))
        res["fp32 bwd"].append(statistics.median(bw))
        for bits, v in low.items():
            res[bits].append(profile_step(v["step"], batches, iters))
    floor = gather_floor(s, batches, iters)
    out = {"fp32 fwd": statistics.median(res["fp32 fwd"]), "fp32 bwd": statistics.median(res["fp32 bwd"])}
    for bits in (8, 4):
        out[f"int{bits}"] = {k: statistics.median(r[k] for r in res[bits]) for k in res[bits][0]}
    out["floor"] = floor
    return out


def to_markdown(cells, cmd: str, args, stat0, elapsed: float) -> str:
    lines = [
        f"Command: `{cmd}` ({elapsed / 60:.1f} min)  ",
        *machine_info(args.threads),
        f"Contention: {contention(stat0, cpu_stat())}.  ",
        f"ms per batch, median over {args.procs} process(es) x {args.rounds} interleaved rounds x {args.iters} "
        "batches. FBGEMM FP32 = the fused training TBE (forward; backward with RowWiseAdagrad fused in). "
        "Our step = forward + backward of `LowPrecisionEmbeddingBagCollection` (ALPT, RowWiseAdagrad), split "
        "by phase (see `benchmarks/profile_step.py`). Gather floor = `index_select` of every table's looked-up "
        "rows (one read of the touched rows, what a forward cannot go below).",
        "",
        "| config | ids | FP32 fwd | FP32 bwd | FP32 step | variant | "
        + " | ".join(PHASES)
        + " | our step | gather int8 / fp32 |",
        "|---|---|---:|---:|---:|---|" + "---:|" * (len(PHASES) + 2),
    ]
    for s, dist, c in cells:
        for bits in (8, 4):
            p = c[f"int{bits}"]
            lines.append(
                f"| {s.label()} | {dist} | {c['fp32 fwd']:.2f} | {c['fp32 bwd']:.2f} | "
                f"{c['fp32 fwd'] + c['fp32 bwd']:.2f} | int{bits} | "
                + " | ".join(f"{p.get(ph, 0.0):.2f}" for ph in PHASES)
                + f" | {p['total']:.2f} | {c['floor']['int8 rows']:.2f} / {c['floor']['fp32 rows']:.2f} |"
            )
    return "\n".join(lines)


def _median_cells(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in ("fp32 fwd", "fp32 bwd")}
    for key in ("int8", "int4", "floor"):
        out[key] = {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one process (smoke run)")
    ap.add_argument("--dists", default="uniform,zipf1.05")
    ap.add_argument("--procs", type=int, default=None, help="fresh processes per cell (default 3; quick 1)")
    ap.add_argument("--write", metavar="MD")
    add_worker_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        r = run_cell(Setup(**json.loads(args.worker)), args.dist, args.rounds, args.iters, args.seed)
        print(json.dumps(r))
        return
    args.procs = args.procs or (1 if args.quick else 3)
    stat0, t0 = cpu_stat(), time.perf_counter()
    cells = []
    for s in QUICK if args.quick else SETUPS:
        for dist in args.dists.split(","):
            runs = run_fresh(__file__, s, dist, args)
            cells.append((s, dist, _median_cells(runs)))
    cmd = "python benchmarks/profile_step.py " + " ".join(a for a in sys.argv[1:] if not a.endswith(".md"))
    md = to_markdown(cells, cmd.replace(" --write", "").strip(), args, stat0, time.perf_counter() - t0)
    print(md)
    if args.write:
        write_section(args.write, "profile_step", "Train-step profile by phase (CPU)", md)


if __name__ == "__main__":
    main()

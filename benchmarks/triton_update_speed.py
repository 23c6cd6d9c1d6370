"""Speed and peak memory of the Triton fused update against a plain PyTorch update, torch + Triton only.

Per size, width (int8, int4) and variant, one step = every table updated once from one batch of
Zipf-distributed ids (each id of a bag receives its bag's pooled gradient), row-wise Adagrad,
stochastic rounding:

- ``torch``: the straightforward PyTorch update: ``unique`` the ids, ``index_add_`` the
  occurrence gradients per row, gather the touched rows, dequantize (fp16 scale x signed code),
  row-wise Adagrad step, quantize back with stochastic rounding (``torch.rand``), pack, scatter;
- ``triton``: :func:`torchrec_lowprec.kernels.triton_update.fused_update`, the same math (fixed
  step sizes), exact sequential row sums (the library's default);
- ``triton-tree``: the same with ``exact_row_sums=False`` (tree reductions);
- ``triton-alpt``: the library's default configuration (ALPT: learned and grown step sizes).

Reported per variant: median ms per step over ``--iters`` steps after warm-up (wall time with
the device synchronised: the update syncs with the host anyway), the speed-up of the torch
baseline's time over the variant's, ``torch.cuda.max_memory_allocated`` during one step
(absolute, and its excess over what was allocated before the step: the update's transient
memory, also per occurrence). A check runs first: one step of ``torch`` and ``triton`` from the
same state gives the same row-wise Adagrad state (to summation order) and codes within the
stochastic-rounding spread (|diff| <= 2, mean below 0.6: independent draws give at most 1/2), untouched rows
unchanged; the script exits 1 if it fails.

On CPU (no CUDA) it runs the same code in Triton's interpreter (``TRITON_INTERPRET=1``, set
here) on the ``tiny`` size: a smoke test of the code path (interpreter times say nothing about
the GPU, and peak memory is CUDA-only: reported as null).

    python benchmarks/triton_update_speed.py                     # CUDA: sizes criteo and pooled
    python benchmarks/triton_update_speed.py --json o.json --md o.md
    python benchmarks/triton_update_speed.py --sizes tiny        # CPU (interpreter) smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (lazily, below)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchrec_lowprec.kernels import triton_update  # noqa: E402
from torchrec_lowprec.kernels.spec import OptimizerParams, TableUpdate, UpdateSpec  # noqa: E402
from torchrec_lowprec.quant.layout import code_range, pack_codes, quantize_rows, row_bytes, split_row  # noqa: E402
from torchrec_lowprec.quant.lsq import init_step_size  # noqa: E402
from torchrec_lowprec.types import OptimizerType  # noqa: E402

LR, EPS = 0.01, 1e-8
VARIANTS = ("torch", "triton", "triton-tree", "triton-alpt")


@dataclass(frozen=True)
class Size:
    """A benchmark shape: ``tables`` tables of ``rows`` x ``dim``; a batch of ``batch`` bags of
    ``ids_per_bag`` Zipf(``alpha``) ids per table."""

    name: str
    tables: int
    rows: int
    dim: int
    batch: int
    ids_per_bag: int
    alpha: float = 1.05


SIZES = {
    "criteo": Size("criteo", tables=26, rows=100_000, dim=128, batch=4096, ids_per_bag=1),
    "pooled": Size("pooled", tables=8, rows=1_000_000, dim=64, batch=4096, ids_per_bag=8),
    "tiny": Size("tiny", tables=1, rows=128, dim=16, batch=8, ids_per_bag=2),
}


@dataclass
class Table:
    """One table's storage: fused rows, fp32 master steps, row-wise Adagrad state."""

    rows: torch.Tensor
    step: torch.Tensor
    state: torch.Tensor

    def clone(self) -> Table:
        return Table(self.rows.clone(), self.step.clone(), self.state.clone())


def make_tables(size: Size, bits: int, device: torch.device, seed: int = 0) -> list[Table]:
    """Quantized random tables (LSQ-initialised steps) with a small Adagrad state."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(size.tables):
        x = torch.randn(size.rows, size.dim, generator=g, device=device) * 0.05
        step = init_step_size(x, bits, "lsq")
        state = torch.rand(size.rows, generator=g, device=device) * 1e-3 + 1e-4
        out.append(Table(quantize_rows(x, step, bits), step, state))
        del x
    return out


def zipf_ids(n: int, rows: int, alpha: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` ids of a Zipf(``alpha``) law over ``rows`` ranks, ranks scattered over the rows."""
    cdf = torch.cumsum(torch.arange(1, rows + 1, device=device, dtype=torch.float64) ** -alpha, 0)
    u = torch.rand(n, generator=g, device=device, dtype=torch.float64) * cdf[-1]
    ranks = torch.searchsorted(cdf, u).clamp_(max=rows - 1)
    return torch.randperm(rows, generator=g, device=device)[ranks]


def make_batch(size: Size, device: torch.device, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Per table ``(ids, grad_offsets, grad)``: each id of bag ``b`` reads the bag's gradient row."""
    g = torch.Generator(device=device).manual_seed(seed)
    bag = torch.arange(size.batch, device=device).repeat_interleave(size.ids_per_bag)
    out = []
    for _ in range(size.tables):
        ids = zipf_ids(bag.numel(), size.rows, size.alpha, g, device)
        grad = torch.randn(size.batch, size.dim, generator=g, device=device) * 1e-2
        out.append((ids, bag * size.dim, grad))
    return out


def torch_update(
    t: Table, ids: torch.Tensor, goff: torch.Tensor, grad: torch.Tensor, bits: int, dim: int
) -> None:
    """The straightforward PyTorch update of one table (fixed step sizes), in place."""
    qmin, qmax = code_range(bits)
    half = 1 << (bits - 1)
    uniq, inv = torch.unique(ids, return_inverse=True)
    g = torch.zeros(uniq.numel(), dim, device=grad.device).index_add_(0, inv, grad.view(-1, dim)[goff // dim])
    r = t.rows[uniq]
    scale, q = split_row(r, bits, dim)
    x = scale[:, None] * q.to(torch.float32)
    h = t.state[uniq] + (g * g).mean(dim=1)
    t.state[uniq] = h
    x = x - (LR / (h.sqrt() + EPS))[:, None] * g
    code = torch.floor(x / scale[:, None] + torch.rand_like(x)).clamp_(qmin, qmax)
    r[:, 4 : row_bytes(bits, dim)] = pack_codes(code.to(torch.int32) + half, bits)
    t.rows[uniq] = r


def triton_step(
    tables: list[Table], batch: list, bits: int, dim: int, step: int, variant: str
) -> Callable[[], None]:
    """One step of a Triton variant over every table."""
    alpt = variant == "triton-alpt"
    opt = OptimizerParams(OptimizerType.ROWWISE_ADAGRAD, lr=LR, eps=EPS)

    def run() -> None:
        for i, (t, (ids, goff, grad)) in enumerate(zip(tables, batch)):
            spec = UpdateSpec(bits, dim, opt, step, True, alpt, 1e-2, key=1000 * step + i, grow_step=alpt)
            update = TableUpdate(t.rows, t.step, t.state, torch.empty(0, device=grad.device), ids, goff,
                                 torch.empty(0, device=grad.device), spec)  # fmt: skip
            triton_update.fused_update(update, grad, exact_row_sums=variant != "triton-tree")

    return run


def step_fn(variant: str, tables: list[Table], batch: list, bits: int, dim: int) -> Callable[[], None]:
    """A callable running one step of ``variant``."""
    if variant == "torch":

        def run() -> None:
            for t, b in zip(tables, batch):
                torch_update(t, *b, bits, dim)

        return run
    return triton_step(tables, batch, bits, dim, 1, variant)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_agreement(size: Size, bits: int, device: torch.device) -> dict:
    """One step of ``torch`` and ``triton`` from one state: max/mean code difference, the
    largest relative Adagrad-state difference, untouched rows and scale heads unchanged."""
    base = make_tables(size, bits, device)
    batch = make_batch(size, device)
    a, b = [t.clone() for t in base], [t.clone() for t in base]
    step_fn("torch", a, batch, bits, size.dim)()
    step_fn("triton", b, batch, bits, size.dim)()
    sync(device)
    diffs, rel, untouched, heads = [], 0.0, True, True
    for t0, ta, tb, (ids, _, _) in zip(base, a, b, batch):
        qa, qb = split_row(ta.rows, bits, size.dim)[1], split_row(tb.rows, bits, size.dim)[1]
        touched = torch.zeros(size.rows, dtype=torch.bool, device=device)
        touched[ids] = True
        diffs.append((qa[touched] - qb[touched]).abs().flatten())
        rel = max(rel, float(((ta.state - tb.state).abs() / tb.state).max()))
        untouched &= bool(torch.equal(ta.rows[~touched], t0.rows[~touched]))
        untouched &= bool(torch.equal(tb.rows[~touched], t0.rows[~touched]))
        heads &= bool(
            torch.equal(ta.rows[:, :4], t0.rows[:, :4]) and torch.equal(tb.rows[:, :4], t0.rows[:, :4])
        )
    d = torch.cat(diffs).float()
    out = {"max_code_diff": int(d.max()), "mean_code_diff": round(float(d.mean()), 4),
           "state_rel_diff": rel, "untouched_rows_equal": untouched, "heads_equal": heads}  # fmt: skip
    out["ok"] = bool(
        out["max_code_diff"] <= 2 and out["mean_code_diff"] < 0.6 and rel <= 1e-4 and untouched and heads
    )
    return out


def measure(size: Size, bits: int, variant: str, device: torch.device, iters: int, warmup: int) -> dict:
    """Median ms per step and peak memory of one variant (fresh tables, the same batch)."""
    tables = make_tables(size, bits, device)
    batch = make_batch(size, device)
    run = step_fn(variant, tables, batch, bits, size.dim)
    for _ in range(warmup):
        run()
    sync(device)
    peak = extra = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        sync(device)
        peak = torch.cuda.max_memory_allocated()
        extra = peak - before
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    n_occ = size.tables * size.batch * size.ids_per_bag
    return {
        "size": size.name, "bits": bits, "variant": variant, "ms": round(statistics.median(times), 3),
        "ms_min": round(min(times), 3), "peak_bytes": peak, "extra_bytes": extra,
        "extra_bytes_per_occurrence": None if extra is None else round(extra / n_occ, 1),
        "occurrences": n_occ,
    }  # fmt: skip


def markdown(doc: dict) -> str:
    """The results as a markdown section."""
    lines = [
        f"Triton fused update vs a plain PyTorch update on {doc['device']} (torch {doc['torch']}, "
        f"triton {doc['triton']}); row-wise Adagrad, stochastic rounding, Zipf ids; median of "
        f"{doc['iters']} steps. Speed-up = torch ms / variant ms. Peak = `torch.cuda.max_memory_allocated` "
        "in one step; extra = peak minus what was allocated before the step.",
        "",
        "| size | bits | variant | ms/step | speed-up vs torch | peak MiB | extra MiB | extra B/occurrence |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    for r in doc["results"]:
        lines.append(
            f"| {r['size']} | {r['bits']} | {r['variant']} | {r['ms']:.2f} | {r['speedup']:.3g}x | "
            f"{mib(r['peak_bytes'])} | {mib(r['extra_bytes'])} | {r['extra_bytes_per_occurrence'] or 'n/a'} |"
        )
    lines += ["", "Check (one step, torch vs triton, same state): " + "; ".join(
        f"{k}: {v}" for k, v in doc["checks"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument(
        "--sizes", default="criteo,pooled" if cuda else "tiny", help=f"comma list of {list(SIZES)}"
    )
    p.add_argument("--bits", default="8,4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=10 if cuda else 1)
    p.add_argument("--warmup", type=int, default=2 if cuda else 0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--md", help="write the markdown section here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    import triton

    doc = {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__, "iters": args.iters,
        "results": [], "checks": {},
    }  # fmt: skip
    ok = True
    for name in args.sizes.split(","):
        size = SIZES[name]
        for bits in (int(b) for b in args.bits.split(",")):
            check = check_agreement(size, bits, device)
            doc["checks"][f"{name}/int{bits}"] = check
            ok &= check["ok"]
            rows = [measure(size, bits, v, device, args.iters, args.warmup) for v in args.variants.split(",")]
            base = next((r["ms"] for r in rows if r["variant"] == "torch"), None)
            for r in rows:
                r["speedup"] = round(base / r["ms"], 3) if base else float("nan")
                print(json.dumps(r), flush=True)
            doc["results"] += rows
            if cuda:
                torch.cuda.empty_cache()
    doc["ok"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1), encoding="utf-8")
    if args.md:
        Path(args.md).write_text(markdown(doc), encoding="utf-8")
    print(markdown(doc), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

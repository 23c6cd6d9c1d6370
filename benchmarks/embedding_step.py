"""Forward and train-step time and state bytes of low-precision tables vs FBGEMM's fused FP32/FP16.

In one process, on the same Zipf-distributed ids, for each configuration:
- FBGEMM ``SplitTableBatchedEmbeddingBagsCodegen`` with EXACT_ROWWISE_ADAGRAD fused into the
  backward, weights FP32 and FP16 (what a sharded ``torchrec.EmbeddingBagCollection`` runs);
- ``LowPrecisionEmbeddingBagCollection`` at int8 / int4 / int2 (ALPT: learned step sizes,
  stochastic rounding, RowWiseAdagrad), forward on FBGEMM's IntNBit kernel, update in the
  native kernel.
Reports milliseconds per batch (median) and state bytes, each also as a ratio to FP32.

    python benchmarks/embedding_step.py                       # both configurations
    python benchmarks/embedding_step.py --quick               # small sizes, a smoke run
    python benchmarks/embedding_step.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

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
        rows = f"{self.rows // 1000}k" if self.rows < 1_000_000 else f"{self.rows // 1_000_000}M"
        return f"{self.tables} x {rows} x {self.dim}, batch {self.batch}, {self.ids_per_bag} ids/bag"


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


def make_batches(s: Setup, n: int, alpha: float, seed: int = 0) -> list[KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        values = torch.cat([zipf_ids(s.rows, s.batch * s.ids_per_bag, alpha, gen) for _ in range(s.tables)])
        lengths = torch.full((s.tables * s.batch,), s.ids_per_bag, dtype=torch.int64)
        out.append(KeyedJaggedTensor.from_lengths_sync([f"f{t}" for t in range(s.tables)], values, lengths))
    return out


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

    return {"fwd": fwd, "step": step, "bytes": state}


def bench_lowprec(s: Setup, bits: int, grad: torch.Tensor) -> dict:
    tables = [
        torchrec.EmbeddingBagConfig(
            name=f"t{t}", embedding_dim=s.dim, num_embeddings=s.rows, feature_names=[f"f{t}"]
        )
        for t in range(s.tables)
    ]
    cfg = lp.LowPrecisionConfig(bits=bits, learning_rate=LR, optimizer="rowwise_adagrad")
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg, device=grad.device)

    def fwd(kjt):
        with torch.no_grad():
            ebc(kjt)

    def step(kjt):
        ebc(kjt).values().backward(grad)

    return {"fwd": fwd, "step": step, "bytes": ebc.memory_bytes()}


def run(setups, alpha: float, rounds: int, iters: int, device: torch.device) -> list[tuple[Setup, dict]]:
    """Build every variant, then time them interleaved: ``rounds`` rounds, each timing every
    variant for ``iters`` batches; a variant's figure is the median over all its batches. This
    keeps slow drifts of a shared machine from favouring whichever variant ran first."""
    results = []
    for s in setups:
        batches = [b.to(device) for b in make_batches(s, 4, alpha)]
        grad = torch.randn(s.batch, s.tables * s.dim, generator=torch.Generator().manual_seed(1)).to(device)
        variants = {
            "FBGEMM FP32": bench_fbgemm(s, SparseType.FP32, grad),
            "FBGEMM FP16": bench_fbgemm(s, SparseType.FP16, grad),
            "lowprec int8 (ALPT)": bench_lowprec(s, 8, grad),
            "lowprec int4 (ALPT)": bench_lowprec(s, 4, grad),
            "lowprec int2 (ALPT)": bench_lowprec(s, 2, grad),
        }
        samples = {name: {"fwd": [], "step": []} for name in variants}
        for _ in range(rounds):
            for name, v in variants.items():
                for kind in ("fwd", "step"):
                    samples[name][kind].append(timed(v[kind], batches, warmup=1, iters=iters))
        rows = {
            name: {
                "fwd": statistics.median(samples[name]["fwd"]),
                "step": statistics.median(samples[name]["step"]),
                "bytes": v["bytes"],
            }
            for name, v in variants.items()
        }
        for name, r in rows.items():
            print(f"  {s.label()} | {name}: fwd {r['fwd']:.2f} ms, step {r['step']:.2f} ms", flush=True)
        results.append((s, rows))
        del variants
        gc.collect()
    return results


def to_markdown(results, command: str, alpha: float, device: torch.device) -> str:
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    lines = [
        f"Command: `{command}`  ",
        f"Device: {device.type} ({where}), torch {torch.__version__}; "
        f"update backend: `{backend_for(device)}`; ids Zipf(alpha={alpha}); optimizer RowWiseAdagrad; "
        "median ms per batch over interleaved rounds. Ratios are to FBGEMM FP32 in the same run: forward speed-up (FP32 ms / ms), "
        "train-step throughput (FP32 ms / ms), state bytes (bytes / FP32 bytes; weights + optimizer state "
        "+ fp32 master step sizes).",
        "",
    ]
    for s, rows in results:
        base = rows["FBGEMM FP32"]
        lines += [
            f"**{s.label()}**",
            "",
            "| tables | fwd ms | fwd speed-up | train step ms | step throughput | state MB | state ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['fwd']:.2f} | {base['fwd'] / r['fwd']:.2f}x | {r['step']:.2f} | "
                f"{base['step'] / r['step']:.2f}x | {r['bytes'] / 2**20:.0f} | {r['bytes'] / base['bytes']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all variants")
    ap.add_argument("--iters", type=int, default=5, help="batches timed per variant per round")
    ap.add_argument("--write", metavar="MD", help="replace this benchmark's section of a markdown file")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    setups = QUICK if args.quick else SETUPS
    cmd = (
        "python benchmarks/embedding_step.py"
        + (" --quick" if args.quick else "")
        + (f" --alpha {args.alpha}" if args.alpha != 1.05 else "")
    )
    cpu = torch.device("cpu")
    md = to_markdown(run(setups, args.alpha, args.rounds, args.iters, cpu), cmd, args.alpha, cpu)
    print(md)
    if args.write:
        key = "embedding_step" if args.alpha == 1.05 else f"embedding_step_alpha{args.alpha:g}"
        write_section(args.write, key, f"Embedding train step vs FBGEMM (CPU, Zipf {args.alpha:g})", md)
    if not torch.cuda.is_available():
        print("CUDA section skipped: no GPU on this machine (GPU figures need a GPU run).")
        return
    gpu = torch.device("cuda")
    md = to_markdown(run(setups, args.alpha, args.rounds, args.iters, gpu), cmd, args.alpha, gpu)
    print(md)
    if args.write:
        write_section(
            args.write,
            f"embedding_step_cuda_alpha{args.alpha:g}",
            f"Embedding train step vs FBGEMM (CUDA, Zipf {args.alpha:g})",
            md,
        )


if __name__ == "__main__":
    main()

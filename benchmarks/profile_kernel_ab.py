"""Interleaved A/B of two builds of the native kernels on the same inputs, in one process.

    python benchmarks/profile_kernel_ab.py OLD.so NEW.so [--config 8x1M|26x200k] [--dist uniform]
    python benchmarks/profile_kernel_ab.py OLD.so NEW.so --kernel lookup --bits 8 [--dist zipf1.2]

Loads both shared libraries (each build has its own module name), builds the tables and a
batch as the step benchmark does, and times each build alternately: ``--kernel update`` (the
default) ``fused_update_many`` (int8 rows, RowWiseAdagrad, ALPT with growth); ``--kernel
lookup`` the forward's ``pooled_lookup`` at ``--bits``, with FBGEMM's FP32 TBE forward on the
same ids in the same rounds for scale. Prints the median ms of each and the median of the
per-round ratios old/new, with the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from embedding_step import SETUPS, draw_ids  # noqa: E402

from torchrec_lowprec.kernels.spec import (
    OptimizerParams,
    UpdateSpec,  # noqa: E402
)
from torchrec_lowprec.quant.layout import quantize_rows  # noqa: E402
from torchrec_lowprec.quant.lsq import init_step_size  # noqa: E402
from torchrec_lowprec.types import OptimizerType


def _load(path: str):
    name = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--config", default="8x1M", choices=["8x1M", "26x200k"])
    ap.add_argument("--dist", default="uniform")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--kernel", default="update", choices=["update", "lookup"])
    ap.add_argument("--bits", type=int, default=8, choices=[2, 4, 8], help="--kernel lookup: the width")
    args = ap.parse_args()
    torch.set_num_threads(2)
    s = SETUPS[0] if args.config == "8x1M" else SETUPS[1]
    old, new = _load(args.old), _load(args.new)
    if args.kernel == "lookup":
        _lookup_ab(s, args, old, new)
        return
    g = torch.Generator().manual_seed(0)
    cols = [[] for _ in range(7)]
    floats, ints = [], []
    n = s.batch * s.ids_per_bag
    for t in range(s.tables):
        x = (torch.rand(s.rows, s.dim, generator=g) - 0.5) * (2 / s.rows**0.5)
        step = init_step_size(x, 8, "lsq")
        rows = quantize_rows(x, step, 8)
        del x
        ids = draw_ids(s.rows, n, args.dist, g)
        bag = torch.arange(n) // s.ids_per_bag
        goff = bag * (s.tables * s.dim) + t * s.dim
        for c, v in zip(cols, (rows, step, torch.zeros(s.rows), torch.empty(0), ids, goff, torch.empty(0))):
            c.append(v)
        spec = UpdateSpec(8, s.dim, OptimizerParams(OptimizerType.ROWWISE_ADAGRAD, 0.01), 1, True, True, 1e-4, 7,
                          grow_step=True)  # fmt: skip
        floats.append(spec.float_args())
        ints.append(spec.int_args())
    grad = torch.randn(s.batch, s.tables * s.dim, generator=g)
    times = {"old": [], "new": []}
    for r in range(args.rounds):
        for name, ext in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
            t0 = time.perf_counter()
            ext.fused_update_many(*cols, grad, floats, ints)
            times[name].append((time.perf_counter() - t0) * 1e3)
    ratios = [a / b for a, b in zip(times["old"], times["new"])]
    print(f"{s.label()}, {args.dist}: old {statistics.median(times['old']):.2f} ms, new "
          f"{statistics.median(times['new']):.2f} ms, old/new median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); load {open('/proc/loadavg').read().split()[:3]}")  # fmt: skip


def _lookup_ab(s, args, old, new) -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from torchrec_lowprec.kernels.lookup import table_buffer

    g = torch.Generator().manual_seed(0)
    n = s.batch * s.ids_per_bag
    parts, table_offsets, ids = [], [], []
    for _ in range(s.tables):
        x = (torch.rand(s.rows, s.dim, generator=g) - 0.5) * (2 / s.rows**0.5)
        rows = quantize_rows(x, init_step_size(x, args.bits, "lsq"), args.bits)
        del x
        table_offsets.append(sum(p.numel() for p in parts))
        parts.append(rows.reshape(-1))
        ids.append(draw_ids(s.rows, n, args.dist, g))
    flat = table_buffer(sum(p.numel() for p in parts), "cpu")  # huge pages, as the module's tables
    torch.cat(parts, out=flat)
    del parts
    values = torch.cat(ids)
    offsets = torch.arange(0, values.numel() + 1, s.ids_per_bag)
    T = s.tables
    call = (flat, values, offsets, table_offsets, [args.bits] * T, [s.dim] * T, [s.rows] * T, 1, False, None)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(s.rows, s.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        weights_precision=SparseType.FP32,
    )
    assert torch.equal(old.pooled_lookup(*call), new.pooled_lookup(*call)), "the two builds differ"
    runs = {"old": lambda: old.pooled_lookup(*call), "new": lambda: new.pooled_lookup(*call)}
    runs["FBGEMM FP32"] = lambda: tbe(values, offsets)
    times = {name: [] for name in runs}
    with torch.no_grad():
        for r in range(args.rounds):
            order = list(runs.items())
            for name, fn in order[r % 3 :] + order[: r % 3]:
                fn()  # one warm call per round, then the median of 5
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    fn()
                    ts.append((time.perf_counter() - t0) * 1e3)
                times[name].append(statistics.median(ts))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratios = [a / b for a, b in zip(times["old"], times["new"])]
    print(f"{s.label()}, {args.dist}, int{args.bits} lookup: old {med['old']:.2f} ms, new {med['new']:.2f} ms, "
          f"FBGEMM FP32 {med['FBGEMM FP32']:.2f} ms (vs FP32: old {med['FBGEMM FP32'] / med['old']:.2f}x, new "
          f"{med['FBGEMM FP32'] / med['new']:.2f}x); old/new median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); load {open('/proc/loadavg').read().split()[:3]}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The precision planner on a Criteo-1TB-sized model: 26 tables (the Criteo 1TB vocabularies
capped at 40M rows, as in TorchRec's DLRM / MLPerf configs), dim 128, onto 8 GPUs of 40 GB and
16 GB (and 8 / 4 GB, where fp32 no longer fits), with RowWiseAdagrad and Adam, without and with per-id frequencies (Zipf 1.05, 16 groups).

Planning runs TorchRec's planner on a meta-device model (no memory is allocated), so this runs
on any machine.

    python benchmarks/planner.py [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch
import torchrec
from torchrec.distributed.planner import Topology

import torchrec_lowprec as lp
from torchrec_lowprec.modules.table_layout import stored_bytes
from torchrec_lowprec.planner import GiB, InfeasibleBudgetError, plan_precision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import publish  # noqa: E402

CRITEO_1TB_VOCABS = (
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
)  # fmt: skip
CAP = 40_000_000
DIM = 128


def tables() -> list[torchrec.EmbeddingBagConfig]:
    return [
        torchrec.EmbeddingBagConfig(
            name=f"t_cat_{i}", embedding_dim=DIM, num_embeddings=min(v, CAP), feature_names=[f"cat_{i}"]
        )
        for i, v in enumerate(CRITEO_1TB_VOCABS)
    ]


def zipf_counts(tbls) -> dict[str, torch.Tensor]:
    """Expected lookups per frequency-ranked id over 4B training rows, Zipf 1.05."""
    out = {}
    for t in tbls:
        r = torch.arange(1, t.num_embeddings + 1, dtype=torch.float64)
        pmf = r.pow_(-1.05)
        pmf /= pmf.sum()
        out[t.feature_names[0]] = (pmf * 4e9).round_().to(torch.int64)
    return out


def bits_mix(mp) -> str:
    share: dict[int, int] = {}
    total = 0
    for tp in mp.precision.tables.values():
        for a, e, b in zip(tp.group_starts(), tp.group_ends, tp.bits):
            share[b] = share.get(b, 0) + e - a
            total += e - a
    return " ".join(f"{b}b:{100 * n / total:.1f}%" for b, n in sorted(share.items(), reverse=True))


def torchrec_estimate(tbls, optimizer: str) -> float:
    """What TorchRec's own estimator counts for fp32 tables (4 B/element + its optimizer guess)."""
    mult = {"rowwise_adagrad": 1 / DIM, "adam": 2.0}[optimizer]
    return sum(t.num_embeddings * t.embedding_dim * 4 * (1 + mult) for t in tbls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8192, help="per-rank batch size")
    ap.add_argument("--write", help="write the results section into this markdown file")
    args = ap.parse_args()
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    tbls = tables()
    rows = sum(t.num_embeddings for t in tbls)
    counts = zipf_counts(tbls)
    lines = [
        f"26 tables, {rows:,} rows in all (largest 40M), dim {DIM}; 8 ranks (CUDA topology); per-rank batch "
        f"{args.batch_size}; 15% of each rank reserved for dense parts. ALPT (fp32 master step per row) with "
        "stochastic rounding; floor 2 bits (no pruning).",
        "",
        "| optimizer | GB / rank | frequencies | bits (share of rows) | max table bytes / rank | "
        "fp32 average / rank | plan time |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for opt in ("rowwise_adagrad", "adam"):
        cfg = lp.LowPrecisionConfig(optimizer=opt)
        fp32_need = sum(stored_bytes(t.num_embeddings, DIM, 32, opt, False, 16) for t in tbls) / 8
        for gb in (40, 16, 8, 4) if opt == "rowwise_adagrad" else (40, 16):
            for freq in (None, counts):
                topo = Topology(world_size=8, compute_device="cuda", hbm_cap=gb * GiB, local_world_size=8)
                t0 = time.perf_counter()
                try:
                    mp = plan_precision(tbls, topo, cfg, batch_size=args.batch_size, frequencies=freq)
                    res = f"{bits_mix(mp)} | {max(mp.per_rank_bytes) / GiB:.2f} GiB"
                except InfeasibleBudgetError as e:
                    res = f"infeasible: {str(e).split(':')[1].split('(')[0].strip()} | -"
                dt = time.perf_counter() - t0
                lines.append(
                    f"| {opt} | {gb} | {'Zipf 1.05, 16 groups' if freq else 'none (1 group)'} | {res} | "
                    f"{fp32_need / GiB:.1f} GiB | {dt:.1f} s |"
                )
                print(lines[-1], flush=True)
    lines += [
        "",
        f"TorchRec's own storage estimate for these tables in fp32 is {torchrec_estimate(tbls, 'rowwise_adagrad') / 8 / GiB:.1f} "
        f"GiB/rank (RowWiseAdagrad) and {torchrec_estimate(tbls, 'adam') / 8 / GiB:.1f} GiB/rank (Adam); for int8 or "
        "int4 tables it counts 2 bytes per element whatever the width, which is why the planner here uses "
        "`LowPrecisionStorageEstimator` (real bytes: padded IntNBit rows, fp32 master step, fp32 optimizer state). "
        "`tests/distributed/test_mixed_precision_sharding.py` checks that the bytes each rank then allocates "
        "equal the planned bytes (exactly, in that test: TW/CW plans from the planner and a RW plan).",
    ]
    publish(
        args.write,
        "planner",
        "Precision planner: a Criteo-1TB-sized model on 8 GPUs",
        "benchmarks/planner.py",
        sys.argv[1:],
        lines,
    )


if __name__ == "__main__":
    main()

"""MPE on synthetic CTR data: compression (all metadata counted) against test AUC, next to the
float model and uniform int8 / int4 ALPT, all trained the same way in one run.

Pipeline (as a user would run it): count id frequencies on the *training* split, re-map ids to
frequency rank (``data.remap_by_rank``), search bit widths per frequency group with
``MPESearchEmbeddingBagCollection`` inside TorchRec's DLRM (one epoch), select, then retrain a
fresh DLRM whose tables are ``MixedPrecisionEmbeddingBagCollection`` (ALPT, stochastic
rounding) from scratch and evaluate on the test split.

    python benchmarks/mpe.py [--train-rows 500000] [--lambdas 1e-5,1e-4,1e-3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torchrec
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain

import torchrec_lowprec as lp
from torchrec_lowprec.data import (
    SyntheticCTR,
    SyntheticCTRConfig,
    count_frequencies,
    exact_auc,
    frequency_rank,
    log_loss_terms,
    remap_by_rank,
)
from torchrec_lowprec.modules.mpe_search import MPESearchConfig, merge_plans, mpe_search_, regularization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import write_section  # noqa: E402

VOCABS = (200_000, 100_000, 50_000, 20_000, 5_000, 1_000, 200, 20)


class RankedData:
    """The synthetic splits with ids re-mapped to frequency rank (counted on train)."""

    def __init__(self, data: SyntheticCTR, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.counts = count_frequencies(data.batches("train", 8192), data.vocab_sizes)
        self.ranks = {f: frequency_rank(c) for f, c in self.counts.items()}

    def batches(self, split: str, batch_size: int | None = None):
        for b in self.data.batches(split, batch_size or self.batch_size):
            yield Batch(b.dense_features, remap_by_rank(b.sparse_features, self.ranks), b.labels)


def build_dlrm(data: SyntheticCTR, dim: int, seed: int) -> DLRMTrain:
    torch.manual_seed(seed)
    ebc = torchrec.EmbeddingBagCollection(data.embedding_bag_configs(dim))
    return DLRMTrain(DLRM(ebc, data.num_dense, [64, dim], [64, 32, 1]))


def sparse_of(model: DLRMTrain):
    return model.model.sparse_arch.embedding_bag_collection


def train_epoch(model, rd: RankedData, opt, extra_loss=None) -> float:
    model.train()
    seen, t0 = 0, time.perf_counter()
    for batch in rd.batches("train"):
        loss, _ = model(batch)
        if extra_loss is not None:
            loss = loss + extra_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += batch.labels.numel()
    return seen / (time.perf_counter() - t0)


def evaluate(model, rd: RankedData) -> dict:
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in rd.batches("test", 8192):
            _, (_, lg, lb) = model(batch)
            logits.append(lg.double().numpy())
            labels.append(lb.numpy())
    z, y = np.concatenate(logits), np.concatenate(labels)
    return {"auc": exact_auc(z, y), "logloss": float(log_loss_terms(z, y).mean())}


def serving_bytes(ebc) -> int:
    """What a served table holds: stored rows (codes + fp16 scale/bias) and id maps; the fp32
    master step sizes and optimizer state are training-only (counted in ``train_bytes``)."""
    per = ebc.memory_bytes(per_table=True)
    return sum(p.get("rows", 0) + p.get("row_map", 0) for p in per.values())


def low_precision_run(name: str, rd: RankedData, args, cfg, plan=None) -> dict:
    model = build_dlrm(rd.data, args.dim, args.seed)
    ebc = sparse_of(model)
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ebc.parameters(), {"lr": args.emb_lr})
    lp.convert(model, cfg, precision_plan=plan)
    ebc = sparse_of(model)
    dense = [p for p in model.parameters() if not hasattr(p, "_optimizer_classes")]
    ex_s = train_epoch(model, rd, torch.optim.Adam(dense, lr=args.dense_lr))
    return {
        "name": name,
        **evaluate(model, rd),
        "serve": serving_bytes(ebc),
        "train": ebc.memory_bytes(),
        "ex_s": ex_s,
    }


class _Both:
    def __init__(self, *opts) -> None:
        self.opts = opts

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad()

    def step(self) -> None:
        for o in self.opts:
            o.step()


def mpe_run(lam: float, rd: RankedData, args) -> tuple[dict, dict]:
    model = build_dlrm(rd.data, args.dim, args.seed)
    scfg = MPESearchConfig(
        candidate_bits=(0, 2, 4, 8), num_groups=args.groups, reg_lambda=lam, sparse_weights=True
    )
    searches = mpe_search_(model, scfg, rd.counts)
    arch = [p for s in searches for p in s.architecture_parameters()]
    weights = [p for s in searches for p in s.weights.parameters()]
    ids = {id(p) for p in arch + weights}
    rest = [p for p in model.parameters() if id(p) not in ids]
    dense_opt = torch.optim.Adam(
        [{"params": rest, "lr": args.dense_lr}, {"params": arch, "lr": args.arch_lr}]
    )
    # Row-sparse table gradients: Adagrad touches only the looked-up rows (as the fused
    # RowWiseAdagrad of the other runs does).
    opt = _Both(dense_opt, torch.optim.Adagrad(weights, lr=args.emb_lr))
    t0 = time.perf_counter()
    train_epoch(model, rd, opt, lambda: regularization(searches))
    search_s = time.perf_counter() - t0
    plan = merge_plans([s.select() for s in searches])
    run = low_precision_run(f"MPE λ={lam:g}", rd, args, lp.LowPrecisionConfig(), plan)
    run["search_s"] = search_s
    return run, plan.to_dict()


def bits_mix(plan: dict) -> str:
    share: dict[int, int] = {}
    total = 0
    for t in plan["tables"].values():
        starts = [0] + t["group_ends"][:-1]
        for a, e, b in zip(starts, t["group_ends"], t["bits"]):
            share[b] = share.get(b, 0) + e - a
            total += e - a
    return " ".join(f"{b}b:{100 * n / total:.0f}%" for b, n in sorted(share.items(), reverse=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=500_000)
    ap.add_argument("--test-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--emb-lr", type=float, default=0.05)
    ap.add_argument("--dense-lr", type=float, default=2e-3)
    ap.add_argument("--arch-lr", type=float, default=0.05)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--lambdas", default="1e-5,1e-4,1e-3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", help="write the results section into this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = SyntheticCTRConfig(
        vocab_sizes=VOCABS,
        num_dense=4,
        train_rows=args.train_rows,
        val_rows=0,
        test_rows=args.test_rows,
        seed=args.seed,
    )
    data = SyntheticCTR(cfg)
    rd = RankedData(data, args.batch_size)
    bayes = data.bayes_metrics("test")
    fp32_serve = sum(v * args.dim * 4 for v in VOCABS)
    runs, plans = [], {}
    for name, c in (("fp32", lp.LowPrecisionConfig(bits=32)), ("int8 ALPT", lp.LowPrecisionConfig(bits=8)),
                    ("int4 ALPT", lp.LowPrecisionConfig(bits=4))):  # fmt: skip
        runs.append(low_precision_run(name, rd, args, c))
        print(f"{name}: AUC {runs[-1]['auc']:.4f}", flush=True)
    for lam in (float(x) for x in args.lambdas.split(",")):
        r, plan = mpe_run(lam, rd, args)
        runs.append(r)
        plans[r["name"]] = plan
        print(f"{r['name']}: AUC {r['auc']:.4f} {bits_mix(plan)} search {r['search_s']:.0f}s", flush=True)
    base = runs[0]["auc"]
    lines = [
        f"Synthetic CTR: {len(VOCABS)} fields (vocabularies {', '.join(f'{v:,}' for v in VOCABS)}; Zipf 1.1), "
        f"dim {args.dim}, {args.train_rows:,} training rows (one epoch, batch {args.batch_size}), "
        f"{args.test_rows:,} test rows, Bayes AUC {bayes['auc']:.4f}. TorchRec DLRM; tables trained by the fused "
        f"RowWiseAdagrad (lr {args.emb_lr}). MPE: candidates {{0, 2, 4, 8}}, {args.groups} frequency groups per "
        "table (counted on train), one search epoch, selection rule 1/(2m), retrain from scratch with ALPT.",
        "",
        "Compression = fp32 table bytes / serving bytes (codes + fp16 scale/bias per stored row + id maps; "
        "pruned rows cost nothing). Training bytes add the fp32 master step sizes and RowWiseAdagrad state.",
        "",
        "| model | test AUC | vs fp32 | log-loss | bits (share of rows) | serving bytes | compression | "
        "training bytes | examples/s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        mix = bits_mix(plans[r["name"]]) if r["name"] in plans else r["name"].split()[0]
        lines.append(
            f"| {r['name']} | {r['auc']:.4f} | {r['auc'] - base:+.4f} | {r['logloss']:.4f} | {mix} | "
            f"{r['serve'] / 2**20:.2f} MiB | {fp32_serve / r['serve']:.1f}x | {r['train'] / 2**20:.2f} MiB | "
            f"{r['ex_s']:,.0f} |"
        )
    best = [r for r in runs[3:] if r["auc"] >= base - 0.001]
    verdict = (
        f"Target (>= 10x at AUC >= fp32 - 0.001): met by {', '.join(r['name'] for r in best if fp32_serve / r['serve'] >= 10)}"
        if any(fp32_serve / r["serve"] >= 10 for r in best)
        else "Target (>= 10x at AUC >= fp32 - 0.001): NOT met in this run"
    )
    lines += ["", verdict]
    cmd = "python benchmarks/mpe.py " + " ".join(sys.argv[1:])
    body = f"Command: `{cmd}`\n\n" + "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, "mpe", "MPE: mixed precision by frequency group", body)


if __name__ == "__main__":
    main()

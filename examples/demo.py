"""`make demo`: train TorchRec's DLRM on synthetic CTR data with fp32, int8 and int4 tables.

The data come from a planted model, so the best achievable (Bayes) AUC is known. Every run
starts from the same TorchRec DLRM (same init), tags its tables with a fused RowWiseAdagrad
(``_apply_optimizer_in_backward``, as TorchRec's DLRM examples do) and swaps its
EmbeddingBagCollection with ``torchrec_lowprec.convert``: fp32 rows (``bits=32``: the same
fused update, no quantization), or int8 / int4 rows (ALPT: learned per-row step sizes,
stochastic rounding). Prints one table.

    python examples/demo.py [--train-rows 400000] [--dim 16] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torchrec
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.models.dlrm import DLRM, DLRMTrain

import torchrec_lowprec as lp
from torchrec_lowprec.data.metrics import exact_auc, log_loss_terms
from torchrec_lowprec.data.synthetic import SyntheticCTR, SyntheticCTRConfig

VOCABS = (50_000, 20_000, 10_000, 5_000, 2_000, 500, 100, 20)


def build_model(data: SyntheticCTR, dim: int, seed: int) -> DLRMTrain:
    torch.manual_seed(seed)
    ebc = torchrec.EmbeddingBagCollection(data.embedding_bag_configs(dim))
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=data.num_dense,
            dense_arch_layer_sizes=[64, dim],
            over_arch_layer_sizes=[64, 32, 1],
        )
    )


def float_table_bytes(tables) -> int:
    """fp32 rows + RowWiseAdagrad's one fp32 per row: what TorchRec/FBGEMM FP32 holds."""
    return sum(t.num_embeddings * (4 * t.embedding_dim + 4) for t in tables)


def run(precision: str, data: SyntheticCTR, args) -> dict:
    model = build_model(data, args.dim, args.seed)
    ebc = model.model.sparse_arch.embedding_bag_collection
    tables = ebc.embedding_bag_configs()
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ebc.parameters(), {"lr": args.emb_lr})
    bits = 32 if precision == "fp32" else int(precision[3:])
    lp.convert(model, lp.LowPrecisionConfig(bits=bits, rounding="stochastic", learn_step_size=True))
    emb_bytes = model.model.sparse_arch.embedding_bag_collection.memory_bytes()
    dense = [p for p in model.parameters() if not hasattr(p, "_optimizer_classes")]
    opt = torch.optim.Adam(dense, lr=args.dense_lr)
    model.train()
    t0 = time.perf_counter()
    seen = 0
    for batch in data.batches("train", args.batch_size):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += batch.labels.numel()
    train_s = time.perf_counter() - t0
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in data.batches("test", 8192):
            _, (_, lg, lb) = model(batch)
            logits.append(lg.double().numpy())
            labels.append(lb.numpy())
    z, y = np.concatenate(logits), np.concatenate(labels)
    return {
        "precision": precision,
        "auc": exact_auc(z, y),
        "logloss": float(log_loss_terms(z, y).mean()),
        "bytes": emb_bytes,
        "fp32_bytes": float_table_bytes(tables),
        "ex_per_s": seen / train_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=500_000)
    ap.add_argument("--test-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--emb-lr", type=float, default=0.05)
    ap.add_argument("--dense-lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default="fp32,int8,int4")
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
    bayes = data.bayes_metrics("test")
    print(
        f"synthetic CTR: {len(VOCABS)} fields, {args.train_rows} train rows, {args.test_rows} test rows, one epoch"
    )
    results = []
    for p in args.precisions.split(","):
        r = run(p.strip(), data, args)
        results.append(r)
        print(f"  {p}: AUC {r['auc']:.4f}, {r['ex_per_s']:.0f} ex/s", flush=True)
    print()
    print(
        "| precision | test AUC | Bayes AUC | gap | log-loss | Bayes log-loss | embedding bytes | vs fp32 | examples/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['precision']} | {r['auc']:.4f} | {bayes['auc']:.4f} | {bayes['auc'] - r['auc']:.4f} | "
            f"{r['logloss']:.4f} | {bayes['logloss']:.4f} | {r['bytes'] / 2**20:.1f} MiB | "
            f"{r['bytes'] / r['fp32_bytes']:.3f}x | {r['ex_per_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()

"""MEC codebook compression vs ALPT int8/int4 vs fp32, on synthetic CTR data; plus an export check.

One TorchRec DLRM per precision, trained for one epoch on the same data from the same init
(fused RowWiseAdagrad for the tables, Adam for the dense layers, as examples/dlrm/train.py):
- fp32 (``lp.convert`` with ``bits=32``), int8 and int4 ALPT;
- MEC: the trained fp32 model's tables of >= ``--min-rows`` rows replaced by PQ codes learned
  from them and their training-data frequencies (``convert(model, CodebookConfig(...), frequencies=...)``), for several (L, K), then the
  codebooks fine-tuned inside the model (codes, dense layers and small tables frozen).
Reports test AUC and the serving bytes of the tables (codes + codebooks + uncompressed tables,
vs fp32 tables), and checks export of the int8 / int4 models to TorchRec's quantized
EmbeddingBagCollection (predictions before/after, forward time).

    python benchmarks/compression.py                         # the full run (~10-15 min, 2 cores)
    python benchmarks/compression.py --quick                 # small sizes, a smoke run
    python benchmarks/compression.py --write docs/benchmarks.md

Over ``--seeds`` (default 3), paired with the fp32 model of the same seed; the MEC setting is
chosen on a validation split and test AUC is reported for it and the baselines only. Finished
seeds are cached in ``--results``, keyed by the settings and a hash of the library sources.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch
import torchrec
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.models.dlrm import DLRM, DLRMTrain

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import ResultCache, describe_code, machine_info, write_section  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402
from torchrec_lowprec.compress import CodebookConfig, finetune_codebooks  # noqa: E402
from torchrec_lowprec.configs import InferenceConfig
from torchrec_lowprec.data import count_frequencies, exact_auc  # noqa: E402
from torchrec_lowprec.data.synthetic import SyntheticCTR, SyntheticCTRConfig  # noqa: E402

VOCABS = (400_000, 200_000, 100_000, 10_000, 1_000, 100)
QUICK_VOCABS = (40_000, 20_000, 1_000, 100)


def build(data: SyntheticCTR, dim: int, seed: int) -> DLRMTrain:
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


def train(data: SyntheticCTR, bits: int, args) -> tuple[DLRMTrain, float]:
    model = build(data, args.dim, args.seed)
    ebc = model.model.sparse_arch.embedding_bag_collection
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, ebc.parameters(), {"lr": args.emb_lr})
    lp.convert(model, lp.LowPrecisionConfig(bits=bits, rounding="stochastic", learn_step_size=True))
    dense = [p for p in model.parameters() if not hasattr(p, "_optimizer_classes")]
    opt = torch.optim.Adam(dense, lr=args.dense_lr)
    model.train()
    t0 = time.perf_counter()
    for batch in data.batches("train", args.batch_size):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, time.perf_counter() - t0


def predict(dlrm: torch.nn.Module, data: SyntheticCTR, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    dlrm.eval()
    logits, labels = [], []
    with torch.no_grad():
        for b in data.batches(split, 8192):
            logits.append(dlrm(b.dense_features, b.sparse_features).reshape(-1).double().numpy())
            labels.append(b.labels.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def auc(dlrm: torch.nn.Module, data: SyntheticCTR, split: str = "test") -> float:
    return exact_auc(*predict(dlrm, data, split))


def aucs(dlrm: torch.nn.Module, data: SyntheticCTR) -> tuple[float, float]:
    """(validation AUC, test AUC)."""
    return auc(dlrm, data, "val"), auc(dlrm, data, "test")


def fp32_table_bytes(tables) -> int:
    return sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)


def lp_serving_bytes(ebc) -> int:
    """Stored rows only (what the served table holds; no optimizer state or fp32 master steps)."""
    return sum(ebc.quantized_weight(t.name).numel() for t in ebc.embedding_bag_configs())


def mec_serving_bytes(cebc) -> int:
    rest = lp_serving_bytes(cebc.uncompressed) if cebc.uncompressed is not None else 0
    return sum(t.memory_bytes() for t in cebc.compressed.values()) + rest


def forward_ms(fn, batches, repeats: int = 5) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            times.append((time.perf_counter() - t0) / len(batches) * 1e3)
    return statistics.median(times)


def export_check(model: DLRMTrain, data: SyntheticCTR, repeats: int = 15) -> dict:
    dlrm = model.model
    batches = [
        b.sparse_features for b in data.batches("test", 4096, num_rows=min(8 * 4096, data.split_rows("test")))
    ]
    before, labels = predict(dlrm, data)
    trained_ebc = dlrm.sparse_arch.embedding_bag_collection
    lp.convert(dlrm, InferenceConfig())
    served_ebc = dlrm.sparse_arch.embedding_bag_collection
    after, _ = predict(dlrm, data)
    # Interleaved rounds, so that load from other jobs on the machine hits both alike.
    trained_ms, served_ms = [], []
    for _ in range(repeats):
        trained_ms.append(forward_ms(trained_ebc, batches, repeats=1))
        served_ms.append(forward_ms(served_ebc, batches, repeats=1))
    return {
        "max_abs_diff": float(np.abs(after - before).max()),
        "equal": bool(np.array_equal(after, before)),
        "auc": exact_auc(after, labels),
        "trained_ms": statistics.median(trained_ms),
        "served_ms": statistics.median(served_ms),
    }


def access_entropy(cebc, counts: dict) -> float:
    """Mean over compressed tables and blocks of the entropy (bits) of code usage per access."""
    out = []
    for t in cebc.embedding_bag_configs():
        if t.name not in cebc.compressed:
            continue
        codes = cebc.compressed[t.name].codes.to(torch.int64)
        w = sum(counts[f] for f in t.feature_names).to(torch.float64)
        for j in range(codes.shape[1]):
            p = torch.bincount(codes[:, j], weights=w, minlength=cebc.compressed[t.name].codebook_size)
            p = p / p.sum()
            out.append(float(-(p * torch.log2(p.clamp_min(1e-300))).sum()))
    return statistics.mean(out)


def one_seed(args, vocabs, seed: int) -> dict:
    """Train fp32 / int8 / int4, compress the fp32 model with every MEC setting; rows of
    (method, setting, val AUC, test AUC, bytes, note), and the export check (seed 0 only)."""
    args.seed = seed
    cfg = SyntheticCTRConfig(
        vocab_sizes=vocabs, num_dense=4, train_rows=args.train_rows, val_rows=args.val_rows,
        test_rows=args.test_rows, seed=seed,
    )  # fmt: skip
    data = SyntheticCTR(cfg)
    rows = []
    trained = {}
    for name, bits in (("fp32", 32), ("int8 ALPT", 8), ("int4 ALPT", 4)):
        model, secs = train(data, bits, args)
        ebc = model.model.sparse_arch.embedding_bag_collection
        rows.append((name, "-", *aucs(model.model, data), lp_serving_bytes(ebc), f"trained in {secs:.0f} s"))
        trained[bits] = model
        print(f"seed {seed} {name}: val/test AUC {rows[-1][2]:.4f} / {rows[-1][3]:.4f}", flush=True)
    counts = count_frequencies(data.batches("train", 8192), data.vocab_sizes)
    settings = [tuple(int(v) for v in s.split("x")) for s in args.mec.split(",")]
    runs = [(L, K, args.popularity, args.mec_steps) for L, K in settings]
    L0, K0 = settings[0]
    for p in args.ablate.split(","):
        if p == "kmeans":
            runs.append((L0, K0, args.popularity, 0))
        elif p and p != args.popularity:
            runs.append((L0, K0, p, args.mec_steps))
    for L, K, pop, steps in runs:
        model = copy.deepcopy(trained[32])
        mec = CodebookConfig(num_subspaces=L, codebook_size=K, min_rows=args.min_rows, steps=steps,
                        popularity=pop, seed=seed)  # fmt: skip
        t0 = time.perf_counter()
        lp.convert(model, mec, frequencies=counts)
        secs = time.perf_counter() - t0
        cebc = model.model.sparse_arch.embedding_bag_collection
        nbytes = mec_serving_bytes(cebc)
        ent = statistics.mean(e for r in cebc.fit_report.values() for e in r["entropy_bits"])
        note = (
            f"code entropy {ent:.2f} (per row) / {access_entropy(cebc, counts):.2f} (per access) of "
            f"{np.log2(K):.0f} bits, seed 0"
        )
        label = f"MEC ({pop})" if steps else f"MEC ({pop}, k-means only)"
        rows.append((label, f"L={L}, K={K}", *aucs(model.model, data), nbytes, note))
        print(
            f"seed {seed} MEC L={L} K={K} {pop}: val/test {rows[-1][2]:.4f} / {rows[-1][3]:.4f}", flush=True
        )
        if steps and args.finetune_steps:
            t0 = time.perf_counter()
            n = finetune_codebooks(
                model, data.batches("train", 2048), lambda b, m=model: m(b)[0], lr=args.finetune_lr,
                max_steps=args.finetune_steps,
            )  # fmt: skip
            rows.append((f"MEC ({pop}) + fine-tune", f"L={L}, K={K}", *aucs(model.model, data), nbytes,
                         f"{n} steps x 2048 rows"))  # fmt: skip
    exports = {str(bits): export_check(trained[bits], data) for bits in (8, 4)} if seed == 0 else {}
    return {"rows": rows, "exports": exports, "bayes": data.bayes_metrics("test")["auc"],
            "fp32_bytes": fp32_table_bytes(data.embedding_bag_configs(args.dim)),
            "compressed_rows": sum(t.num_embeddings for t in data.embedding_bag_configs(args.dim)
                                   if t.num_embeddings >= args.min_rows),
            "rows_total": sum(t.num_embeddings for t in data.embedding_bag_configs(args.dim))}  # fmt: skip


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan"))


def report(per_seed: list[dict], seeds: list[int], args, vocabs, command: str, code: str) -> list[str]:
    """Validation table of every setting; the MEC setting chosen on validation; test AUC of the
    baselines and the chosen setting only; the export check."""
    s0 = per_seed[0]
    fp32_bytes = s0["fp32_bytes"]
    keys = [(r[0], r[1]) for r in s0["rows"]]
    by = {k: [next(r for r in s["rows"] if (r[0], r[1]) == k) for s in per_seed] for k in keys}
    base = by[("fp32", "-")]

    def diff(k, i):  # i = 2: validation, 3: test
        return _mean_se([r[i] - b[i] for r, b in zip(by[k], base)])

    lines = [
        f"Command: `{command}`",
        "",
        machine_info(args.threads)[0],
        "",
        f"Synthetic CTR (`SyntheticCTR`, seeds {', '.join(map(str, seeds))}: the seed draws the data, the init "
        f"and the rounding): {len(vocabs)} fields with vocabularies {', '.join(f'{v:,}' for v in vocabs)} "
        f"(Zipf 1.1), dim {args.dim}, {args.train_rows:,} train rows (one epoch, batch {args.batch_size}), "
        f"{args.val_rows:,} validation rows (the MEC setting is chosen on them), {args.test_rows:,} test rows; "
        f"Bayes AUC {statistics.fmean(s['bayes'] for s in per_seed):.4f}. MEC compresses tables of >= "
        f"{args.min_rows:,} rows ({s0['compressed_rows']:,} of {s0['rows_total']:,} rows); {args.mec_steps} "
        f"learner steps per table; fine-tuning: {args.finetune_steps} Adam steps (lr {args.finetune_lr:g}) on the "
        "codebooks only. Bytes are what serving holds: codes + codebooks + uncompressed tables (MEC), stored rows "
        f"with fp16 scale/bias (ALPT), vs fp32 tables ({fp32_bytes / 2**20:.1f} MiB). Differences are per seed to "
        f"the fp32 model of the same seed (paired), mean ± standard error. {args.threads} thread(s). Code: {code}.",
        "",
        "**Validation** (every setting):",
        "",
        "| method | setting | val AUC vs fp32 (paired) | table bytes | compression | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for k in keys[1:]:
        d, r0 = diff(k, 2), by[k][0]
        lines.append(
            f"| {k[0]} | {k[1]} | {d[0]:+.4f} ± {d[1]:.4f} | {r0[4] / 2**20:.2f} MiB | {fp32_bytes / r0[4]:.1f}x | "
            f"{r0[5]} |"
        )
    mec = [k for k in keys if k[0].startswith("MEC")]
    ok = [k for k in mec if diff(k, 2)[0] >= -0.002]
    if ok:
        chosen = min(ok, key=lambda k: (by[k][0][4], -diff(k, 2)[0]))
        rule = "the smallest bytes with validation AUC >= fp32 - 0.002"
    else:
        chosen = max(mec, key=lambda k: diff(k, 2)[0])
        rule = "no setting reached validation AUC >= fp32 - 0.002: the best validation AUC"
    lines += [
        "",
        f"Chosen on validation ({rule}): **{chosen[0]} {chosen[1]}**.",
        "",
        "**Test** (the baselines and the chosen setting only):",
        "",
        "| method | setting | test AUC | vs fp32 (paired) | table bytes | compression |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for k in [keys[0], keys[1], keys[2], chosen]:
        d = diff(k, 3)
        vs = "" if k == keys[0] else f"{d[0]:+.4f} ± {d[1]:.4f}"
        lines.append(
            f"| {k[0]} | {k[1]} | {statistics.fmean(r[3] for r in by[k]):.4f} | {vs} | {by[k][0][4] / 2**20:.2f} MiB | "
            f"{fp32_bytes / by[k][0][4]:.1f}x |"
        )
    d, comp = diff(chosen, 3), fp32_bytes / by[chosen][0][4]
    met = comp >= 16 and d[0] >= -0.002
    lines += [
        "",
        f"**Target (>= 16x at test AUC >= fp32 - 0.002, mean paired): {'met' if met else 'not met'}** by the "
        f"setting chosen on validation ({chosen[0]} {chosen[1]}: {comp:.1f}x, {d[0]:+.4f} ± {d[1]:.4f}).",
        "What this shows and its caveats: [compression.md](compression.md#results-and-when-to-prefer-mec).",
    ]
    ex = s0["exports"]
    if ex:
        lines += [
            "",
            f"Export to TorchRec's quantized `EmbeddingBagCollection` (`convert(model, InferenceConfig())`), seed {seeds[0]}:",
            "",
            "| model | predictions after == before | max abs logit diff | AUC after | "
            "embedding forward, trained module | served module |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for bits, e in ex.items():
            lines.append(
                f"| int{bits} ALPT | {'bit-identical' if e['equal'] else 'differ'} | {e['max_abs_diff']:.1e} | "
                f"{e['auc']:.4f} | {e['trained_ms']:.2f} ms | {e['served_ms']:.2f} ms |"
            )
        lines += [
            "",
            "Forward time: median ms per batch of 4096 over 8 test batches, embedding collection only.",
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--train-rows", type=int, default=2_000_000)
    ap.add_argument("--val-rows", type=int, default=100_000)
    ap.add_argument("--test-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--emb-lr", type=float, default=0.05)
    ap.add_argument("--dense-lr", type=float, default=2e-3)
    ap.add_argument("--min-rows", type=int, default=50_000)
    ap.add_argument(
        "--mec", default="4x256,2x256,1x256,1x2", help="L x K settings (1x2: a floor, ~no per-id info)"
    )
    ap.add_argument("--mec-steps", type=int, default=150)
    ap.add_argument("--popularity", default="count", help="weighting of every L x K")
    ap.add_argument(
        "--ablate",
        default="log,uniform,kmeans",
        help="at the first L x K: other weightings; kmeans = no learner steps",
    )
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--finetune-lr", type=float, default=5e-5)
    # One intra-op thread: on the shared 2-core machine, 2 threads made these small ops up to 60x
    # slower (OpenMP barrier waits while other jobs hold the cores).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--results", default="runs/compression.jsonl", help="finished seeds (reused on the same code)"
    )
    ap.add_argument("--write", default=None, help="write the section into this markdown file")
    args = ap.parse_args()
    command = "python benchmarks/compression.py " + " ".join(sys.argv[1:])
    torch.set_num_threads(args.threads)
    vocabs = QUICK_VOCABS if args.quick else VOCABS
    if args.quick:
        args.train_rows, args.val_rows, args.test_rows, args.min_rows = 60_000, 20_000, 20_000, 10_000
        args.mec, args.mec_steps, args.finetune_steps = "4x256", 30, 30
    cache = ResultCache(args.results)
    seeds = [int(x) for x in args.seeds.split(",")]
    settings = {
        k: v for k, v in vars(args).items() if k not in ("write", "results", "threads", "seeds", "seed")
    }
    per_seed = [
        cache.get([settings, seed], lambda seed=seed: one_seed(args, vocabs, seed), seed=seed)
        for seed in seeds
    ]
    for s in per_seed:
        s["rows"] = [tuple(r) for r in s["rows"]]
    lines = report(per_seed, seeds, args, vocabs, command, describe_code(per_seed))
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(args.write, "compression", "MEC compression vs ALPT (DLRM, synthetic CTR)", md)


if __name__ == "__main__":
    main()

"""Accuracy of a low-precision ``EmbeddingCollection`` on the sequence example, paired to fp32.

Trains ``examples/sequence/train.py`` (in this process) once per variant and seed on one
synthetic data set with a planted click model, so the Bayes-optimal AUC (the ceiling) is
known, and reports per variant the validation and test AUC (mean ± sample std over seeds),
the per-seed difference to the fp32 reference (TorchRec's ``EmbeddingCollection`` with
RowWiseAdagrad applied in the backward) as mean ± std and its min..max, the gap to the
ceiling and the bytes of the table's state::

    python benchmarks/sequence_accuracy.py --write docs/benchmarks.md     # ~4-6 min on 2 cores

The data are the same for every run (``--data-seed``); the seed sets the model init (the same
TorchRec init of the table for every precision), the batch order and the rounding draws, so
runs of one seed differ only in how the table is stored and updated.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from report import contention, cpu_stat, machine_info, publish  # noqa: E402


def _load_example():
    """examples/sequence/train.py as ``seq_train`` (``train`` is the DLRM example's name)."""
    spec = importlib.util.spec_from_file_location(
        "seq_train", os.path.join(ROOT, "examples", "sequence", "train.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seq_train"] = mod
    spec.loader.exec_module(mod)
    return mod


seq_train = _load_example()
from seq_data import SequenceData  # noqa: E402  (on sys.path through the example)


@dataclass(frozen=True)
class Variant:
    """One way of storing and training the item table, and the example's flags for it."""

    name: str
    bits: int
    flags: tuple[str, ...]


REFERENCE = "fp32 (TorchRec EC)"
VARIANTS = [
    Variant(REFERENCE, 32, ("--precision", "fp32", "--collection", "torchrec")),
    Variant("fp32 (ours, bits=32)", 32, ("--precision", "fp32")),
    Variant("fp16 (ours)", 16, ("--precision", "fp16")),
    Variant("int8 (ours)", 8, ("--precision", "int8")),
    Variant("int4 (ours)", 4, ("--precision", "int4")),
    Variant("int2 (ours)", 2, ("--precision", "int2")),
]


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def _paired(xs: list[float], ref: list[float]) -> str:
    d = [x - r for x, r in zip(xs, ref)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return f"{statistics.fmean(d):+.4f} ± {sd:.4f} ({min(d):+.4f}..{max(d):+.4f})"


def table(runs: dict[str, list[dict]]) -> list[str]:
    """The markdown rows: one per variant."""
    ref = runs[REFERENCE]
    lines = [
        "| variant | bits | val AUC | val vs fp32 (paired) | test AUC | test vs fp32 (paired) | test gap to Bayes "
        "| table state | vs fp32 | train examples/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        rs = runs.get(v.name)
        if not rs:
            continue
        val, test = [r["val"]["auc"] for r in rs], [r["test"]["auc"] for r in rs]
        paired_val = _paired(val, [r["val"]["auc"] for r in ref]) if v.name != REFERENCE else "—"
        paired_test = _paired(test, [r["test"]["auc"] for r in ref]) if v.name != REFERENCE else "—"
        gap = statistics.fmean(r["bayes"]["test"]["auc"] - r["test"]["auc"] for r in rs)
        b = rs[0]["table_bytes"]
        lines.append(
            f"| {v.name} | {v.bits} | {_mean_sd(val)} | {paired_val} | {_mean_sd(test)} | {paired_test} | "
            f"{gap:.4f} | {b['ours'] / 2**20:.2f} MiB | {b['ratio']:.3f}x | "
            f"{statistics.fmean(r['train']['examples_per_s'] for r in rs):,.0f} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="all", help="comma-separated names (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--example-flags", default="", help="extra flags for train.py (data size, lr, ...)")
    ap.add_argument("--write", help="replace the 'sequence_accuracy' section of this markdown file")
    args = ap.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [v for v in VARIANTS if args.variants == "all" or v.name in args.variants.split(",")]
    if REFERENCE not in [v.name for v in wanted]:
        wanted.insert(0, VARIANTS[0])  # everything is paired to it
    base = [*args.example_flags.split(), "--threads", str(args.threads), "--quiet"]
    data = SequenceData(seq_train.data_spec(seq_train.parse_args(base)))
    stat0, t0 = cpu_stat(), time.perf_counter()
    runs: dict[str, list[dict]] = {}
    for seed in seeds:  # seed-major: a slow drift of the machine hits every variant alike
        for v in wanted:
            t = time.perf_counter()
            s = seq_train.train(seq_train.parse_args([*base, *v.flags, "--seed", str(seed)]), data)
            runs.setdefault(v.name, []).append(s)
            print(
                f"{v.name:>22} seed {seed}: val AUC {s['val']['auc']:.4f} test AUC {s['test']['auc']:.4f} "
                f"({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t0
    d = data.describe()
    bayes = data.bayes("val")["auc"], data.bayes("test")["auc"]
    ex = seq_train.parse_args(base)
    lines = [
        *machine_info(args.threads),
        f"Contention: {contention(stat0, cpu_stat())}; the runs took {wall / 60:.1f} min. The machine was "
        "shared with other work, so examples/s are indicative only.",
        "",
        f"**Data** (`examples/sequence/seq_data.py`, data seed {ex.data_seed}): {d['num_items']:,} items, "
        f"histories of 1..{d['hist_max']} items (mean {d['mean_hist_len']:.1f}) drawn from Zipf({d['zipf']}) "
        f"popularity; the true click logit is {d['scale']} x <recency-weighted mean of the history's latent "
        f"vectors (decay {d['decay']}), target's latent vector> + target bias (sd {d['bias_sd']}) "
        f"{d['offset']:+}; {d['train_rows']:,} training rows x {ex.epochs} epoch(s), {d['val_rows']:,} validation "
        f"and {d['test_rows']:,} test rows, CTR {d['train_ctr']:.3f}. **Ceiling** (AUC of the true "
        f"probabilities, Bayes-optimal): validation {bayes[0]:.4f}, test {bayes[1]:.4f}.",
        "",
        f"**Model**: one item table (dim {ex.embedding_dim}) read by the `history` and `target` features of "
        f"an `EmbeddingCollection`; {ex.pooling} pooling of the history by the target (learned query map + "
        f"recency bias), MLP {ex.mlp} over [u, t, u*t]; batch {ex.batch_size}. The table trains with "
        f"RowWiseAdagrad (lr {ex.emb_lr:g}, eps 1e-8) applied in the backward; Adam {ex.dense_lr:g} on the "
        f"rest. **Reference**: {REFERENCE} = TorchRec's unsharded `torchrec.EmbeddingCollection` with "
        "`torchrec.optim.RowWiseAdagrad` through `_apply_optimizer_in_backward` (dense gradient of the "
        "table). *ours* = `LowPrecisionEmbeddingCollection` (fused update; int8/4/2: ALPT with learned "
        "per-row step sizes and stochastic rounding, the library's defaults). Every run of one seed starts "
        "from the same TorchRec init of the table.",
        "",
        f"Seeds {', '.join(map(str, seeds))}. AUC: mean ± sample std over seeds. *vs fp32 (paired)*: the "
        "per-seed difference to the reference run of the same seed, mean ± std (min..max). Table state: "
        "rows (codes + fp16 step size and bias) + fp32 master step sizes + optimizer state, against fp32 "
        "rows + RowWiseAdagrad's one fp32 per row.",
        "",
        *table(runs),
    ]
    publish(
        args.write,
        "sequence_accuracy",
        "Accuracy: LowPrecisionEmbeddingCollection on the sequence example (fp32 / fp16 / int8 / int4 / int2)",
        "benchmarks/sequence_accuracy.py",
        [shlex.quote(a) for a in argv_used if not a.endswith(".md") and a != "--write"],
        lines,
    )


if __name__ == "__main__":
    main()

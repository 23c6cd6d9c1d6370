"""Accuracy of low-precision tables: fp32, fp16, LPT-DR, LPT-SR and ALPT at 8/4/2 bits.

Trains the DLRM example (``examples/dlrm/train.py``, in this process) once per variant and
seed on one synthetic data set with a known Bayes ceiling (and on the Criteo sample when
``--criteo`` is given), then reports the mean and spread over seeds of test AUC and log-loss,
the gap to the Bayes AUC, and embedding bytes, and writes the "accuracy" section of
docs/benchmarks.md::

    python benchmarks/accuracy.py --criteo ../shared/data/criteo_kaggle_sample_10k.tsv --write docs/benchmarks.md

The seed changes the model's init and the rounding draws; the data set is the same for every
run, so variants are compared on the same rows. Finished runs are appended to ``--results``
(JSON lines) and reused when the same command runs again, so an interrupted run continues.
New variants (mixed precision, compression) are one ``register_variant`` call. LPT-DR,
LPT-SR and ALPT are the papers' (a row that leaves its grid is clipped); "+grow" rows use the
library's default, which grows that row's step size instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "dlrm"))
sys.path.insert(0, HERE)

import dlrm_data  # noqa: E402
import train as dlrm_train  # noqa: E402
from dlrm_model import Env  # noqa: E402
from report import ResultCache, describe_code, machine_info, write_section  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One way of storing and training the tables: a name and the train.py flags it means."""

    name: str
    family: str  # fp32, fp16, LPT-DR, LPT-SR, ALPT (or a later method's name)
    bits: int
    flags: tuple[str, ...] = field(default=())


VARIANTS: list[Variant] = []


def register_variant(v: Variant) -> None:
    """Add a variant to the harness (e.g. ``Variant("mpe-4", "MPE", 4, ("--precision", "mpe"))``)."""
    if any(x.name == v.name for x in VARIANTS):
        raise ValueError(f"variant {v.name!r} is already registered")
    VARIANTS.append(v)


register_variant(Variant("fp32", "fp32", 32, ("--precision", "fp32")))
register_variant(Variant("fp16", "fp16", 16, ("--precision", "fp16", "--rounding", "stochastic")))
for _bits in (8, 4, 2):
    _p = ("--precision", f"int{_bits}")
    # The papers' variants clip a row that leaves its grid; the library's default grows the
    # row's step instead ("+grow" rows), which changes LPT and ALPT alike.
    _clip, _grow = ("--no-grow-step-size",), ("--grow-step-size",)
    _dr, _sr = ("--rounding", "nearest"), ("--rounding", "stochastic")
    _fixed, _learned = ("--no-learn-step-size",), ("--learn-step-size",)
    register_variant(Variant(f"lpt-dr-{_bits}", "LPT-DR", _bits, (*_p, *_dr, *_fixed, *_clip)))
    register_variant(Variant(f"lpt-sr-{_bits}", "LPT-SR", _bits, (*_p, *_sr, *_fixed, *_clip)))
    register_variant(Variant(f"alpt-{_bits}", "ALPT", _bits, (*_p, *_sr, *_learned, *_clip)))
    register_variant(Variant(f"lpt-sr-grow-{_bits}", "LPT-SR +grow", _bits, (*_p, *_sr, *_fixed, *_grow)))
    register_variant(Variant(f"alpt-grow-{_bits}", "ALPT +grow", _bits, (*_p, *_sr, *_learned, *_grow)))


def dataset_flags(args: argparse.Namespace) -> dict[str, list[str]]:
    """Data set name -> the train.py flags that select it and its training settings."""
    out = {
        "synthetic": [
            "--data", "synthetic", "--vocab-sizes", args.vocab_sizes, "--zipf", str(args.zipf),
            "--num-dense", str(args.num_dense), "--train-rows", str(args.train_rows), "--val-rows", "0",
            "--test-rows", str(args.test_rows), "--batch-size", str(args.batch_size),
            "--epochs", str(args.epochs), "--embedding-dim", str(args.dim), "--emb-lr", f"{args.emb_lr:g}",
        ]
    }  # fmt: skip
    if args.criteo:
        out["criteo-sample"] = [
            "--data", f"criteo:{args.criteo}", "--batch-size", str(args.criteo_batch_size),
            "--epochs", str(args.criteo_epochs), "--embedding-dim", str(args.dim),
            "--min-count", str(args.criteo_min_count),
        ]  # fmt: skip
    return out


class RunCache(ResultCache):
    """:class:`report.ResultCache` of DLRM runs (``run_one``) keyed by data set and flags."""

    def __init__(self, path: str, threads: int) -> None:
        super().__init__(path)
        self.threads = threads

    def get(self, dataset: str, name: str, seed: int, flags: list[str], data: dlrm_data.DataSource) -> dict:
        key = self.key([dataset, list(flags)])
        if key not in self.done:
            self._load()
        fresh = key not in self.done
        r = super().get([dataset, list(flags)], lambda: run_one(dataset, flags, data, self.threads),
                        dataset=dataset, variant=name, seed=seed)  # fmt: skip
        if fresh:
            print(
                f"{dataset:>14} {name:>12} seed {seed}: AUC {r['auc']:.4f} (val {r['val_auc']:.4f}) "
                f"log-loss {r['logloss']:.4f} ({r['seconds']:.0f} s)",
                flush=True,
            )
        return r


def run_one(dataset: str, flags: list[str], data: dlrm_data.DataSource, threads: int) -> dict:
    """Train and evaluate one model; the numbers the report needs."""
    args = dlrm_train.parse_args([*flags, "--no-progress", "--quiet", "--threads", str(threads)])
    s = dlrm_train.train(args, Env(), data)
    bayes = s["bayes"]["test"] if s["bayes"] else None
    return {
        "val_auc": s["val"]["auc"],
        "val_logloss": s["val"]["logloss"],
        "auc": s["test"]["auc"],
        "logloss": s["test"]["logloss"],
        "test_rows": s["test"]["rows"],
        "bayes_auc": bayes["auc"] if bayes else None,
        "bayes_logloss": bayes["logloss"] if bayes else None,
        "bytes": s["embedding_bytes"]["ours"],
        "fp32_bytes": s["embedding_bytes"]["fp32_rowwise_adagrad"],
        "examples_per_s": s["train"]["examples_per_s"],
        "train_rows": s["train"]["rows"],
        "steps": s["train"]["steps"],
    }


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(rows: dict[str, list[dict]], a: str, b: str, metric: str = "auc") -> tuple[float, float] | None:
    """Mean and standard error of ``a - b`` over the seeds both ran (runs of one seed share the
    init of the dense part and the float tables, so the per-seed difference is much less noisy
    than either mean)."""
    ra, rb = rows.get(a), rows.get(b)
    if not ra or not rb:
        return None
    d = [x[metric] - y[metric] for x, y in zip(ra, rb)]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return statistics.fmean(d), se


def table(dataset: str, rows: dict[str, list[dict]]) -> str:
    """Markdown table of one data set: mean ± sample std over seeds; the difference to fp32 is
    per seed (paired), mean ± its standard error."""
    has_bayes = any(r["bayes_auc"] is not None for rs in rows.values() for r in rs)
    head = "| variant | bits | test AUC | vs fp32 (paired) | "
    head += "gap to Bayes | " if has_bayes else ""
    head += "log-loss | embedding bytes | vs fp32 | examples/s |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (head.count("|") - 3)]
    for v in VARIANTS:
        rs = rows.get(v.name)
        if not rs:
            continue
        auc, auc_sd = _mean_sd([r["auc"] for r in rs])
        ll, ll_sd = _mean_sd([r["logloss"] for r in rs])
        line = f"| {v.family} | {v.bits} | {auc:.4f} ± {auc_sd:.4f} | "
        d = paired(rows, v.name, "fp32") if v.name != "fp32" else None
        line += f"{d[0]:+.4f} ± {d[1]:.4f} | " if d else "| "
        if has_bayes:
            line += f"{statistics.fmean(r['bayes_auc'] - r['auc'] for r in rs):.4f} | "
        r0 = rs[0]
        line += (
            f"{ll:.4f} ± {ll_sd:.4f} | {r0['bytes'] / 2**20:.1f} MiB | {r0['bytes'] / r0['fp32_bytes']:.3f}x | "
            f"{statistics.fmean(r['examples_per_s'] for r in rs):,.0f} |"
        )
        lines.append(line)
    return "\n".join(lines)


def _better(d: tuple[float, float]) -> str:
    mean, se = d
    if mean - 2 * se > 0:
        return "holds"
    if mean + 2 * se < 0:
        return "does not hold (worse)"
    return "not resolved (within 2 standard errors of 0)"


def verdicts(rows: dict[str, list[dict]]) -> list[str]:
    """The papers' claims, checked on paired per-seed AUC differences (mean ± standard error)."""
    out = []
    for name, label in (("alpt-8", "int8 ALPT (the paper's, clipping)"), ("alpt-grow-8", "int8 ALPT +grow (the library's default)")):  # fmt: skip
        d = paired(rows, name, "fp32")
        if not d:
            continue
        ok = d[0] >= -0.0005
        out.append(
            f"{label} − fp32: {d[0]:+.4f} ± {d[1]:.4f} AUC (claim: loses at most 0.0005) — "
            + ("holds" if ok else "does not hold")
            + (
                f" on the mean only: its standard error (±{d[1]:.4f}) is larger than its margin"
                if ok and d[0] - 2 * d[1] < -0.0005
                else ""
            )
            + "."
        )
    for bits in (4, 2):
        d = paired(rows, f"lpt-sr-{bits}", f"lpt-dr-{bits}")
        if d:
            out.append(
                f"{bits}-bit LPT-SR − LPT-DR (stochastic vs nearest rounding): {d[0]:+.4f} ± {d[1]:.4f} AUC "
                f"(claim: SR better) — {_better(d)}."
            )
        d = paired(rows, f"alpt-{bits}", f"lpt-sr-{bits}")
        if d:
            out.append(
                f"{bits}-bit ALPT − LPT-SR: {d[0]:+.4f} ± {d[1]:.4f} AUC (claim: ALPT better) — {_better(d)}."
            )
    for bits in (8, 4, 2):
        g = paired(rows, f"alpt-grow-{bits}", f"alpt-{bits}")
        a = paired(rows, f"alpt-grow-{bits}", f"lpt-sr-grow-{bits}")
        if g and a:
            out.append(
                f"{bits}-bit step growth (the library's default): ALPT +grow − ALPT {g[0]:+.4f} ± {g[1]:.4f}; "
                f"ALPT +grow − LPT-SR +grow {a[0]:+.4f} ± {a[1]:.4f} AUC."
            )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=3_000_000)
    ap.add_argument("--test-rows", type=int, default=300_000)
    ap.add_argument(
        "--vocab-sizes", default="1000000,300000,100000,30000,10000,1000,100,10", help="synthetic fields"
    )
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--num-dense", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument(
        "--emb-lr", type=float, default=0.4, help="RowWiseAdagrad lr of the synthetic set's tables"
    )
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared machine OpenMP spin-waits make 2 threads up to 10x slower)",
    )
    ap.add_argument("--variants", default="all", help="comma-separated names (default: every registered one)")
    ap.add_argument("--criteo", help="Criteo TSV (e.g. ../shared/data/criteo_kaggle_sample_10k.tsv)")
    ap.add_argument("--criteo-batch-size", type=int, default=256)
    ap.add_argument("--criteo-epochs", type=int, default=1)
    ap.add_argument("--criteo-min-count", type=int, default=3, help="rarer values share the OOV row")
    ap.add_argument("--results", default="runs/accuracy.jsonl", help="finished runs (reused on a rerun)")
    ap.add_argument("--write", help="write the 'accuracy' section of this markdown file")
    args = ap.parse_args(argv)
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    wanted = [v for v in VARIANTS if args.variants == "all" or v.name in args.variants.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    cache = RunCache(args.results, args.threads)
    t_start = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {}
    for dataset, dflags in dataset_flags(args).items():
        data = dlrm_data.open_data(dlrm_train.parse_args(dflags), cache=True)
        results[dataset] = {}
        for v in wanted:
            for seed in seeds:
                flags = [*dflags, *v.flags, "--seed", str(seed)]
                results[dataset].setdefault(v.name, []).append(cache.get(dataset, v.name, seed, flags, data))
        del data
    wall = time.perf_counter() - t_start
    run_seconds = sum(r.get("seconds", 0.0) for rows in results.values() for rs in rows.values() for r in rs)

    all_runs = [r for rows in results.values() for rs in rows.values() for r in rs]
    parts = [
        f"Command: `{command}` ({len(seeds)} seeds x {len(wanted)} variants per data set; the runs took "
        f"{run_seconds / 60:.1f} min in all, this invocation {wall / 60:.1f} min (runs found in "
        f"`{args.results}` are reused), on {os.cpu_count()} CPU cores shared with other work, "
        f"{args.threads} torch thread(s)). Code (runs are cached by a hash of the library and example sources, "
        f"so every row below comes from the code named here): "
        f"{describe_code(all_runs)}. Test AUC and log-loss: mean ± sample standard deviation over seeds "
        f"{', '.join(map(str, seeds))} (the seed sets the model init and the rounding draws; the "
        "data are fixed). *vs fp32 (paired)*: the per-seed difference to the fp32 run of the same seed, "
        "mean ± its standard error — runs of one seed start from the same weights, so this is far less "
        "noisy than the spread of either. Embedding bytes: ours (`memory_bytes()`: codes, fp16 "
        "scales, fp32 master step sizes, RowWiseAdagrad state) against FP32 rows + RowWiseAdagrad. "
        "Examples/s: training only, one process; indicative only (the machine was shared).",
        "",
        machine_info(args.threads)[0],
    ]
    for dataset, rows in results.items():
        if dataset == "synthetic":
            desc = (
                f"**Synthetic** (planted model, known Bayes AUC): {len(args.vocab_sizes.split(','))} fields "
                f"with Zipf({args.zipf}) ids over vocabularies {args.vocab_sizes}, {args.num_dense} dense, "
                f"{args.train_rows:,} training rows x {args.epochs} epoch(s), {args.test_rows:,} test rows; "
                f"DLRM dim {args.dim}, batch {args.batch_size}, RowWiseAdagrad lr {args.emb_lr:g} on the tables, Adam 2e-3 dense."
            )
        else:
            r0 = next(iter(rows.values()))[0]
            desc = (
                f"**Criteo sample** (`{os.path.basename(args.criteo)}`: random 8:1:1 split, {r0['train_rows']:,} "
                f"training rows x {args.criteo_epochs} epoch(s), {r0['test_rows']:,} test rows, values seen < "
                f"{args.criteo_min_count} times in the training rows share one OOV row): batch {args.criteo_batch_size}; AUC differences below ~0.01 are noise at this size."
            )
        parts += ["", desc, "", table(dataset, rows)]
        v = verdicts(rows)
        if v:
            parts += [""] + [f"- {line}" for line in v]
    md = "\n".join(parts)
    print("\n" + md)
    if args.write:
        write_section(
            args.write, "accuracy", "Accuracy: fp32, fp16, LPT-DR, LPT-SR, ALPT at 8/4/2 bits (DLRM)", md
        )


if __name__ == "__main__":
    main()

"""AUC against embedding bytes: one picture of what each storage format costs and keeps.

Reads the cached runs of the other benchmarks (``runs/*.jsonl``; only runs made by the current
library sources, see ``report.ResultCache``) and draws, per benchmark data set, the test AUC
difference to fp32 (paired per seed, mean ± standard error as error bars) against the tables'
serving bytes relative to fp32 (log scale):

- the low-bit benchmark (``benchmarks/lowbit.py``'s synthetic set): fp32, fp16, int8 / int4 /
  int2 ALPT and the hot-rows-at-8-bits tables, and the same-bytes recipes of
  ``benchmarks/lowbit_recipes.py`` that are in the cache (fixed step, hottest rows wider: drawn as
  squares; fp16 and the Criteo sample runs are made here if missing: a few runs);
- the MPE benchmark (``benchmarks/mpe.py``): int8 / int4 ALPT and MPE at each lambda;
- the compression benchmark (``benchmarks/compression.py``): int8 / int4 ALPT and MEC at each
  L x K;
- the Criteo sample when ``--criteo`` names it (optional).

It is descriptive: every setting's test AUC is drawn; the benchmarks' own sections say which
setting validation chose. Writes ``docs/frontier.png`` and the "frontier" section (the plotted
points as a table)::

    python benchmarks/frontier.py --criteo /work/shared/data/criteo_kaggle_sample_10k.tsv \\
        --png docs/frontier.png --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import accuracy  # noqa: E402  (puts examples/dlrm on the path)
import dlrm_data  # noqa: E402
import lowbit  # noqa: E402
import train as dlrm_train  # noqa: E402
from report import code_version, describe_code, machine_info, write_section  # noqa: E402

#: The Criteo sample's settings: the uniform widths and lowbit_recipes.py's chosen same-bytes
#: recipes (and their fixed step at int8), as the DLRM example's flags build them.
CRITEO_VARIANTS = (
    *((p, ("--precision", p)) for p in ("fp32", "fp16", "int8", "int4", "int2")),
    ("int8 fixed step dithered", ("--precision", "int8", "--no-learn-step-size", "--rounding", "dithered")),
    ("int4 fixed step hot 60% at 8b", ("--precision", "int4", "--no-learn-step-size", "--hot-rows", "0.6:8")),
    ("int2 fixed step hot 20% at 8b + 50% at 4b dithered",
     ("--precision", "int2", "--no-learn-step-size", "--rounding", "dithered", "--hot-rows", "0.2:8,0.5:4")),
)  # fmt: skip
Point = tuple[str, float, float, float, int, list[dict]]  # label, bytes ratio, mean diff, se, seeds, runs


def _records(path: str, code_hash: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["result"].get("code", {}).get("hash") == code_hash:
                out.append(rec)
    return out


def _paired(by_seed: dict[str, dict[int, float]], name: str) -> tuple[float, float, int] | None:
    seeds = sorted(set(by_seed.get(name, {})) & set(by_seed.get("fp32", {})))
    if not seeds:
        return None
    d = [by_seed[name][s] - by_seed["fp32"][s] for s in seeds]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
    return statistics.fmean(d), se, len(d)


def _serving_ratio(flags: list[str], tables: dict[str, tuple[int, int]]) -> float:
    """Serving bytes of the tables a train.py run stored, relative to fp32 (plans, from a file or
    ``--hot-rows``: their groups plus the 4 B/row id map of grouped tables)."""
    return lowbit.serving_bytes(flags, tables, id_maps=True) / sum(r * d * 4 for r, d in tables.values())


def _frontier_variant(name: str) -> bool:
    """The low-bit benchmark's storage formats and the recipes' hot-row tables (the training-recipe
    ablations at a uniform width stay in their sections)."""
    return (
        name in ("fp32", "fp16", "int8", "int4", "int2")
        or name.endswith(" default")
        or " hot " in name
        or _is_recipe(name)
    )


def _is_recipe(name: str) -> bool:
    """A ``lowbit_recipes.py`` same-bytes recipe: fixed step, its master-step bytes spent on hot rows."""
    return "fixed step" in name


def training_ratio(runs: list[dict]) -> float | None:
    """Mean training-state bytes / fp32's of a point's runs (``bytes`` / ``fp32_bytes`` of a
    train.py run: codes, scales, master steps, optimizer state, id maps), None where a benchmark
    does not record them."""
    r = [x["bytes"] / x["fp32_bytes"] for x in runs if "bytes" in x and "fp32_bytes" in x]
    return statistics.fmean(r) if len(r) == len(runs) and r else None


def train_py_points(recs: list[dict], dataset: str, tables: dict[str, tuple[int, int]]) -> list[Point]:
    by_seed: dict[str, dict[int, float]] = {}
    flags_of: dict[str, list[str]] = {}
    runs: dict[str, list[dict]] = {}
    for r in recs:
        if r["dataset"] == dataset and _frontier_variant(r["variant"]):
            by_seed.setdefault(r["variant"], {})[r["seed"]] = r["result"]["auc"]
            flags_of[r["variant"]] = r["flags"] if "flags" in r else r["parts"][1]
            runs.setdefault(r["variant"], []).append(r["result"])
    out = []
    for name in by_seed:
        p = _paired(by_seed, name) if name != "fp32" else (0.0, 0.0, len(by_seed[name]))
        if p:
            out.append((name, _serving_ratio(flags_of[name], tables), *p, runs[name]))
    return out


def mpe_points(recs: list[dict], dim: int = 32) -> list[Point]:
    import mpe  # noqa: PLC0415

    fp32 = sum(v * dim * 4 for v in mpe.VOCABS)
    setups = [json.dumps(r["parts"][0]) for r in recs]
    if setups:  # one benchmark setting (rows, dims, ...): the one with the most runs
        common = max(set(setups), key=setups.count)
        recs = [r for r, s in zip(recs, setups) if s == common]
    by_seed: dict[str, dict[int, float]] = {}
    serve: dict[str, list[float]] = {}
    runs: dict[str, list[dict]] = {}
    for r in recs:
        res = r["result"]
        by_seed.setdefault(res["name"], {})[r["seed"]] = res["auc"]
        serve.setdefault(res["name"], []).append(res["serve"] / fp32)
        runs.setdefault(res["name"], []).append(res)
    out = []
    for name in by_seed:
        p = _paired(by_seed, name) if name != "fp32" else (0.0, 0.0, len(by_seed[name]))
        if p:
            out.append((name, statistics.fmean(serve[name]), *p, runs[name]))
    return out


def compression_points(recs: list[dict]) -> list[Point]:
    by_seed: dict[str, dict[int, float]] = {}
    ratio: dict[str, float] = {}
    runs: dict[str, list[dict]] = {}
    for r in recs:
        res = r["result"]
        for method, setting, _val, test, nbytes, _note in res["rows"]:
            name = "fp32" if method == "fp32" else f"{method} {setting}".replace(" -", "")
            by_seed.setdefault(name, {})[r["seed"]] = test
            ratio[name] = nbytes / res["fp32_bytes"]
            runs.setdefault(name, []).append(res)
    out = []
    for name in by_seed:
        p = _paired(by_seed, name) if name != "fp32" else (0.0, 0.0, len(by_seed[name]))
        if p:
            out.append((name, ratio[name], *p, runs[name]))
    return out


def plot(panels: dict[str, list[Point]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: v for k, v in panels.items() if v}
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    colors = {"fp": "k", "int": "C0", "hot": "C2", "MPE": "C1", "MEC": "C3", "ALPT": "C0"}
    for ax, (title, pts) in zip(axes.flat, panels.items()):
        for name, x, y, se, _n, _r in sorted(pts, key=lambda p: p[1]):
            c = next((v for k, v in colors.items() if k in name), "C4")
            if "hot" in name:
                c = colors["hot"]
            fmt = "o"
            if _is_recipe(name):
                c, fmt = "C5", "s"
            ax.errorbar(x, y, yerr=se, fmt=fmt, color=c, ms=4, capsize=2)
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("serving bytes of the tables / fp32 (log)")
        ax.set_ylabel("test AUC - fp32 (paired, ± s.e. over seeds)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="runs/accuracy.jsonl", help="accuracy.py / lowbit.py run cache")
    ap.add_argument("--mpe-results", default="runs/mpe.jsonl")
    ap.add_argument("--compression-results", default="runs/compression.jsonl")
    ap.add_argument("--criteo", help="the Criteo sample TSV (optional)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-run", action="store_true", help="only plot cached runs (no fp16 / Criteo runs)")
    ap.add_argument("--png", default="docs/frontier.png")
    ap.add_argument("--write", help="write the 'frontier' section of this markdown file")
    args = ap.parse_args(argv)
    command = "python benchmarks/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    code = code_version()
    seeds = [int(s) for s in args.seeds.split(",")]
    lb = lowbit.main_args([])
    dflags = lowbit.data_flags(lb)
    data = dlrm_data.open_data(dlrm_train.parse_args(dflags), cache=True)
    lb_tables = {t.name: (t.num_embeddings, t.embedding_dim) for t in data.embedding_bag_configs(lb.dim)}
    if not args.no_run:
        cache = accuracy.RunCache(args.results, 1)
        for seed in seeds:
            cache.get(
                "synthetic-val", "fp16", seed, [*dflags, "--precision", "fp16", "--seed", str(seed)], data
            )
    del data
    crit_tables: dict[str, tuple[int, int]] = {}
    if args.criteo and os.path.exists(args.criteo):
        cflags = ["--data", f"criteo:{args.criteo}", "--batch-size", "256", "--epochs", "1",
                  "--embedding-dim", "16", "--min-count", "3"]  # fmt: skip
        cdata = dlrm_data.open_data(dlrm_train.parse_args(cflags), cache=True)
        crit_tables = {t.name: (t.num_embeddings, t.embedding_dim) for t in cdata.embedding_bag_configs(16)}
        if not args.no_run:
            cache = accuracy.RunCache(args.results, 1)
            for name, vflags in CRITEO_VARIANTS:
                for seed in seeds:
                    cache.get("criteo-frontier", name, seed, [*cflags, *vflags, "--seed", str(seed)], cdata)
    acc = _records(args.results, code["hash"])
    panels = {
        "synthetic (low-bit benchmark): fp16, ALPT, hot rows wider, same-bytes recipes": train_py_points(
            acc, "synthetic-val", lb_tables
        ),
        "synthetic (MPE benchmark): MPE at several lambda and byte budgets": mpe_points(
            _records(args.mpe_results, code["hash"])
        ),
        "synthetic (compression benchmark): MEC at L x K": compression_points(
            _records(args.compression_results, code["hash"])
        ),
    }
    if crit_tables:
        panels["Criteo sample (8k train rows; noise ~0.01)"] = train_py_points(
            acc, "criteo-frontier", crit_tables
        )
    # a panel needs its method's points (fp32 and the uniform baselines alone say nothing new)
    need = {"MPE benchmark": "MPE", "compression benchmark": "MEC"}
    panels = {
        k: v
        for k, v in panels.items()
        if len(v) > 1 and all(m in {p[0].split()[0] for p in v} for key, m in need.items() if key in k)
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(panels, args.png)
    lines = [
        f"Command: `{command}`. Drawn from the cached runs of `benchmarks/lowbit.py`, `benchmarks/lowbit_recipes.py`, "
        "`benchmarks/mpe.py` and `benchmarks/compression.py` (their sections give each data set and model) made "
        "by the current sources; every storage setting's test AUC is drawn (descriptive: the benchmarks' sections "
        "say which setting validation chose; the training-recipe ablations at a uniform width are in their own "
        "sections). Squares: the fixed-step recipes, whose master-step bytes pay for the wider hot rows, so their "
        "training-state bytes (last column) stay near their width's default while their serving bytes grow. "
        f"Code: {describe_code([r for pts in panels.values() for p in pts for r in p[5]])}.",
        "",
        *machine_info(1),
        "(The run cache is this machine's: the runs were made here.)",
        "",
        f"![AUC vs bytes]({os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.write or 'docs/x')))})",
        "",
        "| data set | storage | serving bytes / fp32 | test AUC - fp32 (paired) | seeds | training-state bytes / fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for title, pts in panels.items():
        for name, x, y, se, n, runs in sorted(pts, key=lambda p: -p[1]):
            t = training_ratio(runs)
            lines.append(
                f"| {title.split(':')[0]} | {name} | {x:.3f} | {y:+.4f} ± {se:.4f} | {n} | "
                f"{'' if t is None else f'{t:.3f}'} |"
            )
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(args.write, "frontier", "AUC against bytes (frontier)", md)


if __name__ == "__main__":
    main()

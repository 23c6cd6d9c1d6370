"""Training from a Criteo-format TSV file vs from in-memory synthetic data of the same shape.

Writes a Criteo-format TSV (label, 13 integers, 26 categorical tokens) of ``--rows`` rows drawn
from :class:`SyntheticCTR` into a temporary folder, then runs ``--repeats`` fresh processes;
each trains the example's DLRM (``--precision``, default int8) twice, in alternating order:

* ``memory``: the synthetic rows, generated before the clock starts and kept in memory
  (``--train-rows`` = the file's training split, same 26 vocabularies, 13 dense inputs);
* ``file``: ``--data criteo:FILE --data-cache off`` (vocabulary pass before the clock starts;
  parsing, id lookup and batching during training, in the data-loader process that
  ``--prefetch-mode auto`` forks for text files, or on a thread with ``--prefetch-mode thread``);
* ``file (cached)``: ``--data criteo:FILE --data-cache DIR``, a later run: the binary cache that
  the first open converted (once, before the processes start; its time is reported) is
  memory-mapped and batches are sliced from it on a prefetch thread.

The processes run twice: on the quiet machine and with ``--load`` busy processes (a pure-Python
``while True`` loop each) competing for the cores.

It reports examples/s of the training loop (``train.examples_per_s`` of the summary) per
variant and the ratios file / memory and cached / memory per process (median, min-max), with the CPU, the load
average before and after, and writes the ``file_loading`` section of ``--write``.

    python benchmarks/file_loading.py --rows 500000 --repeats 3 --write docs/benchmarks.md
    python benchmarks/file_loading.py --file ../shared/data/criteo_kaggle_sample_10k.tsv --rows 10000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "dlrm"))
sys.path.insert(0, HERE)

from report import machine_info, publish  # noqa: E402

# Criteo Kaggle-like cardinalities, capped so a 1M-row file's tables fit a laptop.
VOCABS = (200_000, 50_000, 20_000, 10_000, 5_000, 2_000, 1_000, 500) * 3 + (100, 10)


def write_criteo_file(path: str, rows: int, seed: int = 0) -> None:
    """``rows`` Criteo-format lines from SyntheticCTR (ids as decimal tokens, dense as integers)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from torchrec_lowprec.data import SyntheticCTR, SyntheticCTRConfig

    cfg = SyntheticCTRConfig(
        vocab_sizes=VOCABS, num_dense=13, train_rows=rows, val_rows=0, test_rows=0, seed=seed
    )
    data = SyntheticCTR(cfg)
    with pcsv.CSVWriter(path, _schema(), write_options=_write_options()) as w:
        for k in range(data.num_chunks("train")):
            block, _ = data.chunk("train", k)
            cols = [pa.array(block.labels.astype(np.int64))]
            cols += [
                pa.array(np.floor(np.exp(np.abs(block.dense[:, j])) * 3).astype(np.int64)) for j in range(13)
            ]
            cols += [pa.array(v.astype(np.int64)).cast(pa.string()) for v in block.values]
            w.write_table(pa.Table.from_arrays(cols, schema=_schema()))


def _schema():
    import pyarrow as pa

    return pa.schema(
        [("label", pa.int64())]
        + [(f"i{j}", pa.int64()) for j in range(13)]
        + [(f"c{j}", pa.string()) for j in range(26)]
    )


def _write_options():
    import pyarrow.csv as pcsv

    return pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def child(args: argparse.Namespace) -> dict:
    """One fresh process: warm up, then memory and file in the order ``args.order``."""
    import dlrm_data
    import torch
    import train as dlrm_train
    from dlrm_model import Env

    torch.set_num_threads(args.threads)
    common = ["--precision", args.precision, "--batch-size", str(args.batch_size), "--embedding-dim", "16",
              "--no-progress", "--quiet", "--threads", str(args.threads), "--parse-threads", str(args.parse_threads),
              "--prefetch", str(args.prefetch),
              "--prefetch-mode", args.prefetch_mode]  # fmt: skip
    # The native update kernel is built (or loaded) here, outside both measurements.
    warm = dlrm_train.parse_args(
        [*common, "--vocab-sizes", "100,10", "--train-rows", "4096", "--max-steps", "3"]
    )
    dlrm_train.train(warm, Env(), dlrm_data.open_data(warm))
    out: dict = {}
    for variant in args.order.split(","):
        if variant == "memory":
            flags = [*common, "--vocab-sizes", ",".join(map(str, VOCABS)), "--num-dense", "13",
                     "--train-rows", str(args.train_rows), "--val-rows", "0", "--test-rows", "1"]  # fmt: skip
        elif variant == "file":
            flags = [*common, "--data", f"criteo:{args.file}", "--data-cache", "off"]
        else:  # cached: the cache main() built
            flags = [*common, "--data", f"criteo:{args.file}", "--data-cache", args.cache_dir]
        a = dlrm_train.parse_args(flags)
        data = dlrm_data.open_data(a, cache=True)
        if variant == "memory":  # generate every chunk now: the clock measures training only
            for _ in data.blocks("train"):
                pass
        t0, n = time.perf_counter(), 0
        for lb in data.train_batches(args.batch_size, 0, 1):  # the input pipeline alone, no model
            n += lb.valid
        alone = n / (time.perf_counter() - t0)
        s = dlrm_train.train(a, Env(), data)
        out[variant] = {
            "examples_per_s": s["train"]["examples_per_s"],
            "rows": s["train"]["rows"],
            "alone": alone,
        }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated file")
    ap.add_argument("--file", help="use this Criteo TSV instead of generating one")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes (>= 3 for a spread)")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (as benchmarks/accuracy.py)")
    ap.add_argument("--parse-threads", type=int, default=0, help="CSV parser threads (0: cores, at most 4)")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--prefetch-mode", default="auto", choices=["auto", "process", "thread"])
    ap.add_argument(
        "--load", type=int, default=1, help="busy processes of the loaded runs (0: no loaded runs)"
    )
    ap.add_argument("--write", help="write the 'file_loading' section of this markdown file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--order", default="memory,file,cached", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--train-rows", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file
        if path is None:
            path = os.path.join(tmp, "criteo_synthetic.tsv")
            t0 = time.perf_counter()
            write_criteo_file(path, args.rows)
            print(f"wrote {args.rows:,} rows to {path} in {time.perf_counter() - t0:.0f} s", flush=True)
        from torchrec_lowprec.data import CriteoDataset, open_cached

        args.cache_dir = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        cached = open_cached(CriteoDataset(path), args.cache_dir)  # the one conversion
        convert_s = time.perf_counter() - t0
        train_rows = cached.scan()["rows"]["train"]  # the file's training split
        print(f"converted to {cached.cache_dir} in {convert_s:.1f} s", flush=True)
        commit = _commit()  # the code the processes run
        phases = {}
        for busy in [0, args.load] if args.load else [0]:
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                phases[busy] = _repeats(args, path, train_rows)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    lines = report(args, phases, train_rows, commit, convert_s)
    publish(
        args.write,
        "file_loading",
        "Training from a Criteo TSV file vs in memory",
        "benchmarks/file_loading.py",
        argv,
        lines,
    )


VARIANTS = ("memory", "file", "cached")


def _repeats(args: argparse.Namespace, path: str, train_rows: int) -> dict:
    """``--repeats`` fresh processes, each running every variant (order rotating)."""
    runs, loads = [], [load()]
    for r in range(args.repeats):
        order = ",".join(VARIANTS[(r + k) % 3] for k in range(3))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--file", path, "--order", order,
               "--cache-dir", args.cache_dir,
               "--train-rows", str(train_rows), "--precision", args.precision, "--batch-size",
               str(args.batch_size), "--threads", str(args.threads), "--parse-threads",
               str(args.parse_threads), "--prefetch", str(args.prefetch),
               "--prefetch-mode", args.prefetch_mode]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise SystemExit(f"error: run {r} failed:\n{p.stderr[-3000:]}")
        res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        runs.append(res)
        loads.append(load())
        print(
            f"process {r} ({order}): "
            + ", ".join(f"{k} {v['examples_per_s']:,.0f} ex/s" for k, v in res.items()),
            flush=True,
        )
    return {"runs": runs, "loads": loads}


def _spread(xs: list[float], fmt: str) -> str:
    return f"{format(statistics.median(xs), fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"


def _commit() -> str:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git(
        "status", "--porcelain", "--", "torchrec_lowprec", "examples/dlrm", "benchmarks/file_loading.py"
    )
    return head + (" (with uncommitted changes)" if dirty else "")


def report(
    args: argparse.Namespace, phases: dict, train_rows: int, commit: str, convert_s: float
) -> list[str]:
    import pyarrow

    def col(runs: list[dict], key: str) -> list[float]:
        return [r[key]["examples_per_s"] for r in runs]

    source = f"`{args.file}`" if args.file else f"a generated Criteo-format TSV of {args.rows:,} rows"
    names = {0: "quiet"} | {n: f"{n} busy process{'es' if n > 1 else ''}" for n in phases if n}
    head = " | ".join(names[n] for n in phases)
    rows = {"in-memory synthetic": [], "Criteo TSV file (text, `--data-cache off`)": [],
            "file (cached, a later run)": [], "file / memory (per process)": [],
            "cached / memory (per process)": [], "pipeline alone, rows/s: memory / file / cached": []}  # fmt: skip
    ratios = {}
    for n, ph in phases.items():
        runs = ph["runs"]
        mem, fil, cac = col(runs, "memory"), col(runs, "file"), col(runs, "cached")
        ratios[n] = [c / m for c, m in zip(cac, mem)]
        vals = [_spread(mem, ",.0f"), _spread(fil, ",.0f"), _spread(cac, ",.0f"),
                _spread([f / m for f, m in zip(fil, mem)], ".2f"), _spread(ratios[n], ".2f"),
                " / ".join(f"{statistics.median([r[v]['alone'] for r in runs]):,.0f}" for v in VARIANTS)]  # fmt: skip
        for k, v in zip(rows, vals):
            rows[k].append(v)
    quiet = ratios[0]
    verdict = (
        "meets"
        if min(quiet) >= 0.9
        else "meets in the median only"
        if statistics.median(quiet) >= 0.9
        else "misses"
    )
    loads = "; ".join(f"{names[n]}: {' -> '.join(ph['loads'])}" for n, ph in phases.items())
    return [
        *machine_info(args.threads),
        f"Code: commit {commit}; pyarrow {pyarrow.__version__}. Load average (1/5/15 min) before and "
        f"after each process ({loads}).",
        "",
        f"{args.precision} DLRM (dim 16, batch {args.batch_size}, {args.threads} torch thread(s)), one epoch of the "
        f"{train_rows:,}-row training split of {source} vs the same number of in-memory synthetic rows "
        f"of the same shape (13 dense, 26 one-hot fields); {args.repeats} fresh processes per column, "
        "all three variants in each, order rotating. The loaded column runs the same processes while "
        "busy processes (`python -c 'while True: pass'`) compete for the cores. Examples/s of the "
        "training loop, median (min-max) over processes:",
        "",
        f"| variant | {head} |",
        "| --- |" + " --- |" * len(phases),
        *(f"| {k} | {' | '.join(v)} |" for k, v in rows.items()),
        "",
        f"The conversion to the binary cache (vocabulary pass + one parse of every split, written as "
        f"memory-mapped .npy arrays) took {convert_s:.1f} s once, before the processes. The text file "
        f"is parsed in a forked data-loader process (prefetch mode `{args.prefetch_mode}`), the cache is "
        f"sliced on a prefetch thread; {args.prefetch} batches ahead. The pipeline alone: batches of "
        "the training split with no model.",
        "",
        f"Target cached >= 0.90x of memory (quiet): {verdict} (median {statistics.median(quiet):.2f}x, "
        f"min {min(quiet):.2f}x).",
    ]


if __name__ == "__main__":
    main()

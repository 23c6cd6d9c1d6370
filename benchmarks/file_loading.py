"""Training from a Criteo-format TSV file vs from in-memory synthetic data of the same shape.

Writes a Criteo-format TSV (label, 13 integers, 26 categorical tokens) of ``--rows`` rows drawn
from :class:`SyntheticCTR` into a temporary folder, then runs ``--repeats`` fresh processes;
each trains the example's DLRM (``--precision``, default int8) twice, in alternating order:

* ``memory``: the synthetic rows, generated before the clock starts and kept in memory
  (``--train-rows`` = the file's training split, same 26 vocabularies, 13 dense inputs);
* ``file``: ``--data criteo:FILE`` (vocabulary pass before the clock starts; parsing, id
  lookup and batching during training, in the data-loader process that ``--prefetch-mode auto``
  forks for files, or on a thread with ``--prefetch-mode thread``).

It reports examples/s of the training loop (``train.examples_per_s`` of the summary) per
variant and the ratio file / memory per process (median, min-max), with the CPU, the load
average before and after, and writes the ``file_loading`` section of ``--write``.

    python benchmarks/file_loading.py --rows 1000000 --repeats 3 --write docs/benchmarks.md
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
        else:
            flags = [*common, "--data", f"criteo:{args.file}"]
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
    ap.add_argument("--write", help="write the 'file_loading' section of this markdown file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--order", default="memory,file", help=argparse.SUPPRESS)
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
        from torchrec_lowprec.data import CriteoDataset

        train_rows = CriteoDataset(path).scan()["rows"]["train"]  # the file's training split
        runs, loads, commit = [], [load()], _commit()  # the code the processes run
        for r in range(args.repeats):
            order = "memory,file" if r % 2 == 0 else "file,memory"
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--file", path, "--order", order,
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
    lines = report(args, runs, loads, train_rows, commit)
    publish(
        args.write,
        "file_loading",
        "Training from a Criteo TSV file vs in memory",
        "benchmarks/file_loading.py",
        argv,
        lines,
    )


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
    args: argparse.Namespace, runs: list[dict], loads: list[str], train_rows: int, commit: str
) -> list[str]:
    import pyarrow

    mem = [r["memory"]["examples_per_s"] for r in runs]
    fil = [r["file"]["examples_per_s"] for r in runs]
    ratio = [f / m for f, m in zip(fil, mem)]
    source = f"`{args.file}`" if args.file else f"a generated Criteo-format TSV of {args.rows:,} rows"
    verdict = (
        "meets"
        if min(ratio) >= 0.9
        else "meets in the median only"
        if statistics.median(ratio) >= 0.9
        else "misses"
    )
    return [
        *machine_info(args.threads),
        f"Code: commit {commit}; pyarrow {pyarrow.__version__}. Load average (1/5/15 min) before and "
        f"after each process (each keeps about 1.5 cores busy: the training step and its loader): "
        f"{' -> '.join(loads)}.",
        "",
        f"{args.precision} DLRM (dim 16, batch {args.batch_size}, {args.threads} torch thread(s)), one epoch of the "
        f"{train_rows:,}-row training split of {source} vs the same number of in-memory synthetic rows "
        f"of the same shape (13 dense, 26 one-hot fields); {len(runs)} fresh processes, both variants in "
        "each, order alternating. Median (min-max) over processes:",
        "",
        "| variant | examples/s |",
        "| --- | --- |",
        f"| in-memory synthetic | {_spread(mem, ',.0f')} |",
        f"| Criteo TSV file | {_spread(fil, ',.0f')} |",
        f"| file / memory (per process) | {_spread(ratio, '.2f')} |",
        "",
        f"The input pipeline alone (batches of the training split, no model; file: read, parse, look "
        f"up ids, batch, hand the batch over): memory {_spread([r['memory']['alone'] for r in runs], ',.0f')}, "
        f"file {_spread([r['file']['alone'] for r in runs], ',.0f')} rows/s. Prefetch mode "
        f"`{args.prefetch_mode}` (auto: a forked data-loader process for files, so parsing neither shares "
        "the GIL with the training loop nor waits for it; a thread for the synthetic data), "
        f"{args.prefetch} batches ahead. The file pipeline keeps up where a core is free for it; on a "
        "machine whose cores are all busy its work is added to the step's.",
        "",
        f"Target file >= 0.90x of memory: {verdict} (median {statistics.median(ratio):.2f}x, "
        f"min {min(ratio):.2f}x).",
    ]


if __name__ == "__main__":
    main()

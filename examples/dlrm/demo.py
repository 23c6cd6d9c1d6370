"""`make demo`: TorchRec's DLRM on synthetic CTR data with fp32, int8 and int4 tables.

The data come from a planted model, so the best achievable (Bayes) AUC is known. Each run is
``examples/dlrm/train.py`` (in this process, on the same data): the same TorchRec DLRM init,
a fused RowWiseAdagrad on the tables, and the tables stored as fp32 (``bits=32``: the same
fused update, no quantization) or int8 / int4 with ALPT (learned per-row step sizes,
stochastic rounding, and the library's default step growth for rows that leave their grid).
Prints one table; ``--write README.md`` also puts it between that file's
``<!-- demo:start -->`` / ``<!-- demo:end -->`` markers, with the command, the commit and the machine.

    python examples/dlrm/demo.py [--train-rows 1000000] [--precisions fp32,int8,int4] [-- more train.py flags]
    python examples/dlrm/demo.py --write README.md
    python -m torchrec_lowprec_examples.dlrm.demo ...   # the same, from an installed package
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import train as dlrm_train  # noqa: E402
from dlrm_data import open_data  # noqa: E402
from dlrm_model import Env  # noqa: E402

from torchrec_lowprec.files import atomic_write_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def code_label() -> str:
    """The commit of this tree, and whether the library or the example had uncommitted changes."""

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "an unknown commit"
    dirty = [x for x in git("status", "--porcelain", "--", "torchrec_lowprec", "examples/dlrm").splitlines()
             if not x.endswith("demo.py")]  # fmt: skip
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def write_table(path: str, command: str, lines: list[str]) -> None:
    """Replace what lies between ``<!-- demo:start -->`` and ``<!-- demo:end -->`` in ``path``."""
    start, end = "<!-- demo:start -->", "<!-- demo:end -->"
    text = open(path).read()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no {start} ... {end} markers; add them where the table should go")
    from torchrec_lowprec.kernels.cpu_native import cpu_description

    body = "\n".join(
        [
            start,
            f"Written by `{command}` at {code_label()} on {cpu_description()}, one seed:",
            "",
            *lines,
            end,
        ]
    )
    atomic_write_bytes(path, pattern.sub(lambda _: body, text).encode())


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=100_000)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a busy 2-core machine OpenMP spin-waits make 2 threads far slower)",
    )
    ap.add_argument("--write", help="also write the table between the demo markers of this file (README.md)")
    ap.add_argument("extra", nargs="*", help="more train.py flags (after --)")
    args = ap.parse_args(argv)
    if args.write and not os.path.exists(args.write):
        raise SystemExit(f"--write {args.write}: no such file")
    torch.set_num_threads(args.threads)
    common = [
        "--train-rows", str(args.train_rows), "--val-rows", "0", "--test-rows", str(args.test_rows),
        "--no-progress", "--quiet", "--threads", str(args.threads), *args.extra,
    ]  # fmt: skip
    data = open_data(dlrm_train.parse_args(common), cache=True)
    base = dlrm_train.parse_args(common)
    print(
        f"synthetic CTR: {len(data.keys)} fields, {args.train_rows:,} train rows, {args.test_rows:,} test rows, "
        f"one epoch, DLRM dim {base.embedding_dim}, batch {base.batch_size}, {args.threads} thread(s)",
        flush=True,
    )
    results = []
    t_all = time.perf_counter()
    for p in args.precisions.split(","):
        p = p.strip()
        t0 = time.perf_counter()
        # fp32/fp16 take the same flags; ALPT (stochastic rounding, learned step) is the default.
        s = dlrm_train.train(dlrm_train.parse_args([*common, "--precision", p]), Env(), data)
        results.append(s)
        print(
            f"  {p}: test AUC {s['test']['auc']:.4f}, {s['train']['examples_per_s']:,.0f} ex/s "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    print(f"  ({time.perf_counter() - t_all:.0f} s in all)\n")
    lines = [
        "| precision | test AUC | Bayes AUC | gap | log-loss | Bayes log-loss | embedding bytes | vs fp32 | examples/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results:
        t, b, by = s["test"], s["bayes"]["test"], s["embedding_bytes"]
        name = s["model"]["precision"] + (" ALPT" if s["model"]["precision"].startswith("int") else "")
        lines.append(
            f"| {name} | {t['auc']:.4f} | {b['auc']:.4f} | {b['auc'] - t['auc']:.4f} | {t['logloss']:.4f} | "
            f"{b['logloss']:.4f} | {by['ours'] / 2**20:.1f} MiB | {by['ratio']:.3f}x | "
            f"{s['train']['examples_per_s']:,.0f} |"
        )
    print("\n".join(lines))
    if args.write:
        write_table(
            args.write,
            "python examples/dlrm/demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            lines,
        )
    return results


if __name__ == "__main__":
    main()

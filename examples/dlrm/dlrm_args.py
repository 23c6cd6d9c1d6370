"""The command line of the DLRM example: its parser and the one pass that checks every flag.

:func:`parse_args` checks every numeric flag for finiteness and range and every output path
for writability *before* any data is read or a model is built; a bad flag ends the script with
exactly one ``error: --flag ...`` line on stderr and exit status 2 (argparse's convention).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import dlrm_checkpoint
from dlrm_data import DataError, _vocab_sizes, add_data_args
from dlrm_model import PRECISION_BITS, add_model_args

from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.files import unwritable_reason
from torchrec_lowprec.flags import OneLineErrorParser, parse_hot_rows, range_error
from torchrec_lowprec.types import PLAN_BITS, OptimizerType

INF = math.inf

#: Whole-number flags and their smallest value (the default of each is allowed).
INT_MIN = {
    # data
    "min_count": 1, "train_rows": 1, "val_rows": 0, "test_rows": 0, "num_dense": 0, "bag_max": 1,
    "data_seed": 0, "prefetch": 0, "parse_threads": 0,
    # model
    "embedding_dim": 1, "mpe_groups": 1, "dcn_layers": 1, "dcn_rank": 1,
    # training / output
    "batch_size": 1, "eval_batch_size": 1, "epochs": 1, "max_steps": 0, "eval_every": 0,
    "eval_rows": 0, "seed": 0, "threads": 0, "checkpoint_every": 0,
}  # fmt: skip

#: Real-valued flags: (low, high, low excluded, high excluded); NaN and infinities are always refused.
FLOAT_RANGE = {
    "zipf": (0.0, INF, False, False),
    "mpe_lambda": (0.0, INF, False, False),
    "step_size_lr": (0.0, INF, False, False),
    "growth_threshold": (1.0, INF, False, False),
    "emb_lr": (0.0, INF, False, False),
    "dense_lr": (0.0, INF, False, False),
    "dist_timeout_s": (0.0, INF, True, False),
}

#: ``--mpe-target-bits`` names: the bytes of every table stored at this width.
BUDGET_WIDTHS = {"int8": 8, "int4": 4, "int2": 2}

#: What ``0`` means for flags where it is a setting rather than a count.
ZERO_MEANS = {
    "max_steps": "0: no limit",
    "eval_every": "0: only at the end",
    "eval_rows": "0: all",
    "threads": "0: cores / local ranks",
    "checkpoint_every": "0: at the end only",
    "prefetch": "0: none",
    "parse_threads": "0: cores, at most 4",
}


def _sizes(flag: str, spec: str, allow_empty: bool) -> str | None:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        return f"{flag} {spec!r}: expected comma-separated whole numbers like 64,32"
    if (not sizes and not allow_empty) or any(s < 1 for s in sizes):
        return (
            f"{flag} {spec!r}: every layer needs >= 1 unit{'' if allow_empty else ', and one layer at least'}"
        )
    return None


def _lists(args: argparse.Namespace) -> str | None:
    """Flags holding lists or names (layer sizes, vocabularies, widths, the initial step)."""
    for flag, spec, empty in (("--dense-arch", args.dense_arch, True), ("--over-arch", args.over_arch, True)):
        if (msg := _sizes(flag, spec, empty)) is not None:
            return msg
    try:
        _vocab_sizes(args.vocab_sizes)
    except DataError as e:
        return str(e)
    try:
        bits = [int(b) for b in args.mpe_bits.split(",")]
    except ValueError:
        bits = None
    if not bits or any(b not in PLAN_BITS for b in bits):
        return f"--mpe-bits {args.mpe_bits!r}: expected comma-separated widths from {list(PLAN_BITS)}"
    if (msg := _mpe_target(args, bits)) is not None:
        return msg
    init = args.step_size_init
    if init not in ("lsq", "absmax"):
        try:
            ok = 0 < float(init) < INF
        except ValueError:
            ok = False
        if not ok:
            return f"--step-size-init {init!r}: expected lsq, absmax or a finite number > 0"
    return None


def _mpe_target(args: argparse.Namespace, bits: list[int]) -> str | None:
    """``--mpe-target-bits``: a number or a width name, for ``--precision mpe``, that the
    candidate widths can meet (the per-table check, which needs the tables, runs before the
    search's first step)."""
    spec = args.mpe_target_bits
    if spec is None:
        return None
    if args.precision != "mpe":
        return f"--mpe-target-bits {spec} needs --precision mpe"
    try:
        target = float(BUDGET_WIDTHS.get(spec, spec))
    except ValueError:
        return f"--mpe-target-bits {spec!r}: expected stored bits per value in (0, 32] or one of {list(BUDGET_WIDTHS)}"
    if not args.mpe_lambda > 0:
        return f"--mpe-target-bits needs --mpe-lambda > 0 (where lambda's dual ascent starts), got {args.mpe_lambda}"
    try:
        MPESearchConfig(candidate_bits=tuple(bits), target_bits=target, reg_lambda=args.mpe_lambda)
    except ValueError as e:
        return f"--mpe-target-bits {spec}: {str(e).removeprefix('MPESearchConfig.')}"
    return None


def output_file_problem(flag: str, path: str) -> str | None:
    """Why the file ``path`` cannot be written (atomically, creating its folders), or None."""
    if os.path.isdir(path):
        return f"{flag} {path} is a directory; give a file path, e.g. {os.path.join(path, 'out.json')}"
    why = unwritable_reason(path)
    return f"{flag} {path}: {why}" if why else None


def checkpoint_dir_problem(path: str, overwrite: bool) -> str | None:
    """Why ``--checkpoint-dir path`` cannot take checkpoints (or be cleared by --overwrite)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--checkpoint-dir {path} is an existing file, not a folder: give a folder path"
    if why := unwritable_reason(os.path.join(path, dlrm_checkpoint.LATEST)):
        return f"--checkpoint-dir {path}: {why}; give a writable folder"
    if overwrite and (links := dlrm_checkpoint.linked_entries(path)):
        return dlrm_checkpoint.links_message(path, links)
    return None


def data_cache_problem(spec: str) -> str | None:
    """Why ``--data-cache spec`` cannot hold the binary data cache (None: auto, off or a usable folder)."""
    if spec in ("auto", "off"):
        return None
    if not spec:
        return "--data-cache '': expected auto, off or a folder"
    if os.path.exists(spec) and not os.path.isdir(spec):
        return f"--data-cache {spec} is an existing file, not a folder: give a folder, auto or off"
    if why := unwritable_reason(os.path.join(spec, ".probe")):
        return f"--data-cache {spec}: {why}; give a writable folder, auto or off"
    return None


def hot_rows_problem(args: argparse.Namespace) -> str | None:
    """Why ``--hot-rows`` cannot be used with the other flags, or None."""
    if args.precision_plan or args.precision == "mpe":
        other = "--precision-plan" if args.precision_plan else "--precision mpe"
        return f"--hot-rows and {other} both set the tables' widths: pass one of them"
    try:
        parse_hot_rows(args.hot_rows, PRECISION_BITS[args.precision])
    except ValueError as e:
        return str(e)
    return None


def check_args(args: argparse.Namespace) -> str | None:
    """Every flag of :func:`parse_args` at once: the first problem as a message, or None."""
    if (args.resume or args.overwrite) and not args.checkpoint_dir:
        return "--resume and --overwrite need --checkpoint-dir"
    if args.resume and args.overwrite:
        return "--resume continues from the checkpoints that --overwrite would delete: pass one of them"
    if (msg := range_error(args, INT_MIN, FLOAT_RANGE, ZERO_MEANS) or _lists(args)) is not None:
        return msg
    if (msg := data_cache_problem(args.data_cache)) is not None:
        return msg
    if args.precision_plan and not os.path.isfile(args.precision_plan):
        return f"--precision-plan {args.precision_plan} does not exist (or is not a file)"
    if args.hot_rows is not None and (msg := hot_rows_problem(args)) is not None:
        return msg
    outputs = [("--summary", args.summary), ("--plot", args.plot)]
    if args.precision == "mpe":
        outputs.append(("--mpe-plan-out", args.mpe_plan_out))
    for flag, path in outputs:
        if path and (msg := output_file_problem(flag, path)) is not None:
            return msg
    if args.checkpoint_dir:
        return checkpoint_dir_problem(args.checkpoint_dir, args.overwrite)
    return None


def build_parser(description: str | None = None) -> OneLineErrorParser:
    ap = OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    add_model_args(ap)
    g = ap.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=1024, help="global batch (split evenly over ranks)")
    g.add_argument("--eval-batch-size", type=int, default=8192)
    g.add_argument("--emb-lr", type=float, default=0.05, help="lr of the tables' fused optimizer")
    g.add_argument(
        "--emb-optimizer", default="rowwise_adagrad", choices=[o.value for o in OptimizerType],
        help="the tables' fused optimizer (set as TorchRec does, by an in-backward tag)",
    )  # fmt: skip
    g.add_argument("--dense-lr", type=float, default=2e-3, help="Adam lr of the MLPs")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    g.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-rows", type=int, default=0, help="rows of the periodic validations (0: all)")
    g.add_argument("--seed", type=int, default=0, help="model init and rounding draws")
    g.add_argument(
        "--skip-nonfinite-loss",
        action="store_true",
        help="skip (and count) a batch whose loss is NaN/inf instead of stopping with an error",
    )
    g.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: cores / local ranks)"
    )
    g = ap.add_argument_group("output")
    g.add_argument("--summary", help="write the run's JSON summary here (atomically)")
    g.add_argument("--plot", help="write training curves here (PNG)")
    g.add_argument(
        "--checkpoint-dir",
        help="save checkpoints here (one run at a time: a LOCK file holds the running one's pid and host)",
    )
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: end only)")
    g.add_argument(
        "--resume", nargs="?", const="latest", choices=["latest", "auto"],
        help="continue from the newest complete checkpoint in --checkpoint-dir; `--resume auto`: "
        "from scratch when there is none (for restarts)",
    )  # fmt: skip
    g.add_argument(
        "--overwrite", action="store_true", help="delete the checkpoints in --checkpoint-dir first"
    )
    g.add_argument(
        "--dist-timeout-s", type=float, default=300.0,
        help="seconds (> 0) a collective may wait for a hung rank before the job fails (default 300)",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--quiet", action="store_true", help="print only errors")
    return ap


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The flags, every one checked (exit 2 with one ``error:`` line if one is not usable)."""
    ap = build_parser(description)
    args = ap.parse_args(argv)
    if (msg := check_args(args)) is not None:
        ap.error(msg)
    return args

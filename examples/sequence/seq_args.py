"""The command line of the sequence example: its parser and the one pass that checks every flag.

As the DLRM example's (``examples/dlrm/dlrm_args.py``): every flag is checked for range and
finiteness and every output path for writability *before* data are generated or a model is
built; a bad flag ends the script with exactly one ``error: --flag ...`` line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from seq_model import PRECISION_BITS

from torchrec_lowprec.files import unwritable_reason
from torchrec_lowprec.flags import OneLineErrorParser, add_recipe_flags, parse_hot_rows, range_error

INF = math.inf

#: Whole-number flags and their smallest value.
INT_MIN = {
    "num_items": 2, "latent_dim": 1, "hist_max": 1, "train_rows": 1, "val_rows": 1, "test_rows": 1,
    "data_seed": 0, "embedding_dim": 1, "batch_size": 1, "eval_batch_size": 1, "epochs": 1,
    "seed": 0, "threads": 0,
}  # fmt: skip

#: Real-valued flags: (low, high, low excluded, high excluded); NaN and infinities are refused.
FLOAT_RANGE = {
    "zipf": (0.0, INF, False, True),
    "decay": (0.0, 1.0, True, False),
    "scale": (0.0, INF, False, True),
    "bias_sd": (0.0, INF, False, True),
    "offset": (-INF, INF, True, True),
    "emb_lr": (0.0, INF, False, True),
    "dense_lr": (0.0, INF, False, True),
}


def check_args(args: argparse.Namespace) -> str | None:
    """The first unusable flag as a message, or None."""
    if (msg := range_error(args, INT_MIN, FLOAT_RANGE, {"threads": "0: all cores"})) is not None:
        return msg
    try:
        hidden = [int(v) for v in args.mlp.split(",") if v.strip()]
    except ValueError:
        return f"--mlp {args.mlp!r}: expected comma-separated whole numbers like 64,32"
    if any(h < 1 for h in hidden):
        return f"--mlp {args.mlp!r}: every layer needs >= 1 unit"
    if args.collection == "torchrec" and args.precision != "fp32":
        return (
            f"--collection torchrec stores fp32 tables only, got --precision {args.precision}: "
            "use --collection lowprec for fp16/int8/int4/int2"
        )
    if args.hot_rows is not None:
        if args.collection == "torchrec":
            return "--hot-rows needs --collection lowprec (TorchRec's collection stores one fp32 table)"
        try:
            parse_hot_rows(args.hot_rows, PRECISION_BITS[args.precision])
        except ValueError as e:
            return str(e)
    if args.summary:
        if os.path.isdir(args.summary):
            return f"--summary {args.summary} is a directory; give a file path, e.g. {os.path.join(args.summary, 'out.json')}"
        if why := unwritable_reason(args.summary):
            return f"--summary {args.summary}: {why}"
    return None


def build_parser(description: str | None = None) -> OneLineErrorParser:
    ap = OneLineErrorParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("synthetic data (the planted model, see seq_data.py)")
    g.add_argument("--num-items", type=int, default=10_000, help="items in the catalogue (= table rows)")
    g.add_argument("--latent-dim", type=int, default=8, help="dimension of the true item vectors")
    g.add_argument("--hist-max", type=int, default=20, help="longest history (lengths uniform in 1..this)")
    g.add_argument("--zipf", type=float, default=1.05, help="item popularity exponent")
    g.add_argument("--decay", type=float, default=0.8, help="recency weight per step back, in (0, 1]")
    g.add_argument(
        "--scale", type=float, default=1.2, help="weight of <preference, target> in the true logit"
    )
    g.add_argument("--bias-sd", type=float, default=0.5, help="spread of the true item biases")
    g.add_argument("--offset", type=float, default=-0.3, help="intercept of the true logit")
    g.add_argument("--train-rows", type=int, default=300_000)
    g.add_argument("--val-rows", type=int, default=50_000)
    g.add_argument("--test-rows", type=int, default=50_000)
    g.add_argument("--data-seed", type=int, default=0, help="seed of the planted model and the rows")
    g = ap.add_argument_group("model")
    g.add_argument("--precision", default="int8", choices=list(PRECISION_BITS), help="item table storage")
    g.add_argument(
        "--collection",
        default="lowprec",
        choices=["lowprec", "torchrec"],
        help="lowprec: LowPrecisionEmbeddingCollection (fused update); torchrec: torchrec.EmbeddingCollection "
        "+ in-backward RowWiseAdagrad (fp32 only, the reference)",
    )
    g.add_argument(
        "--rounding",
        default="stochastic",
        choices=["stochastic", "nearest", "dithered"],
        help="write-back rounding (dithered: stochastic with golden-ratio draws over steps)",
    )
    add_recipe_flags(g)  # --learn-step-size, --hot-rows
    g.add_argument("--embedding-dim", type=int, default=16)
    g.add_argument("--pooling", default="attention", choices=["attention", "mean"], help="history pooling")
    g.add_argument("--mlp", default="64,32", help="hidden sizes of the MLP over [u, t, u*t]")
    g = ap.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=512)
    g.add_argument("--eval-batch-size", type=int, default=8192)
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--emb-lr", type=float, default=0.3, help="fused RowWiseAdagrad lr of the item table")
    g.add_argument("--dense-lr", type=float, default=3e-3, help="Adam lr of the attention and MLP")
    g.add_argument("--seed", type=int, default=0, help="model init, batch order and rounding draws")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    g = ap.add_argument_group("output")
    g.add_argument("--summary", help="write the run's JSON summary here (atomically)")
    g.add_argument("--quiet", action="store_true", help="print only errors")
    return ap


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The flags, every one checked (exit 2 with one ``error:`` line if one is not usable)."""
    ap = build_parser(description)
    args = ap.parse_args(argv)
    if (msg := check_args(args)) is not None:
        ap.error(msg)
    return args

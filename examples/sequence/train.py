"""Train a target-attention sequence model whose item table is stored in fp32 / fp16 / int8 /
int4 / int2, on synthetic user histories with a planted click model (a known AUC ceiling).

    python examples/sequence/train.py --precision int4 --summary runs/seq_int4.json
    python examples/sequence/train.py --precision fp32 --collection torchrec   # TorchRec's EC, the reference
    python examples/sequence/train.py --precision int4 --no-learn-step-size --hot-rows 0.6:8   # a low-bit recipe

One item table (``t_item``) is read by two features, ``history`` (the user's last items) and
``target`` (the item to score), through an ``EmbeddingCollection`` (one row per id):
``LowPrecisionEmbeddingCollection`` trained by its fused RowWiseAdagrad in the backward (no
weight gradients; ``ec.fused_optimizer`` is there for LR schedules), or with ``--collection
torchrec`` TorchRec's own ``EmbeddingCollection`` with ``RowWiseAdagrad`` applied in the
backward. The attention and MLP train with Adam. The summary (``--summary``, JSON) holds the
validation and test AUC / log-loss, the Bayes-optimal AUC of the true probabilities (the
ceiling), the table's bytes and the training speed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from seq_args import parse_args as _parse_args  # noqa: E402
from seq_data import DataSpec, SequenceData  # noqa: E402
from seq_model import build_model, fp32_bytes, item_table, table_bytes  # noqa: E402

from torchrec_lowprec.data.metrics import exact_auc, log_loss_terms  # noqa: E402
from torchrec_lowprec.files import atomic_write_bytes  # noqa: E402

SUMMARY_VERSION = 1


def parse_args(argv: Sequence[str] | None = None):
    """The checked flags (exit 2 with one ``error:`` line on a bad one)."""
    return _parse_args(argv, description=__doc__)


def data_spec(args) -> DataSpec:
    """The :class:`DataSpec` the data flags describe."""
    return DataSpec(
        num_items=args.num_items, latent_dim=args.latent_dim, hist_max=args.hist_max, zipf=args.zipf,
        decay=args.decay, scale=args.scale, bias_sd=args.bias_sd, offset=args.offset,
        train_rows=args.train_rows, val_rows=args.val_rows, test_rows=args.test_rows, data_seed=args.data_seed,
    )  # fmt: skip


@torch.no_grad()
def evaluate(model, data: SequenceData, split: str, batch_size: int) -> dict:
    """AUC and log-loss of ``model`` on a whole split."""
    model.eval()
    sp = data.splits[split]
    logits = [model(sp.batch(slice(lo, lo + batch_size))[0]) for lo in range(0, sp.rows, batch_size)]
    model.train()
    z = torch.cat(logits).double().numpy()
    y = sp.label.numpy()
    return {"auc": exact_auc(z, y), "logloss": float(log_loss_terms(z, y).mean()), "rows": sp.rows}


def train(args, data: SequenceData | None = None) -> dict:
    """Build, train, evaluate; returns the summary. ``data``: reuse generated data (its spec
    must be the flags'), e.g. across the runs of a benchmark."""
    spec = data_spec(args)
    if data is None:
        data = SequenceData(spec)
    elif data.spec != spec:
        raise ValueError(f"the data given were generated from {data.spec}, the flags describe {spec}")
    model = build_model(args, spec.num_items, data)
    dense = torch.optim.Adam(model.dense_parameters(), lr=args.dense_lr)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[tuple[int, float]] = []
    step, seconds, rows, running = 0, 0.0, 0, []
    for _ in range(args.epochs):
        for kjt, labels in data.train_batches(args.batch_size, gen):
            t0 = time.perf_counter()
            loss = F.binary_cross_entropy_with_logits(model(kjt), labels)
            dense.zero_grad(set_to_none=True)
            loss.backward()  # the item table is updated here, by its fused optimizer
            dense.step()
            seconds += time.perf_counter() - t0
            step, rows = step + 1, rows + labels.numel()
            running.append(loss.item())
            if step % 100 == 0:
                history.append((step, float(np.mean(running))))
                running = []
    final_loss = float(np.mean(running)) if running else (history[-1][1] if history else float("nan"))
    if not np.isfinite(final_loss):
        raise FloatingPointError("the training loss is not finite: lower --emb-lr / --dense-lr")
    val = evaluate(model, data, "val", args.eval_batch_size)
    test = evaluate(model, data, "test", args.eval_batch_size)
    ours = table_bytes(model.ec)
    fp32 = fp32_bytes([item_table(spec.num_items, args.embedding_dim)])
    return {
        "version": SUMMARY_VERSION,
        "args": vars(args),
        "data": data.describe(),
        "model": {
            "collection": type(model.ec).__module__ + "." + type(model.ec).__name__,
            "precision": args.precision,
            "pooling": args.pooling,
            "embedding_dim": args.embedding_dim,
            "table_optimizer": "RowWiseAdagrad, in the backward",
            "dense_optimizer": "Adam",
        },
        "versions": {m: __import__(m).__version__ for m in ("torch", "torchrec", "fbgemm_gpu")},
        "train": {
            "steps": step,
            "rows": rows,
            "seconds": seconds,
            "examples_per_s": rows / seconds if seconds > 0 else float("nan"),
            "final_loss": final_loss,
            "history": history,
        },
        "val": val,
        "test": test,
        "bayes": {"val": data.bayes("val"), "test": data.bayes("test")},
        "table_bytes": {"ours": ours, "fp32_rowwise_adagrad": fp32, "ratio": ours / fp32},
    }


def report(s: dict) -> str:
    """A few lines for the terminal."""
    b = s["bayes"]
    return "\n".join(
        [
            f"{s['model']['precision']} ({s['model']['collection'].rsplit('.', 1)[-1]}), "
            f"{s['train']['steps']} steps, {s['train']['examples_per_s']:,.0f} examples/s",
            f"val  AUC {s['val']['auc']:.4f}  log-loss {s['val']['logloss']:.4f}   (Bayes {b['val']['auc']:.4f})",
            f"test AUC {s['test']['auc']:.4f}  log-loss {s['test']['logloss']:.4f}   (Bayes {b['test']['auc']:.4f})",
            f"table bytes {s['table_bytes']['ours']:,} ({s['table_bytes']['ratio']:.3f}x of fp32 + RowWiseAdagrad)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script; returns the summary. A bad flag exits 2 with one ``error:`` line."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        summary = train(args)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if not args.quiet:
        print(report(summary), flush=True)
    if args.summary:
        atomic_write_bytes(args.summary, json.dumps(summary, indent=1).encode())
    return summary


if __name__ == "__main__":
    main()

"""Train TorchRec's DLRM with low-precision embedding tables (fp32 / fp16 / int8 / int4 / int2).

One process::

    python examples/dlrm/train.py --precision int4 --summary out/int4.json --plot out/int4.png
    python examples/dlrm/train.py --data criteo:../shared/data/criteo_kaggle_sample_10k.tsv --precision int8

Several processes (``WORLD_SIZE > 1``: DistributedModelParallel, TorchRec's planner, gloo on
CPU / nccl on CUDA; each rank reads its own slice of every global batch)::

    torchrun --nproc-per-node 2 examples/dlrm/train.py --precision int8
    torchx run -s local_cwd launch/components.py:dlrm -j 1x2 -- --precision int8

Variants of the papers: LPT-DR = ``--rounding nearest --no-learn-step-size``, LPT-SR =
``--rounding stochastic --no-learn-step-size``, ALPT = ``--rounding stochastic
--learn-step-size`` (the default), each with ``--no-grow-step-size`` to clip rows that leave
their grid as the papers do (the library's default grows the row's step instead).
``--batch-size`` is the global batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dlrm_args  # noqa: E402
import dlrm_checkpoint  # noqa: E402
import dlrm_lock  # noqa: E402
from dlrm_data import DataError, DataSource, open_data  # noqa: E402
from dlrm_model import (  # noqa: E402
    Env,
    build_model,
    float_equivalent_bytes,
    hot_rows_plan,
    init_env,
    plan_summary,
    shard,
    sparse_module,
    table_config,
)
from dlrm_report import json_default, plot, report, versions  # noqa: E402

from torchrec_lowprec.data import MalformedRowError, atomic_write_bytes, exact_auc, log_loss_terms  # noqa: E402
from torchrec_lowprec.planner.schema import PrecisionPlan

SUMMARY_VERSION = 1


class PlanError(ValueError):
    """A ``--precision-plan`` / ``--precision mpe`` that cannot be used: exit 2 with one line."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (the script stops: exit 2, one ``error:`` line)."""


def check_plan_tables(path: str, tables) -> list[str]:
    """A ``--precision-plan`` naming tables the model lacks is an error (``DataError`` naming them);
    returns the model's tables the plan does not name (they take ``--precision``)."""
    from torchrec_lowprec.planner.schema import PrecisionPlan

    try:
        planned = set(PrecisionPlan.load(path).tables)
    except (OSError, ValueError) as e:
        raise DataError(f"--precision-plan {path}: {e}") from None
    names = [t.name for t in tables]
    unknown = sorted(planned - set(names))
    if unknown:
        raise DataError(
            f"--precision-plan {path} names tables {unknown} that the model does not have (its tables: "
            f"{names}): plan for this data set's tables"
        )
    return [n for n in names if n not in planned]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags (``dlrm_args``), every one checked before anything runs: a bad one exits 2 with
    one ``error: --flag ...`` line."""
    return dlrm_args.parse_args(argv, description=__doc__)


# --------------------------------------------------------------------------------- eval
def evaluate(model, data: DataSource, split: str, args, env: Env, max_rows: int | None = None) -> dict:
    """AUC and mean log-loss over ``split`` (every rank's rows, gathered)."""
    for m in model.modules():  # a bad training batch checked on the GPU is raised by now at the latest
        if callable(getattr(m, "check_inputs", None)):
            m.check_inputs()
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for lb in data.eval_batches(split, args.eval_batch_size, env.rank, env.world, max_rows):
            _, (_, z, y) = model(lb.batch.to(env.device))
            logits.append(z[: lb.valid].double().cpu().numpy())
            labels.append(y[: lb.valid].cpu().numpy())
    model.train()
    z = np.concatenate(logits) if logits else np.zeros(0)
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    if env.distributed:
        parts: list = [None] * env.world
        dist.all_gather_object(parts, (z, y))
        z = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
    if len(y) == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
    return {"auc": exact_auc(z, y), "logloss": float(log_loss_terms(z, y).mean()), "rows": int(len(y))}


def _all_sum(value: float, env: Env) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item())


def _all_gather(obj, env: Env) -> list:
    if not env.distributed:
        return [obj]
    out: list = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


# -------------------------------------------------------------------------------- train
def train(args: argparse.Namespace, env: Env, data: DataSource | None = None) -> dict:
    """Build, train, evaluate; returns the summary (every rank returns the same one).

    ``data`` reuses an opened data set (the benchmark trains many models on one); by default
    the arguments name it.
    """
    lead = env.rank == 0
    say = (lambda *a: print(*a, flush=True)) if lead and not args.quiet else (lambda *a: None)
    if args.batch_size % env.world:
        raise DataError(f"--batch-size {args.batch_size} is not a multiple of the {env.world} ranks")
    data = data or open_data(args)
    tables = data.embedding_bag_configs(args.embedding_dim)
    unplanned = check_plan_tables(args.precision_plan, tables) if args.precision_plan else []
    if unplanned:
        say(f"--precision-plan does not name tables {unplanned}: they take --precision {args.precision}")
    try:
        model = build_model(args, tables, data.num_dense_in, data)
    except (ValueError, OSError) as e:  # the plan / precision arguments, not a bug: one line, exit 2
        # (the other flags were checked by parse_args: name only the flag that was in play)
        if args.precision == "mpe" or not args.precision_plan:
            flag = f"--precision {args.precision}"
        else:
            flag = "--precision-plan"
        raise PlanError(str(e) if str(e).startswith("--") else f"{flag}: {e}") from e
    if env.distributed:
        model = shard(model, env)
    else:
        model = model.to(env.device)
    emb = sparse_module(model)
    local_bytes = int(emb.memory_bytes())
    ours_per_rank = [int(b) for b in _all_gather(local_bytes, env)]
    fp32_bytes = float_equivalent_bytes(tables)
    dense_params = [p for n, p in model.named_parameters() if not hasattr(p, "_optimizer_classes")]
    dense_opt = torch.optim.Adam(dense_params, lr=args.dense_lr)
    say(
        f"{data.name} data, {len(tables)} tables, dim {args.embedding_dim}, "
        f"{'plan ' + args.precision_plan + ', else ' if args.precision_plan else ''}{args.precision} "
        f"{'with hot rows ' + args.hot_rows + ' ' if getattr(args, 'hot_rows', None) else ''}"
        f"({args.rounding}, {'learned' if args.learn_step_size else 'fixed'} step"
        f"{', clipped' if args.grow_step_size is False else ''}), world {env.world}: "
        f"embeddings {sum(ours_per_rank) / 2**20:.2f} MiB vs fp32 {fp32_bytes / 2**20:.2f} MiB"
    )

    trainer = {"step": 0, "epoch": 0, "rows_in_epoch": 0, "rows_trained": 0, "train_seconds": 0.0,
               "history": {"train": [], "eval": []}, "local_steps": 0}  # fmt: skip
    resumed_from = None
    shapes = dlrm_checkpoint.model_config(args, tables, data.num_dense_in)  # a resume must match them
    if args.checkpoint_dir:
        path = dlrm_checkpoint.resume_point(args.checkpoint_dir, args.resume, args.overwrite)
        if path is None and args.resume:
            say(f"--resume auto: no checkpoint in {args.checkpoint_dir}, starting fresh")
        elif path is not None:
            trainer = dlrm_checkpoint.load(path, model, dense_opt, shapes)
            resumed_from = trainer["step"]
            say(f"resumed from {path} (step {trainer['step']}, epoch {trainer['epoch']})")

    per_epoch = data.split_rows("train")
    total = None
    if per_epoch is not None:
        total = args.epochs * (-(-per_epoch // args.batch_size))
    if args.max_steps:
        total = min(total, args.max_steps) if total is not None else args.max_steps
    bar = None
    if lead and not args.no_progress and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=trainer["step"], unit="step", dynamic_ncols=True, file=sys.stderr)

    def checkpoint() -> None:
        if args.checkpoint_dir:
            trainer["loss_acc"] = [loss_sum, loss_n]  # the partial mean of the next history point
            trainer["config"] = shapes
            dlrm_checkpoint.save(args.checkpoint_dir, model, dense_opt, trainer)

    model.train()
    from torchrec_lowprec.kernels.cpu_native import ensure_built

    ensure_built(env.device)  # the kernel's first build (once, ~1 min, announced) is not training time
    loss_sum, loss_n = trainer.pop("loss_acc", (0.0, 0))
    log_every = 1 if total is not None and total < 50 else 50  # short runs: a loss point per step
    stop = bool(args.max_steps) and trainer["step"] >= args.max_steps  # a resumed run may be done
    while trainer["epoch"] < args.epochs and not stop:
        t0 = time.perf_counter()
        for lb in data.train_batches(args.batch_size, env.rank, env.world, trainer["rows_in_epoch"]):
            loss, _ = model(lb.batch.to(env.device))
            if _all_sum(float(not torch.isfinite(loss.detach())), env):  # any rank's loss NaN/inf
                trainer["nonfinite_losses"] = trainer.get("nonfinite_losses", 0) + 1
                if not args.skip_nonfinite_loss:
                    raise NonFiniteLossError(
                        f"training loss is {float(loss.detach())} at step {trainer['step'] + 1} (epoch "
                        f"{trainer['epoch']}): lower --emb-lr/--dense-lr or check the data; the model is "
                        "left as after the previous step (--skip-nonfinite-loss skips such batches)"
                    )
                trainer["rows_in_epoch"] += lb.global_rows  # the batch is consumed, not trained on
                continue
            dense_opt.zero_grad()
            loss.backward()  # the tables update here (fused optimizer in backward)
            dense_opt.step()
            trainer["step"] += 1
            trainer["local_steps"] += 1
            trainer["rows_in_epoch"] += lb.global_rows
            trainer["rows_trained"] += lb.valid * env.world
            loss_sum += float(loss.detach())
            loss_n += 1
            if bar is not None:
                bar.update(1)
            step = trainer["step"]
            if loss_n and (step % log_every == 0):
                trainer["history"]["train"].append([step, loss_sum / loss_n])
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}")
                loss_sum, loss_n = 0.0, 0
            stop = bool(args.max_steps) and step >= args.max_steps
            if args.eval_every and step % args.eval_every == 0 and not stop:
                trainer["train_seconds"] += time.perf_counter() - t0
                m = evaluate(model, data, "val", args, env, args.eval_rows or None)
                trainer["history"]["eval"].append([step, m["auc"], m["logloss"]])
                if bar is not None:
                    bar.write(f"step {step}: val AUC {m['auc']:.4f}, log-loss {m['logloss']:.4f}")
                t0 = time.perf_counter()
            if args.checkpoint_every and step % args.checkpoint_every == 0 and not stop:
                trainer["train_seconds"] += time.perf_counter() - t0
                checkpoint()
                t0 = time.perf_counter()
            if stop:
                break
        trainer["train_seconds"] += time.perf_counter() - t0
        if not stop:
            trainer["epoch"] += 1
            trainer["rows_in_epoch"] = 0
    checkpoint()  # before the last history point, so a resumed run carries the partial mean on
    if loss_n:
        trainer["history"]["train"].append([trainer["step"], loss_sum / loss_n])
    if trainer["rows_trained"] == 0:
        bad = {k: n for k, n in data.malformed_rows().items() if n}
        raise DataError(
            f"no training rows in the {data.name} data"
            f"{f' ({bad} malformed rows skipped)' if bad else ''}: the file(s) are empty, or every "
            "row is malformed, or none falls in the train split (or every batch had a non-finite loss)"
        )
    if bar is not None:
        bar.close()

    val = evaluate(model, data, "val", args, env)
    test = evaluate(model, data, "test", args, env)
    if trainer.get("nonfinite_losses") and not all(
        np.isfinite(m["logloss"]) for m in (val, test) if m["rows"]
    ):
        raise NonFiniteLossError(
            f"{trainer['nonfinite_losses']} batches were skipped for a non-finite loss and the trained model's "
            f"log-loss is still not finite (val {val['logloss']}, test {test['logloss']}): lower --emb-lr/--dense-lr"
        )
    ranks = _all_gather({"rank": env.rank, "steps": trainer["local_steps"], "bytes": local_bytes}, env)
    seconds = _all_sum(trainer["train_seconds"], env) / env.world
    rows_run = trainer["rows_trained"]
    cfg = table_config(args)  # the flags with the library's defaults filled in
    summary = {
        "version": SUMMARY_VERSION,
        "command": list(sys.argv),
        "args": vars(args),
        "world_size": env.world,
        "device": env.device.type,
        "data": {
            "source": data.name,
            "features": len(tables),
            "vocab_sizes": {t.name: t.num_embeddings for t in tables},
            "malformed_rows": data.malformed_rows(),
        },
        "model": {
            "arch": "DLRM_DCN" if args.dcn else "DLRM",
            "precision": args.precision,
            "rounding": args.rounding,
            "learn_step_size": args.learn_step_size,
            "grow_step_size": cfg.grow_step_size,
            "step_size_lr": cfg.step_size_lr,
            "optimizer": cfg.optimizer.value,
            "emb_lr": cfg.learning_rate,
            "embedding_dim": args.embedding_dim,
            "plan": _with_precision(plan_summary(model), _precision_plan(args, tables)),
        },
        "versions": versions(),
        "train": {
            "steps": trainer["step"],
            "epochs_completed": trainer["epoch"],
            "rows": rows_run,
            "seconds": seconds,
            "examples_per_s": rows_run / seconds if seconds > 0 else float("nan"),
            "resumed_from_step": resumed_from,
            "final_loss": trainer["history"]["train"][-1][1] if trainer["history"]["train"] else None,
            "nonfinite_losses_skipped": trainer.get("nonfinite_losses", 0),
        },
        "ranks": ranks,
        "val": val,
        "test": test,
        "bayes": {"val": data.bayes("val"), "test": data.bayes("test")} if data.is_synthetic else None,
        "embedding_bytes": {
            "ours": sum(ours_per_rank),
            "per_rank": ours_per_rank,
            "fp32_rowwise_adagrad": fp32_bytes,
            "ratio": sum(ours_per_rank) / fp32_bytes,
        },
        "history": trainer["history"],
    }
    return summary


def _precision_plan(args: argparse.Namespace, tables) -> tuple[str, PrecisionPlan] | None:
    """Where the tables' precision plan came from (a path, or the ``--hot-rows`` flag) and the plan."""
    if args.precision == "mpe":
        return args.mpe_plan_out, PrecisionPlan.load(args.mpe_plan_out)
    if getattr(args, "precision_plan", None):
        return args.precision_plan, PrecisionPlan.load(args.precision_plan)
    if getattr(args, "hot_rows", None):
        return f"--hot-rows {args.hot_rows}", hot_rows_plan(args, tables)
    return None


def _with_precision(plan: dict, source: tuple[str, PrecisionPlan] | None) -> dict:
    """The sharding plan (table -> sharding, ranks) plus each planned table's group ends and bits."""
    if source is None:
        return plan
    where, precision = source
    out = {k: dict(v) for k, v in plan.items()}
    for name, tp in precision.tables.items():
        out.setdefault(name, {}).update(
            {"precision_plan": where, "group_ends": list(tp.group_ends), "bits": list(tp.bits)}
        )
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the script; returns the summary. Bad data or arguments exit with status 2 and one message."""
    args = parse_args(argv)
    # Two ranks on two cores must not each start a thread per core.
    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    env = init_env(args.dist_timeout_s)
    if env.distributed:
        # The planner warns on every rank that a Topology built by hand may not match the
        # hardware; ours is built from the process group itself.
        logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    try:
        with dlrm_lock.dir_lock(args.checkpoint_dir) if args.checkpoint_dir else contextlib.nullcontext():
            summary = train(args, env)
    except (
        DataError,
        MalformedRowError,
        FileNotFoundError,
        PlanError,
        NonFiniteLossError,
        dlrm_checkpoint.CheckpointError,
    ) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: ranks sharing a stderr do not interleave
        sys.stderr.flush()
        if env.distributed:
            dist.destroy_process_group()
        raise SystemExit(2) from None
    if env.rank == 0:
        if not args.quiet:
            print(report(summary), flush=True)
        text = json.dumps(summary, indent=1, default=json_default)
        outputs = {
            "--summary": lambda p: atomic_write_bytes(p, text.encode()),
            "--plot": lambda p: plot(summary, p),
        }
        for flag, write in outputs.items():
            path = getattr(args, flag[2:])
            try:
                if path:
                    write(path)
            except OSError as e:  # checked writable at the start: the disk filled up since
                print(f"error: writing {flag} {path} failed: {e}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()

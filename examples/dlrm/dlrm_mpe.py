"""``--precision mpe``: the MPE bit-width search before training (one process).

One epoch of the DLRM with every table an ``MPESearchEmbeddingBagCollection`` (fp32 weights,
a softmax over ``--mpe-bits`` per frequency group, the bit regulariser), on ids re-mapped to
frequency rank; then the paper's selection. The caller retrains a fresh model on the plan.
"""

from __future__ import annotations

import argparse
import os

import torch
import torchrec
from dlrm_args import BUDGET_WIDTHS
from dlrm_model import build_model, training_ranks
from torchrec.datasets.utils import Batch

import torchrec_lowprec as lp
from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.data import remap_by_rank
from torchrec_lowprec.modules.mpe_budget import plan_bits, uniform_bits
from torchrec_lowprec.modules.mpe_search import (
    budget_step,
    merge_plans,
    regularization,
    search_collections,
)
from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.progress import progress


def describe_plan(plan: PrecisionPlan) -> list[str]:
    """One line per table: rows at each chosen width (0 = pruned) and the mean bits per row."""
    lines = []
    for name, tp in sorted(plan.tables.items()):
        rows: dict[int, int] = {}
        start = 0
        for end, bits in zip(tp.group_ends, tp.bits):
            rows[bits] = rows.get(bits, 0) + end - start
            start = end
        parts = ", ".join(
            f"{b} bit{' (pruned)' if b == 0 else ''}: {n:,} rows" for b, n in sorted(rows.items())
        )
        mean = sum(b * n for b, n in rows.items()) / max(tp.rows, 1)
        lines.append(f"  {name} ({tp.rows:,} rows): {parts}; {mean:.2f} bits/row")
    return lines


def search_plan(args: argparse.Namespace, tables: list[torchrec.EmbeddingBagConfig], data) -> PrecisionPlan:
    """Search, select, write the plan to ``--mpe-plan-out`` and return it (printing where and what)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "--precision mpe searches in one process: run it once without torchrun (it writes "
            f"{args.mpe_plan_out}), then train sharded with --precision-plan {args.mpe_plan_out}"
        )
    if data is None:
        raise ValueError("--precision mpe needs the training data (frequencies and the search epoch)")
    counts, table_ranks = training_ranks(tables, data, {t.name for t in tables})
    feature_ranks = {f: table_ranks[t.name] for t in tables for f in t.feature_names}
    ranked_counts = {}
    for t in tables:
        for f in t.feature_names:  # counts indexed by rank, as the search's groups expect
            c = torch.zeros_like(counts[f])
            c[table_ranks[t.name]] = counts[f]
            ranked_counts[f] = c
    target = None
    if args.mpe_target_bits is not None:  # checked by parse_args; a width name needs the tables
        spec = args.mpe_target_bits
        target = uniform_bits(tables, BUDGET_WIDTHS[spec]) if spec in BUDGET_WIDTHS else float(spec)
    cfg = MPESearchConfig(
        candidate_bits=tuple(int(b) for b in args.mpe_bits.split(",")),
        num_groups=args.mpe_groups,
        reg_lambda=args.mpe_lambda,
        sparse_weights=True,
        target_bits=target,
    )
    model = build_model(args, tables, data.num_dense_in, data, ebc=torchrec.EmbeddingBagCollection(tables))
    lp.convert(model, cfg, frequencies=ranked_counts)
    searches = search_collections(model)
    arch = [p for s in searches for p in s.architecture_parameters()]
    weights = [p for s in searches for p in s.weights.parameters()]
    searched = {id(p) for p in arch + weights}
    dense = [p for p in model.parameters() if id(p) not in searched]
    opts = [
        torch.optim.Adam([{"params": dense, "lr": args.dense_lr}, {"params": arch, "lr": 0.05}]),
        torch.optim.Adagrad(weights, lr=args.emb_lr),  # row-sparse gradients: touched rows only
    ]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    per_epoch = data.split_rows("train")
    steps = -(-per_epoch // args.batch_size) if per_epoch is not None else None
    budget = "" if target is None else f" (start of its dual ascent to {target:.4g} stored bits per value)"
    say(f"MPE search: one epoch{f' ({steps} steps)' if steps else ''}, candidate bits {cfg.candidate_bits}, "
        f"{cfg.num_groups} frequency groups per table, lambda {cfg.reg_lambda:g}{budget}")  # fmt: skip
    model.train()
    batches = data.train_batches(args.batch_size, 0, 1)
    show = not (args.quiet or args.no_progress)
    for lb in progress(batches, "MPE search", total=steps, unit="step", enabled=show):
        b = lb.batch
        loss, _ = model(Batch(b.dense_features, remap_by_rank(b.sparse_features, feature_ranks), b.labels))
        loss = loss + regularization(searches)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        budget_step(searches)  # with --mpe-target-bits: lambda's dual ascent (no host sync)
    plan = merge_plans([s.select() for s in searches])
    os.makedirs(os.path.dirname(os.path.abspath(args.mpe_plan_out)), exist_ok=True)
    plan.save(args.mpe_plan_out)
    say(f"MPE plan written to {args.mpe_plan_out}:")
    for line in describe_plan(plan):
        say(line)
    if target is not None:
        say(f"  stored bits per value: {plan_bits(plan):.4f} (budget {target:.4f})")
    return plan

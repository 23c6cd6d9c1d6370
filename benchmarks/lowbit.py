"""Where int4 / int2 ALPT lose against fp32, and module-level options that try to close the gap.

Same DLRM, data generator, scale and training as ``benchmarks/accuracy.py`` (whose run cache
it shares: runs are keyed by data set, flags and a hash of the library sources), with a
**validation split**: every option is chosen on validation AUC, and test AUC is reported for
the chosen setting (the whole validation table is shown too). The recipe's table learning rate
(``--emb-lr``) is the one fp32 chose on validation; the fp32 runs at x0.5 / x2 of it say
whether it still is.

1. Diagnosis (seed 0): the fp32 model's trained tables quantized after training (per-row
   absmax step, nearest rounding) -- everything, hot rows only, rare rows only, one field at a
   time -- separates what the grid cannot represent from what training on the grid loses;
   the trained int4 / int2 tables' saturation (codes at the grid's ends) and step sizes of hot
   vs rare rows, and the hottest table's step-size trajectory.
2. Ablations (3 seeds, paired with fp32): step-size init from the row's own values
   (``absmax``), the step-size learning rate (1e-4 and 1e-1 around the default 1e-2), the growth
   threshold, the tables' learning rate (x0.5 / x2 the recipe's, for fp32 too, so that a tuned
   low-bit recipe is compared with a tuned fp32), and precision by frequency inside a table: the
   hottest rows of every table at 8 bits in an otherwise int4 / int2 table
   (``MixedPrecisionEmbeddingBagCollection`` via a precision plan; its bytes, id map included,
   counted).

    python benchmarks/lowbit.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import accuracy  # noqa: E402  (puts examples/dlrm on the path)
import dlrm_data  # noqa: E402
import dlrm_model  # noqa: E402
import torch  # noqa: E402
import train as dlrm_train  # noqa: E402
from report import machine_info, write_section  # noqa: E402

from torchrec_lowprec.configs import LowPrecisionConfig  # noqa: E402
from torchrec_lowprec.flags import parse_hot_rows  # noqa: E402
from torchrec_lowprec.planner.schema import PrecisionPlan  # noqa: E402
from torchrec_lowprec.quant.groups import table_counts  # noqa: E402
from torchrec_lowprec.quant.layout import code_range, dequantize_rows, row_bytes, split_row  # noqa: E402

# name -> train.py flags added to the ALPT defaults (stochastic rounding, learned step, growth 2)
OPTIONS: dict[str, tuple[str, ...]] = {
    "default": (),
    "init absmax": ("--step-size-init", "absmax"),
    "step lr 1e-4": ("--step-size-lr", "1e-4"),
    "step lr 1e-1": ("--step-size-lr", "1e-1"),
    "growth 1.25": ("--growth-threshold", "1.25"),
}
EXAMPLE_EMB_LR = dlrm_train.parse_args([]).emb_lr  # the DLRM example's default table lr
DEFAULT_STEP_LR = LowPrecisionConfig().step_size_lr
LR_FACTORS = (0.5, 2.0)  # the tables' learning rate relative to the recipe's (--emb-lr)
LARGE_BATCH = 8192  # the rounding-noise check: a row seen k times per step moves less per example
HOT_SHARES = (0.01, 0.05, 0.1, 0.25)  # share of each table's rows (most frequent first) stored at 8 bits


def hot_plan(tables, groups: list[tuple[float, int]], bits: int, path: str) -> str:
    """A precision plan file: per table, the most frequent rows in ``groups`` ((share, bits),
    hottest first), the rest at ``bits``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    PrecisionPlan.hot_rows({t.name: (t.num_embeddings, t.embedding_dim) for t in tables}, bits, groups).save(
        path
    )
    return path


def serving_bytes(flags, shapes: dict[str, tuple[int, int]], id_maps: bool = False) -> int:
    """Bytes a server holds for a train.py run's tables (name -> (rows, dim)), from its flags:
    stored rows only (codes + fp16 scale/bias, or fp16 / fp32 values; no master step, optimizer
    state), a plan (``--precision-plan`` or ``--hot-rows``) at its groups' widths. ``id_maps`` adds
    the 4 B/row raw id -> rank map of every grouped table (a raw-id pipeline's)."""
    flags = list(flags)
    bits = dlrm_model.PRECISION_BITS[flags[flags.index("--precision") + 1]]
    plan = None
    if "--precision-plan" in flags:
        plan = PrecisionPlan.load(flags[flags.index("--precision-plan") + 1])
    elif "--hot-rows" in flags:
        plan = PrecisionPlan.hot_rows(
            shapes, bits, parse_hot_rows(flags[flags.index("--hot-rows") + 1], bits)
        )
    total = 0
    for name, (rows, dim) in shapes.items():
        tp = plan.tables.get(name) if plan is not None else None
        if tp is None:
            total += rows * row_bytes(bits, dim)
        else:
            total += tp.serving_bytes() + (4 * tp.rows if id_maps and tp.num_groups > 1 else 0)
    return total


def variants(tables, bits_list, plan_dir: str, emb_lr: float) -> list[tuple[str, int, tuple[str, ...]]]:
    lr = {f"emb lr x{f:g}": ("--emb-lr", f"{emb_lr * f:g}") for f in LR_FACTORS}
    out = [("fp32", 32, ("--precision", "fp32")), ("int8 default", 8, ("--precision", "int8"))]
    out += [(f"fp32 {n}", 32, ("--precision", "fp32", *flags)) for n, flags in lr.items()]
    out.append(("int8 step lr 1e-4", 8, ("--precision", "int8", *OPTIONS["step lr 1e-4"])))
    for bits in (32, 4, 2):
        p = "fp32" if bits == 32 else f"int{bits}"
        out.append((f"{p} batch {LARGE_BATCH}", bits, ("--precision", p, "--batch-size", str(LARGE_BATCH))))
    # the step-size learning rate at the DLRM example's default table lr (train.py --emb-lr 0.05)
    at = ("--emb-lr", f"{EXAMPLE_EMB_LR:g}")
    out.append((f"fp32 emb lr {EXAMPLE_EMB_LR:g}", 32, ("--precision", "fp32", *at)))
    for bits in (8, 4):
        out.append((f"int{bits} emb lr {EXAMPLE_EMB_LR:g}", bits, ("--precision", f"int{bits}", *at)))
        out.append((f"int{bits} emb lr {EXAMPLE_EMB_LR:g} step lr 1e-4", bits,
                    ("--precision", f"int{bits}", *at, *OPTIONS["step lr 1e-4"])))  # fmt: skip
    for bits in bits_list:
        for name, flags in {**OPTIONS, **lr}.items():
            out.append((f"int{bits} {name}", bits, ("--precision", f"int{bits}", *flags)))
        for share in HOT_SHARES:
            path = hot_plan(
                tables, [(share, 8)], bits, os.path.join(plan_dir, f"hot{share:g}-int{bits}.json")
            )
            out.append((f"int{bits} hot {share:.0%} at 8b", bits, ("--precision", f"int{bits}", "--precision-plan", path)))  # fmt: skip
    return out


# ----- diagnosis -----
def _fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = code_range(bits)
    s = (x.abs().amax(1, keepdim=True) / qmax).clamp_min(1e-12)
    return (x / s).round().clamp(qmin, qmax) * s


def _captured_train(flags: list[str], data, threads: int, on_model=None):
    """Run train.py's ``train`` and keep the model (train.py returns only the summary);
    ``on_model(model)`` runs once it is built (e.g. to hook it)."""
    box = {}
    build = dlrm_train.build_model

    def keep(*a, **k):
        box["model"] = build(*a, **k)
        if on_model is not None:
            on_model(box["model"])
        return box["model"]

    dlrm_train.build_model = keep
    try:
        s = dlrm_train.train(dlrm_train.parse_args([*flags, "--no-progress", "--quiet", "--threads", str(threads)]),
                             dlrm_model.Env(), data)  # fmt: skip
    finally:
        dlrm_train.build_model = build
    return box["model"], s


def _auc(model, data, args) -> float:
    return dlrm_train.evaluate(model, data, "test", args, dlrm_model.Env())["auc"]


def diagnose(dflags: list[str], data, tables, threads: int, hot_share: float) -> dict:
    """Seed 0: post-training quantization of the fp32 model, and the trained low-bit tables' state."""
    counts, _ = dlrm_model.training_ranks(tables, data, {t.name for t in tables})
    hot_masks, rare_masks = {}, {}
    for t in tables:
        c = table_counts(t, counts)
        order = torch.argsort(c, descending=True)
        hot = torch.zeros(t.num_embeddings, dtype=torch.bool)
        hot[order[: max(1, round(hot_share * t.num_embeddings))]] = True
        hot_masks[t.name], rare_masks[t.name] = hot, (~hot) & (c > 0)
    out: dict = {"ptq": {}, "state": {}, "trajectory": {}, "moves": {}}
    flags = [*dflags, "--seed", "0"]
    model, _ = _captured_train([*flags, "--precision", "fp32"], data, threads)
    a = dlrm_train.parse_args(flags)
    ebc = dlrm_model.sparse_module(model)
    w = {t.name: ebc.dequantized_weight(t.name).clone() for t in tables}
    out["ptq"]["fp32"] = _auc(model, data, a)
    for bits in (4, 2):
        for label, pick in (("all rows", None), ("hot rows only", hot_masks), ("rare rows only", rare_masks)):
            for t in tables:
                q = _fake_quant(w[t.name], bits)
                if pick is not None:
                    q = torch.where(pick[t.name][:, None], q, w[t.name])
                ebc.load_float_weight(t.name, q)
            out["ptq"][f"int{bits} {label}"] = _auc(model, data, a)
        for t in tables:  # one field at a time
            for u in tables:
                ebc.load_float_weight(u.name, _fake_quant(w[u.name], bits) if u.name == t.name else w[u.name])
            out["ptq"][f"int{bits} only {t.name}"] = _auc(model, data, a)
        for t in tables:
            ebc.load_float_weight(t.name, w[t.name])
    big = max(tables, key=lambda t: t.num_embeddings)
    for bits in (4, 2):
        traj: list = []
        moves: list = []
        hot_big, rare_big = hot_masks[big.name], rare_masks[big.name]

        def hook(model, traj=traj, moves=moves, hot_big=hot_big, rare_big=rare_big, bits=bits):
            ebc, calls, last = dlrm_model.sparse_module(model), [0], {}

            def record(module, inputs):
                calls[0] += 1
                if not module.training:
                    return
                if calls[0] % 50 == 1:
                    scale = module.quantized_weight(big.name)[:, 0:2].contiguous().view(torch.float16).float()
                    scale = scale.reshape(-1)
                    traj.append(
                        [calls[0] - 1, float(scale[hot_big].median()), float(scale[rare_big].median())]
                    )
                    # the rows this batch touches, as stored before the step's update ...
                    ids = torch.unique(inputs[0][big.feature_names[0]].values())
                    last["ids"], last["rows"] = ids, module.quantized_weight(big.name)[ids]
                elif calls[0] % 50 == 2 and "ids" in last:
                    # ... and after it: with stochastic rounding an element moves a whole step with
                    # probability |update| / step, so the mean of |change| / step over rows is the mean
                    # update in steps (rows whose step changed by > 10%, i.e. grew, are left out)
                    ids, before = last.pop("ids"), last.pop("rows")
                    after = module.quantized_weight(big.name)[ids]
                    scale, d = split_row(after, bits, big.embedding_dim)[0], big.embedding_dim
                    u = (dequantize_rows(after, bits, d) - dequantize_rows(before, bits, d)).abs().mean(
                        1
                    ) / scale
                    same = (scale / split_row(before, bits, d)[0] - 1).abs() < 0.1
                    hot, rare = hot_big[ids] & same, ~hot_big[ids] & same
                    moves.append([calls[0] - 2, float(u[hot].mean()) if hot.any() else None,
                                  float(u[rare].mean()) if rare.any() else None])  # fmt: skip

            ebc.register_forward_pre_hook(record)

        model, _ = _captured_train([*flags, "--precision", f"int{bits}"], data, threads, hook)
        lebc = dlrm_model.sparse_module(model)
        st = {}
        for t in tables:
            scale, q = split_row(lebc.quantized_weight(t.name), bits, t.embedding_dim)
            qmin, qmax = code_range(bits)
            sat = (q == qmin) | (q == qmax)
            row = {}
            for label, m in (("hot", hot_masks[t.name]), ("rare", rare_masks[t.name])):
                if m.any():
                    row[label] = {
                        "saturated": float(sat[m].float().mean()),
                        "step_median": float(scale[m].median()),
                        "rms_median": float((scale[m, None] * q[m]).pow(2).mean(1).sqrt().median()),
                    }
            st[t.name] = {"rows": t.num_embeddings, **row}
        out["state"][f"int{bits}"] = st
        out["trajectory"][f"int{bits}"] = traj
        out["moves"][f"int{bits}"] = moves
    out["fp32_rms"] = {
        t.name: {
            label: float(w[t.name][m].pow(2).mean(1).sqrt().median())
            for label, m in (("hot", hot_masks[t.name]), ("rare", rare_masks[t.name]))
            if m.any()
        }
        for t in tables
    }
    out["big_table"] = big.name
    return out


def diag_lines(d: dict, hot_share: float) -> list[str]:
    base = d["ptq"]["fp32"]
    lines = [
        f"**Diagnosis (seed 0).** (a) The trained fp32 model with its tables quantized *after* training "
        f"(per-row absmax step, nearest rounding; hot = the {hot_share:.0%} most frequent rows of each table, "
        f"rare = the other rows seen in training), test AUC minus the fp32 model's ({base:.4f}):",
        "",
        "| quantized after training | int4 | int2 |",
        "|---|---:|---:|",
    ]
    keys = sorted(
        {k.split(" ", 1)[1] for k in d["ptq"] if k != "fp32"}, key=lambda k: (k.startswith("only"), k)
    )
    for k in keys:
        lines.append(f"| {k} | {d['ptq'][f'int4 {k}'] - base:+.4f} | {d['ptq'][f'int2 {k}'] - base:+.4f} |")
    lines += [
        "",
        "(b) The tables trained at int4 / int2 (default ALPT): share of codes at the grid's ends "
        "(saturated), median step size and median row RMS, hot vs rare rows, next to the fp32 "
        "model's median row RMS:",
        "",
        "| table | rows | int4 saturated hot / rare | int2 saturated hot / rare | int4 step hot / rare | "
        "int2 step hot / rare | int4 RMS hot / rare | fp32 RMS hot / rare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    s4, s2, f = d["state"]["int4"], d["state"]["int2"], d["fp32_rms"]

    def pair(row: dict, key: str, fmt: str) -> str:
        return " / ".join(format(row[k][key], fmt) if k in row else "-" for k in ("hot", "rare"))

    for name, row in s4.items():
        fr = f[name]
        lines.append(
            f"| {name} | {row['rows']:,} | {pair(row, 'saturated', '.1%')} | {pair(s2[name], 'saturated', '.1%')} | "
            f"{pair(row, 'step_median', '.2g')} | {pair(s2[name], 'step_median', '.2g')} | "
            f"{pair(row, 'rms_median', '.2g')} | "
            f"{' / '.join(format(fr[k], '.2g') if k in fr else '-' for k in ('hot', 'rare'))} |"
        )
    t4, t2 = d["trajectory"]["int4"], d["trajectory"]["int2"]
    if t4 and t2:
        pick = sorted({0, len(t4) // 4, len(t4) // 2, len(t4) - 1})
        lines += [
            "",
            f"(c) Step-size trajectory of the largest table ({d['big_table']}): median step of its hot / rare rows "
            "at training steps "
            + ", ".join(f"{t4[i][0]}" for i in pick)
            + ": int4 "
            + ", ".join(f"{t4[i][1]:.2g} / {t4[i][2]:.2g}" for i in pick)
            + "; int2 "
            + ", ".join(f"{t2[i][1]:.2g} / {t2[i][2]:.2g}" for i in pick)
            + ".",
        ]
    m4, m2 = d.get("moves", {}).get("int4"), d.get("moves", {}).get("int2")
    if m4 and m2:
        pick = sorted({0, len(m4) // 4, len(m4) // 2, len(m4) - 1})

        def fmt(m: list) -> str:
            return ", ".join(" / ".join("-" if v is None else f"{v:.2g}" for v in m[i][1:]) for i in pick)

        def noise(m: list) -> str:
            # rounding noise sd / update = sqrt(u) / u steps (stochastic rounding of an update of u < 1 steps)
            return " / ".join(f"{v**-0.5:.1f}x" if v and v < 1 else "-" for v in m[pick[-1]][1:])

        lines += [
            "",
            f"(d) Update size against the grid ({d['big_table']}): after one training step, the mean over the "
            "rows the batch touched (rows whose step grew left out) of mean |change| / step. With stochastic rounding an element moves one step "
            "with probability |update| / step, so this is the update u in steps, and the rounding noise it adds "
            "has a standard deviation of about sqrt(u) steps for u < 1, 1/sqrt(u) times the update itself. Hot / rare rows at "
            "training steps " + ", ".join(f"{m4[i][0]}" for i in pick) + ": int4 " + fmt(m4)
            + "; int2 " + fmt(m2) + f". Rounding noise / update at step {m4[pick[-1]][0]}, hot / rare: "
            f"int4 {noise(m4)}, int2 {noise(m2)}.",
        ]  # fmt: skip
    return lines


# ----- ablations -----
def summarize(rows: dict[str, list[dict]], names: list[tuple[str, int, tuple]]) -> list[str]:
    lines = [
        "| variant | bits | embedding bytes (training state) | vs fp32 | val AUC vs fp32 (paired) | test AUC vs fp32 (paired) | seeds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, bits, _ in names:
        rs = rows.get(name)
        if not rs:
            continue
        dv = accuracy.paired(rows, name, "fp32", "val_auc") if name != "fp32" else None
        dt = accuracy.paired(rows, name, "fp32") if name != "fp32" else None
        test = f"{dt[0]:+.4f} ± {dt[1]:.4f}" if dt else f"{statistics.fmean(r['auc'] for r in rs):.4f} (AUC)"
        val = (
            f"{dv[0]:+.4f} ± {dv[1]:.4f}" if dv else f"{statistics.fmean(r['val_auc'] for r in rs):.4f} (AUC)"
        )
        lines.append(
            f"| {name} | {bits} | {rs[0]['bytes'] / 2**20:.2f} MiB | {rs[0]['bytes'] / rs[0]['fp32_bytes']:.3f}x | "
            f"{val} | {test} | {len(rs)} |"
        )
    return lines


def names_flags(names) -> list[tuple[str, tuple[str, ...]]]:
    return [(n, f) for n, _, f in names]


def _diagnostic(name: str) -> bool:
    """Runs that test the step-size lr default at the example's table lr, not options."""
    return f"emb lr {EXAMPLE_EMB_LR:g}" in name


def batch_lines(rows: dict[str, list[dict]], batch: int) -> list[str]:
    """The gap to fp32 at the recipe's batch and at a larger one, each paired with fp32 at the same batch."""
    parts = []
    for bits in (4, 2):
        small = accuracy.paired(rows, f"int{bits} default", "fp32")
        large = accuracy.paired(rows, f"int{bits} batch {LARGE_BATCH}", f"fp32 batch {LARGE_BATCH}")
        if small and large:
            parts.append(
                f"int{bits} {small[0]:+.4f} ± {small[1]:.4f} at batch {batch}, "
                f"{large[0]:+.4f} ± {large[1]:.4f} at batch {LARGE_BATCH}"
            )
    if not parts:
        return []
    return [
        "- Batch size (a check of the rounding-noise explanation: the more often a row occurs in one step, "
        "the less rounding noise each occurrence adds): test AUC vs fp32 at the same batch, "
        + "; ".join(parts)
        + "."
    ]


def selection(rows: dict[str, list[dict]], names, bits_list, emb_lr: float) -> list[str]:
    """Per width: the option chosen on validation among the same-bytes options, and the hot-row
    share chosen on validation (the fewest bytes meeting the target there, else the best);
    test AUC of the chosen ones against the targets."""
    targets = {4: 0.004, 2: 0.015, 8: 0.001}
    out = []
    if "fp32" not in rows:
        return out
    # The targets are stated against the benchmark's fp32 recipe; the fp32 learning rate chosen
    # on validation is reported next to it so that a tuned low-bit recipe is not flattered.
    fp32s = [n for n in rows if n.startswith("fp32")]
    ref = max(fp32s, key=lambda n: statistics.fmean(r["val_auc"] for r in rows[n]))
    if ref != "fp32":
        d = accuracy.paired(rows, ref, "fp32")
        out.append(
            f"- fp32 reference: the targets compare with the benchmark's recipe (**fp32**, emb lr {emb_lr:g}); on "
            f"validation the better fp32 is **{ref}** (test {d[0]:+.4f} ± {d[1]:.4f} vs fp32), and each line "
            "below also gives the difference to it."
        )

    def vs_ref(name: str) -> str:
        if ref == "fp32":
            return ""
        d = accuracy.paired(rows, name, ref)
        return f"; vs {ref} {d[0]:+.4f} ± {d[1]:.4f}"

    for bits in bits_list:
        same = [n for n, b, f in names if b == bits and "hot" not in n and n in rows and not _diagnostic(n)]
        hot = [n for n, b, f in names if b == bits and "hot" in n and n in rows]
        for label, group in (("same bytes as today", same), ("hottest rows at 8 bits", hot)):
            if not group or f"int{bits} default" not in rows:
                continue
            val = {n: accuracy.paired(rows, n, "fp32", "val_auc")[0] for n in group}
            # as MPE and MEC choose: the fewest bytes whose validation AUC meets the target, else
            # the best validation AUC
            meets = [n for n in group if val[n] >= -targets[bits]]
            best = min(meets, key=lambda n: rows[n][0]["bytes"]) if meets else max(group, key=val.__getitem__)
            dt = accuracy.paired(rows, best, "fp32")
            r0, base = rows[best][0], rows[f"int{bits} default"][0]
            extra = r0["bytes"] - base["bytes"]
            ok = dt[0] >= -targets[bits]
            flags = dict(names_flags(names)).get(best, ())
            idmap = 0
            if "--precision-plan" in flags:
                plan = PrecisionPlan.load(flags[flags.index("--precision-plan") + 1])
                idmap = sum(4 * tp.rows for tp in plan.tables.values() if tp.num_groups > 1)
            gap = accuracy.paired(rows, f"int{bits} default", "fp32")[0]
            recovered = (
                f", {1 - dt[0] / gap:.0%} of int{bits} default's gap ({gap:+.4f}) recovered"
                if best != f"int{bits} default" and gap < 0
                else ""
            )
            out.append(
                f"- int{bits}, {label}: chosen on validation **{best}**; test {dt[0]:+.4f} ± {dt[1]:.4f} vs fp32"
                f"{recovered}{vs_ref(best)} (target >= -{targets[bits]}: **{'met' if ok else 'not met'}**"
                + (f"; {extra / 2**20:+.2f} MiB = {extra / base['bytes']:+.1%} bytes over int{bits} default" if extra else "")
                + (f", of which {idmap / 2**20:.2f} MiB is the 4 B/row raw id -> rank map this example's raw-id "
                   f"pipeline needs: with frequency-ranked ids the hot rows cost {(extra - idmap) / 2**20:+.2f} MiB = "
                   f"{(extra - idmap) / base['bytes']:+.1%}" if idmap else "")
                + ")."
            )  # fmt: skip
    dt = accuracy.paired(rows, "int8 default", "fp32")
    if dt:
        out.append(
            f"- int8 default: test {dt[0]:+.4f} ± {dt[1]:.4f} vs fp32{vs_ref('int8 default')} (target >= -0.001: "
            f"**{'met' if dt[0] >= -0.001 else 'not met'}**)."
        )
    return out


def _short(v: float) -> str:
    """1e-2 rather than 0.01 or 1e-02 (how the options name step-size learning rates)."""
    return f"{v:.0e}".replace("e-0", "e-").replace("e+00", "")


def step_lr_lines(rows: dict[str, list[dict]], emb_lr: float) -> list[str]:
    """The library's step-size learning rate default against the previous one (1e-4), paired."""
    pairs = [(f"int{b} default", f"int{b} step lr 1e-4", f"int{b}, table lr {emb_lr:g}") for b in (8, 4, 2)]
    pairs += [(f"int{b} emb lr {EXAMPLE_EMB_LR:g}", f"int{b} emb lr {EXAMPLE_EMB_LR:g} step lr 1e-4",
               f"int{b}, table lr {EXAMPLE_EMB_LR:g}") for b in (8, 4)]  # fmt: skip
    parts = []
    for a, b, label in pairs:
        if a in rows and b in rows:
            dv, dt = accuracy.paired(rows, a, b, "val_auc"), accuracy.paired(rows, a, b)
            parts.append(f"{label}: val {dv[0]:+.4f} ± {dv[1]:.4f}, test {dt[0]:+.4f} ± {dt[1]:.4f}")
    if not parts:
        return []
    return [
        f"- Step-size learning rate, the default {_short(DEFAULT_STEP_LR)} minus 1e-4 (paired; the table lr "
        f"{EXAMPLE_EMB_LR:g} is the DLRM example's default): " + "; ".join(parts) + "."
    ]


def main_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``main_args([])``: the defaults, e.g. for frontier.py)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-rows", type=int, default=3_000_000)
    ap.add_argument("--val-rows", type=int, default=200_000)
    ap.add_argument("--test-rows", type=int, default=300_000)
    ap.add_argument("--vocab-sizes", default="1000000,300000,100000,30000,10000,1000,100,10")
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--emb-lr", type=float, default=0.4, help="the recipe's RowWiseAdagrad lr of the tables")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--hot-share", type=float, default=0.01, help="the diagnosis's hot rows")
    ap.add_argument("--no-diagnosis", action="store_true")
    ap.add_argument("--cached-only", action="store_true", help="report the cached runs only; train nothing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="runs/accuracy.jsonl", help="run cache, shared with accuracy.py")
    ap.add_argument("--write", help="write the 'lowbit' section of this markdown file")
    return ap.parse_args(argv)


def data_flags(args: argparse.Namespace) -> list[str]:
    """train.py flags of the data set and training settings."""
    return [
        "--data", "synthetic", "--vocab-sizes", args.vocab_sizes, "--zipf", "1.1", "--num-dense", "4",
        "--train-rows", str(args.train_rows), "--val-rows", str(args.val_rows), "--test-rows", str(args.test_rows),
        "--batch-size", str(args.batch_size), "--epochs", "1", "--embedding-dim", str(args.dim),
        "--emb-lr", f"{args.emb_lr:g}",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = main_args(argv)
    command = "python benchmarks/lowbit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dflags = data_flags(args)
    data = dlrm_data.open_data(dlrm_train.parse_args(dflags), cache=True)
    tables = data.embedding_bag_configs(args.dim)
    bits_list = [int(b) for b in args.bits.split(",")]
    plans = os.path.join(os.path.dirname(os.path.abspath(args.results)), "plans")
    names = variants(tables, bits_list, plans, args.emb_lr)
    if args.only:
        names = [v for v in names if v[0] in args.only.split(",")]
    cache = accuracy.RunCache(args.results, args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[dict]] = {}
    for name, _, vflags in names:
        for seed in seeds:
            flags = [*dflags, *vflags, "--seed", str(seed)]
            if args.cached_only and cache.key(["synthetic-val", flags]) not in cache.done:
                break  # seeds run in order: a variant's first missing seed ends its list
            rows.setdefault(name, []).append(cache.get("synthetic-val", name, seed, flags, data))
    diag = None
    if not args.no_diagnosis:
        path = os.path.join(os.path.dirname(os.path.abspath(args.results)), "lowbit_diag.json")
        key = json.dumps([dflags, cache.code["hash"], args.hot_share])
        saved = json.load(open(path)) if os.path.exists(path) else {}
        if key not in saved and not args.cached_only:
            saved[key] = diagnose(dflags, data, tables, args.threads, args.hot_share)
            with open(path, "w") as f:
                json.dump(saved, f)
        diag = saved.get(key)
    wall = time.perf_counter() - t_start
    runs = [r for rs in rows.values() for r in rs]
    lines = [
        f"Command: `{command}` (seeds {args.seeds}; the seeds column says how many each variant has; this invocation {wall / 60:.1f} min, the runs "
        f"{sum(r.get('seconds', 0) for r in runs) / 60:.1f} min in all, 1 torch thread, 2 shared CPU cores). "
        f"Code: {accuracy.describe_code(runs)}.",
        "",
        machine_info(args.threads)[0],
        "",
        f"Scale: the accuracy benchmark's synthetic data set and DLRM (vocabularies {args.vocab_sizes}, Zipf 1.1, "
        f"dim {args.dim}, batch {args.batch_size}, RowWiseAdagrad lr {args.emb_lr:g}) with **{args.train_rows:,} training rows** "
        f"(the accuracy section's scale), {args.val_rows:,} validation "
        f"rows (for every choice) and {args.test_rows:,} test rows. Differences are per seed to the fp32 run of the "
        "same seed (paired), mean ± standard error. Embedding bytes: `memory_bytes()` (codes, fp16 scales, fp32 "
        "master steps, RowWiseAdagrad state and, for the hot-row tables, the 4 B/row raw id -> frequency rank map) "
        "against fp32 rows + RowWiseAdagrad.",
        "",
    ]
    if diag:
        lines += diag_lines(diag, args.hot_share) + [""]
    lines += ["**Ablations** (validation and test, paired to fp32):", ""]
    lines += summarize(rows, names)
    lines += [
        "",
        "**Chosen on validation, reported on test** (same-bytes options: the best validation AUC; hot-row "
        "share: the fewest bytes whose validation AUC meets the target, else the best):",
        "",
    ]
    lines += selection(rows, names, bits_list, args.emb_lr) + step_lr_lines(rows, args.emb_lr)
    lines += batch_lines(rows, args.batch_size)
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(
            args.write, "lowbit", "Closing the low-bit gap: diagnosis and ablations (int4 / int2)", md
        )


if __name__ == "__main__":
    main()

"""What the DLRM example tells its user: MPE progress and plan, one-line plan errors, short-run curves, provenance."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import train  # examples/dlrm, put on sys.path by conftest

from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "--vocab-sizes", "500,40", "--embedding-dim", "8", "--dense-arch", "8", "--over-arch", "8",
    "--train-rows", "3000", "--val-rows", "500", "--test-rows", "500", "--batch-size", "250",
    "--no-progress", "--threads", "1",
]  # fmt: skip


def test_mpe_prints_plan_path_and_bits_and_records_them(tmp_path, capsys):
    out_plan = tmp_path / "mpe.json"
    s = train.main([*SMALL, "--precision", "mpe", "--mpe-bits", "0,4,8", "--mpe-lambda", "1e-2",
                    "--mpe-groups", "4", "--mpe-plan-out", str(out_plan)])  # fmt: skip
    out = capsys.readouterr().out
    assert "MPE search: one epoch (12 steps), candidate bits (0, 4, 8), 4 frequency groups" in out
    assert f"MPE plan written to {out_plan}:" in out
    plan = PrecisionPlan.load(str(out_plan))
    for name, tp in plan.tables.items():
        line = next(x for x in out.splitlines() if x.startswith(f"  {name} ({tp.rows:,} rows): "))
        rows_at = {}
        for lo, hi, b in zip((0, *tp.group_ends[:-1]), tp.group_ends, tp.bits):
            rows_at[b] = rows_at.get(b, 0) + hi - lo
        for b, n in rows_at.items():
            assert f"{b} bit{' (pruned)' if b == 0 else ''}: {n:,} rows" in line, line
        mean = sum(b * n for b, n in rows_at.items()) / tp.rows
        assert line.endswith(f"; {mean:.2f} bits/row")
        # The summary's "plan" holds the chosen widths (one process: no sharding entries).
        assert s["model"]["plan"][name] == {
            "precision_plan": str(out_plan), "group_ends": list(tp.group_ends), "bits": list(tp.bits)
        }  # fmt: skip


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.mark.parametrize("what", ["missing", "not-json", "wrong-table-size"])
def test_precision_plan_errors_exit_2_with_one_line(tmp_path, what):
    path = tmp_path / "plan.json"
    if what == "not-json":
        path.write_text("{oops")
    elif what == "wrong-table-size":  # t_cat_0 has 500 rows, not 7
        PrecisionPlan({"t_cat_0": TablePrecision(7, 8, (7,), (4,))}).save(str(path))
    p = _run(
        [sys.executable, os.path.join(ROOT, "examples/dlrm/train.py"), *SMALL, "--precision-plan", str(path)]
    )
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --precision-plan"), p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_mpe_at_int4_bytes_writes_a_plan_within_them(tmp_path, capsys):
    from torchrec_lowprec.modules.mpe_budget import plan_bits

    out_plan = tmp_path / "mpe.json"
    train.main([*SMALL, "--precision", "mpe", "--mpe-bits", "0,2,4,8", "--mpe-lambda", "1e-2",
                "--mpe-target-bits", "int4", "--mpe-groups", "4", "--mpe-plan-out", str(out_plan)])  # fmt: skip
    out = capsys.readouterr().out
    # int4 rows at dim 8: 4 B of codes + 4 B of fp16 scale/bias = 8 bits per value
    assert "lambda 0.01 (start of its dual ascent to 8 stored bits per value)" in out
    plan = PrecisionPlan.load(str(out_plan))
    assert plan_bits(plan) <= 8.0
    assert f"  stored bits per value: {plan_bits(plan):.4f} (budget 8.0000)" in out


def test_mpe_under_torchrun_one_error_line_per_rank(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = _run([torchrun, "--nproc-per-node", "2", "--max-restarts", "0", "--tee", "3",
              os.path.join(ROOT, "examples/dlrm/train.py"), *SMALL, "--precision", "mpe",
              "--mpe-plan-out", str(tmp_path / "p.json")], cwd=str(tmp_path))  # fmt: skip
    assert p.returncode != 0
    text = p.stdout + p.stderr
    # torchrun --tee prefixes each worker's lines with [<role><local rank>]: (its own report follows)
    worker = [(m.group(1), m.group(2)) for m in re.finditer(r"^\[[a-z]+([01])\]:(.*)$", text, re.M)]
    assert sorted(r for r, _ in worker) == ["0", "1"], text[-3000:]  # one line per rank, nothing else
    assert all(line.startswith("error: --precision mpe searches in one process") for _, line in worker), (
        worker
    )
    assert "exitcode  : 2" in text


def test_short_run_logs_every_step_and_records_versions(tmp_path):
    png = tmp_path / "curves.png"
    s = train.main([*SMALL, "--precision", "int8", "--quiet", "--plot", str(png)])
    steps = s["train"]["steps"]
    assert steps == 12
    assert [x[0] for x in s["history"]["train"]] == list(range(1, steps + 1))  # < 50 steps: every step
    assert png.stat().st_size > 10_000
    v = s["versions"]
    import torch
    import torchrec

    import torchrec_lowprec

    assert v["torchrec_lowprec"] == torchrec_lowprec.__version__
    assert v["torch"] == torch.__version__ and v["torchrec"] == torchrec.__version__
    assert v["fbgemm_gpu"].startswith("1.8.")
    head = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert v["git_commit"] == head and len(head) == 40
    assert isinstance(v["git_dirty"], bool)

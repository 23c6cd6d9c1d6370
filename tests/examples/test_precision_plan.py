"""The example trains a DLRM whose tables follow a precision plan (frequency groups, pruning)."""

import json
import subprocess
import sys
from pathlib import Path

from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

ROOT = Path(__file__).resolve().parents[2]


def test_train_with_a_precision_plan(tmp_path):
    # the example's small synthetic tables: t_cat_0 (1000 rows), t_cat_1 (100 rows)
    plan = PrecisionPlan(
        {
            "t_cat_0": TablePrecision(1000, 16, (100, 500, 1000), (8, 4, 0)),
            "t_cat_1": TablePrecision(100, 16, (100,), (2,)),
        }
    )
    plan.save(str(tmp_path / "plan.json"))
    summary = tmp_path / "s.json"
    cmd = [
        sys.executable, str(ROOT / "examples/dlrm/train.py"), "--vocab-sizes", "1000,100", "--embedding-dim", "16",
        "--train-rows", "20000", "--test-rows", "4000", "--val-rows", "2000", "--batch-size", "512",
        "--precision-plan", str(tmp_path / "plan.json"), "--summary", str(summary), "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(summary.read_text())
    assert s["test"]["auc"] > 0.6
    ours, fp32 = s["embedding_bytes"]["ours"], s["embedding_bytes"]["fp32_rowwise_adagrad"]
    # int8 rows of 100 ids + int4 of 400 + id map of t_cat_0 + int2 t_cat_1, ALPT + RowWiseAdagrad
    want = 100 * (20 + 8) + 400 * (12 + 8) + 1000 * 4 + 100 * (8 + 8)
    assert ours == want and ours < 0.25 * fp32


def test_precision_mpe_searches_then_trains(tmp_path):
    plan_path, summary = tmp_path / "mpe.json", tmp_path / "s.json"
    cmd = [
        sys.executable, str(ROOT / "examples/dlrm/train.py"), "--vocab-sizes", "5000,100", "--embedding-dim", "16",
        "--train-rows", "20000", "--test-rows", "4000", "--val-rows", "2000", "--batch-size", "512",
        "--precision", "mpe", "--mpe-bits", "0,4,8", "--mpe-lambda", "1e-2", "--mpe-groups", "8",
        "--mpe-plan-out", str(plan_path), "--summary", str(summary), "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = PrecisionPlan.load(str(plan_path))
    bits = plan.tables["t_cat_0"].bits
    assert len(bits) == 8 and set(bits) <= {0, 4, 8}
    assert bits[-1] < bits[0]  # the strong regulariser lowered the rarest group
    s = json.loads(summary.read_text())
    assert s["test"]["auc"] > 0.6
    assert s["embedding_bytes"]["ours"] < 0.35 * s["embedding_bytes"]["fp32_rowwise_adagrad"]


def test_hot_rows_recipe_trains_the_plan_it_describes(tmp_path):
    # docs/precision.md's int4 recipe: fixed step, each table's hottest 60% of rows at 8 bits
    summary = tmp_path / "s.json"
    cmd = [
        sys.executable, str(ROOT / "examples/dlrm/train.py"), "--vocab-sizes", "1000,100", "--embedding-dim", "16",
        "--train-rows", "20000", "--test-rows", "4000", "--val-rows", "2000", "--batch-size", "512",
        "--precision", "int4", "--no-learn-step-size", "--hot-rows", "0.6:8", "--summary", str(summary),
        "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(summary.read_text())
    assert s["test"]["auc"] > 0.6
    plan = s["model"]["plan"]
    assert plan["t_cat_0"]["group_ends"] == [600, 1000] and plan["t_cat_0"]["bits"] == [8, 4]
    assert plan["t_cat_1"]["group_ends"] == [60, 100] and plan["t_cat_1"]["bits"] == [8, 4]
    assert plan["t_cat_0"]["precision_plan"] == "--hot-rows 0.6:8"
    # int8 rows 20 B, int4 rows 12 B, RowWiseAdagrad 4 B/row, no master step, 4 B/row id map
    want = sum(round(0.6 * n) * (20 + 4) + (n - round(0.6 * n)) * (12 + 4) + 4 * n for n in (1000, 100))
    assert s["embedding_bytes"]["ours"] == want


def test_hot_rows_and_a_precision_plan_are_one_choice(tmp_path):
    PrecisionPlan.uniform({"t_cat_0": (1000, 16)}, 8).save(str(tmp_path / "plan.json"))
    cmd = [
        sys.executable, str(ROOT / "examples/dlrm/train.py"), "--vocab-sizes", "1000,100",
        "--hot-rows", "0.6:16", "--precision-plan", str(tmp_path / "plan.json"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --hot-rows and --precision-plan both set the tables' widths: pass one of them"
    ]

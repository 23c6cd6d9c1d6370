"""The DLRM example never trains silently on bad data: non-finite losses, empty or all-malformed
files and precision plans that do not match the model end with exit 2 and one ``error:`` line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import train  # examples/dlrm, put on sys.path by conftest

from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

from .conftest import exit_2

TINY = [
    "--vocab-sizes", "2000,300,50,10", "--num-dense", "3", "--embedding-dim", "8", "--dense-arch", "16",
    "--over-arch", "16", "--threads", "1", "--no-progress", "--quiet", "--train-rows", "3000",
    "--val-rows", "500", "--test-rows", "500", "--batch-size", "256",
]  # fmt: skip


def test_a_nonfinite_loss_stops_naming_the_step(capsys):
    # Adam with lr 1e30 makes the MLP weights ~1e30 after step 1: step 2's logits overflow.
    msg = exit_2(capsys, [*TINY, "--dense-lr", "1e30"])
    assert "training loss is nan at step 2" in msg and "--skip-nonfinite-loss" in msg


def test_skipping_nonfinite_losses_counts_them_and_never_passes_a_nan_model(capsys, tmp_path):
    msg = exit_2(capsys, [*TINY, "--dense-lr", "1e30", "--skip-nonfinite-loss"])
    # 3000 rows / 256 = 12 batches: step 1 trains, the 11 after it are skipped.
    assert "11 batches were skipped for a non-finite loss" in msg and "not finite" in msg
    # A healthy run with the flag: nothing skipped, the summary says so.
    summary = tmp_path / "s.json"
    train.main([*TINY, "--skip-nonfinite-loss", "--summary", str(summary)])
    s = json.loads(summary.read_text())
    assert s["train"]["nonfinite_losses_skipped"] == 0 and s["train"]["steps"] == 12


def _criteo_line(label: str, i: int) -> str:
    return "\t".join([label, *[str(i % 7)] * 13, *[f"{(i * k) % 11:08x}" for k in range(26)]]) + "\n"


@pytest.mark.parametrize("content", ["", "nan_labels"])
def test_an_empty_or_all_malformed_file_is_an_error(tmp_path, capsys, content):
    path = tmp_path / "day_0.tsv"
    path.write_text("" if content == "" else "".join(_criteo_line("nan", i) for i in range(60)))
    msg = exit_2(capsys, [*TINY, "--data", f"criteo:{path}"])
    assert "no training rows in the criteo data" in msg
    if content:
        assert "malformed rows skipped" in msg


def _plan(rows: dict[str, int], dim: int = 8) -> PrecisionPlan:
    return PrecisionPlan({t: TablePrecision(n, dim, (n,), (4,)) for t, n in rows.items()})


def test_a_plan_naming_tables_the_model_lacks_is_an_error(tmp_path, capsys):
    path = tmp_path / "plan.json"
    _plan({"t_cat_0": 2000, "t_user": 100, "t_item": 50}).save(str(path))
    msg = exit_2(capsys, [*TINY, "--precision-plan", str(path)])
    assert "names tables ['t_item', 't_user'] that the model does not have" in msg and "t_cat_3" in msg


def test_tables_a_plan_does_not_name_take_the_default_precision(tmp_path, capsys):
    path, summary = tmp_path / "plan.json", tmp_path / "s.json"
    _plan({"t_cat_0": 2000}).save(str(path))
    argv = [*TINY, "--precision-plan", str(path), "--precision", "int8", "--summary", str(summary)]
    train.main([a for a in argv if a != "--quiet"])
    assert "does not name tables ['t_cat_1', 't_cat_2', 't_cat_3']: they take --precision int8" in (
        capsys.readouterr().out
    )
    s = json.loads(summary.read_text())
    assert np.isfinite(s["test"]["logloss"])
    # t_cat_0 int4 (4 B codes + 4 B step/bias), the other 360 rows int8 (8 + 4); 8 B of optimizer state each.
    assert s["embedding_bytes"]["ours"] == 2000 * (4 + 4 + 8) + 360 * (8 + 4 + 8)

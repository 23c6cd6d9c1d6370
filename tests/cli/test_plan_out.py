"""``torchrec-lowprec plan --out`` in a place no file can be written is refused before planning
(issue 23, item 1): one ``error:`` line naming --out, exit 2, nothing planned."""

from __future__ import annotations

import time

from tests.unwritable import unwritable_dir
from torchrec_lowprec.cli import main

TABLES = "tables:\n  - {name: big, rows: 2000, dim: 64}\n"


def _plan(tmp_path, out: str) -> int:
    tables = tmp_path / "tables.yaml"
    tables.write_text(TABLES)
    argv = ["plan", "--tables", str(tables), "--world-size", "1", "--hbm-gb", "1", "--device", "cpu"]
    return main([*argv, "--out", out])


def test_unwritable_out_is_refused_before_planning(tmp_path, capsys, monkeypatch):
    import torchrec_lowprec.planner as planner

    def reached(*a, **k):
        raise AssertionError("planned although --out cannot be written")

    monkeypatch.setattr(planner, "plan_precision", reached)
    with unwritable_dir(tmp_path) as ro:
        t0 = time.perf_counter()
        assert _plan(tmp_path, str(ro / "plan.json")) == 2
        assert time.perf_counter() - t0 < 30
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"torchrec-lowprec: error: --out {ro}/plan.json: cannot write in {ro}"), lines


def test_a_failed_write_of_the_plan_is_one_error_line(tmp_path, capsys, monkeypatch):
    import errno

    from torchrec_lowprec.planner import MemoryPlan

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(MemoryPlan, "save", full)
    assert _plan(tmp_path, str(tmp_path / "plan.json")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"torchrec-lowprec: error: --out {tmp_path}/plan.json: writing the plan failed: "
                   f"[Errno 28] No space left on device: '{tmp_path}/plan.json'"]  # fmt: skip

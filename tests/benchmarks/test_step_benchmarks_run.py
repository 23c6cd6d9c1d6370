"""The train-step timing benchmarks run end to end in their --quick form (one fresh process,
one round, one batch) on real TorchRec/FBGEMM modules and print their table, so a change to
the library they instrument cannot leave them broken until the next `make bench`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "script, expect",
    [
        ("profile_step.py", ["| KJT handling | bounds check | lookup |", "| int8 |", "| int4 |"]),
        ("embedding_step.py", ["Verdicts (computed from the figures above):", "int8", "int4"]),
        ("recipe_step.py", ["| int4 recipe (fixed step, hot 60% at 8b) |", "recipes' train step >= 1.0x"]),
    ],
)
def test_quick_mode_runs_and_prints_its_table(script, expect):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["--quick", "--procs", "1", "--rounds", "1", "--iters", "1", "--threads", "1"]
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for text in expect:
        assert text in out.stdout, (text, out.stdout[-2000:])


@pytest.mark.parametrize("script", ["embedding_step.py", "sequence_step.py", "recipe_step.py"])
@pytest.mark.parametrize("flag", [("--procs", "0"), ("--dists", "bogus")])
def test_bad_cell_flags_are_one_error_line_before_anything_runs(script, flag):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *flag],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"{script}: error:"), out.stderr[-2000:]
    assert out.stdout == ""

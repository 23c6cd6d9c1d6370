"""benchmarks/sequence_step.py --quick runs end to end on real TorchRec/FBGEMM modules (one
process, one round) and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "sequence_step.py")


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, SCRIPT, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )


def test_quick_mode_measures_every_variant_and_writes_nothing():
    docs = os.path.join(ROOT, "docs", "benchmarks.md")
    before = open(docs).read() if os.path.exists(docs) else None
    out = _run("--quick", "--procs", "1", "--rounds", "1", "--iters", "1", "--threads", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("TorchRec EC FP32", "TorchRec EC FP16", "FBGEMM TBE FP32", "ours int8", "ours int4"):
        assert f"| {name} |" in out.stdout
    assert "Verdicts (computed from the figures above):" in out.stdout
    assert "int8 state <= 0.30x FP32" in out.stdout
    assert (open(docs).read() if os.path.exists(docs) else None) == before


def test_quick_mode_refuses_write_and_unknown_dists():
    out = _run("--quick", "--write", "x.md")
    assert out.returncode == 2 and "--quick writes nothing" in out.stderr
    out = _run("--dists", "uniform,bogus")
    assert out.returncode == 2 and "unknown --dists entry 'bogus'" in out.stderr

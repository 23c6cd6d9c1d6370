"""Distributed faults of the DLRM example under torchrun on 2 CPU ranks (gloo, DMP): a killed
rank restarts the job from the newest complete checkpoint (issue 12, item 16), a hung rank ends
the job within ``--dist-timeout-s`` (item 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from soak import worker_pids  # noqa: E402  (the soak benchmark finds torchrun's workers the same way)

ARGS = [
    "--vocab-sizes", "2000,300,50,10", "--num-dense", "3", "--embedding-dim", "8", "--dense-arch", "16",
    "--over-arch", "16", "--no-progress", "--quiet", "--train-rows", "20000", "--val-rows", "1000",
    "--test-rows", "2000", "--batch-size", "256", "--epochs", "2", "--precision", "int4",
]  # fmt: skip


def _torchrun(*extra: str, restarts: int = 0) -> subprocess.Popen:
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [os.path.join(venv_bin, "torchrun"), "--nproc-per-node", "2", "--max-restarts", str(restarts),
           "--standalone", "examples/dlrm/train.py", *ARGS, *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path: str, proc: subprocess.Popen, seconds: float) -> None:
    end = time.monotonic() + seconds
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < end, f"{path} did not appear within {seconds} s"
        time.sleep(0.2)


def test_killed_rank_restarts_and_ends_like_an_uninterrupted_run(tmp_path):
    ref = _torchrun("--checkpoint-dir", str(tmp_path / "a"), "--summary", str(tmp_path / "a.json"))
    out = ref.communicate(timeout=180)[0]
    assert ref.returncode == 0, out[-3000:]
    ck = tmp_path / "b"
    job = _torchrun("--checkpoint-dir", str(ck), "--checkpoint-every", "20", "--resume", "auto",
                    "--summary", str(tmp_path / "b.json"), restarts=2)  # fmt: skip
    _wait_for(str(ck / "step_000000040"), job, 120)
    pids = worker_pids(job.pid)
    assert sorted(pids) == [0, 1], pids
    os.kill(pids[1], signal.SIGKILL)  # mid-run: the job has 158 steps
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 0, out[-3000:]
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["train"]["resumed_from_step"] is not None and b["train"]["resumed_from_step"] >= 40
    assert b["train"]["steps"] == a["train"]["steps"] == 158
    # Identical, not close: the restarted ranks replay the lost steps bit for bit.
    assert (b["val"], b["test"], b["history"]) == (a["val"], a["test"], a["history"])
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "step_000000140", "step_000000158"]


def test_stopped_rank_ends_the_job_within_the_dist_timeout(tmp_path):
    ck = tmp_path / "c"
    job = _torchrun("--checkpoint-dir", str(ck), "--checkpoint-every", "20", "--dist-timeout-s", "10")
    _wait_for(str(ck / "step_000000020"), job, 120)
    pids = worker_pids(job.pid)
    os.kill(pids[1], signal.SIGSTOP)  # hung, not dead: gloo would wait 30 minutes
    t0 = time.monotonic()
    try:
        out = job.communicate(timeout=75)[0]
    finally:
        if job.poll() is None:
            os.kill(pids[1], signal.SIGKILL)
            job.kill()
    took = time.monotonic() - t0
    assert job.returncode != 0
    # 10 s for rank 0's collective to time out, then torchrun stops the others (SIGTERM, and
    # SIGKILL after its 30 s grace for the stopped one).
    assert took < 10 + 30 + 15, (took, out[-2000:])
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]

"""A real TorchX launch of the DLRM example on 2 local CPU processes (gloo, DMP, TorchRec's planner)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import train  # examples/dlrm, put on sys.path by conftest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = [
    "--train-rows", "30000", "--val-rows", "2000", "--test-rows", "10000", "--vocab-sizes", "3000,500,40,8",
    "--num-dense", "3", "--embedding-dim", "8", "--dense-arch", "16", "--over-arch", "16",
    "--batch-size", "512", "--precision", "int8", "--no-progress",
]  # fmt: skip


def test_torchx_local_cwd_trains_on_two_ranks(tmp_path):
    summary = tmp_path / "summary.json"
    venv_bin = os.path.dirname(sys.executable)  # torchx runs `torchrun` from PATH
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    env.pop("WORLD_SIZE", None)
    cmd = [os.path.join(venv_bin, "torchx"), "run", "-s", "local_cwd", "launch/components.py:dlrm",
           "-j", "1x2", "--", *ARGS, "--summary", str(summary)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr + proc.stdout
    s = json.loads(summary.read_text())
    assert s["world_size"] == 2
    steps = -(-30000 // 512)
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    assert [r["steps"] for r in s["ranks"]] == [steps, steps]
    # TorchRec's planner puts whole tables on ranks (TABLE_WISE on CPU); both ranks hold some.
    plan = s["model"]["plan"]
    assert {p["sharding"] for p in plan.values()} == {"table_wise"}
    assert {r for p in plan.values() for r in p["ranks"]} == {0, 1}
    assert all(b > 0 for b in s["embedding_bytes"]["per_rank"])
    assert s["embedding_bytes"]["ours"] == sum(s["embedding_bytes"]["per_rank"])
    assert s["train"]["rows"] == 30000 - (30000 % 512) % 2  # a last odd row would be dropped
    assert s["test"]["rows"] == 10000 and s["val"]["rows"] == 2000

    # The 2 ranks train on the same global batches as one process does (the sharded embedding
    # gradient is divided by the world size, DDP averages the dense one), so the result is the
    # one-process result up to float summation order.
    one = train.main([*ARGS, "--threads", "1", "--quiet"])
    assert s["embedding_bytes"]["ours"] == one["embedding_bytes"]["ours"]
    assert abs(s["test"]["auc"] - one["test"]["auc"]) < 2e-3, (s["test"], one["test"])
    assert abs(s["test"]["logloss"] - one["test"]["logloss"]) < 2e-3
    assert s["test"]["auc"] > 0.6


def _command(app) -> str:
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role.args[1]


@pytest.mark.parametrize("face", ["package", "checkout"])
def test_component_restarts_and_resumes(face):
    # Not slow: builds the AppDef only (what `torchx run --dryrun` prints).
    if face == "package":
        from torchrec_lowprec.components import DLRM_MODULE, dlrm

        target = f"-m {DLRM_MODULE}"
    else:
        sys.path.insert(0, os.path.join(ROOT, "launch"))
        try:
            import components as launch_components
        finally:
            sys.path.remove(os.path.join(ROOT, "launch"))
        dlrm, target = launch_components.dlrm, launch_components.DLRM_SCRIPT
    cmd = _command(dlrm("--precision", "int8", "--checkpoint-dir", "ck", j="1x2"))
    assert cmd.startswith("torchrun --max-restarts 3 "), cmd
    assert cmd.endswith(f"{target} --precision int8 --checkpoint-dir ck --resume auto"), cmd
    assert "--nproc_per_node 2" in cmd
    cmd = _command(dlrm("--checkpoint-dir=ck", max_restarts=0))
    assert cmd.startswith("torchrun --max-restarts 0 ") and cmd.endswith("--checkpoint-dir=ck --resume auto")
    # An explicit --resume is left alone; without checkpoints there is nothing to resume from.
    assert _command(dlrm("--checkpoint-dir", "ck", "--resume")).endswith("--checkpoint-dir ck --resume")
    assert "--resume" not in _command(dlrm("--precision", "int4"))
    with pytest.raises(ValueError, match="max_restarts must be >= 0"):
        dlrm(max_restarts=-1)


def _supports_resume_auto() -> bool:
    try:
        train.parse_args(["--checkpoint-dir", "x", "--resume", "auto"])
    except SystemExit:
        return False
    return True


def _worker_pids(marker: str, local_rank: str) -> list[int]:
    """Workers (LOCAL_RANK set by torchrun) whose command line holds ``marker``."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if marker in cmd and f"LOCAL_RANK={local_rank}".encode() in env:
            pids.append(int(d))
    return pids


@pytest.mark.skipif(not _supports_resume_auto(), reason="the trainer has no --resume auto")
def test_killed_rank_restarts_and_resumes_to_the_same_result(tmp_path):
    """Issue 12 #16: kill -9 one rank mid-run; torchrun restarts, the trainer resumes, same metrics."""
    import signal
    import time

    args = [*ARGS[:1], "40000", *ARGS[2:], "--checkpoint-every", "20"]  # 79 steps
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)

    def launch(name: str) -> tuple[subprocess.Popen, str, str]:
        ck, summary = str(tmp_path / name / "ck"), str(tmp_path / name / "s.json")
        cmd = [os.path.join(venv_bin, "torchx"), "run", "-s", "local_cwd", "launch/components.py:dlrm",
               "-j", "1x2", "--", *args, "--checkpoint-dir", ck, "--summary", summary]  # fmt: skip
        p = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return p, ck, summary

    p, ck, killed_summary = launch("killed")
    deadline = time.monotonic() + 240
    while not os.path.exists(os.path.join(ck, "LATEST")):  # the first checkpoint (step 20) is complete
        assert p.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    (victim,) = _worker_pids(ck, "1")
    os.kill(victim, signal.SIGKILL)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-4000:]
    killed = json.loads(open(killed_summary).read())
    assert killed["train"]["resumed_from_step"] is not None and killed["train"]["resumed_from_step"] >= 20

    p, _, clean_summary = launch("clean")
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-4000:]
    clean = json.loads(open(clean_summary).read())
    assert clean["train"]["resumed_from_step"] is None
    assert killed["train"]["steps"] == clean["train"]["steps"] == -(-40000 // 512)
    for split in ("val", "test"):  # a resumed run is bit-identical: exact equality
        assert killed[split]["auc"] == clean[split]["auc"], (killed[split], clean[split])
        assert killed[split]["logloss"] == clean[split]["logloss"]

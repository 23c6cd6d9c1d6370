"""The GPU check as on the GPU image (torch + Triton, no fbgemm_gpu, no torchrec): the import
blocker (``scripts/hide/sitecustomize.py``, ``GPU_CHECK_HIDE``) really hides the packages, the
torch + Triton pieces import without them, and a dry run in that mode passes every torch +
Triton phase and skips the FBGEMM / TorchRec ones, naming the missing packages, in budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HIDE = "fbgemm_gpu,torchrec"
TORCH_TRITON = ("compile", "triton-ref", "speed", "memory")
STACK_PHASES = ("fbgemm", "dmp", "bench")


def _hidden_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, GPU_CHECK_HIDE=HIDE, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts" / "hide"), str(ROOT)])
    return env


def test_blocker_hides_packages_and_torch_triton_modules_import_without_them():
    code = (
        "import importlib.util, importlib.metadata as md, json, sys\n"
        "out = {'spec': [importlib.util.find_spec(m) is None for m in ('torchrec', 'fbgemm_gpu')]}\n"
        "dists = {d.metadata['Name'].lower() for d in md.distributions()}\n"
        "out['dists'] = sorted(d for d in dists if d.startswith(('torchrec', 'fbgemm')))\n"
        "try:\n"
        "    import torchrec\n"
        "    out['import'] = 'imported'\n"
        "except ModuleNotFoundError as e:\n"
        "    out['import'] = str(e)\n"
        "import tests.helpers, tests.conftest\n"
        "import torchrec_lowprec, torchrec_lowprec.configs, torchrec_lowprec.optim.fused\n"
        "from torchrec_lowprec.kernels import cpu_native, reference, triton_aot, triton_update\n"
        "from torchrec_lowprec.quant import layout, lsq, rounding\n"
        "out['loaded'] = sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu'))\n"
        "out['torch'] = 'torch' in sys.modules\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_hidden_env(), capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out == {
        "spec": [True, True],
        "dists": [],
        "import": "No module named 'torchrec'",
        "loaded": [],
        "torch": True,
    }


@pytest.mark.slow
def test_dry_run_without_fbgemm_and_torchrec(tmp_path):
    budget = 300
    env = _hidden_env(GPU_CHECK_DRY="1", OUT=str(tmp_path), GPU_CHECK_BUDGET_S=str(budget))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH")  # the script must set up the children's path itself
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    phases = {ph["name"]: ph for ph in summary["phases"]}
    status = {name: ph["status"] for name, ph in phases.items()}
    assert p.returncode == 0, (status, p.stdout[-3000:], p.stderr[-3000:])
    assert summary["hidden"] == ["fbgemm_gpu", "torchrec"]
    assert summary["facts"]["fbgemm_gpu"].startswith("missing (ModuleNotFoundError")
    assert summary["facts"]["torchrec"].startswith("missing (ModuleNotFoundError")
    assert status == {
        "env": "passed",
        "setup": "skipped",
        **{name: "passed" for name in TORCH_TRITON},
        **{name: "skipped" for name in STACK_PHASES},
    }
    for name in STACK_PHASES:
        assert "fbgemm_gpu" in phases[name]["detail"] and "torchrec" in phases[name]["detail"]
        assert phases[name]["seconds"] < 1.0
    assert phases["compile"]["detail"].startswith("sm_90: 3 passed")
    assert phases["triton-ref"]["detail"].startswith("16 passed")
    speed = json.loads((tmp_path / "triton_update_speed.json").read_text())
    assert speed["ok"] is True and len(speed["results"]) == 8  # int8/int4 x 4 variants
    for check in speed["checks"].values():
        assert (
            check["max_code_diff"] <= 2 and check["state_rel_diff"] <= 1e-4 and check["untouched_rows_equal"]
        )
    assert summary["elapsed_s"] <= budget
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check (DRY RUN on CPU stand-ins, hiding")
    assert len(list(tmp_path.iterdir())) <= 8

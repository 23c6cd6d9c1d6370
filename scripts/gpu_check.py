"""The CUDA path on a real GPU, in one prepared run that fits the device budget.

Usage (``make gpu-check`` runs it)::

    OUT=/path/to/out bash scripts/gpu_check.sh          # on a machine with one NVIDIA GPU
    GPU_CHECK_DRY=1 OUT=/tmp/o bash scripts/gpu_check.sh  # dry run on CPU (tested in `make test`)

Phases, each timed and each with its own log under ``$OUT``:

1. ``env``: GPU, driver, Python and the versions of torch / triton / fbgemm_gpu / torchrec.
2. ``setup``: ``make setup`` (the CUDA stack is picked because ``nvidia-smi -L`` answers).
   A machine that cannot reach a package index keeps the interpreter it has; later phases
   that need a missing package (torchrec, fbgemm_gpu) say so and are skipped, not failed.
3. ``kernels``: ``tests/kernels/test_triton_update.py`` compiled for the GPU and
   ``tests/gpu/`` (Triton on the GPU == the CPU reference == the C++ kernel, every case;
   FBGEMM's CUDA IntNBit forward on our buffer; export on CUDA).
4. ``dmp``: ``examples/dlrm/train.py`` under torchrun, one process (nccl on the GPU), int8
   and int4, then a checkpoint round trip (stop at half, resume, same final metrics).
5. ``bench``: the CUDA section of ``benchmarks/embedding_step.py`` (forward and train step vs
   FBGEMM's CUDA FP32/FP16 TBE, peak GPU memory per variant).

The whole run stops itself before ``GPU_CHECK_BUDGET_S`` seconds (default 450: the device
allows 10 minutes a command) and writes ``summary.md`` / ``summary.json`` after every
phase, so a run cut short still reports what it did. The dry run (``GPU_CHECK_DRY=1``)
runs the same phases on CPU stand-ins: Triton in its interpreter on a subset of cases,
gloo instead of nccl, a few steps, the benchmark's ``--quick`` sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRY = os.environ.get("GPU_CHECK_DRY", "0") not in ("", "0")
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "450"))
#: Seconds kept back at the end for writing the summary.
RESERVE_S = 10.0


@dataclass
class Phase:
    name: str
    status: str = "not run"  # passed | failed | skipped | timed out | not run
    seconds: float = 0.0
    detail: str = ""
    log: str = ""
    commands: list[str] = field(default_factory=list)


class Run:
    """Runs the phases against one deadline and rewrites the summary after each."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.start = time.monotonic()
        self.phases: list[Phase] = []
        self.python = sys.executable
        self.facts: dict[str, str] = {}

    def left(self) -> float:
        return BUDGET_S - RESERVE_S - (time.monotonic() - self.start)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["PATH"] = str(Path(self.python).parent) + os.pathsep + env.get("PATH", "")
        env["TRITON_INTERPRET"] = "1" if DRY else "0"
        if DRY:
            env["GPU_CHECK_CASES"] = env.get("GPU_CHECK_CASES", "subset")
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def sh(self, phase: Phase, cmd: list[str], cap_s: float, env: dict | None = None) -> int | None:
        """Run ``cmd`` into the phase's log; None when it ran out of time."""
        phase.commands.append(" ".join(cmd))
        timeout = min(cap_s, self.left())
        if timeout <= 5:
            return None
        with open(self.out / phase.log, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)\n")
            log.flush()
            try:
                p = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env or self.env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                log.write(f"\n[timed out after {timeout:.0f} s]\n")
                return None
            return p.returncode

    def phase(self, name: str, fn) -> Phase:
        ph = Phase(name, log=f"{len(self.phases) + 1}-{name}.log")
        self.phases.append(ph)
        t0 = time.monotonic()
        if self.left() <= 5:
            ph.status, ph.detail = "not run", "no time left in the budget"
        else:
            try:
                fn(ph)
            except Exception as e:  # noqa: BLE001 - a broken phase must not lose the others
                ph.status, ph.detail = "failed", f"{type(e).__name__}: {e}"
        ph.seconds = round(time.monotonic() - t0, 1)
        print(f"[gpu-check] {name}: {ph.status} in {ph.seconds:.1f} s {ph.detail}", flush=True)
        self.write_summary()
        return ph

    def tail(self, phase: Phase, n: int = 15) -> str:
        try:
            lines = (self.out / phase.log).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def write_summary(self) -> None:
        doc = {
            "dry_run": DRY,
            "budget_s": BUDGET_S,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "facts": self.facts,
            "phases": [asdict(p) for p in self.phases],
        }
        (self.out / "summary.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        lines = [
            f"# GPU check ({'DRY RUN on CPU stand-ins' if DRY else 'CUDA'})",
            "",
            *(f"- {k}: {v}" for k, v in self.facts.items()),
            "",
            "| phase | status | seconds | detail | log |",
            "|---|---|---:|---|---|",
            *(f"| {p.name} | {p.status} | {p.seconds:.1f} | {p.detail} | {p.log} |" for p in self.phases),
            "",
        ]
        bench = self.out / "embedding_step_cuda.md"
        if bench.exists():
            lines += ["## Benchmark", "", bench.read_text(encoding="utf-8")]
        (self.out / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def _probe(python: str) -> dict[str, str]:
    """Versions of the stack as ``python`` sees it (a package missing reads 'missing')."""
    code = (
        "import importlib, json, platform\n"
        "out = {'python': platform.python_version()}\n"
        "for m in ('torch', 'triton', 'fbgemm_gpu', 'torchrec'):\n"
        "    try:\n"
        "        out[m] = getattr(importlib.import_module(m), '__version__', 'present')\n"
        "    except Exception as e:\n"
        "        out[m] = 'missing (' + type(e).__name__ + ')'\n"
        "import torch\n"
        "out['cuda'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return {"probe": f"failed: {p.stderr.strip().splitlines()[-1:] or p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def phase_env(run: Run, ph: Phase) -> None:
    smi = shutil.which("nvidia-smi")
    gpu = "none"
    if smi:
        p = subprocess.run([smi, "-L"], capture_output=True, text=True)
        gpu = p.stdout.strip() or p.stderr.strip()
    run.facts["nvidia-smi -L"] = gpu
    run.facts.update(_probe(run.python))
    (run.out / ph.log).write_text(json.dumps(run.facts, indent=1) + "\n", encoding="utf-8")
    if not DRY and "no CUDA" in run.facts.get("cuda", "no CUDA"):
        ph.status, ph.detail = "failed", "torch sees no CUDA device (set GPU_CHECK_DRY=1 for the CPU dry run)"
        return
    ph.status = "passed"


def phase_setup(run: Run, ph: Phase) -> None:
    venv_python = ROOT / ".venv" / "bin" / "python"
    if DRY or os.environ.get("GPU_CHECK_SETUP", "1") == "0":
        ph.status, ph.detail = "skipped", "dry run / GPU_CHECK_SETUP=0: using " + run.python
        return
    rc = run.sh(ph, ["make", "setup"], cap_s=240, env=dict(os.environ))
    if rc == 0 and venv_python.exists():
        run.python = str(venv_python)
        run.facts.update({f"after setup: {k}": v for k, v in _probe(run.python).items()})
        ph.status = "passed"
        return
    ph.status = "failed" if rc is not None else "timed out"
    ph.detail = f"make setup did not finish (no package index?); continuing with {run.python}"


def _needs_stack(run: Run) -> str | None:
    missing = [m for m in ("torchrec", "fbgemm_gpu") if run.facts.get(m, "").startswith("missing")]
    missing += [
        m for m in ("torchrec", "fbgemm_gpu") if run.facts.get(f"after setup: {m}", "").startswith("missing")
    ]
    return ", ".join(sorted(set(missing))) or None


def _pytest_status(ph: Phase, rc: int | None, run: Run) -> None:
    if rc is None:
        ph.status = "timed out"
    elif rc in (0, 5):
        ph.status = "passed"
    else:
        ph.status = "failed"
    summary = [
        ln for ln in run.tail(ph, 40).splitlines() if " passed" in ln or " failed" in ln or "error" in ln
    ]
    ph.detail = summary[-1].strip("= ") if summary else ph.detail


def phase_kernels(run: Run, ph: Phase) -> None:
    tests = ["tests/gpu/test_cuda_paths.py"]
    if not DRY:  # the full Triton-vs-reference suite, compiled; the dry run keeps to the subset
        tests.insert(0, "tests/kernels/test_triton_update.py")
    env = run.env()
    if DRY:
        env["GPU_CHECK_DRY"] = "1"
    rc = run.sh(
        ph, [run.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], cap_s=240, env=env
    )
    _pytest_status(ph, rc, run)


def phase_dmp(run: Run, ph: Phase) -> None:
    missing = _needs_stack(run)
    if missing:
        ph.status, ph.detail = "skipped", f"{missing} not importable on this machine"
        return
    steps = 20 if DRY else 300
    common = [
        "--train-rows", str(steps * 256), "--val-rows", "2000", "--test-rows", "4000",
        "--batch-size", "256", "--no-progress", "--quiet",
    ]  # fmt: skip
    torchrun = [run.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for precision in ("int8", "int4"):
            summary = Path(tmp) / f"{precision}.json"
            cmd = [*torchrun, "examples/dlrm/train.py", "--precision", precision, *common]
            rc = run.sh(ph, [*cmd, "--summary", str(summary)], cap_s=150)
            if rc != 0:
                ph.status = "timed out" if rc is None else "failed"
                ph.detail = f"{precision} training exited {rc}"
                return
            results[precision] = json.loads(summary.read_text())
        # checkpoint round trip: stop at half, resume, compare with the uninterrupted int8 run
        ck = Path(tmp) / "ckpt"
        cmd = [
            *torchrun,
            "examples/dlrm/train.py",
            "--precision",
            "int8",
            *common,
            "--checkpoint-dir",
            str(ck),
        ]
        rc = run.sh(ph, [*cmd, "--max-steps", str(steps // 2)], cap_s=150)
        resumed = Path(tmp) / "resumed.json"
        if rc == 0:
            rc = run.sh(ph, [*cmd, "--resume", "--summary", str(resumed)], cap_s=150)
        if rc != 0:
            ph.status = "timed out" if rc is None else "failed"
            ph.detail = f"checkpoint round trip exited {rc}"
            return
        again = json.loads(resumed.read_text())
    auc = {k: _metric(v, "auc") for k, v in results.items()}
    same = _metric(again, "auc") == auc["int8"]
    ph.status = "passed" if same else "failed"
    ph.detail = f"test AUC int8 {auc['int8']}, int4 {auc['int4']}; resumed int8 {_metric(again, 'auc')}" + (
        " (identical)" if same else " (DIFFERS from the uninterrupted run)"
    )


def _metric(summary: dict, name: str):
    test = summary.get("test") or summary.get("final", {}).get("test") or {}
    return test.get(name)


def phase_bench(run: Run, ph: Phase) -> None:
    missing = _needs_stack(run)
    if missing:
        ph.status, ph.detail = "skipped", f"{missing} not importable on this machine"
        return
    md = run.out / "embedding_step_cuda.md"
    cmd = [
        run.python,
        "benchmarks/embedding_step.py",
        "--device",
        "cpu" if DRY else "cuda",
        "--write",
        str(md),
    ]
    # Both configurations, uniform and Zipf ids, 2 fresh processes per cell (the device budget);
    # the dry run takes the quick sizes.
    cmd += ["--quick"] if DRY else ["--procs", "2", "--dists", "uniform,zipf1.05"]
    rc = run.sh(ph, cmd, cap_s=300)
    ph.status = "passed" if rc == 0 and md.exists() else ("timed out" if rc is None else "failed")


def main() -> int:
    out = Path(os.environ.get("OUT") or os.environ.get("GPU_CHECK_OUT") or ROOT / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out)
    print(f"[gpu-check] {'dry run' if DRY else 'CUDA'}; budget {BUDGET_S:.0f} s; output in {out}", flush=True)
    env_phase = run.phase("env", lambda ph: phase_env(run, ph))
    if env_phase.status == "failed":
        return 1
    for name, fn in (
        ("setup", phase_setup),
        ("kernels", phase_kernels),
        ("dmp", phase_dmp),
        ("bench", phase_bench),
    ):
        run.phase(name, lambda ph, fn=fn: fn(run, ph))
    print((out / "summary.md").read_text(encoding="utf-8"), flush=True)
    return 0 if all(p.status in ("passed", "skipped") for p in run.phases) else 1


if __name__ == "__main__":
    sys.exit(main())

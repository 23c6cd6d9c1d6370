"""The CUDA path on a real GPU, in one prepared run that fits the device budget.

Usage (``make gpu-check`` runs it)::

    OUT=/path/to/out bash scripts/gpu_check.sh          # on a machine with one NVIDIA GPU
    GPU_CHECK_DRY=1 OUT=/tmp/o bash scripts/gpu_check.sh  # dry run on CPU (tested in `make test`)
    GPU_CHECK_DRY=1 GPU_CHECK_HIDE=fbgemm_gpu,torchrec OUT=/tmp/o bash scripts/gpu_check.sh
                                                        # ... as if those were not installed

Phases, each timed, all logged to ``$OUT/gpu-check.log``. The first six need only torch and
Triton; the last three need fbgemm_gpu and torchrec and are *skipped* (with the missing
package named) where those are not importable, never failed:

1. ``env``: GPU, its arch, Python and the versions of torch / triton / fbgemm_gpu / torchrec.
2. ``setup``: uses ``.venv`` if it exists; else ``make setup`` if a package index answers;
   else (no network) skipped, keeping the interpreter it has.
3. ``compile``: ``tests/kernels/test_triton_aot.py`` for the GPU's arch (every Triton kernel
   of the package, the update's pairwise cover: compiles, no spills, IEEE-only fp32 PTX).
4. ``triton-ref``: the compiled Triton update on the GPU == the CPU PyTorch reference (== the
   C++ kernel where it builds), bit for bit: ``tests/kernels/test_triton_update.py`` and the
   update cases of ``tests/gpu/test_cuda_paths.py`` (every case; the dry run a subset).
5. ``speed``: ``benchmarks/triton_update_speed.py``: the Triton update vs a plain PyTorch
   update, int8/int4, two realistic sizes (``--json``/``--md`` into ``$OUT``).
6. ``memory``: the update's peak GPU memory from that run, against bounds (below).
7. ``fbgemm``: FBGEMM's CUDA IntNBit forward on our buffer, export on CUDA (tests/gpu).
8. ``dmp``: ``examples/dlrm/train.py`` under torchrun, one process, int8 and int4, then a
   checkpoint round trip (stop at half, resume, same final metrics).
9. ``bench``: the CUDA section of ``benchmarks/embedding_step.py`` (vs FBGEMM's TBE).

The whole run stops itself before ``GPU_CHECK_BUDGET_S`` seconds (default 540: the device
allows 10 minutes a command) and writes ``summary.md`` / ``summary.json`` after every phase.
The dry run (``GPU_CHECK_DRY=1``) runs the same phases on CPU stand-ins: Triton in its
interpreter on a subset of cases and tiny sizes, gloo instead of nccl, a few steps.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

from gpu_check_lib import DRY, HIDDEN, ROOT, Phase, Run, probe, pytest_status

STACK = ("fbgemm_gpu", "torchrec")
#: The update may allocate at most this per occurrence (plus MEMORY_SLACK) beyond its inputs:
#: the sort of the ids, segment starts/counts, flags (about 50 B) with allocator rounding.
MEMORY_PER_OCC = 256
MEMORY_SLACK = 4 << 20


def phase_env(run: Run, ph: Phase) -> None:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    gpu = "none"
    if smi:
        p = subprocess.run([smi, "-L"], capture_output=True, text=True)
        gpu = p.stdout.strip() or p.stderr.strip()
    run.facts["nvidia-smi -L"] = gpu
    if HIDDEN:
        run.facts["hidden (GPU_CHECK_HIDE)"] = ", ".join(HIDDEN)
    run.facts.update(probe(run.python, run.env()))
    run.log(json.dumps(run.facts, indent=1) + "\n")
    if not DRY and "no CUDA" in run.facts.get("cuda", "no CUDA"):
        ph.status, ph.detail = "failed", "torch sees no CUDA device (set GPU_CHECK_DRY=1 for the CPU dry run)"
        return
    ph.status = "passed"


def _index_reachable(timeout: float = 3.0) -> bool:
    host = os.environ.get("PIP_INDEX_HOST", "pypi.org")
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def phase_setup(run: Run, ph: Phase) -> None:
    venv_python = ROOT / ".venv" / "bin" / "python"
    if DRY or os.environ.get("GPU_CHECK_SETUP", "1") == "0":
        ph.status, ph.detail = "skipped", "dry run / GPU_CHECK_SETUP=0: using " + run.python
        return
    if not venv_python.exists() and not _index_reachable():
        ph.status, ph.detail = "skipped", f"no package index reachable (no network): using {run.python} as is"
        return
    rc = run.sh(ph, ["make", "setup"], cap_s=240, env=dict(os.environ))
    if rc == 0 and venv_python.exists():
        run.python = str(venv_python)
        run.facts.update({k: v for k, v in probe(run.python, run.env()).items()})
        ph.status = "passed"
        return
    ph.status = "failed" if rc is not None else "timed out"
    ph.detail = f"make setup did not finish; continuing with {run.python}"


def _arch(run: Run) -> str:
    """The GPU's sm number (the dry run compiles for sm_90, the H100/H200 the check runs on)."""
    sm = run.facts.get("sm", "none")
    return "90" if DRY or not sm.isdigit() else sm


def phase_compile(run: Run, ph: Phase) -> None:
    env = {k: v for k, v in run.env().items() if k != "TRITON_INTERPRET"}
    env["TRITON_AOT_ARCHS"] = _arch(run)
    cmd = [
        run.python,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "tests/kernels/test_triton_aot.py",
    ]
    pytest_status(ph, run.sh(ph, cmd, cap_s=180, env=env), run)
    ph.detail = f"sm_{env['TRITON_AOT_ARCHS']}: {ph.detail}"


def phase_triton_ref(run: Run, ph: Phase) -> None:
    # Build (or find) the C++ kernel first, so the comparison says whether it took part.
    code = "from torchrec_lowprec.kernels import cpu_native as c; print('native:', c.is_available(), c.load_error())"
    run.sh(ph, [run.python, "-c", code], cap_s=150)
    native = "native: True" in run.tail(5)
    tests = ["tests/gpu/test_cuda_paths.py", "-k", "update_device"]
    if not DRY:  # the whole Triton-vs-reference suite, compiled; the dry run runs it in `make test`
        tests.insert(0, "tests/kernels/test_triton_update.py")
    env = run.env()
    if DRY:
        env["GPU_CHECK_DRY"] = "1"
    cmd = [run.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    pytest_status(ph, run.sh(ph, cmd, cap_s=300, env=env), run)
    ph.detail += (
        "; vs the reference and the C++ kernel" if native else "; vs the reference (C++ kernel not built)"
    )


def phase_speed(run: Run, ph: Phase) -> None:
    res = run.out / "triton_update_speed.json"
    cmd = [run.python, "benchmarks/triton_update_speed.py", "--json", str(res), "--md", str(run.out / "triton_update_speed.md")]  # fmt: skip
    rc = run.sh(ph, cmd, cap_s=240)
    if rc is None or not res.exists():
        ph.status, ph.detail = ("timed out" if rc is None else "failed"), f"benchmark exited {rc}"
        return
    doc = json.loads(res.read_text())
    ph.status = "passed" if rc == 0 and doc["ok"] else "failed"
    best = {}
    for r in doc["results"]:
        if r["variant"].startswith("triton"):
            key = f"{r['size']}/int{r['bits']}"
            best[key] = max(best.get(key, 0.0), r["speedup"])
    ph.detail = "best Triton speed-up vs torch: " + ", ".join(f"{k} {v:.3g}x" for k, v in best.items())
    if not doc["ok"]:
        ph.detail += "; torch and triton DISAGREE (see checks in summary.md)"


def phase_memory(run: Run, ph: Phase) -> None:
    res = run.out / "triton_update_speed.json"
    if not res.exists():
        ph.status, ph.detail = "failed", "no results from the speed phase"
        return
    rows = json.loads(res.read_text())["results"]
    if all(r["extra_bytes"] is None for r in rows):
        ph.status = "passed" if DRY else "failed"
        ph.detail = f"no CUDA allocator: peak memory not measured ({len(rows)} variants ran)"
        return
    torch_extra = {(r["size"], r["bits"]): r["extra_bytes"] for r in rows if r["variant"] == "torch"}
    bad, notes = [], []
    for r in rows:
        if not r["variant"].startswith("triton"):
            continue
        bound = MEMORY_PER_OCC * r["occurrences"] + MEMORY_SLACK
        base = torch_extra.get((r["size"], r["bits"]))
        key = f"{r['size']}/int{r['bits']}/{r['variant']}"
        if r["extra_bytes"] > bound or (base is not None and r["extra_bytes"] >= base):
            bad.append(f"{key} +{r['extra_bytes'] / 2**20:.1f} MiB (bound {bound / 2**20:.1f}, torch {base})")
        if r["variant"] == "triton":
            notes.append(f"{key} +{r['extra_bytes'] / 2**20:.1f} MiB vs torch +{(base or 0) / 2**20:.1f} MiB")
    ph.status = "failed" if bad else "passed"
    ph.detail = "; ".join(bad or notes)


def phase_fbgemm(run: Run, ph: Phase) -> None:
    missing = run.missing(*STACK)
    if missing:
        ph.status, ph.detail = "skipped", f"{missing} not importable on this machine"
        return
    env = run.env()
    if DRY:
        env["GPU_CHECK_DRY"] = "1"
    cmd = [run.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu/test_cuda_paths.py", "-k", "forward or export"]  # fmt: skip
    pytest_status(ph, run.sh(ph, cmd, cap_s=150, env=env), run)


def phase_dmp(run: Run, ph: Phase) -> None:
    missing = run.missing(*STACK)
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
    missing = run.missing(*STACK)
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


PHASES = {
    "setup": phase_setup,
    "compile": phase_compile,
    "triton-ref": phase_triton_ref,
    "speed": phase_speed,
    "memory": phase_memory,
    "fbgemm": phase_fbgemm,
    "dmp": phase_dmp,
    "bench": phase_bench,
}


def main() -> int:
    out = Path(os.environ.get("OUT") or os.environ.get("GPU_CHECK_OUT") or ROOT / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out)
    mode = "dry run" if DRY else "CUDA"
    print(
        f"[gpu-check] {mode}; budget {run.left() + 10:.0f} s; hidden {list(HIDDEN)}; output in {out}",
        flush=True,
    )
    if run.phase("env", lambda ph: phase_env(run, ph)).status == "failed":
        return 1
    for name, fn in PHASES.items():
        run.phase(name, lambda ph, fn=fn: fn(run, ph))
    print((out / "summary.md").read_text(encoding="utf-8"), flush=True)
    return 0 if all(p.status in ("passed", "skipped") for p in run.phases) else 1


if __name__ == "__main__":
    sys.exit(main())

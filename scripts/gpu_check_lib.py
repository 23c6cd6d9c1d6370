"""The machinery of ``scripts/gpu_check.py``: phases against one deadline, one log, the summary.

Everything lands in ``$OUT`` as at most five files (the device returns at most eight):
``gpu-check.log`` (every command's output, a header per phase), ``summary.md`` /
``summary.json`` (rewritten after every phase, so a run cut short still reports), and the
benchmarks' own result files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRY = os.environ.get("GPU_CHECK_DRY", "0") not in ("", "0")
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "540"))
#: Seconds kept back at the end for writing the summary.
RESERVE_S = 10.0
#: Top-level packages made to look uninstalled in the child processes (``scripts/hide``).
HIDDEN = tuple(m.strip() for m in os.environ.get("GPU_CHECK_HIDE", "").split(",") if m.strip())
HIDE_DIR = ROOT / "scripts" / "hide"
LOG = "gpu-check.log"
#: Result files of the benchmarks whose markdown is appended to summary.md.
SECTIONS = ("triton_update_speed.md", "embedding_step_cuda.md")


@dataclass
class Phase:
    """One phase's outcome: ``status`` is passed | failed | skipped | timed out | not run."""

    name: str
    status: str = "not run"
    seconds: float = 0.0
    detail: str = ""
    log: str = LOG
    commands: list[str] = field(default_factory=list)


class Run:
    """Runs the phases against one deadline and rewrites the summary after each."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.start = time.monotonic()
        self.phases: list[Phase] = []
        self.python = sys.executable
        self.facts: dict[str, str] = {}
        (out / LOG).write_text("", encoding="utf-8")

    def left(self) -> float:
        """Seconds left before the summary must be written."""
        return BUDGET_S - RESERVE_S - (time.monotonic() - self.start)

    def env(self) -> dict[str, str]:
        """The environment of every child: the checkout first on the path, the interpreter's
        bin on PATH, Triton compiled (GPU) or interpreted (dry run), hidden packages hidden."""
        env = dict(os.environ)
        paths = [str(ROOT)] + ([str(HIDE_DIR)] if HIDDEN else [])
        env["PYTHONPATH"] = os.pathsep.join([*paths[::-1], env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        env["PATH"] = str(Path(self.python).parent) + os.pathsep + env.get("PATH", "")
        env["TRITON_INTERPRET"] = "1" if DRY else "0"
        if DRY:
            env["GPU_CHECK_CASES"] = env.get("GPU_CHECK_CASES", "subset")
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def log(self, text: str) -> None:
        """Append ``text`` to the run's log."""
        with open(self.out / LOG, "a", encoding="utf-8") as f:
            f.write(text)

    def sh(self, phase: Phase, cmd: list[str], cap_s: float, env: dict | None = None) -> int | None:
        """Run ``cmd`` into the log; its exit code, or None when it ran out of time."""
        phase.commands.append(" ".join(cmd))
        timeout = min(cap_s, self.left())
        if timeout <= 5:
            return None
        self.log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)\n")
        with open(self.out / LOG, "a", encoding="utf-8") as log:
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

    def phase(self, name: str, fn: Callable[[Phase], None]) -> Phase:
        """Run one phase (a failure in it never stops the others) and rewrite the summary."""
        ph = Phase(name)
        self.phases.append(ph)
        self.log(f"\n===== phase {len(self.phases)}: {name} =====\n")
        t0 = time.monotonic()
        if self.left() <= 5:
            ph.status, ph.detail = "not run", "no time left in the budget"
        else:
            try:
                fn(ph)
            except Exception as e:  # noqa: BLE001 - a broken phase must not lose the others
                ph.status, ph.detail = "failed", f"{type(e).__name__}: {e}"
        ph.seconds = round(time.monotonic() - t0, 1)
        self.log(f"----- {name}: {ph.status} in {ph.seconds:.1f} s {ph.detail}\n")
        print(f"[gpu-check] {name}: {ph.status} in {ph.seconds:.1f} s {ph.detail}", flush=True)
        self.write_summary()
        return ph

    def tail(self, n: int = 15) -> str:
        """The log's last ``n`` lines (the phase running now wrote them)."""
        try:
            lines = (self.out / LOG).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def missing(self, *modules: str) -> str | None:
        """Which of ``modules`` the env phase found not importable (comma-joined), or None."""
        gone = [m for m in modules if self.facts.get(m, "missing").startswith("missing")]
        return ", ".join(gone) or None

    def write_summary(self) -> None:
        """``summary.json`` and ``summary.md`` from the phases so far."""
        doc = {
            "dry_run": DRY,
            "hidden": list(HIDDEN),
            "budget_s": BUDGET_S,
            "elapsed_s": round(time.monotonic() - self.start, 1),
            "facts": self.facts,
            "phases": [asdict(p) for p in self.phases],
        }
        (self.out / "summary.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        title = "DRY RUN on CPU stand-ins" if DRY else "CUDA"
        lines = [
            f"# GPU check ({title}{', hiding ' + ', '.join(HIDDEN) if HIDDEN else ''})",
            "",
            *(f"- {k}: {v}" for k, v in self.facts.items()),
            f"- elapsed: {doc['elapsed_s']} s of a {BUDGET_S:.0f} s budget",
            "",
            "| phase | status | seconds | detail |",
            "|---|---|---:|---|",
            *(f"| {p.name} | {p.status} | {p.seconds:.1f} | {p.detail} |" for p in self.phases),
            "",
        ]
        for name in SECTIONS:
            if (self.out / name).exists():
                lines += [f"## {name}", "", (self.out / name).read_text(encoding="utf-8")]
        (self.out / "summary.md").write_text("\n".join(lines), encoding="utf-8")


def probe(python: str, env: dict[str, str]) -> dict[str, str]:
    """Versions of the stack as ``python`` sees it in ``env`` (a package missing reads
    'missing (<error>)'), the CUDA device and its arch (``sm``)."""
    code = (
        "import importlib, json, platform\n"
        "out = {'python': platform.python_version()}\n"
        "for m in ('torch', 'triton', 'fbgemm_gpu', 'torchrec'):\n"
        "    try:\n"
        "        out[m] = getattr(importlib.import_module(m), '__version__', 'present')\n"
        "    except Exception as e:\n"
        "        out[m] = 'missing (' + type(e).__name__ + ')'\n"
        "import torch\n"
        "cuda = torch.cuda.is_available()\n"
        "out['cuda'] = torch.cuda.get_device_name(0) if cuda else 'no CUDA device'\n"
        "out['sm'] = '%d%d' % torch.cuda.get_device_capability(0) if cuda else 'none'\n"
        "print(json.dumps(out))\n"
    )
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if p.returncode != 0:
        return {"probe": f"failed: {p.stderr.strip().splitlines()[-1:] or p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def pytest_status(ph: Phase, rc: int | None, run: Run) -> None:
    """A pytest phase's status from its exit code, its detail from pytest's summary line."""
    ph.status = "timed out" if rc is None else ("passed" if rc == 0 else "failed")
    summary = [ln for ln in run.tail(40).splitlines() if " passed" in ln or " failed" in ln or "error" in ln]
    ph.detail = summary[-1].strip("= ") if summary else f"pytest exited {rc}"

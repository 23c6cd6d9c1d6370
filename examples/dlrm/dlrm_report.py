"""What the DLRM example prints and writes at the end: the report lines, the training curves,
the versions of the stack it ran on."""

from __future__ import annotations

import os
import sys


def _git(folder: str, *argv: str) -> str | None:
    import subprocess

    try:
        p = subprocess.run(["git", "-C", folder, *argv], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def versions() -> dict:
    """Library / stack versions and the git commit of the library's checkout (None if not one)."""
    import torchrec_lowprec
    from torchrec_lowprec._versions import installed_versions

    here = os.path.dirname(os.path.abspath(torchrec_lowprec.__file__))
    commit = _git(here, "rev-parse", "HEAD") or None
    status = _git(here, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "torchrec_lowprec": torchrec_lowprec.__version__,
        **installed_versions(),
        "python": sys.version.split()[0],
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
    }


def report(summary: dict) -> str:
    """A few human-readable lines of a summary."""
    t, v, b = summary["test"], summary["val"], summary["bayes"]
    by = summary["embedding_bytes"]
    lines = [
        f"val  AUC {v['auc']:.4f}  log-loss {v['logloss']:.4f}  ({v['rows']} rows)",
        f"test AUC {t['auc']:.4f}  log-loss {t['logloss']:.4f}  ({t['rows']} rows)",
    ]
    if b and b["test"]:
        lines.append(f"Bayes test AUC {b['test']['auc']:.4f}  log-loss {b['test']['logloss']:.4f}")
    lines.append(
        f"embedding bytes {by['ours']:,} ({by['ratio']:.3f}x of fp32 + RowWiseAdagrad {by['fp32_rowwise_adagrad']:,})"
    )
    tr = summary["train"]
    lines.append(f"{tr['steps']} steps, {tr['rows']:,} rows, {tr['examples_per_s']:,.0f} examples/s")
    bad = {k: n for k, n in summary["data"]["malformed_rows"].items() if n}
    if bad:
        lines.append(f"malformed rows skipped: {bad}")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Training loss and validation AUC against steps (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = summary["history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    every = 50
    if h["train"]:
        s, loss = zip(*h["train"])
        ax1.plot(s, loss, marker="o" if len(s) < 60 else None, ms=3)
        every = s[1] - s[0] if len(s) > 1 else s[0]
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"train log-loss (mean over {every} step{'s' if every > 1 else ''})")
    evals = h["eval"] + [[summary["train"]["steps"], summary["val"]["auc"], summary["val"]["logloss"]]]
    s, auc, _ = zip(*evals)
    ax2.plot(s, auc, marker="o", label=summary["model"]["precision"])
    if summary["bayes"] and summary["bayes"]["val"]:
        ax2.axhline(summary["bayes"]["val"]["auc"], color="k", ls="--", label="Bayes")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation AUC")
    ax2.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def json_default(o):
    return str(o)  # paths, devices: anything json does not know is written as text

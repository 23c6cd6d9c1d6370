"""Soak: the DLRM example on 2 CPU ranks under ``torchrun --max-restarts``, a random rank killed
(SIGKILL) every few minutes, checkpoints every ``--checkpoint-every`` steps, for ``--minutes``.

Then the job is stopped at a checkpoint, one last segment trains ``--checkpoint-every`` more steps
without kills, and an uninterrupted run of the same number of steps is the reference. Reports:
kills and restarts, resident memory of every worker process over its life (and of torchrun's
agent over the whole soak), temp files left in the checkpoint folder, and whether the final
metrics equal the reference's exactly. A benchmark, not a test (it takes ``--minutes`` plus the
reference run). It runs the committed code (``git archive HEAD`` into the work folder), so edits
made while it runs do not reach the restarted ranks.

    python benchmarks/soak.py --minutes 20 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import publish  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = [
    "--vocab-sizes", "20000,5000,500,50", "--num-dense", "4", "--embedding-dim", "16", "--dense-arch", "32",
    "--over-arch", "32", "--train-rows", "50000", "--val-rows", "2000", "--test-rows", "5000",
    "--batch-size", "512", "--epochs", "100000", "--precision", "int4", "--no-progress", "--quiet",
]  # fmt: skip
SCRATCH = (".partial-", ".trash-", ".tmp-")


def worker_pids(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun workers that are children of ``parent`` (read from /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{d}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(d)
    return out


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def torchrun(code: str, ckpt: str, extra: list[str], restarts: int, log) -> subprocess.Popen:
    venv_bin = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [os.path.join(venv_bin, "torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts",
           str(restarts), "examples/dlrm/train.py", *MODEL, "--threads", "1", "--checkpoint-dir", ckpt, *extra]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def newest_step(code: str, ckpt: str) -> int:
    sys.path.insert(0, code)
    sys.path.insert(0, os.path.join(code, "examples", "dlrm"))
    import dlrm_checkpoint

    path = dlrm_checkpoint.latest(ckpt)
    return int(os.path.basename(path).split("_")[1]) if path else 0


def soak(args: argparse.Namespace) -> dict:
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, "soak")
    code = os.path.join(work, "code")
    os.makedirs(code)
    commit = _commit()
    subprocess.run(f"git archive {commit} | tar -x -C {code}", shell=True, cwd=ROOT, check=True)
    rng = random.Random(args.seed)
    log = open(os.path.join(work, "soak.log"), "w")
    every = ["--checkpoint-every", str(args.checkpoint_every)]
    job = torchrun(code, ckpt, [*every, "--resume", "auto"], restarts=1000, log=log)
    t0 = time.monotonic()
    samples: dict[int, list[tuple[float, float]]] = {}  # pid -> [(t, rss)]
    agent: list[tuple[float, float]] = []
    ckpt_seen: dict[str, float] = {}
    kills: list[tuple[float, int]] = []
    next_kill = t0 + args.kill_every_s * rng.uniform(0.6, 1.4)
    while time.monotonic() - t0 < args.minutes * 60:
        now = time.monotonic()
        pids = worker_pids(job.pid)
        for pid in pids.values():
            r = rss_mib(pid)
            if r is not None:
                samples.setdefault(pid, []).append((now - t0, r))
        a = rss_mib(job.pid)
        if a is not None:
            agent.append((now - t0, a))
        if os.path.isdir(ckpt):
            for d in os.listdir(ckpt):
                if d.startswith("step_") and d not in ckpt_seen:
                    ckpt_seen[d] = now - t0
        if now >= next_kill and len(pids) == 2:
            rank = rng.randrange(2)
            os.kill(pids[rank], signal.SIGKILL)
            kills.append((now - t0, rank))
            next_kill = now + args.kill_every_s * rng.uniform(0.6, 1.4)
        assert job.poll() is None, f"the soak job ended early (rc {job.returncode}); see {work}/soak.log"
        time.sleep(args.sample_s)
    # Stop at a checkpoint: end the job, then train one more interval without kills.
    os.killpg(job.pid, signal.SIGTERM)
    job.wait(timeout=120)
    stopped_at = newest_step(code, ckpt)
    final_steps = stopped_at + args.checkpoint_every
    soak_s = time.monotonic() - t0
    summary = os.path.join(work, "soak.json")
    last = torchrun(code, ckpt, [*every, "--resume", "auto", "--max-steps", str(final_steps), "--summary", summary],
                    restarts=0, log=log)  # fmt: skip
    assert last.wait() == 0, f"the last segment failed; see {work}/soak.log"
    leftovers = sorted(d for d in os.listdir(ckpt) if d.startswith(SCRATCH))
    t1 = time.monotonic()
    ref_summary = os.path.join(work, "reference.json")
    ref_ckpt = os.path.join(work, "reference")
    ref = torchrun(code, ref_ckpt, [*every, "--overwrite", "--max-steps", str(final_steps), "--summary", ref_summary],
                   restarts=0, log=log)  # fmt: skip
    assert ref.wait() == 0, f"the reference run failed; see {work}/soak.log"
    ref_s = time.monotonic() - t1
    a, b = json.load(open(ref_summary)), json.load(open(summary))
    lives = []
    for pid, s in samples.items():
        if s[-1][0] - s[0][0] >= 60:  # lived a minute or more: compare its first minute to its end
            base = next(r for t, r in s if t - s[0][0] >= 30)
            lives.append((pid, s[-1][0] - s[0][0], base, s[-1][1], max(r for _, r in s)))
    marks = sorted(ckpt_seen.values())
    gaps = [y - x for x, y in zip(marks, marks[1:])]
    return {
        "commit": commit, "cpu": _cpu(), "soak_s": soak_s, "reference_s": ref_s, "kills": kills, "stopped_at": stopped_at,
        "final_steps": final_steps, "lives": lives, "agent": _first_minute_and_end(agent),
        "leftovers": leftovers, "checkpoint_gap_s": sorted(gaps)[len(gaps) // 2] if gaps else None,
        "equal": {k: a[k] == b[k] for k in ("val", "test", "history")},
        "metrics": {"test": b["test"], "val": b["val"], "reference_test": a["test"]},
        "resumed_from": b["train"]["resumed_from_step"], "workers_seen": len(samples),
    }  # fmt: skip


def _first_minute_and_end(samples: list[tuple[float, float]]) -> tuple[float, float] | None:
    """RSS one minute in (past start-up) and at the end."""
    later = [r for t, r in samples if t >= 60]
    return (later[0], later[-1]) if later else None


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def _check_snapshot(commit: str, code: str) -> None:
    """Raise unless the files of ``git archive commit`` equal the snapshot folder ``code``."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run(f"git archive {commit} | tar -x -C {d}", shell=True, cwd=ROOT, check=True)
        diff = subprocess.run(["diff", "-rq", "-x", "__pycache__", d, code], capture_output=True, text=True)
        if diff.returncode != 0:
            raise SystemExit(f"the run's code snapshot {code} is not commit {commit}:\n{diff.stdout[:2000]}")


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def lines_of(r: dict, args: argparse.Namespace) -> list[str]:
    growth = [end - base for _, _, base, end, _ in r["lives"]]
    out = [
        f"Commit {r['commit']}, CPU: {r['cpu']} (shared with other work), 2 ranks x 1 thread, gloo. Model: "
        f"`{' '.join(MODEL)}`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| soak duration | {r['soak_s'] / 60:.1f} min, then a last segment without kills |",
        f"| ranks killed (SIGKILL) | {len(r['kills'])} (every {args.kill_every_s:.0f} s ± 40 %, random rank) |",
        f"| worker processes seen | {r['workers_seen']} (2 per restart) |",
        f"| checkpoint interval | every {args.checkpoint_every} steps, median {r['checkpoint_gap_s'] or 0:.0f} s apart |",
        f"| steps trained | {r['final_steps']} (stopped at checkpoint {r['stopped_at']}, final run resumed from {r['resumed_from']}) |",
        f"| worker RSS over a life >= 1 min (30 s in -> end) | {len(growth)} lives, growth max {max(growth, default=0):+.1f} MiB, mean {sum(growth) / max(1, len(growth)):+.1f} MiB |",
        f"| torchrun agent RSS (1 min in -> end of soak) | {r['agent'][0]:.0f} -> {r['agent'][1]:.0f} MiB |"
        if r["agent"] else "| torchrun agent RSS | not sampled |",
        f"| temp files left in the checkpoint folder | {len(r['leftovers'])} {r['leftovers'] or ''} |",
        f"| final metrics == uninterrupted run ({r['reference_s'] / 60:.1f} min) | "
        f"{'yes' if all(r['equal'].values()) else 'NO: ' + str(r['equal'])} (test AUC {r['metrics']['test']['auc']:.6f}, "
        f"log-loss {r['metrics']['test']['logloss']:.6f}; val and loss history compared too) |",
    ]  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="how long ranks are killed (default 20)")
    ap.add_argument("--kill-every-s", type=float, default=180.0, help="mean seconds between kills")
    ap.add_argument(
        "--checkpoint-every", type=int, default=900, help="steps between checkpoints (about a minute here)"
    )
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument("--seed", type=int, default=0, help="which rank is killed when")
    ap.add_argument("--workdir", default="runs/soak", help="checkpoints, logs and summaries go here")
    ap.add_argument("--write", help="write the section into this markdown file (docs/benchmarks.md)")
    ap.add_argument(
        "--report-only", metavar="COMMIT", nargs="?", const="",
        help="write the section from --workdir's result.json instead of running; a result without its "
        "commit needs COMMIT, accepted only if `git archive COMMIT` equals the run's code snapshot",
    )  # fmt: skip
    args = ap.parse_args(argv)
    argv_list = list(argv if argv is not None else sys.argv[1:])
    if args.report_only is not None:
        r = json.load(open(os.path.join(args.workdir, "result.json")))
        if "commit" not in r:
            if not args.report_only:
                ap.error("this result.json does not record its commit; pass --report-only COMMIT")
            _check_snapshot(args.report_only, os.path.join(args.workdir, "code"))
            r["commit"], r["cpu"] = args.report_only, _cpu()
        argv_list = [a for a in argv_list if not a.startswith("--report-only") and a != args.report_only]
    else:
        if os.path.exists(os.path.join(args.workdir, "soak")):
            ap.error(f"{args.workdir}/soak exists; remove it or pass another --workdir")
        r = soak(args)
        json.dump(r, open(os.path.join(args.workdir, "result.json"), "w"), indent=1)
    publish(args.write, "soak", "Soak: 2 ranks, killed ranks, restarts", "benchmarks/soak.py", argv_list,
            lines_of(r, args))  # fmt: skip
    if not all(r["equal"].values()) or r["leftovers"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""The timing benchmarks' protocol: every cell is timed in several fresh processes, one after
the other (a process's allocator, caches and thread pool state are part of what one process
measures, so the spread over processes is the honest error bar on a shared VM).

A script adds the worker flags with :func:`add_worker_args`, answers ``--worker`` itself (one
JSON line on stdout, last), and calls :func:`run_fresh` for each cell."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """``--rounds``, ``--iters``, ``--threads`` and the hidden ``--worker`` / ``--dist`` /
    ``--seed`` a fresh process is started with."""
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all variants per process")
    ap.add_argument("--iters", type=int, default=4, help="batches timed per variant per round")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="threads per process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dist", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)


def rows_label(rows: int) -> str:
    """``200k`` / ``1M``: a table size as the benchmark tables print it."""
    return f"{rows // 1000}k" if rows < 1_000_000 else f"{rows // 1_000_000}M"


def run_fresh(
    script: str,
    setup: Any,
    dist: str,
    args: argparse.Namespace,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    describe: Callable[[dict], str] | None = None,
) -> list[dict]:
    """``args.procs`` fresh processes of ``script --worker <setup as JSON> --dist <dist>``, one
    after the other, with ``args``' rounds, iters and threads (``OMP/MKL_NUM_THREADS`` too) and
    seed = the process's number; each one's last stdout line, parsed. ``describe``: a short
    progress text from one result."""
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), **(env or {})
    )
    results = []
    for p in range(args.procs):
        cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(asdict(setup)), "--dist", dist,
               "--rounds", str(args.rounds), "--iters", str(args.iters), "--threads", str(args.threads),
               "--seed", str(p), *extra]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark process failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        tail = f": {describe(r)}" if describe else " done"
        print(f"  {setup.label()} | {dist} | process {p + 1}/{args.procs}{tail}", flush=True)
    return results

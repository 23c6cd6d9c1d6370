"""Run a test body in N gloo processes on CPU (torch.multiprocessing)."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_multiprocess(fn, *args, world_size: int = 2) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; a failure on any
    rank raises here with that rank's traceback. ``fn`` must be importable (module level)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(world_size, os.path.join(d, "init"), fn, args), nprocs=world_size, join=True)

"""Checkpoints of the DLRM example: model, dense optimizer, step counter and data position.

Layout of ``--checkpoint-dir``::

    LATEST                 name of the newest complete checkpoint (written last, atomically)
    step_000120/           one checkpoint
        model.pt           one process: the model's state_dict (torch.save)
        model/             several processes: the DMP state_dict through DCP (every rank writes)
        trainer.pt         dense optimizer state, step, epoch, rows consumed in the epoch, history

The low-precision tables' state_dict holds their codes, step sizes, optimizer state and the
stochastic-rounding position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import io
import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchrec_lowprec.data import atomic_write_bytes
from torchrec_lowprec.distributed import checkpoint as dcp_checkpoint

LATEST = "LATEST"


def _save_bytes(path: str, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save(
    ckpt_dir: str, model: nn.Module, dense_opt: torch.optim.Optimizer, trainer: dict, keep: int = 2
) -> str:
    """Write checkpoint ``step_<step>`` (all ranks call this) and point ``LATEST`` at it."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    name = f"step_{trainer['step']:09d}"
    path = os.path.join(ckpt_dir, name)
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    if distributed:
        dist.barrier()
        dcp_checkpoint.save(model, os.path.join(path, "model"))
    else:
        _save_bytes(os.path.join(path, "model.pt"), model.state_dict())
    if rank == 0:
        # Dense parameters are replicated (DDP), so rank 0's optimizer state is everyone's.
        _save_bytes(os.path.join(path, "trainer.pt"), {**trainer, "dense_opt": dense_opt.state_dict()})
    if distributed:
        dist.barrier()
    if rank == 0:
        atomic_write_bytes(os.path.join(ckpt_dir, LATEST), name.encode())
        old = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and d != name)
        for d in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(os.path.join(ckpt_dir, d), ignore_errors=True)
    return path


def latest(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint in ``ckpt_dir`` (None if there is none)."""
    marker = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return os.path.join(ckpt_dir, f.read().strip())


def _load_dcp(model: nn.Module, path: str) -> None:
    """``torchrec_lowprec.distributed.checkpoint.load``, except on table-wise plans.

    DCP's default load planner drops ShardedTensors a rank holds no shard of, then takes the
    missing keys for a pre-2.4 checkpoint, re-flattens the state dict the old way and fails on
    ``..._extra_state`` ("Missing key in checkpoint state_dict"). That happens whenever some rank
    holds no shard of some table (TABLE_WISE), so this loads with ``flatten_sharded_tensors=False``
    (our ShardedTensors are not nested, which is all that option is for). The collection's own
    ``load_state_dict`` still checks every table against the checkpoint.
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint import load as dcp_load

    if not (dist.is_available() and dist.is_initialized()):
        dcp_checkpoint.load(model, path)  # one process: every table is local, no such problem
        return
    state = model.state_dict()
    dcp_load(state, checkpoint_id=path, planner=DefaultLoadPlanner(flatten_sharded_tensors=False))
    model.load_state_dict(state)


def load(path: str, model: nn.Module, dense_opt: torch.optim.Optimizer) -> dict:
    """Load ``path`` into ``model`` and ``dense_opt``; returns the trainer state."""
    trainer = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
    if os.path.isdir(os.path.join(path, "model")):
        _load_dcp(model, os.path.join(path, "model"))
    else:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"{path} was written by one process (model.pt); a sharded run resumes from a sharded "
                "checkpoint only"
            )
        state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(state)
    dense_opt.load_state_dict(trainer.pop("dense_opt"))
    return trainer

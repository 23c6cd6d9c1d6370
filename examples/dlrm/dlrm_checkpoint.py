"""Checkpoints of the DLRM example: model, dense optimizer, step counter and data position.

Layout of ``--checkpoint-dir``::

    LATEST                 name of the newest checkpoint written (a hint; the manifests decide)
    step_000120/           one complete checkpoint
        model.pt           one process: the model's state_dict (torch.save)
        model/             several processes: the DMP state_dict through DCP (every rank writes)
        trainer.pt         dense optimizer state, step, epoch, rows consumed in the epoch, history
        MANIFEST.json      size and SHA-256 of every file above, written last
    .partial-step_000130/  a checkpoint being written (renamed to step_000130 once complete)

A checkpoint is *complete* when its manifest verifies. Resuming takes the newest complete one
(warning about every newer one that is not: truncated, altered, half-written); nothing is ever
unpickled beyond tensors and plain types (``torch.load(weights_only=True)``; DCP through
:class:`~torchrec_lowprec.distributed.checkpoint.SafeLoadPlanner`). Rotation deletes only
checkpoints older than the one just written.

The low-precision tables' state_dict holds their codes, step sizes, optimizer state and the
stochastic-rounding position, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchrec_lowprec.data import atomic_write_bytes
from torchrec_lowprec.distributed import checkpoint as dcp_checkpoint
from torchrec_lowprec.manifest import CheckpointCorruptError, verify_manifest, write_manifest

LATEST = "LATEST"
_STEP = re.compile(r"^step_(\d+)$")
_SCRATCH = (".partial-step_", ".trash-step_", ".tmp-")


class CheckpointError(ValueError):
    """A checkpoint directory cannot be used as asked (refused start, unsafe or unusable file)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (each rank reading the folder could race a writer)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _save_bytes(path: str, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_plain(path: str) -> Any:
    """``torch.load`` of tensors and plain types only; anything else raises ``CheckpointError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain types; refusing to unpickle it "
            f"(it may run code). Only load checkpoints you trust. ({first})"
        ) from None


def step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``step_*`` folder in ``ckpt_dir``, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(ckpt_dir, d)) for d in os.listdir(ckpt_dir) if (m := _STEP.match(d))
    ]
    return sorted(found, reverse=True)


def holds_checkpoints(ckpt_dir: str) -> bool:
    """Whether ``ckpt_dir`` holds any checkpoint (complete or not) or a ``LATEST`` marker."""
    return bool(step_dirs(ckpt_dir)) or os.path.exists(os.path.join(ckpt_dir, LATEST))


def clear(ckpt_dir: str) -> None:
    """Delete every checkpoint, ``LATEST`` and scratch folder in ``ckpt_dir`` (``--overwrite``)."""
    if _rank() == 0 and os.path.isdir(ckpt_dir):
        for d in os.listdir(ckpt_dir):
            p = os.path.join(ckpt_dir, d)
            if _STEP.match(d) or d.startswith(_SCRATCH):
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
            elif d == LATEST:
                os.unlink(p)
    if _distributed():
        dist.barrier()


def _remove_scratch(ckpt_dir: str, keep: str) -> None:
    """Half-written checkpoints and temp files a killed writer left behind."""
    for d in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, d)
        if d.startswith(_SCRATCH) and p != keep:
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)


def save(
    ckpt_dir: str, model: nn.Module, dense_opt: torch.optim.Optimizer, trainer: dict, keep: int = 2
) -> str:
    """Write checkpoint ``step_<step>`` (all ranks call this) and point ``LATEST`` at it.

    The files go to ``.partial-step_<step>``; once every rank wrote its part, rank 0 writes the
    manifest and renames the folder, so ``step_*`` folders only ever appear complete. Then the
    oldest checkpoints beyond ``keep`` are deleted, never one newer than this one.
    """
    rank = _rank()
    name = f"step_{trainer['step']:09d}"
    final = os.path.join(ckpt_dir, name)
    path = os.path.join(ckpt_dir, ".partial-" + name)
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        _remove_scratch(ckpt_dir, keep="")
        os.makedirs(path)
    if _distributed():
        dist.barrier()
        dcp_checkpoint.save(model, os.path.join(path, "model"), manifest=False)
    else:
        _save_bytes(os.path.join(path, "model.pt"), model.state_dict())
    if rank == 0:
        # Dense parameters are replicated (DDP), so rank 0's optimizer state is everyone's.
        _save_bytes(os.path.join(path, "trainer.pt"), {**trainer, "dense_opt": dense_opt.state_dict()})
    if _distributed():
        dist.barrier()
    if rank == 0:
        write_manifest(path, {"step": trainer["step"]})
        if os.path.isdir(final):  # the same step again (resumed past a corrupt one): swap it out
            trash = os.path.join(ckpt_dir, ".trash-" + name)
            os.replace(final, trash)
            os.replace(path, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(path, final)
        atomic_write_bytes(os.path.join(ckpt_dir, LATEST), name.encode())
        older = [p for s, p in step_dirs(ckpt_dir) if s < trainer["step"]]
        for p in older[max(0, keep - 1) :]:
            shutil.rmtree(p, ignore_errors=True)
    if _distributed():
        dist.barrier()
    return final


def latest(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint in ``ckpt_dir`` (None if there is none).

    Every newer folder whose manifest does not verify is skipped with a warning naming what is
    wrong; rank 0 decides and every rank gets its answer.
    """
    found = None
    if _rank() == 0:
        for _, path in step_dirs(ckpt_dir):
            try:
                verify_manifest(path)
            except CheckpointCorruptError as e:
                warnings.warn(f"skipping checkpoint {e}", stacklevel=2)
                continue
            found = path
            break
    return _from_rank0(found)


def load(path: str, model: nn.Module, dense_opt: torch.optim.Optimizer) -> dict:
    """Load ``path`` (verified by :func:`latest`) into ``model`` and ``dense_opt``; returns the
    trainer state. Refuses (``CheckpointError``) anything that is not tensors and plain types."""
    trainer = _load_plain(os.path.join(path, "trainer.pt"))
    if not isinstance(trainer, dict) or "dense_opt" not in trainer:
        raise CheckpointError(f"{path}/trainer.pt is not a trainer state of this script")
    if os.path.isdir(os.path.join(path, "model")):
        try:
            dcp_checkpoint.load(model, os.path.join(path, "model"), verify=False)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}/model: {str(e).strip().splitlines()[0]}") from None
    else:
        if _distributed():
            raise CheckpointError(
                f"{path} was written by one process (model.pt); a sharded run resumes from a sharded "
                "checkpoint only"
            )
        model.load_state_dict(_load_plain(os.path.join(path, "model.pt")))
    dense_opt.load_state_dict(trainer.pop("dense_opt"))
    return trainer


def resume_point(ckpt_dir: str, resume: str | None, overwrite: bool) -> str | None:
    """The checkpoint a run starts from (None: from scratch), by ``--resume`` / ``--overwrite``.

    - no ``--resume``: a folder holding checkpoints is refused (``CheckpointError``) unless
      ``overwrite``, which deletes them first;
    - ``--resume``: the newest complete checkpoint; none at all is an error;
    - ``--resume auto``: the newest complete checkpoint, or from scratch in a folder without
      checkpoints; a folder whose checkpoints are all corrupt is an error (not silently replaced).
    """
    if resume is None:
        if holds_checkpoints(ckpt_dir) and not overwrite:
            raise CheckpointError(
                f"--checkpoint-dir {ckpt_dir} already holds checkpoints; pass --resume (or --resume auto) to "
                "continue from them, or --overwrite to delete them and start from step 0"
            )
        if overwrite:
            clear(ckpt_dir)
        return None
    path = latest(ckpt_dir)
    if path is None and (resume != "auto" or _from_rank0(bool(step_dirs(ckpt_dir)))):
        what = "no complete checkpoint" if step_dirs(ckpt_dir) else "no checkpoint"
        raise CheckpointError(
            f"--resume: {what} in {ckpt_dir}; start without --resume (or with --resume auto), or pass "
            "--overwrite without --resume to discard what is there"
        )
    return path

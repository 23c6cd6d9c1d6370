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

import errno
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


def _ours(d: str) -> bool:
    """Whether the entry ``d`` of a checkpoint folder is one this module writes and deletes."""
    return bool(_STEP.match(d)) or d.startswith(_SCRATCH) or d == LATEST


def linked_entries(ckpt_dir: str) -> list[str]:
    """Checkpoint / scratch entries of ``ckpt_dir`` that are symbolic links (never deleted)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(
        d
        for d in os.listdir(ckpt_dir)
        if d != LATEST and _ours(d) and os.path.islink(os.path.join(ckpt_dir, d))
    )


def links_message(ckpt_dir: str, links: list[str]) -> str:
    first = os.path.join(ckpt_dir, links[0])
    return (
        f"--overwrite: {first} is a symbolic link (to {os.readlink(first)})"
        f"{f' and {len(links) - 1} more entries are links' if len(links) > 1 else ''}; refusing to delete "
        "through a link: remove the link(s) yourself, or use another --checkpoint-dir"
    )


def clear(ckpt_dir: str) -> None:
    """Delete every checkpoint, ``LATEST`` and scratch folder in ``ckpt_dir`` (``--overwrite``).
    A checkpoint entry that is a symbolic link is refused (``CheckpointError``), not followed."""
    links = _from_rank0(linked_entries(ckpt_dir) if _rank() == 0 else None)
    if links:
        raise CheckpointError(links_message(ckpt_dir, links))
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


def _first_failure(failure: str | None) -> str | None:
    """The first rank's failure, on every rank (None: every rank succeeded). Takes the place of a
    barrier, so a rank whose write failed never leaves the others waiting for it."""
    if not _distributed():
        return failure
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, failure)
    return next((f for f in every if f is not None), None)


def _write_failures() -> tuple[type[BaseException], ...]:
    from torch.distributed.checkpoint.api import CheckpointException  # DCP's wrapper of a rank's OSError

    return (OSError, CheckpointException)


def _describe_failure(e: BaseException) -> str:
    """One line for a failed checkpoint write (DCP's CheckpointException: its first rank's error)."""
    prefix = ""
    failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback) or exception}
    if isinstance(failures, dict) and failures:
        rank, first = min(failures.items(), key=lambda kv: kv[0])
        e = first[0] if isinstance(first, tuple) else first
        prefix = f"rank {rank}: "
    if isinstance(e, OSError):
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        return f"{prefix}{e}{': the disk is full or over a quota / file-size limit' if full else ''}"
    text = str(e).strip().splitlines()
    return f"{prefix}{type(e).__name__}: {text[0] if text else ''}"


def _latest_hint(ckpt_dir: str) -> str | None:
    """The checkpoint ``LATEST`` names, if it is there (a hint for messages)."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            path = os.path.join(ckpt_dir, f.read().strip())
    except OSError:
        return None
    return path if os.path.isdir(path) else None


def save(
    ckpt_dir: str, model: nn.Module, dense_opt: torch.optim.Optimizer, trainer: dict, keep: int = 2
) -> str:
    """Write checkpoint ``step_<step>`` (all ranks call this) and point ``LATEST`` at it.

    The files go to ``.partial-step_<step>``; once every rank wrote its part, rank 0 writes the
    manifest and renames the folder, so ``step_*`` folders only ever appear complete. Then the
    oldest checkpoints beyond ``keep`` are deleted, never one newer than this one. A write that
    fails on any rank (disk full, file-size limit) removes the partial folder, leaves every
    complete checkpoint as it was and raises ``CheckpointError`` on every rank.
    """
    rank = _rank()
    name = f"step_{trainer['step']:09d}"
    final = os.path.join(ckpt_dir, name)
    path = os.path.join(ckpt_dir, ".partial-" + name)
    failures = _write_failures()

    def attempt(fn) -> str | None:
        try:
            fn()
        except failures as e:
            return _describe_failure(e)
        return None

    def start() -> None:
        os.makedirs(ckpt_dir, exist_ok=True)
        _remove_scratch(ckpt_dir, keep="")
        os.makedirs(path)

    def write() -> None:
        if _distributed():
            dcp_checkpoint.save(model, os.path.join(path, "model"), manifest=False)
        else:
            _save_bytes(os.path.join(path, "model.pt"), model.state_dict())
        if rank == 0:
            # Dense parameters are replicated (DDP), so rank 0's optimizer state is everyone's.
            _save_bytes(os.path.join(path, "trainer.pt"), {**trainer, "dense_opt": dense_opt.state_dict()})

    def finish() -> None:
        write_manifest(path, {"step": trainer["step"]})
        if os.path.isdir(final) and not os.path.islink(final):  # the same step again: swap it out
            trash = os.path.join(ckpt_dir, ".trash-" + name)
            os.replace(final, trash)
            os.replace(path, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:  # (a link in the way: rename fails, ENOTDIR; the link is left alone)
            os.replace(path, final)
        atomic_write_bytes(os.path.join(ckpt_dir, LATEST), name.encode())

    failure = _first_failure(attempt(start) if rank == 0 else None)
    if failure is None:
        failure = _first_failure(attempt(write))
    if failure is None:
        failure = _first_failure(attempt(finish) if rank == 0 else None)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        _first_failure(None)  # every rank waits for the cleanup
        last = _latest_hint(ckpt_dir)
        raise CheckpointError(
            f"writing checkpoint {final} failed ({failure}); the half-written folder was removed"
            + (
                f" and the last complete checkpoint, {last}, is intact"
                if last
                else " (no earlier checkpoint)"
            )
            + f": fix that (free space), then rerun{' with --resume' if last else ''}"
        )
    if rank == 0:
        older = [p for s, p in step_dirs(ckpt_dir) if s < trainer["step"]]
        for p in older[max(0, keep - 1) :]:
            if not os.path.islink(p):
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


#: What a checkpoint's model must agree on with the run resuming it: the config key, its flag.
SHAPE_FLAGS = {
    "precision": "--precision", "embedding_dim": "--embedding-dim",
    "vocab_sizes": "vocabulary (--data / --vocab-sizes / --min-count)", "num_dense": "dense features (--data / --num-dense)",
    "dense_arch": "--dense-arch", "over_arch": "--over-arch", "dcn": "--dcn", "dcn_layers": "--dcn-layers",
    "dcn_rank": "--dcn-rank", "hot_rows": "--hot-rows",
}  # fmt: skip


def model_config(args, tables, num_dense: int) -> dict:
    """The flags that decide the model's shapes (stored in every checkpoint, compared on resume)."""
    sizes = lambda spec: [int(v) for v in spec.split(",") if v.strip()]  # noqa: E731
    return {
        "precision": args.precision,
        "embedding_dim": args.embedding_dim,
        "vocab_sizes": {t.name: t.num_embeddings for t in tables},
        "num_dense": num_dense,
        "dense_arch": sizes(args.dense_arch),
        "over_arch": sizes(args.over_arch),
        "dcn": bool(args.dcn),
        "dcn_layers": args.dcn_layers if args.dcn else None,
        "dcn_rank": args.dcn_rank if args.dcn else None,
        "hot_rows": getattr(args, "hot_rows", None),
    }


def _show(key: str, v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "(none)"
    return "(none)" if v is None else str(v)


def _mismatch(path: str, saved: dict, given: dict) -> str | None:
    """One line naming every shape flag the checkpoint and this run disagree on (None: agree)."""
    diffs = []
    for key, flag in SHAPE_FLAGS.items():
        if key not in saved or saved[key] == given.get(key):
            continue
        a, b = saved[key], given.get(key)
        if key == "vocab_sizes" and isinstance(a, dict) and isinstance(b, dict):
            tables = sorted(set(a) | set(b))
            bad = [t for t in tables if a.get(t) != b.get(t)]
            shown = ", ".join(f"{t} {a.get(t, 'absent')} vs {b.get(t, 'absent')}" for t in bad[:3])
            diffs.append(f"{flag}: rows saved vs given: {shown}{' ...' if len(bad) > 3 else ''}")
        else:
            diffs.append(f"{flag} saved {_show(key, a)}, given {_show(key, b)}")
    if not diffs:
        return None
    return (
        f"--resume: checkpoint {path} was written by a different model ({'; '.join(diffs)}): resume with the "
        "flags it was saved with, or start afresh in a new --checkpoint-dir"
    )


def _misfit(path: str, e: BaseException) -> CheckpointError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointError(
        f"--resume: checkpoint {path} does not fit this model ({first[:300]}): resume with the flags it was "
        "saved with, or start afresh in a new --checkpoint-dir"
    )


def load(path: str, model: nn.Module, dense_opt: torch.optim.Optimizer, config: dict | None = None) -> dict:
    """Load ``path`` (verified by :func:`latest`) into ``model`` and ``dense_opt``; returns the
    trainer state. Refuses (``CheckpointError``) anything that is not tensors and plain types,
    and a checkpoint whose :func:`model_config` differs from ``config`` (before touching the model)."""
    trainer = _load_plain(os.path.join(path, "trainer.pt"))
    if not isinstance(trainer, dict) or "dense_opt" not in trainer:
        raise CheckpointError(f"{path}/trainer.pt is not a trainer state of this script")
    saved = trainer.pop("config", None)
    if config is not None and isinstance(saved, dict) and (msg := _mismatch(path, saved, config)):
        raise CheckpointError(msg)
    if os.path.isdir(os.path.join(path, "model")):
        try:
            dcp_checkpoint.load(model, os.path.join(path, "model"), verify=False)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}/model: {str(e).strip().splitlines()[0]}") from None
        except (
            ValueError,
            RuntimeError,
            KeyError,
        ) as e:  # a checkpoint of another model (older ones: no config)
            raise _misfit(path, e) from None
    else:
        if _distributed():
            raise CheckpointError(
                f"{path} was written by one process (model.pt); a sharded run resumes from a sharded "
                "checkpoint only"
            )
        try:
            model.load_state_dict(_load_plain(os.path.join(path, "model.pt")))
        except (ValueError, RuntimeError, KeyError) as e:  # missing / unexpected keys, other shapes
            raise _misfit(path, e) from None
    try:
        dense_opt.load_state_dict(trainer.pop("dense_opt"))
    except (ValueError, KeyError) as e:
        raise _misfit(path, e) from None
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

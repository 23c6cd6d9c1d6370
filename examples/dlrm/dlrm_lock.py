"""One run at a time per ``--checkpoint-dir`` of the DLRM example: the ``LOCK`` file.

Two runs writing one folder delete each other's half-written checkpoints (each clears the
scratch folders it finds). :func:`dir_lock` holds an ``flock`` on ``ckpt_dir/LOCK``, a file
holding the running job's pid and host, for the whole run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import warnings
from collections.abc import Iterator

from dlrm_checkpoint import CheckpointError, _from_rank0, _rank

LOCK = "LOCK"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _holder(fd: int) -> dict | None:
    try:
        doc = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("pid"), int) else None


def _in_use(ckpt_dir: str, path: str, holder: dict | None, why: str) -> CheckpointError:
    who = f"pid {holder['pid']} on host {holder.get('host')}" if holder else "another run"
    return CheckpointError(
        f"--checkpoint-dir {ckpt_dir} is in use by {who} ({why}; lock file {path}): two runs on one "
        f"folder delete each other's checkpoints. Wait for that run to end or use another --checkpoint-dir; "
        f"if it is surely gone, delete {path}"
    )


def _acquire(ckpt_dir: str) -> tuple[int, str]:
    """Take ``ckpt_dir/LOCK`` (an ``flock`` on a file holding this pid and host); see :func:`dir_lock`."""
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(ckpt_dir, path, holder, "it holds the lock") from None
        except OSError as e:  # a file system without flock: the pid and host decide alone
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                os.close(fd)
                raise
            flock = False
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # released (unlinked) between our open and flock: take the new one
            os.close(fd)
            continue
        holder = _holder(fd)
        if holder is not None and holder != me:
            here = holder.get("host") == me["host"]
            if here and _alive(holder["pid"]):
                os.close(fd)
                raise _in_use(ckpt_dir, path, holder, "that process is running")
            if not here and not flock:
                os.close(fd)
                raise _in_use(
                    ckpt_dir, path, holder, "on another host; this file system cannot tell if it runs"
                )
            gone = "that process is gone" if here else "it holds no lock: its run ended without releasing it"
            warnings.warn(
                f"taking over the stale lock {path} of pid {holder['pid']} on host {holder.get('host')} ({gone})",
                stacklevel=3,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return fd, path
    raise CheckpointError(f"--checkpoint-dir {ckpt_dir}: could not take the lock {path} (it keeps changing)")


@contextlib.contextmanager
def dir_lock(ckpt_dir: str) -> Iterator[None]:
    """Hold ``ckpt_dir/LOCK`` for the body: one run at a time per checkpoint folder.

    The lock file holds the running job's pid and host (rank 0 takes it; every rank gets its
    answer). A second run is refused with ``CheckpointError`` naming them; a lock left by a
    process that is gone (same host, pid dead; or an ``flock`` no one holds) is taken over with
    a warning. Released (the file deleted) when the body ends, however it ends.
    """
    held, failure = None, None
    if _rank() == 0:
        try:
            held = _acquire(ckpt_dir)
        except (CheckpointError, OSError) as e:
            failure = (
                str(e)
                if isinstance(e, CheckpointError)
                else f"--checkpoint-dir {ckpt_dir}: cannot lock it ({e})"
            )
    failure = _from_rank0(failure)
    if failure is not None:
        raise CheckpointError(failure)
    try:
        yield
    finally:
        if held is not None:
            fd, path = held
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still holding it: a waiter then finds the file gone
            os.close(fd)

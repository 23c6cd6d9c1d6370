"""Small file helpers shared by every layer: atomic writes and JSON documents (no torchrec import)."""

from __future__ import annotations

import json
import os
import tempfile


def _umask() -> int:
    """The process umask: from /proc on Linux (thread-safe), else by setting it and putting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename.

    A reader never sees a half-written file, and a crash leaves the old file in place. The
    file gets the mode a plain ``open(path, "w")`` would give (``0o666 & ~umask``: 0644 under
    umask 022), not ``mkstemp``'s 0600.

    Example::

        atomic_write_bytes("runs/plan.json", b"{}")
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why :func:`atomic_write_bytes` could not write the file ``path`` (None: it could).

    The nearest existing folder above ``path`` must be a directory in which a file can be
    created: a real file is made there and removed, since mode bits say nothing for root or on
    a read-only mount. Used to refuse an output flag before any work starts.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return "it is a directory; give a file path"
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def write_json(path: str | os.PathLike, doc: object) -> None:
    """``doc`` as indented JSON at ``path``, written atomically."""
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())


def read_json(path: str | os.PathLike, what: str) -> object:
    """The JSON document at ``path``; ``FileNotFoundError`` / ``ValueError`` naming ``what``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not JSON ({e})") from None

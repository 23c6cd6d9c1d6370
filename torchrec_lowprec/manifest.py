"""Checksum manifests of checkpoint directories (no torch import).

A writer calls :func:`write_manifest` once every file of a checkpoint directory is in place; it
records each file's size and SHA-256 in ``MANIFEST.json`` (written atomically, last). A reader
calls :func:`verify_manifest` before loading: a missing manifest (an unfinished write), a missing,
truncated or changed file raises :class:`CheckpointCorruptError` naming the file.

Example::

    write_manifest("ckpt/step_000100")
    verify_manifest("ckpt/step_000100")  # raises CheckpointCorruptError if a byte changed
"""

from __future__ import annotations

import hashlib
import os

from torchrec_lowprec.files import read_json, write_json

MANIFEST = "MANIFEST.json"
_FORMAT = 1


class CheckpointCorruptError(ValueError):
    """A checkpoint directory is incomplete, truncated or altered (its manifest says which file)."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> list[str]:
    """Every file under ``folder`` (relative, sorted) except the top manifest and temp files."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != MANIFEST and not n.startswith(".tmp-"):
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str | os.PathLike, extra: dict | None = None) -> dict:
    """Record size and SHA-256 of every file under ``folder`` in ``folder/MANIFEST.json``."""
    folder = os.fspath(folder)
    files = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    doc = {"format": _FORMAT, "files": files, **(extra or {})}
    write_json(os.path.join(folder, MANIFEST), doc)
    return doc


def verify_manifest(folder: str | os.PathLike) -> dict:
    """Check every file ``folder/MANIFEST.json`` lists; returns the manifest.

    Raises :class:`CheckpointCorruptError` if the manifest is missing or unreadable (the write
    never finished) or a file is missing, has another size or another checksum.
    """
    folder = os.fspath(folder)
    try:
        doc = read_json(os.path.join(folder, MANIFEST), "checkpoint manifest")
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointCorruptError(f"{folder}: not a complete checkpoint ({e})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files:
        raise CheckpointCorruptError(f"{folder}: {MANIFEST} lists no files")
    for rel, want in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointCorruptError(f"{folder}: file {rel} listed in {MANIFEST} is missing")
        size = os.path.getsize(path)
        if size != want.get("bytes"):
            raise CheckpointCorruptError(
                f"{folder}: file {rel} has {size} bytes, {MANIFEST} says {want.get('bytes')} (truncated?)"
            )
        if _sha256(path) != want.get("sha256"):
            raise CheckpointCorruptError(f"{folder}: file {rel} does not match its SHA-256 in {MANIFEST}")
    return doc

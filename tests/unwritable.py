"""A folder in which no file can be created, for tests of "cannot write there" errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A read-only folder: ``tmp_path/ro`` with mode 0555, or, as root (who writes through mode
    bits), a read-only system folder (``/sys``); skips the test where there is none."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            yield ro
        finally:
            ro.chmod(0o755)
        return
    for cand in ("/sys", "/proc"):
        try:
            fd, probe = tempfile.mkstemp(dir=cand)
        except OSError:
            yield Path(cand)
            return
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no read-only folder for root here")

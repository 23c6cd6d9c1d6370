"""Issue 13 item 6: a process that waits for the native kernel's build says so.

A second process (here: a fresh interpreter with ``RANK=1``) that finds the build lock held
and no library yet prints the build message on stderr while it waits, then loads the library
once the builder is done. The builder is this test: it holds the lock, and "finishes" by
putting the already-built library where the waiter looks (so no compile is needed here).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrec_lowprec.kernels import cpu_native

if not cpu_native.is_available():
    pytest.skip(f"native CPU kernel not available: {cpu_native.load_error()}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def test_waiting_rank_says_it_waits_for_the_build_then_loads(tmp_path):
    real = Path(cpu_native.library_path())
    h = cpu_native.build_hash()
    directory = tmp_path / f"ext-{h}"
    directory.mkdir()
    env = dict(os.environ, TORCHREC_LOWPREC_EXT_DIR=str(tmp_path), RANK="1", PYTHONPATH=str(ROOT))
    code = "from torchrec_lowprec.kernels import cpu_native; print(cpu_native.build())"
    with open(tmp_path / f"ext-{h}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        line = proc.stderr.readline()  # blocks until the waiter speaks (or exits)
        assert "[rank 1] torchrec_lowprec: building the native update kernel, once, about a minute" in line
        assert "waiting for another process" in line
        time.sleep(0.2)
        assert proc.poll() is None  # still waiting on the lock
        os.symlink(real, directory / real.name)
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == str(directory / real.name)


def test_build_and_ensure_built_return_without_rebuilding():
    assert cpu_native.build(verbose=False) == cpu_native.library_path()
    assert cpu_native.ensure_built("cpu") is True
    assert cpu_native.ensure_built() is True

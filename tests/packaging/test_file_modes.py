"""Files the library writes get the umask's mode (0644 under umask 022), still atomically."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from torchrec_lowprec.data import save_frequencies
from torchrec_lowprec.files import atomic_write_bytes, write_json
from torchrec_lowprec.planner.schema import PrecisionPlan


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    write_json(tmp_path / "b.json", {"a": 1})
    save_frequencies({"f": torch.tensor([3, 1])}, tmp_path / "freq.pt")
    PrecisionPlan.uniform({"t": (10, 4)}, 4).save(str(tmp_path / "plan.json"))
    for name in ("a.bin", "b.json", "freq.pt", "plan.json"):
        assert _mode(tmp_path / name) == expected, (name, oct(_mode(tmp_path / name)))
    # Atomic: nothing but the targets is left in the folder.
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.json", "freq.pt", "plan.json"]


def test_overwrite_keeps_content_atomic_and_mode(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "x.json"
    write_json(p, {"v": 1})
    os.chmod(p, 0o600)  # an older file's mode does not stick: the new file is a new inode
    write_json(p, {"v": 2})
    assert p.read_text().replace(" ", "").replace("\n", "") == '{"v":2}'
    assert _mode(p) == 0o644

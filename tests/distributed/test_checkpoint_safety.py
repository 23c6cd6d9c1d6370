"""Library checkpoints (DCP) run no code from the checkpoint and detect altered files
(issue 12, items 5 and 7); one process, no process group."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException

import torchrec_lowprec as lp
from tests.distributed.test_sharding import ALPT_SR, Wrap, tables
from torchrec_lowprec.distributed import checkpoint
from torchrec_lowprec.distributed.checkpoint import SafeFileSystemReader, SafeLoadPlanner
from torchrec_lowprec.manifest import CheckpointCorruptError


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_entry_with_a_payload_is_refused(tmp_path):
    path, marker = str(tmp_path / "ck"), tmp_path / "pwned"
    dcp.save(
        {"w": torch.ones(3), "ebc._extra_state": _Payload(str(marker))}, checkpoint_id=path, no_dist=True
    )
    state = {"w": torch.zeros(3), "ebc._extra_state": {}}
    with pytest.raises(CheckpointException, match="unsupported GLOBAL posix.mkdir"):
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()
    # DCP's own planner runs it: the test can fail.
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(), no_dist=True)
    assert marker.is_dir()


def test_metadata_with_a_payload_is_refused(tmp_path):
    path, marker = tmp_path / "ck", tmp_path / "pwned"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(path), no_dist=True)
    assert SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata["w"].size == torch.Size([3])
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(pickle.UnpicklingError, match=r"names posix.mkdir, which is not DCP metadata"):
        SafeFileSystemReader(str(path)).read_metadata()
    assert not marker.exists()


def test_flipped_byte_in_a_dcp_checkpoint_is_detected(tmp_path):
    path = tmp_path / "ck"
    src = lp.LowPrecisionEmbeddingBagCollection(tables(), config=ALPT_SR)
    checkpoint.save(Wrap(src), str(path))
    dst = lp.LowPrecisionEmbeddingBagCollection(tables(), config=ALPT_SR.replace(seed=5))
    checkpoint.load(Wrap(dst), str(path))  # intact: loads
    for k, v in src.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, dst.state_dict()[k]), k
    data = next(p for p in path.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=rf"file {data.name} does not match its SHA-256"):
        checkpoint.load(Wrap(dst), str(path))
    os.unlink(path / "MANIFEST.json")
    with pytest.raises(CheckpointCorruptError, match="not a complete checkpoint"):
        checkpoint.load(Wrap(dst), str(path))

"""Checkpoints of the DLRM example that are safe to load and hard to lose (issue 12, items 5-7):
no code runs from a checkpoint, a finished run's checkpoints are never overwritten by accident,
corrupt / truncated / half-written checkpoints are detected and skipped."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import train  # examples/dlrm, put on sys.path by conftest

from torchrec_lowprec.manifest import write_manifest

from .conftest import exit_2

TINY = [
    "--vocab-sizes", "2000,300,50,10", "--num-dense", "3", "--embedding-dim", "8",
    "--dense-arch", "16", "--over-arch", "16", "--threads", "1", "--no-progress", "--quiet",
    "--train-rows", "5000", "--val-rows", "0", "--test-rows", "2000", "--batch-size", "256",
    "--epochs", "2", "--precision", "int4",
]  # fmt: skip


def _flip_byte(path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_planted_reduce_payload_is_refused_not_run(tmp_path, capsys):
    ck = tmp_path / "ck"
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "10"])
    step = ck / "step_000000010"
    trainer = torch.load(step / "trainer.pt", weights_only=True)
    marker = tmp_path / "pwned"
    trainer["history"] = _Payload(str(marker))
    torch.save(trainer, step / "trainer.pt")
    write_manifest(step, {"step": 10})  # an attacker rewrites the checksums too
    line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--resume"])
    assert "trainer.pt holds objects other than tensors and plain types; refusing to unpickle it" in line
    assert not marker.exists()
    # The same file under the old loader runs the payload: the test can fail.
    torch.load(step / "trainer.pt", weights_only=False)
    assert marker.is_dir()


def test_a_new_run_refuses_a_folder_with_checkpoints_unless_overwrite(tmp_path, capsys):
    ck = tmp_path / "ck"
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "10"])
    before = {p.name: p.read_bytes() for p in (ck / "step_000000010").iterdir() if p.is_file()}
    line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--max-steps", "3"])
    assert "already holds checkpoints" in line and "--overwrite" in line
    assert sorted(os.listdir(ck)) == ["LATEST", "step_000000010"]
    assert {p.name: p.read_bytes() for p in (ck / "step_000000010").iterdir() if p.is_file()} == before
    s = train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "3", "--overwrite"])
    assert s["train"]["steps"] == 3 and s["train"]["resumed_from_step"] is None
    assert sorted(os.listdir(ck)) == ["LATEST", "step_000000003"]


def test_resume_auto_starts_fresh_then_resumes(tmp_path, capsys):
    ck = tmp_path / "ck"
    a = train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "7", "--resume", "auto"])
    assert a["train"]["resumed_from_step"] is None and a["train"]["steps"] == 7
    b = train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "9", "--resume", "auto"])
    assert b["train"]["resumed_from_step"] == 7 and b["train"]["steps"] == 9
    line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(tmp_path / "empty"), "--resume"])
    assert "--resume: no checkpoint in" in line


def test_corrupt_latest_falls_back_and_newer_checkpoints_are_kept(tmp_path):
    full = train.main([*TINY, "--checkpoint-dir", str(tmp_path / "a")])
    ck = tmp_path / "b"
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "20", "--checkpoint-every", "5"])
    assert sorted(os.listdir(ck)) == ["LATEST", "step_000000015", "step_000000020"]
    _flip_byte(ck / "step_000000020" / "model.pt")
    os.unlink(ck / "LATEST")
    with pytest.warns(
        UserWarning, match=r"skipping checkpoint .*step_000000020: file model.pt does not match its SHA-256"
    ):
        s = train.main([*TINY, "--checkpoint-dir", str(ck), "--resume", "--max-steps", "16"])
    assert s["train"]["resumed_from_step"] == 15
    # Rotation deleted nothing newer than the checkpoint it wrote.
    assert sorted(os.listdir(ck)) == ["LATEST", "step_000000015", "step_000000016", "step_000000020"]
    # Truncated as well now: still skipped; the run goes on from step 16 to the end.
    ck20 = ck / "step_000000020" / "trainer.pt"
    ck20.write_bytes(ck20.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=r"step_000000020: file model.pt"):
        s = train.main([*TINY, "--checkpoint-dir", str(ck), "--resume", "--checkpoint-every", "5"])
    assert s["train"]["resumed_from_step"] == 16 and s["train"]["steps"] == 40
    assert s["test"] == full["test"] and s["history"] == full["history"]
    # step_20 was rewritten by the resumed run (swapped in whole), and is complete again.
    assert sorted(os.listdir(ck)) == ["LATEST", "step_000000035", "step_000000040"]


def test_no_complete_checkpoint_left_is_an_error(tmp_path, capsys):
    ck = tmp_path / "ck"
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "4"])
    _flip_byte(ck / "step_000000004" / "trainer.pt", offset=40)
    for mode in ([], ["auto"]):
        with pytest.warns(UserWarning, match="trainer.pt does not match its SHA-256"):
            line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--resume", *mode])
        assert "no complete checkpoint in" in line
    model = ck / "step_000000004" / "model.pt"
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=r"model.pt has \d+ bytes, MANIFEST.json says \d+ \(truncated\?\)"):
        exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--resume"])
    # A half-written checkpoint (no manifest) is not complete either.
    shutil.rmtree(ck)
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "4"])
    os.unlink(ck / "step_000000004" / "MANIFEST.json")
    line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--resume"])
    assert "no complete checkpoint in" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--resume", "auto", "--overwrite", "--checkpoint-dir", "x"],
            "--resume continues from the checkpoints",
        ),
        (["--overwrite"], "--resume and --overwrite need --checkpoint-dir"),
        (["--resume", "sometimes", "--checkpoint-dir", "x"], "invalid choice: 'sometimes'"),
    ],
)
def test_conflicting_checkpoint_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args([*TINY, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err

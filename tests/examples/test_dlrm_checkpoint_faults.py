"""Checkpoint faults of the DLRM example (issue 23, items 3-5): a resume under other model flags,
a full disk or a file-size limit while checkpointing, a symlinked step folder under
--overwrite, and two runs on one checkpoint folder at once. Each is one ``error:`` line and
exit 2, and no complete checkpoint is lost."""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
import sys

import dlrm_checkpoint  # examples/dlrm, put on sys.path by conftest
import pytest
import torch
import train

from torchrec_lowprec.manifest import verify_manifest, write_manifest

from .conftest import DLRM_DIR, ROOT, exit_2

TINY = [
    "--vocab-sizes", "2000,300,50,10", "--num-dense", "3", "--embedding-dim", "8",
    "--dense-arch", "16", "--over-arch", "16", "--threads", "1", "--no-progress", "--quiet",
    "--train-rows", "5000", "--val-rows", "0", "--test-rows", "500", "--batch-size", "256",
    "--epochs", "1", "--precision", "int4",
]  # fmt: skip


def _flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder with one complete int4 checkpoint at step 5."""
    ck = tmp_path_factory.mktemp("saved") / "ck"
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "5"])
    return ck


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--precision", "int8", "--precision saved int4, given int8"),
        ("--embedding-dim", "16", "--embedding-dim saved 8, given 16"),
        ("--vocab-sizes", "2000,300,50,11", "vocabulary (--data / --vocab-sizes / --min-count): rows saved vs given: t_cat_3 10 vs 11"),
        ("--over-arch", "32,16", "--over-arch saved 16, given 32,16"),
    ],
)  # fmt: skip
def test_resume_under_other_model_flags_names_the_mismatch(saved, capsys, flag, value, message):
    before = {p.name: p.read_bytes() for p in (saved / "step_000000005").iterdir()}
    line = exit_2(capsys, [*_flag(TINY, flag, value), "--checkpoint-dir", str(saved), "--resume"])
    assert line.startswith(
        f"error: --resume: checkpoint {saved}/step_000000005 was written by a different model"
    )
    assert message in line, line
    assert "resume with the flags it was saved with, or start afresh in a new --checkpoint-dir" in line
    assert {p.name: p.read_bytes() for p in (saved / "step_000000005").iterdir()} == before


def test_resume_with_other_hot_rows_names_the_mismatch(saved, capsys):
    line = exit_2(capsys, [*TINY, "--hot-rows", "0.25:8", "--checkpoint-dir", str(saved), "--resume"])
    assert "was written by a different model (--hot-rows saved (none), given 0.25:8)" in line, line


def test_an_older_checkpoint_without_flags_is_still_refused_in_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    train.main([*TINY, "--checkpoint-dir", str(ck), "--max-steps", "3"])
    step = ck / "step_000000003"
    trainer = torch.load(step / "trainer.pt", weights_only=True)
    trainer.pop("config", None)  # as written before checkpoints recorded the model's flags
    torch.save(trainer, step / "trainer.pt")
    write_manifest(step, {"step": 3})
    line = exit_2(capsys, [*_flag(TINY, "--precision", "int8"), "--checkpoint-dir", str(ck), "--resume"])
    assert f"--resume: checkpoint {step} does not fit this model" in line and "new --checkpoint-dir" in line


def _assert_only_complete(ck, steps: list[int]) -> None:
    names = sorted(os.listdir(ck))
    assert names == ["LATEST", *(f"step_{s:09d}" for s in steps)], names  # no .partial-*, .tmp-*, LOCK
    for s in steps:
        verify_manifest(ck / f"step_{s:09d}")


def test_disk_full_while_checkpointing_keeps_the_last_complete_one(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    real = dlrm_checkpoint.atomic_write_bytes

    def full_at_step_10(path, data):
        if "step_000000010" in str(path) and str(path).endswith("trainer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(dlrm_checkpoint, "atomic_write_bytes", full_at_step_10)
    argv = [*TINY, "--checkpoint-dir", str(ck), "--checkpoint-every", "5", "--max-steps", "12"]
    line = exit_2(capsys, argv)
    assert f"writing checkpoint {ck}/step_000000010 failed ([Errno 28] No space left on device" in line
    assert "the disk is full or over a quota / file-size limit" in line
    assert f"the last complete checkpoint, {ck}/step_000000005, is intact" in line and "--resume" in line
    _assert_only_complete(ck, [5])
    monkeypatch.setattr(dlrm_checkpoint, "atomic_write_bytes", real)
    s = train.main([*argv, "--resume"])
    assert s["train"]["resumed_from_step"] == 5 and s["train"]["steps"] == 12


def test_file_size_limit_while_checkpointing(saved, tmp_path):
    ck = tmp_path / "ck"
    subprocess.run(["cp", "-a", str(saved), str(ck)], check=True)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)

    def limit() -> None:  # python ignores SIGXFSZ: an over-limit write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    argv = [
        sys.executable,
        os.path.join(DLRM_DIR, "train.py"),
        *TINY,
        "--checkpoint-dir",
        str(ck),
        "--resume",
    ]
    p = subprocess.run(
        [*argv, "--max-steps", "8"], capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300
    )
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "writing checkpoint" in lines[0] and "File too large" in lines[0], lines[0]
    assert f"{ck}/step_000000005, is intact" in lines[0]
    _assert_only_complete(ck, [5])


def test_overwrite_never_deletes_through_a_symlinked_step_folder(saved, tmp_path, capsys):
    ck = tmp_path / "ck"
    subprocess.run(["cp", "-a", str(saved), str(ck)], check=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    os.symlink(precious, ck / "step_000000099")
    line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--overwrite"])
    assert f"--overwrite: {ck}/step_000000099 is a symbolic link (to {precious})" in line
    assert "refusing to delete through a link" in line
    assert (precious / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(ck)) == ["LATEST", "step_000000005", "step_000000099"]
    # the module's own clear() refuses as well (a caller that skipped the flag checks)
    with pytest.raises(dlrm_checkpoint.CheckpointError, match="symbolic link"):
        dlrm_checkpoint.clear(str(ck))
    assert (precious / "keep.txt").exists()


HOLD = """
import os, sys
sys.path.insert(0, {dlrm!r})
import dlrm_lock
lock = dlrm_lock.dir_lock({ck!r})
lock.__enter__()
os.makedirs(os.path.join({ck!r}, ".partial-step_000000007"))  # a checkpoint being written
print("locked", flush=True)
sys.stdin.read()
lock.__exit__(None, None, None)
"""


def _holder(ck) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    code = HOLD.format(dlrm=DLRM_DIR, ck=str(ck))
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_busy_checkpoint_folder_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck"
    holder = _holder(ck)
    try:
        line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--resume", "auto", "--max-steps", "3"])
        host = socket.gethostname()
        assert f"--checkpoint-dir {ck} is in use by pid {holder.pid} on host {host}" in line, line
        assert f"lock file {ck}/LOCK" in line
        assert (ck / ".partial-step_000000007").is_dir()  # the first run's checkpoint is left alone
        assert json.loads((ck / "LOCK").read_text()) == {"pid": holder.pid, "host": host}
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (ck / "LOCK").exists()  # released at exit


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    ck = tmp_path / "ck"
    holder = _holder(ck)
    holder.kill()  # SIGKILL: no release, the LOCK file stays
    holder.wait()
    assert json.loads((ck / "LOCK").read_text())["pid"] == holder.pid
    with pytest.warns(UserWarning, match=rf"taking over the stale lock {ck}/LOCK of pid {holder.pid} .*gone"):
        s = train.main([*TINY, "--checkpoint-dir", str(ck), "--resume", "auto", "--max-steps", "3"])
    assert s["train"]["steps"] == 3
    _assert_only_complete(ck, [3])  # the dead run's partial folder is cleaned, the lock released


def test_a_lock_naming_a_live_process_is_refused_without_flock(tmp_path, capsys):
    # A file system without flock (or a lock file copied in): the pid and host decide.
    ck = tmp_path / "ck"
    ck.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (ck / "LOCK").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        line = exit_2(capsys, [*TINY, "--checkpoint-dir", str(ck), "--resume", "auto"])
        assert f"in use by pid {sleeper.pid}" in line and "that process is running" in line
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_file_size_limit_on_two_ranks_fails_every_rank_without_a_hang(tmp_path):
    """A rank whose checkpoint write fails must not leave the other waiting in a barrier."""
    ck = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "--max-restarts", "0", "--standalone",
           os.path.join(DLRM_DIR, "train.py"), *TINY, "--checkpoint-dir", str(ck)]  # fmt: skip
    first = subprocess.run([*cmd, "--max-steps", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    p = subprocess.run([*cmd, "--resume", "--max-steps", "8", "--dist-timeout-s", "60"], capture_output=True,
                       text=True, env=env, timeout=300, preexec_fn=limit)  # fmt: skip
    assert p.returncode != 0
    text = p.stdout + p.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error: writing checkpoint")]
    assert len(errors) == 2, text[-4000:]  # one line per rank, not a timeout
    for ln in errors:
        assert "failed (rank 0: [Errno 27] File too large" in ln, ln
        assert f"{ck}/step_000000004, is intact" in ln, ln
    _assert_only_complete(ck, [4])

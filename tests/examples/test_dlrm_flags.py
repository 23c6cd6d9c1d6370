"""Every flag of the DLRM example is checked before any work (issue 23, items 1, 2 and 6): a bad
value exits 2 with exactly one ``error:`` line naming *that* flag, within a few seconds, before
data are read, a model is built or a process group is joined."""

from __future__ import annotations

import os
import time

import pytest
import train  # examples/dlrm, put on sys.path by conftest

from tests.unwritable import unwritable_dir

# (flags, the flag the one error line must name)
BAD = [
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--dense-lr", "nan"], "--dense-lr"),
    (["--dense-lr", "inf"], "--dense-lr"),
    (["--dense-lr", "-1e-3"], "--dense-lr"),
    (["--emb-lr", "-1"], "--emb-lr"),
    (["--emb-lr", "nan"], "--emb-lr"),
    (["--threads", "-1"], "--threads"),
    (["--bag-max", "0"], "--bag-max"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--eval-rows", "-1"], "--eval-rows"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--seed", "-1"], "--seed"),
    (["--dist-timeout-s", "0"], "--dist-timeout-s"),
    (["--dist-timeout-s", "-5"], "--dist-timeout-s"),
    (["--dist-timeout-s", "nan"], "--dist-timeout-s"),
    (["--zipf", "nan"], "--zipf"),
    (["--zipf", "-1"], "--zipf"),
    (["--zipf", "inf"], "--zipf"),
    (["--embedding-dim", "0"], "--embedding-dim"),
    (["--hot-rows", "0.6"], "--hot-rows"),
    (["--hot-rows", "0.6:3"], "--hot-rows"),
    (["--hot-rows", "0.6:4", "--precision", "int4"], "--hot-rows"),  # not wider than the rest
    (["--hot-rows", "0.7:8,0.5:4", "--precision", "int2"], "--hot-rows"),  # shares add up to 1.2
    (["--hot-rows", "0:8", "--precision", "int4"], "--hot-rows"),
    (["--hot-rows", "0.6:8", "--precision", "mpe"], "--hot-rows"),
    (["--over-arch", "abc"], "--over-arch"),
    (["--over-arch", "64,0"], "--over-arch"),
    (["--dense-arch", "1.5"], "--dense-arch"),
    (["--step-size-init", "-3"], "--step-size-init"),
    (["--step-size-init", "nan"], "--step-size-init"),
    (["--step-size-init", "median"], "--step-size-init"),
    (["--step-size-lr", "nan"], "--step-size-lr"),
    (["--growth-threshold", "0.5"], "--growth-threshold"),
    (["--mpe-lambda", "-1"], "--mpe-lambda"),
    (["--mpe-groups", "0"], "--mpe-groups"),
    (["--mpe-bits", "0,3"], "--mpe-bits"),
    (["--mpe-target-bits", "int4"], "--mpe-target-bits"),  # without --precision mpe
    (["--precision", "mpe", "--mpe-target-bits", "0"], "--mpe-target-bits"),
    (["--precision", "mpe", "--mpe-target-bits", "33"], "--mpe-target-bits"),
    (["--precision", "mpe", "--mpe-target-bits", "nan"], "--mpe-target-bits"),
    (["--precision", "mpe", "--mpe-target-bits", "int3"], "--mpe-target-bits"),
    (["--precision", "mpe", "--mpe-bits", "2,8", "--mpe-target-bits", "1"], "--mpe-target-bits"),
    (["--precision", "mpe", "--mpe-bits", "4,8", "--mpe-target-bits", "int2"], "--mpe-target-bits"),
    (["--precision", "mpe", "--mpe-lambda", "0", "--mpe-target-bits", "int4"], "--mpe-target-bits"),
    (["--min-count", "0"], "--min-count"),
    (["--train-rows", "0"], "--train-rows"),
    (["--val-rows", "-1"], "--val-rows"),
    (["--num-dense", "-1"], "--num-dense"),
    (["--data-seed", "-1"], "--data-seed"),
    (["--prefetch", "-1"], "--prefetch"),
    (["--parse-threads", "-1"], "--parse-threads"),
    (["--dcn", "--dcn-layers", "0"], "--dcn-layers"),
    (["--dcn-rank", "0"], "--dcn-rank"),
    (["--vocab-sizes", "100,0"], "--vocab-sizes"),
    (["--dense-lr", "abc"], "--dense-lr"),  # argparse's own type error, the same one line
]


@pytest.fixture
def no_work(monkeypatch):
    """Any step past argument checking fails the test."""

    def reached(*a, **k):
        raise AssertionError("got past the argument checks")

    for name in ("init_env", "open_data", "build_model", "train"):
        monkeypatch.setattr(train, name, reached)
    monkeypatch.setattr(train.torch, "set_num_threads", reached)


def _one_error(capsys, argv) -> str:
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert time.perf_counter() - t0 < 5
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_a_bad_flag_is_one_error_line_naming_it(no_work, capsys, argv, flag):
    line = _one_error(capsys, argv)
    assert line.startswith(f"error: {flag} ") or line.startswith(f"error: argument {flag}:"), line
    assert "--precision-plan" not in line


def _paths(tmp: str, ro: str) -> list[tuple[list[str], str]]:
    return [
        (["--summary", tmp], "--summary"),  # a directory
        (["--summary", f"{tmp}/file.txt/s.json"], "--summary"),  # under a regular file
        (["--summary", f"{ro}/sub/s.json"], "--summary"),  # cannot be created
        (["--plot", tmp], "--plot"),
        (["--checkpoint-dir", f"{tmp}/file.txt"], "--checkpoint-dir"),  # an existing regular file
        (["--checkpoint-dir", ro], "--checkpoint-dir"),  # read-only
        (["--checkpoint-dir", f"{ro}/ck"], "--checkpoint-dir"),  # cannot be created
        (["--precision", "mpe", "--mpe-plan-out", tmp], "--mpe-plan-out"),
        (["--precision-plan", f"{tmp}/missing.json"], "--precision-plan"),
    ]


def test_unwritable_outputs_are_refused_before_any_work(no_work, capsys, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with unwritable_dir(tmp_path) as ro:
        for argv, flag in _paths(str(tmp_path), str(ro)):
            line = _one_error(capsys, argv)
            assert line.startswith(f"error: {flag} "), (argv, line)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # the write probes are gone


def test_good_flags_pass_the_checks():
    args = train.parse_args(
        ["--zipf", "0", "--dense-lr", "0", "--max-steps", "0", "--step-size-init", "0.01"]
    )
    assert args.zipf == 0 and args.step_size_init == "0.01"
    train.parse_args(["--over-arch", "", "--dense-arch", "8", "--mpe-bits", "0,2,4,8"])

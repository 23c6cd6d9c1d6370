"""torchrec_lowprec.flags: the examples' one-line parser errors and range messages."""

from __future__ import annotations

import argparse
import math

import pytest

from torchrec_lowprec.flags import OneLineErrorParser, range_error

INTS = {"batch_size": 1, "threads": 0}
FLOATS = {"lr": (0.0, math.inf, True, False), "decay": (0.0, 1.0, True, False), "offset": (-math.inf, math.inf, True, True)}  # fmt: skip


def _ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(
        **({"batch_size": 8, "threads": 0, "lr": 0.1, "decay": 1.0, "offset": 0.0} | kw)
    )


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({}, None),
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"threads": -1}, "--threads must be >= 0 (0: all cores), got -1"),
        ({"lr": 0.0}, "--lr must be a finite number > 0, got 0.0"),
        ({"lr": math.inf}, "--lr must be a finite number > 0, got inf"),
        ({"decay": 1.5}, "--decay must be a finite number in (0, 1], got 1.5"),
        ({"offset": math.nan}, "--offset must be a finite number, got nan"),
        ({"lr": None}, None),  # left at None: the flag's default means "not set"
    ],
)
def test_range_error_names_the_first_bad_flag(kw, msg):
    assert range_error(_ns(**kw), INTS, FLOATS, {"threads": "0: all cores"}) == msg


def test_a_parse_error_is_one_line(capsys):
    ap = OneLineErrorParser()
    ap.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--n", "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: argument --n: invalid int value: 'x'\n"

"""torchrec_lowprec.flags: the examples' one-line parser errors and range messages."""

from __future__ import annotations

import argparse
import math

import pytest

from torchrec_lowprec.flags import OneLineErrorParser, parse_hot_rows, range_error

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


@pytest.mark.parametrize(
    "spec, base, want",
    [
        ("0.6:8", 4, [(0.6, 8)]),
        (" 0.2:8 , 0.5:4", 2, [(0.2, 8), (0.5, 4)]),
        ("1:32", 16, [(1.0, 32)]),
    ],
)
def test_parse_hot_rows(spec, base, want):
    assert parse_hot_rows(spec, base) == want


@pytest.mark.parametrize(
    "spec, base, msg",
    [
        ("0.6", 4, "'0.6' is not SHARE:BITS"),
        ("x:8", 4, "'x:8' is not SHARE:BITS"),
        ("nan:8", 4, "'nan:8' is not SHARE:BITS"),
        ("0.6:3", 4, "width 3 is not one of 2, 4, 8, 16, 32"),
        ("0.6:0", 4, "width 0 is not one of"),
        ("0.6:4", 4, "hot rows at 4 bits are not wider than the tables' 4"),
        ("0.7:8,0.5:4", 2, "the hot shares add up to 1.2 of the rows; at most 1"),
        ("0:8", 4, "share 0.0 of the rows at 8 bits must be in (0, 1]"),
        (",".join(["0.1:8"] * 9), 4, "at most 8 groups"),
    ],
)
def test_parse_hot_rows_refuses(spec, base, msg):
    with pytest.raises(ValueError) as e:
        parse_hot_rows(spec, base)
    assert str(e.value).startswith("--hot-rows ") and msg in str(e.value)

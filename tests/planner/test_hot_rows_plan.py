"""PrecisionPlan.hot_rows: the low-bit recipes' plans (each table's hottest rows wider)."""

from __future__ import annotations

import math

import pytest

from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision


def test_groups_are_the_hottest_shares_then_the_rest():
    plan = PrecisionPlan.hot_rows({"a": (1000, 16), "b": (100, 8)}, 2, [(0.2, 8), (0.5, 4)])
    assert plan.tables["a"] == TablePrecision(1000, 16, (200, 700, 1000), (8, 4, 2))
    assert plan.tables["b"] == TablePrecision(100, 8, (20, 70, 100), (8, 4, 2))
    assert PrecisionPlan.from_dict(plan.to_dict()) == plan


def test_small_tables_keep_one_hot_row_and_a_whole_share_is_one_group():
    # every hot group has at least one row; a group that reaches the end leaves no rest
    assert PrecisionPlan.hot_rows({"t": (3, 4)}, 4, [(0.1, 8)]).tables["t"].group_ends == (1, 3)
    assert PrecisionPlan.hot_rows({"t": (2, 4)}, 4, [(0.5, 16), (0.5, 8)]).tables["t"].bits == (16, 8)
    whole = PrecisionPlan.hot_rows({"t": (10, 4)}, 4, [(1.0, 8)]).tables["t"]
    assert (whole.group_ends, whole.bits) == ((10,), (8,))
    # rounding can use up the rows before the last hot group: that group is left out, not empty
    short = PrecisionPlan.hot_rows({"t": (2, 4)}, 2, [(0.9, 8), (0.1, 4)]).tables["t"]
    assert (short.group_ends, short.bits) == ((2,), (8,))


def test_serving_bytes_follow_the_groups():
    plan = PrecisionPlan.hot_rows({"t": (1000, 16)}, 4, [(0.6, 8)])
    # int8 rows: 16 codes + fp16 scale and bias; int4 rows: 8 + 4
    assert plan.tables["t"].serving_bytes() == 600 * 20 + 400 * 12


@pytest.mark.parametrize(
    "bits, hot, msg",
    [
        (3, [(0.5, 8)], "the tables' width 3 is not one of"),
        (4, [], "no hot groups given"),
        (4, [(0.5, 0)], "hot width 0 is not one of"),
        (4, [(0.5, 5)], "hot width 5 is not one of"),
        (4, [(0.0, 8)], "share 0.0 of the rows at 8 bits must be in (0, 1]"),
        (4, [(1.5, 8)], "share 1.5"),
        (4, [(math.nan, 8)], "share nan"),
        (4, [(True, 8)], "share True"),
        (4, [(0.6, 8), (0.6, 16)], "the hot shares add up to 1.2 of the rows; at most 1"),
    ],
)
def test_bad_recipes_are_refused(bits, hot, msg):
    with pytest.raises(ValueError, match="hot_rows: ") as e:
        PrecisionPlan.hot_rows({"t": (100, 16)}, bits, hot)
    assert msg in str(e.value)

"""The frontier's points from cached train.py runs: paired AUC, serving and training-state ratios."""

import frontier
import pytest

from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.quant.layout import row_bytes

TABLES = {"t0": (1000, 16), "t1": (10, 16)}
FP32 = sum(r * d * 4 for r, d in TABLES.values())


def _rec(variant: str, seed: int, auc: float, flags: list[str], nbytes: int) -> dict:
    result = {"auc": auc, "bytes": nbytes, "fp32_bytes": 2 * FP32}
    return {"dataset": "synthetic-val", "variant": variant, "seed": seed, "flags": flags, "result": result}


def test_points_pair_by_seed_and_count_plan_groups_and_id_maps(tmp_path):
    plan = PrecisionPlan.hot_rows(TABLES, 4, [(0.6, 8)])
    path = str(tmp_path / "plan.json")
    plan.save(path)
    recipe = "int4 fixed step hot 60% at 8b"
    recs = []
    for seed, base in ((0, 0.70), (1, 0.72), (2, 0.71)):
        recs.append(_rec("fp32", seed, base, ["--precision", "fp32"], 2 * FP32))
        recs.append(
            _rec("int4 default", seed, base - 0.010 - 0.001 * seed, ["--precision", "int4"], FP32 // 2)
        )
        recs.append(
            _rec(recipe, seed, base - 0.002, ["--precision", "int4", "--precision-plan", path], FP32 // 4 * 3)
        )
        recs.append(_rec("int4 step lr 1e-4", seed, base, ["--precision", "int4"], FP32 // 2))  # an ablation
    recs.append({**_rec("int4 default", 0, 0.0, ["--precision", "int4"], 1), "dataset": "other"})
    pts = {p[0]: p for p in frontier.train_py_points(recs, "synthetic-val", TABLES)}
    assert set(pts) == {"fp32", "int4 default", recipe}

    name, x, mean, se, n, runs = pts["int4 default"]
    assert x == pytest.approx(sum(r * row_bytes(4, d) for r, d in TABLES.values()) / FP32)
    assert (mean, n) == (pytest.approx(-0.011), 3)
    assert se == pytest.approx(0.001 / 3**0.5)  # stdev of -0.010, -0.011, -0.012 over sqrt(3)
    assert frontier.training_ratio(runs) == pytest.approx(0.25)

    # the plan's rows at their groups' widths plus the 4 B/row id map of every grouped table
    _, x, mean, se, n, runs = pts[recipe]
    hot = {"t0": 600, "t1": 6}
    want = sum(
        hot[t] * row_bytes(8, d) + (r - hot[t]) * row_bytes(4, d) + 4 * r for t, (r, d) in TABLES.items()
    )
    assert x == pytest.approx(want / FP32)
    assert (mean, se, n) == (pytest.approx(-0.002), pytest.approx(0.0, abs=1e-12), 3)
    assert frontier.training_ratio(runs) == pytest.approx(0.375)
    assert frontier._is_recipe(recipe) and not frontier._is_recipe("int4 hot 25% at 8b")


def test_training_ratio_is_none_where_a_benchmark_does_not_record_bytes():
    assert frontier.training_ratio([{"auc": 0.7}]) is None
    assert frontier.training_ratio([{"bytes": 1, "fp32_bytes": 4}, {"auc": 0.7}]) is None
    assert frontier.training_ratio([{"bytes": 1, "fp32_bytes": 4}, {"bytes": 3, "fp32_bytes": 4}]) == 0.5


def test_hot_rows_flag_counts_the_same_plan_as_its_file(tmp_path):
    path = str(tmp_path / "plan.json")
    PrecisionPlan.hot_rows(TABLES, 2, [(0.2, 8), (0.5, 4)]).save(path)
    by_file = frontier._serving_ratio(["--precision", "int2", "--precision-plan", path], TABLES)
    by_flag = frontier._serving_ratio(["--precision", "int2", "--hot-rows", "0.2:8,0.5:4"], TABLES)
    assert by_flag == by_file
    assert by_flag > frontier._serving_ratio(["--precision", "int2"], TABLES)


def test_raw_id_pipeline_adds_the_id_map_of_grouped_tables_only():
    flag = ["--precision", "int2", "--hot-rows", "0.2:8,0.5:4"]
    rows_only = frontier.lowbit.serving_bytes(flag, TABLES)
    assert frontier.lowbit.serving_bytes(flag, TABLES, id_maps=True) == rows_only + 4 * 1010
    uniform = ["--precision", "int2"]
    assert frontier.lowbit.serving_bytes(uniform, TABLES, id_maps=True) == frontier.lowbit.serving_bytes(
        uniform, TABLES
    )

"""Issue 23, items 1 and 3: a ``TabularSchema`` file is read with the bounds of the tables file
(no YAML aliases, at most 4 MiB, YAML or JSON) and ``missing_dense`` is checked at load: a finite
number, else an error naming the file, the key and what is allowed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.yaml_bombs import laughs, run_guarded
from torchrec_lowprec.data import TabularDataset, TabularSchema
from torchrec_lowprec.data.schema import MAX_COLUMNS


@pytest.mark.parametrize("key", ["dense", "categorical", "columns", "label"])
def test_billion_laughs_in_a_schema_is_refused_at_once(tmp_path, key):
    # The aliases are defined under `name` and used under `key`, as [*a8] (9**9 strings).
    values = {"name": laughs(), "label": "click", "categorical": "[site]", key: "[*a8]"}
    path = tmp_path / "schema.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    assert path.stat().st_size < 600
    code = f"""
        import sys, time
        from torchrec_lowprec.data import TabularSchema
        t0 = time.perf_counter()
        try:
            TabularSchema.from_file({str(path)!r})
            print("loaded")
        except ValueError as e:
            print(e)
        print(f"ELAPSED {{time.perf_counter() - t0}}")
        """
    out = run_guarded(code, "the schema file")
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr
    assert float(lines[1].split()[1]) < 5
    msg = lines[0]
    assert "schema.yaml" in msg and "alias" in msg and len(msg) < 400, msg


def test_an_oversized_schema_is_refused_yaml_or_json(tmp_path):
    for name in ("s.yaml", "s.json"):
        path = tmp_path / name
        path.write_text(json.dumps({"label": "y", "categorical": ["a"]}) + " " * (5 << 20))
        with pytest.raises(ValueError, match=rf"{name}: the schema file is 5.0 MiB; .* at most 4 MiB"):
            TabularSchema.from_file(path)


def test_schema_lists_and_indices_are_bounded_and_quoted_briefly(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "label: 0\ncategorical: [" + ", ".join(str(i + 1) for i in range(MAX_COLUMNS + 1)) + "]\n"
    )
    with pytest.raises(
        ValueError,
        match=rf"s.yaml: TabularSchema.categorical lists {MAX_COLUMNS + 1} columns; at most {MAX_COLUMNS}",
    ):
        TabularSchema.from_file(path)
    path.write_text(f"label: 0\ncategorical: [{10**12}]\n")
    with pytest.raises(
        ValueError, match=rf"s.yaml: TabularSchema.categorical: column index {10**12} .* \[0, {MAX_COLUMNS}\)"
    ):
        TabularSchema.from_file(path)
    path.write_text("label: 0\ndense: [" + ", ".join(["[x, y]"] * 300) + "]\n")
    with pytest.raises(ValueError) as e:
        TabularSchema.from_file(path)
    assert "s.yaml: TabularSchema.dense" in str(e.value) and len(str(e.value)) < 300, e.value
    path.write_text("label: 0\ncategorical: [a]\n" + "".join(f"k{i}: 1\n" for i in range(2000)) + "1: 2\n")
    with pytest.raises(ValueError) as e:  # mixed key types: no TypeError from sorting them
        TabularSchema.from_file(path)
    assert "s.yaml: unknown schema keys" in str(e.value) and len(str(e.value)) < 600, e.value


@pytest.mark.parametrize("value", ["zero", ".nan", ".inf", "-.inf", "'nan'", "true", "[0]"])
def test_missing_dense_must_be_a_finite_number(tmp_path, value):
    path = tmp_path / "s.yaml"
    path.write_text(f"label: y\ndense: [d]\nmissing_dense: {value}\n")
    with pytest.raises(ValueError, match=r"s.yaml: TabularSchema.missing_dense must be a finite number"):
        TabularSchema.from_file(path)
    with pytest.raises(ValueError, match="missing_dense must be a finite number"):
        TabularSchema(label="y", dense=("d",), missing_dense=float("nan"))


@pytest.mark.parametrize("value, expected", [("-1", -1.0), ("2.5", 2.5), ("'1e3'", 1000.0), ("0", 0.0)])
def test_missing_dense_numbers_fill_empty_fields(tmp_path, value, expected):
    path = tmp_path / "s.yaml"
    path.write_text(f"label: y\ndense: [d]\ncategorical: [c]\nmissing_dense: {value}\n")
    schema = TabularSchema.from_file(path)
    assert schema.missing_dense == expected and isinstance(schema.missing_dense, float)
    csv = tmp_path / "rows.csv"
    csv.write_text("y,d,c\n1,,a\n0,3,b\n")
    data = TabularDataset(csv, schema, fractions=(1.0, 0.0, 0.0))
    rows = next(data._rows(frozenset([0])))
    np.testing.assert_array_equal(rows.dense()[:, 0], [expected, 3.0])

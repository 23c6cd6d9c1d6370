"""Issue 23, item 1: a tables file is read with bounds. YAML aliases ("billion laughs"), an
oversized file, deep nesting, too many tables and huge numbers are refused before any work, and
every message is one bounded line naming the file and the key."""

from __future__ import annotations

import json

import pytest

from tests.yaml_bombs import laughs, run_guarded
from torchrec_lowprec.cli import main
from torchrec_lowprec.planner.tables_file import MAX_FEATURES, MAX_ROWS, MAX_TABLES


def _timed_plan(tmp_path, text: str) -> tuple[int, str, float]:
    """``torchrec-lowprec plan`` on ``text`` in a child process (a regression must not eat this
    one's memory): exit status, stderr and the seconds the command took (torch import excluded)."""
    tables = tmp_path / "tables.yaml"
    tables.write_text(text)
    code = f"""
        import sys, time, torch, torchrec
        from torchrec_lowprec.cli import main
        t0 = time.perf_counter()
        rc = main(["plan", "--tables", {str(tables)!r}, "--world-size", "1", "--hbm-gb", "1",
                   "--device", "cpu", "--out", {str(tmp_path / "plan.json")!r}])
        print(f"ELAPSED {{time.perf_counter() - t0}}", file=sys.stderr)
        sys.exit(rc)
        """
    out = run_guarded(code, "the tables file")
    lines = out.stderr.strip().splitlines()
    elapsed = float(lines[-1].split()[1])
    return out.returncode, "\n".join(lines[:-1]), elapsed


@pytest.mark.parametrize("key", ["features", "rows", "name"])
def test_billion_laughs_in_a_tables_file_is_refused_at_once(tmp_path, key):
    values = {"name": "t", "rows": "10", "dim": "8", key: laughs()}
    text = "- {" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}\n"
    assert len(text) < 600
    rc, err, elapsed = _timed_plan(tmp_path, text)
    assert rc == 2, err
    assert elapsed < 5, elapsed
    assert len(err.splitlines()) == 1 and len(err) < 400, err
    assert "tables.yaml" in err and "alias" in err and "line 1" in err, err


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchrec-lowprec: error: "), err
    return lines[0]


def _plan(tmp_path, text: str, name: str = "tables.yaml") -> int:
    tables = tmp_path / name
    tables.write_text(text)
    argv = ["plan", "--tables", str(tables), "--world-size", "1", "--hbm-gb", "1", "--device", "cpu"]
    return main(argv + ["--out", str(tmp_path / "plan.json")])


def test_an_anchor_without_alias_is_refused_too(tmp_path, capsys):
    assert _plan(tmp_path, "- &t {name: t, rows: 10, dim: 8}\n") == 2
    err = _error(capsys)
    assert "tables.yaml" in err and "anchor" in err and "&t" in err


@pytest.mark.parametrize("name", ["tables.yaml", "tables.json"])
def test_an_oversized_tables_file_is_refused_before_parsing(tmp_path, capsys, name):
    row = {"name": "t", "rows": 10, "dim": 8}
    text = json.dumps([row]) + " " * (5 << 20)
    assert _plan(tmp_path, text, name) == 2
    err = _error(capsys)
    assert name in err and "MiB" in err and "at most 4 MiB" in err, err


def test_deep_nesting_is_refused(tmp_path, capsys):
    assert _plan(tmp_path, "- {name: t, rows: 10, dim: 8, features: " + "[" * 100 + "]" * 100 + "}\n") == 2
    err = _error(capsys)
    assert "tables.yaml" in err and "nested" in err, err


def test_too_many_tables_or_features_and_huge_numbers_are_refused(tmp_path, capsys):
    many = "".join(f"- {{name: t{i}, rows: 1, dim: 1}}\n" for i in range(MAX_TABLES + 1))
    assert _plan(tmp_path, many) == 2
    assert f"{MAX_TABLES + 1} tables; at most {MAX_TABLES}" in _error(capsys)
    feats = ", ".join(f"f{i}" for i in range(MAX_FEATURES + 1))
    assert _plan(tmp_path, f"- {{name: t, rows: 1, dim: 1, features: [{feats}]}}\n") == 2
    err = _error(capsys)
    assert f"{MAX_FEATURES + 1} features; at most {MAX_FEATURES}" in err and len(err) < 400, err
    assert _plan(tmp_path, f"- {{name: t, rows: {MAX_ROWS + 1}, dim: 1}}\n") == 2
    assert f"rows must be a whole number in [1, {MAX_ROWS}]" in _error(capsys)
    assert _plan(tmp_path, "- {name: t, rows: " + "9" * 5000 + ", dim: 1}\n") == 2
    err = _error(capsys)
    assert "tables.yaml" in err and len(err) < 400, err


def test_error_messages_show_a_bounded_excerpt(tmp_path, capsys):
    long_list = "[" + ", ".join(["[x]"] * 200) + "]"
    assert _plan(tmp_path, f"- {{name: t, rows: 10, dim: 8, features: {long_list}}}\n") == 2
    err = _error(capsys)
    assert "features must be a non-empty list" in err and "..." in err and len(err) < 400, err
    assert _plan(tmp_path, "- name: t\n  rows: 10\n  dim: 8\n  ? " + "x" * 100000 + "\n  : 1\n") == 2
    err = _error(capsys)
    assert "unknown key" in err and len(err) < 400, err
    assert _plan(tmp_path, "{1: a, tables: []}\n") == 2  # keys of mixed types: no sort TypeError
    assert "only a 'tables:' key" in _error(capsys)

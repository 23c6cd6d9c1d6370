"""``torchrec-lowprec plan``: every malformed input is one ``error:`` line and exit 2 (issue 12,
item 18 and the CLI half of item 4), checked before any planning starts."""

from __future__ import annotations

import json
import time

import pytest
import torch

from torchrec_lowprec.cli import main
from torchrec_lowprec.data.frequencies import FREQ_FORMAT, FREQ_VERSION, save_frequencies
from torchrec_lowprec.planner import MemoryPlan
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision
from torchrec_lowprec.planner.tables_file import MAX_WORLD_SIZE, read_tables

GOOD = (
    "tables:\n  - {name: big, rows: 2000, dim: 64, features: [u, v]}\n  - {name: small, rows: 100, dim: 32}\n"
)


def _plan(tmp_path, tables_text=GOOD, *extra, world="1", hbm="1", out=None):
    tables = tmp_path / "tables.yaml"
    tables.write_text(tables_text)
    out = out if out is not None else str(tmp_path / "plan.json")
    argv = ["plan", "--tables", str(tables), "--world-size", world, "--hbm-gb", hbm, "--device", "cpu"]
    return main(argv + ["--out", out, *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchrec-lowprec: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "text, msg",
    [
        ("- {name: t, rows: 10, dim: 8, feature: [a]}\n", r"table #0 has unknown key 'feature'; allowed"),
        ("- {name: t, rows: 10, dim: 8, weight_init_max: 1}\n", r"unknown key 'weight_init_max'"),
        ("- {name: t, rows: 10, dim: 8, features: user}\n", r"features must be a non-empty list of names, e.g. \[user_id\]; got 'user'"),
        ("- {name: t, rows: 10, dim: 8, features: []}\n", r"features must be a non-empty list"),
        ("- {name: t, rows: 10, dim: 8, features: [a, 3]}\n", r"features must be a non-empty list"),
        ("- {name: t, rows: 1000.7, dim: 8}\n", r"table 't': rows must be a whole number > 0, got 1000.7"),
        ("- {name: t, rows: '1000', dim: 8}\n", r"rows must be a whole number > 0, got '1000'"),
        ("- {name: t, rows: 10, dim: true}\n", r"dim must be a whole number > 0, got True"),
        ("- {name: t, rows: -5, dim: 8}\n", r"rows must be a whole number > 0, got -5"),
        ("- {name: null, rows: 10, dim: 8}\n", r"name must be a non-empty string without '.', got None"),
        ("- {name: 12, rows: 10, dim: 8}\n", r"got 12"),
        ("- {rows: 10, dim: 8}\n", r"table #0 needs name, rows, dim .*\['name'\] missing"),
        ("- {name: t, rows: 10, num_embeddings: 10, dim: 8}\n", r"gives 'rows' twice"),
        ("- {name: t, rows: 10, dim: 8, pooling: max}\n", r"pooling must be sum, mean or none .*, got 'max'"),
        ("- {name: t, rows: 10, dim: 8}\n- {name: t, rows: 10, dim: 8}\n", r"duplicate table names \['t'\]"),
        ("- {name: t, rows: 10, dim: 8, features: [a]}\n- {name: s, rows: 10, dim: 8, features: [a]}\n", r"feature\(s\) \['a'\] are read by two tables"),
        ("tables: [{name: t, rows: 10, dim: 8}]\ntable: []\n", r"only a 'tables:' key"),
        ("[]\n", r"expected a non-empty list"),
    ],
)  # fmt: skip
def test_malformed_tables_file(tmp_path, capsys, text, msg):
    assert _plan(tmp_path, text) == 2
    import re

    assert re.search(msg, _error(capsys))
    assert not (tmp_path / "plan.json").exists()


def test_torchrec_names_are_accepted_as_aliases(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(
        "- {name: t, num_embeddings: 1000, embedding_dim: 16, feature_names: [a, b], pooling: MEAN}\n"
        "- {name: s, rows: 10, dim: 8}\n"
    )
    t, s = read_tables(str(p))
    assert (t.num_embeddings, t.embedding_dim, t.feature_names, t.pooling.name) == (
        1000,
        16,
        ["a", "b"],
        "MEAN",
    )
    assert (s.num_embeddings, s.embedding_dim, s.feature_names, s.pooling.name) == (10, 8, ["s"], "SUM")


def test_torchrec_feature_names_enable_frequencies(tmp_path, capsys):
    # Before, `feature_names:` was ignored, the table read feature "big", and --frequencies for
    # "u" were silently unused: one group instead of --groups frequency groups.
    counts = {"u": torch.arange(2000, 0, -1), "v": torch.ones(2000, dtype=torch.int64)}
    save_frequencies(counts, tmp_path / "f.pt")
    text = "- {name: big, num_embeddings: 2000, embedding_dim: 64, feature_names: [u, v]}\n"
    assert _plan(tmp_path, text, "--frequencies", str(tmp_path / "f.pt"), "--groups", "4") == 0
    assert MemoryPlan.load(str(tmp_path / "plan.json")).precision.tables["big"].num_groups == 4


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--reserved-fraction", "-0.5"], r"--reserved-fraction must be in \[0, 1\), got -0.5"),
        (["--reserved-fraction", "1"], r"--reserved-fraction must be in \[0, 1\), got 1.0"),
        (["--reserved-fraction", "nan"], r"--reserved-fraction must be in \[0, 1\), got nan"),
        (["--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
        (["--groups", "0"], r"--groups must be >= 1, got 0"),
    ],
)
def test_bad_numeric_flags(tmp_path, capsys, flags, msg):
    import re

    assert _plan(tmp_path, GOOD, *flags) == 2
    assert re.search(msg, _error(capsys))


@pytest.mark.parametrize("hbm", ["nan", "inf", "0", "-1"])
def test_bad_hbm(tmp_path, capsys, hbm):
    assert _plan(tmp_path, GOOD, hbm=hbm) == 2
    assert f"--hbm-gb must be a finite number > 0 (GiB per rank), got {float(hbm)}" in _error(capsys)


def test_world_size_is_bounded_and_rejected_at_once(tmp_path, capsys):
    t0 = time.perf_counter()
    assert _plan(tmp_path, GOOD, world="32768") == 2
    assert time.perf_counter() - t0 < 5  # was: minutes inside TorchRec's planner
    assert f"--world-size must be in [1, {MAX_WORLD_SIZE}], got 32768" in _error(capsys)
    assert _plan(tmp_path, GOOD, world="0") == 2
    assert "got 0" in _error(capsys)


def test_out_is_a_directory_or_in_a_missing_one(tmp_path, capsys):
    assert _plan(tmp_path, GOOD, out=str(tmp_path)) == 2
    assert "is a directory; give a file path" in _error(capsys)
    assert _plan(tmp_path, GOOD, out=str(tmp_path / "nope" / "p.json")) == 2
    assert "does not exist" in _error(capsys)


def _freq_file(tmp_path, counts) -> str:
    path = tmp_path / "f.pt"
    torch.save({"format": FREQ_FORMAT, "version": FREQ_VERSION, "counts": counts}, path)
    return str(path)


@pytest.mark.parametrize(
    "counts, msg",
    [
        ({"u": list(range(2000))}, r"counts of feature 'u' must be a 1-D tensor, got list"),
        ({"u": torch.rand(2000)}, r"counts of feature 'u' must be integers, got torch.float32"),
        ({"u": torch.full((2000,), -1)}, r"feature 'u' has a negative count \(-1\)"),
        ({"u": torch.ones(10, dtype=torch.int64)}, r"feature 'u' has 10 counts but its table has 2000 rows"),
        (
            {"user": torch.ones(2000, dtype=torch.int64)},
            r"counts for feature\(s\) \['user'\] that no table reads",
        ),
    ],
)
def test_bad_frequencies(tmp_path, capsys, counts, msg):
    import re

    assert _plan(tmp_path, GOOD, "--frequencies", _freq_file(tmp_path, counts)) == 2
    assert re.search(msg, _error(capsys))


def test_precision_plan_naming_tables_the_model_lacks(tmp_path, capsys):
    path = tmp_path / "mpe.json"
    PrecisionPlan({"other": TablePrecision(10, 8, (10,), (8,))}).save(str(path))
    assert _plan(tmp_path, GOOD, "--precision-plan", str(path)) == 2
    err = _error(capsys)
    assert "plans table(s) ['other'] that the tables file lacks (it has ['big', 'small'])" in err


def test_infeasible_placement_names_the_io_cost(tmp_path, capsys):
    # The tables (~150 KiB) fit easily, but TorchRec's per-shard I/O buffers for a huge batch do
    # not: the message used to claim "need at least N B per rank ... budget 1.00 GiB".
    rc = _plan(tmp_path, GOOD, "--batch-size", "4000000", hbm="0.25", world="2")
    err = _error(capsys)
    assert rc == 3
    assert (
        "the tables fit at the floor" in err
        and "input/output buffers" in err
        and "--batch-size 4000000" in err
    )
    assert "needs" in err and "on one rank" in err


def test_good_input_still_plans(tmp_path):
    assert _plan(tmp_path, GOOD, "--reserved-fraction", "0") == 0
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert set(doc["precision"]["tables"]) == {"big", "small"}

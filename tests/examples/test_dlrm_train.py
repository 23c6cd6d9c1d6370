"""The DLRM example script (examples/dlrm/train.py), run in this process: training quality and
summary, resume == uninterrupted, malformed rows and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import train  # examples/dlrm, put on sys.path by conftest

from torchrec_lowprec.data import MalformedRowWarning

TINY = [
    "--vocab-sizes", "2000,300,50,10", "--num-dense", "3", "--embedding-dim", "8",
    "--dense-arch", "16", "--over-arch", "16", "--threads", "1", "--no-progress", "--quiet",
]  # fmt: skip


def test_int8_training_learns_and_writes_a_sane_summary(tmp_path):
    out = tmp_path / "summary.json"
    png = tmp_path / "curves.png"
    s = train.main(
        [*TINY, "--train-rows", "60000", "--val-rows", "5000", "--test-rows", "20000", "--batch-size", "256",
         "--precision", "int8", "--eval-every", "100", "--eval-rows", "2000",
         "--summary", str(out), "--plot", str(png)]
    )  # fmt: skip
    on_disk = json.loads(out.read_text())
    assert on_disk["test"] == s["test"] and on_disk["version"] == train.SUMMARY_VERSION
    assert s["train"]["steps"] == -(-60000 // 256) == 235
    assert s["train"]["rows"] == 60000 and s["train"]["examples_per_s"] > 0
    assert s["test"]["rows"] == 20000 and s["val"]["rows"] == 5000
    bayes = s["bayes"]["test"]["auc"]
    # Well above chance, below the Bayes ceiling (which no model can beat beyond noise).
    assert 0.62 < s["test"]["auc"] < bayes + 0.005, (s["test"], bayes)
    assert 0.3 < s["test"]["logloss"] < 0.69
    # int8 at dim 8: (8 codes + 4 scale/bias) + 4 master step + 4 RowWiseAdagrad = 20 bytes/row,
    # against 4*8 + 4 = 36 for fp32 rows + RowWiseAdagrad.
    rows = 2000 + 300 + 50 + 10
    assert s["embedding_bytes"]["fp32_rowwise_adagrad"] == rows * 36
    assert s["embedding_bytes"]["ours"] == rows * 20
    assert [e[0] for e in s["history"]["eval"]] == [100, 200]
    assert len(s["history"]["train"]) >= 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tensors(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # 2 epochs of 20 steps; the interruption falls in the middle of the second epoch.
    base = [*TINY, "--train-rows", "5000", "--val-rows", "0", "--test-rows", "3000", "--batch-size", "256",
            "--epochs", "2", "--precision", "int4"]  # fmt: skip
    a = train.main([*base, "--checkpoint-dir", str(tmp_path / "a")])
    first = train.main([*base, "--checkpoint-dir", str(tmp_path / "b"), "--max-steps", "27"])
    assert first["train"]["steps"] == 27
    b = train.main([*base, "--checkpoint-dir", str(tmp_path / "b"), "--resume"])
    assert b["train"]["resumed_from_step"] == 27 and b["train"]["steps"] == a["train"]["steps"] == 40
    assert b["test"] == a["test"]
    ma = _tensors(tmp_path / "a" / "step_000000040" / "model.pt")
    mb = _tensors(tmp_path / "b" / "step_000000040" / "model.pt")
    assert ma.keys() == mb.keys()
    for k, v in ma.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, mb[k]), k
    ta = _tensors(tmp_path / "a" / "step_000000040" / "trainer.pt")
    tb = _tensors(tmp_path / "b" / "step_000000040" / "trainer.pt")
    for pid, st in ta["dense_opt"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, tb["dense_opt"]["state"][pid][name]), (pid, name)
    assert (ta["epoch"], ta["rows_in_epoch"]) == (tb["epoch"], tb["rows_in_epoch"]) == (2, 0)


def _criteo_rows(n: int, seed: int = 0) -> list[str]:
    """Criteo-format lines whose label depends on the first categorical column."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        c0 = int(rng.integers(0, 20))
        label = int(rng.random() < (0.8 if c0 < 5 else 0.1))
        ints = [str(int(rng.integers(0, 50))) if rng.random() > 0.1 else "" for _ in range(13)]
        cats = [f"{c0:08x}"] + [f"{int(rng.integers(0, 30)):08x}" for _ in range(25)]
        lines.append("\t".join([str(label), *ints, *cats]))
    return lines


@pytest.fixture
def criteo_file(tmp_path):
    lines = _criteo_rows(1500)
    lines[6] = "1\t2\t3"  # too few columns: file line 7
    lines[99] = lines[99].replace("\t", "\tx", 1)  # integer column 1 is not an integer: line 100
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_rows_are_skipped_with_file_and_line(criteo_file, tmp_path):
    args = [*TINY, "--data", f"criteo:{criteo_file}", "--batch-size", "64", "--epochs", "2",
            "--summary", str(tmp_path / "s.json")]  # fmt: skip
    with pytest.warns(MalformedRowWarning) as record:
        s = train.main(args)
    msgs = [str(w.message) for w in record if issubclass(w.category, MalformedRowWarning)]
    assert any(f"{criteo_file}:7: malformed row (3 columns" in m for m in msgs), msgs
    assert any(f"{criteo_file}:100: malformed row" in m and "'x" in m for m in msgs), msgs
    assert sum(s["data"]["malformed_rows"].values()) == 2
    assert s["train"]["rows"] // 2 + s["val"]["rows"] + s["test"]["rows"] == 1498  # 2 epochs
    # The label depends on cat_0 alone, so a trained model separates it well.
    assert s["test"]["auc"] > 0.8, s["test"]


def test_strict_stops_at_the_first_malformed_row(criteo_file, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--data", f"criteo:{criteo_file}", "--strict"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{criteo_file}:7: malformed row" in err and "strict" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "criteo:/nonexistent/day_0.tsv"], "/nonexistent/day_0.tsv does not exist"),
        (["--data", "tabular:{csv}"], "needs --schema"),
        (["--data", "tabular:{csv}", "--schema", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
        (["--data", "tabular:{csv}", "--schema", "{tmp}/bad.yaml"], "cannot parse the schema file"),
        (["--data", "tabular:{csv}", "--schema", "{tmp}/wrong.yaml"], "'clicked' is not in the header"),
        (["--data", "tabular:{csv}", "--schema", "{tmp}/alias.yaml"], "alias.yaml: line 1: YAML anchor &a"),
        (
            ["--data", "tabular:{csv}", "--schema", "{tmp}/zero.yaml"],
            "zero.yaml: TabularSchema.missing_dense must be",
        ),
        (["--data", "parquet:x"], "expected synthetic, criteo:PATH or tabular:PATH"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, argv, message):
    csv = tmp_path / "rows.csv"
    csv.write_text("click,site\n1,a\n0,b\n")
    (tmp_path / "bad.yaml").write_text("label: [unclosed\n")
    (tmp_path / "wrong.yaml").write_text("label: clicked\ncategorical: [site]\n")
    (tmp_path / "alias.yaml").write_text("name: &a [x]\nlabel: click\ncategorical: *a\n")
    (tmp_path / "zero.yaml").write_text("label: click\ncategorical: [site]\nmissing_dense: zero\n")
    argv = [a.format(csv=csv, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("error: ") == 1 and "Traceback" not in err


def test_a_quoted_line_break_in_a_data_file_is_one_error_naming_its_line(tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    csv.write_text("click,site\n" + "1,a\n" * 20 + '0,"b\nc"\n' + "1,d\n" * 20)
    schema = tmp_path / "schema.yaml"
    schema.write_text("label: click\ncategorical: [site]\n")
    with pytest.raises(SystemExit) as e:
        train.main([*TINY, "--data", f"tabular:{csv}", "--schema", str(schema)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    assert f"{csv}:22: a quoted field holds a line break" in err, err


def test_tabular_csv_with_schema_trains(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["click,site,hour,tags"]
    for _ in range(3000):
        site = int(rng.integers(0, 12))
        click = int(rng.random() < (0.7 if site % 3 == 0 else 0.15))
        tags = "|".join(f"t{int(t)}" for t in rng.integers(0, 8, int(rng.integers(0, 3))))
        lines.append(f"{click},s{site},{rng.random() * 24:.2f},{tags}")
    csv = tmp_path / "rows.csv"
    csv.write_text("\n".join(lines) + "\n")
    schema = tmp_path / "schema.yaml"
    schema.write_text("label: click\ndense: [hour]\ncategorical: [site]\nmulti_valued: {tags: '|'}\n")
    s = train.main([*TINY, "--data", f"tabular:{csv}", "--schema", str(schema), "--batch-size", "64",
                    "--precision", "int4"])  # fmt: skip
    assert s["data"]["features"] == 2 and s["model"]["precision"] == "int4"
    assert s["test"]["auc"] > 0.68, s["test"]  # Bayes ~0.79 (click rate 0.7 vs 0.15 by site)


def test_dcn_with_fp16_tables():
    s = train.main([*TINY, "--dcn", "--precision", "fp16", "--train-rows", "20000", "--val-rows", "0",
                    "--test-rows", "5000", "--batch-size", "256"])  # fmt: skip
    assert s["model"]["arch"] == "DLRM_DCN"
    # fp16 rows at dim 8 (16 bytes) + RowWiseAdagrad (4) against fp32 rows (32) + 4.
    assert s["embedding_bytes"]["ratio"] == pytest.approx(20 / 36)
    assert s["test"]["auc"] > 0.6, s["test"]


def test_unset_alpt_flags_take_the_library_defaults():
    import dlrm_model

    import torchrec_lowprec as lp

    lib = lp.LowPrecisionConfig()
    cfg = dlrm_model.table_config(train.parse_args([]))
    assert (cfg.step_size_lr, cfg.grow_step_size, cfg.growth_threshold) == (
        lib.step_size_lr,
        lib.grow_step_size,
        lib.growth_threshold,
    )
    given = ["--step-size-lr", "1e-4", "--growth-threshold", "1.5", "--no-grow-step-size"]
    cfg = dlrm_model.table_config(train.parse_args(given))
    assert (cfg.step_size_lr, cfg.grow_step_size, cfg.growth_threshold) == (1e-4, False, 1.5)


@pytest.mark.parametrize("optimizer,state_per_row", [("adam", 2 * 8 * 4), ("sgd", 0), ("adagrad", 8 * 4)])
def test_emb_optimizer_runs_that_optimizer_on_every_table(optimizer, state_per_row):
    """``--emb-optimizer``: the tables are tagged with it and run it (its state is what they hold)."""
    s = train.main([*TINY, "--precision", "int8", "--emb-optimizer", optimizer, "--emb-lr", "0.01",
                    "--train-rows", "4000", "--val-rows", "0", "--test-rows", "1000", "--batch-size", "256"])  # fmt: skip
    assert s["model"]["optimizer"] == optimizer and s["model"]["emb_lr"] == 0.01
    # int8 rows at dim 8: 8 codes + 4 B fp16 scale/bias, + 4 B fp32 master step, + the state
    rows = sum(s["data"]["vocab_sizes"].values())
    assert s["embedding_bytes"]["ours"] == rows * (12 + 4 + state_per_row)

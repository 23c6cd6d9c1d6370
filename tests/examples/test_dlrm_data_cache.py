"""``--data-cache`` of the DLRM example: a second run trains from the binary cache (no parsing)
to the same model and summary as the text path; a bad cache folder is one error line."""

from __future__ import annotations

import os

import pytest
import train  # examples/dlrm, put on sys.path by conftest

from tests.examples.conftest import exit_2
from tests.examples.test_dlrm_train import TINY, criteo_file  # noqa: F401  (a fixture)
from tests.unwritable import unwritable_dir
from torchrec_lowprec.data import MalformedRowWarning, TabularDataset

RUN = [*TINY, "--batch-size", "64", "--epochs", "2", "--seed", "3"]


def _run(args):
    with pytest.warns(MalformedRowWarning):
        return train.main(args)


def _same(a: dict, b: dict) -> None:
    for split in ("val", "test"):
        assert a[split]["auc"] == b[split]["auc"] and a[split]["logloss"] == b[split]["logloss"]
    assert a["train"]["rows"] == b["train"]["rows"] and a["train"]["steps"] == b["train"]["steps"]
    assert a["train"]["final_loss"] == b["train"]["final_loss"]
    assert a["data"]["malformed_rows"] == b["data"]["malformed_rows"]


def test_the_cached_run_trains_the_text_runs_model_without_parsing(criteo_file, tmp_path, monkeypatch):  # noqa: F811
    data = ["--data", f"criteo:{criteo_file}"]
    text = _run([*RUN, *data, "--data-cache", "off"])
    first = _run([*RUN, *data, "--data-cache", str(tmp_path / "cache")])  # converts
    assert [n for n in os.listdir(tmp_path / "cache") if n.endswith(".npycache")]

    def no_parse(*a, **k):
        raise AssertionError("the text was parsed")

    monkeypatch.setattr(TabularDataset, "_parse", no_parse)
    second = _run([*RUN, *data, "--data-cache", str(tmp_path / "cache")])  # from the cache
    for s in (first, second):
        _same(text, s)
    assert sum(second["data"]["malformed_rows"].values()) == 2


def test_auto_puts_the_cache_beside_the_file(criteo_file):  # noqa: F811
    _run([*RUN, "--data", f"criteo:{criteo_file}", "--max-steps", "2"])
    assert [n for n in os.listdir(os.path.dirname(criteo_file)) if n.endswith(".npycache")]


def test_an_unusable_cache_folder_is_one_error_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    def reached(*a, **k):
        raise AssertionError("got past the argument checks")

    monkeypatch.setattr(train, "open_data", reached)
    (tmp_path / "file.txt").write_text("x")
    with unwritable_dir(tmp_path) as ro:
        for spec in (str(tmp_path / "file.txt"), str(tmp_path / "file.txt" / "sub"), str(ro), ""):
            line = exit_2(capsys, [*TINY, "--data-cache", spec])
            assert line.startswith("error: --data-cache"), line

"""Long library operations report progress: a bar on stderr (forced or on a terminal), a log record, off by env var."""

from __future__ import annotations

import logging

import torch
from torchrec import KeyedJaggedTensor

from torchrec_lowprec.data import count_frequencies


def _batches(n: int):
    for i in range(n):
        yield KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=torch.tensor([i % 5, 1]), lengths=torch.tensor([1, 1])
        )


def test_bar_when_forced_and_log_record(monkeypatch, capsys, caplog):
    monkeypatch.setenv("TORCHREC_LOWPREC_PROGRESS", "1")
    with caplog.at_level(logging.INFO, logger="torchrec_lowprec"):
        counts = count_frequencies(_batches(7), {"f": 5})
    assert counts["f"].tolist() == [2, 9, 1, 1, 1]  # the wrapped iteration still sees every batch
    err = capsys.readouterr().err
    assert "counting id frequencies: " in err and "batch/s" in err
    assert any(r.getMessage().startswith("counting id frequencies: 7 batch in ") for r in caplog.records)


def test_off_by_env_and_off_the_terminal(monkeypatch, capsys):
    for value in ("0", None):  # explicitly off; unset and stderr not a terminal (pytest captures it)
        if value is None:
            monkeypatch.delenv("TORCHREC_LOWPREC_PROGRESS", raising=False)
        else:
            monkeypatch.setenv("TORCHREC_LOWPREC_PROGRESS", value)
        count_frequencies(_batches(3), {"f": 5})
        assert capsys.readouterr().err == ""

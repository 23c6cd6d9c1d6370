"""Fixtures of the DLRM example tests: the example's folder on sys.path, torch threads restored."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DLRM_DIR = os.path.join(ROOT, "examples", "dlrm")
if DLRM_DIR not in sys.path:
    sys.path.insert(0, DLRM_DIR)


@pytest.fixture(autouse=True)
def _restore_threads():
    # train.main sets the process's torch thread count; other test modules expect theirs.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def exit_2(capsys, argv) -> str:
    """``train.main(argv)`` exits 2 with exactly one ``error:`` line and no traceback; that line."""
    import train

    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]

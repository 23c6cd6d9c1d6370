"""The forked data-loader process: order, depth, errors, warnings, state handed back, early close,
a dying child, and the DLRM example's file batches identical to the thread loader's."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings

import numpy as np
import pytest

from torchrec_lowprec.data import CriteoDataset, MalformedRowError, MalformedRowWarning
from torchrec_lowprec.data.prefetch import can_fork, prefetch_process

pytestmark = pytest.mark.skipif(not can_fork(), reason="needs fork")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Counter:
    def __init__(self) -> None:
        self.seen = 0


def test_items_in_order_with_state_handed_back():
    counter = _Counter()

    def produce():
        for i in range(50):
            counter.seen += 1  # changes the child's copy only
            yield np.full(1000, i)

    got = []
    out = prefetch_process(produce, depth=3, finish=lambda: counter.seen, apply_finish=got.append)
    arrays = list(out)
    assert [int(a[0]) for a in arrays] == list(range(50)) and all(a.shape == (1000,) for a in arrays)
    assert counter.seen == 0 and got == [50]


def test_runs_ahead_at_most_depth_items(tmp_path):
    log = tmp_path / "made"

    def produce():
        for i in range(100):
            with open(log, "a") as f:
                f.write(f"{i}\n")
            yield i

    it = prefetch_process(produce, depth=2)
    assert next(it) == 0
    time.sleep(0.5)
    made = len(log.read_text().split())
    assert 2 <= made <= 4  # the consumed item, two in flight, one being produced
    it.close()


def test_errors_and_warnings_reach_the_parent():
    def produce():
        warnings.warn("line 3 is odd", MalformedRowWarning, stacklevel=2)
        yield 1
        raise MalformedRowError("data.tsv:7: malformed row (label 'x' is not a number)")

    it = prefetch_process(produce, depth=2)
    with pytest.warns(MalformedRowWarning, match="line 3 is odd"):
        assert next(it) == 1
    with pytest.raises(MalformedRowError, match="data.tsv:7"):
        next(it)


def test_an_unpicklable_item_is_a_clear_error():
    def produce():
        yield lambda: None

    with pytest.raises(RuntimeError, match="cannot send"):
        list(prefetch_process(produce))


def test_a_killed_child_is_an_error_not_a_hang():
    def produce():
        yield 0
        os.kill(os.getpid(), signal.SIGKILL)
        yield 1

    it = prefetch_process(produce)
    assert next(it) == 0
    with pytest.raises(RuntimeError, match="data loader process died"):
        next(it)


def test_closing_early_ends_the_child():
    it = prefetch_process(lambda: iter(range(10**9)), depth=2)
    assert next(it) == 0
    it.close()  # terminates and joins the child; a second close is harmless
    it.close()


def _write_criteo(path, rows: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for r in range(rows):
            ints = "\t".join(str(int(v)) for v in rng.integers(0, 100, 13))
            cats = "\t".join(f"{int(v):08x}" for v in rng.integers(0, 50, 26))
            label = "x" if r % 97 == 5 else str(int(rng.integers(0, 2)))  # a few malformed rows
            f.write(f"{label}\t{ints}\t{cats}\n")


def test_dlrm_file_batches_same_in_process_and_thread_mode(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples", "dlrm"))
    import dlrm_data

    path = tmp_path / "c.tsv"
    _write_criteo(path, 3000)
    out = {}
    for mode in ("thread", "process"):
        src = CriteoDataset([str(path)], min_count=1, seed=0)
        data = dlrm_data.DataSource("criteo", src, prefetch=3, prefetch_mode=mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(data.train_batches(256, 0, 1))
        out[mode] = (
            batches,
            data.malformed_rows(),
            len([w for w in caught if w.category is MalformedRowWarning]),
        )
    (tb, tbad, tw), (pb, pbad, pw) = out["thread"], out["process"]
    assert pbad == tbad and tbad["train"] > 0 and pw == tw > 0
    assert len(pb) == len(tb) > 5
    for a, b in zip(tb, pb):
        assert (a.valid, a.global_rows) == (b.valid, b.global_rows)
        assert a.batch.dense_features.equal(b.batch.dense_features)
        assert a.batch.labels.equal(b.batch.labels)
        assert a.batch.sparse_features.values().equal(b.batch.sparse_features.values())
        assert a.batch.sparse_features.lengths().equal(b.batch.sparse_features.lengths())

"""The pyarrow-based reader: quoted fields, non-finite and out-of-range values as malformed rows,
segments on parser threads, vectorised vocabulary counting and lookup, the prefetching loader."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch

from torchrec_lowprec.data import (
    CriteoDataset,
    MalformedRowError,
    MalformedRowWarning,
    TabularDataset,
    TabularSchema,
    Vocabulary,
)
from torchrec_lowprec.data.prefetch import prefetch


def _tokens(data, batch, name) -> list[str]:
    tok = ["<oov>", *data.vocabulary.tokens[name]]
    return [tok[i] for i in batch.sparse_features[name].values().tolist()]


def test_quoted_fields_are_parsed_as_csv(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text(
        'y,text,tags\n1,"hello, world","a|b"\n0,"a ""quoted"" one",c\n1,plain,""\n0,"hello, world",a\n'
    )
    schema = TabularSchema(label="y", categorical=("text",), multi_valued={"tags": "|"})
    data = TabularDataset(path, schema, split="chronological", fractions=(1, 0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MalformedRowWarning)  # no row is malformed
        (b,) = data.batches("train", 10)
    assert _tokens(data, b, "text") == ["hello, world", 'a "quoted" one', "plain", "hello, world"]
    assert data.vocabulary.tokens["text"][0] == "hello, world"  # counted twice: id 1
    assert b.sparse_features["tags"].lengths().tolist() == [2, 1, 0, 1]
    assert _tokens(data, b, "tags") == ["a", "b", "c", "a"]
    assert data.malformed_rows == {"train": 0}


def _criteo(label, ints=(), cats=("a",)) -> str:
    ints = [*map(str, ints), *[""] * (13 - len(ints))]
    return "\t".join([str(label), *ints, *cats, *[""] * (26 - len(cats))]) + "\n"


def test_nonfinite_and_out_of_range_labels_are_malformed_rows(tmp_path):
    good = [_criteo(i % 2, [i]) for i in range(20)]
    bad = {3: _criteo("nan"), 6: _criteo("inf"), 9: _criteo("-1"), 12: _criteo("1.5"), 15: _criteo("NULL")}
    lines = [bad.get(i + 1, g) for i, g in enumerate(good)]
    path = tmp_path / "labels.tsv"
    path.write_text("".join(lines))
    data = CriteoDataset(path, split="chronological", fractions=(1, 0, 0), max_warnings=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = torch.cat([b.labels for b in data.batches("train", 7)])
    msgs = [str(w.message) for w in caught if issubclass(w.category, MalformedRowWarning)]
    assert len(labels) == 15 and set(labels.tolist()) <= {0.0, 1.0}
    assert data.malformed_rows == {"train": 5}
    assert [m.split(": malformed")[0] for m in msgs] == [f"{path}:{n}" for n in (3, 6, 9, 12, 15)]
    assert "label 'nan' is not finite" in msgs[0] and "label 'inf' is not finite" in msgs[1]
    assert "label '-1' is outside [0, 1]" in msgs[2] and "label '1.5' is outside [0, 1]" in msgs[3]
    assert "label 'NULL' is not a number" in msgs[4]
    with pytest.raises(MalformedRowError, match=rf"{path}:3: malformed row \(label 'nan' is not finite\)"):
        CriteoDataset(path, strict=True, split="chronological", fractions=(1, 0, 0)).build_vocabulary()


def test_nonfinite_dense_values_are_malformed_rows(tmp_path):
    path = tmp_path / "dense.csv"
    rows = ["y,x,c"] + [f"{i % 2},{i}.5,v{i % 3}" for i in range(12)]
    rows[4], rows[8], rows[10] = "1,nan,v0", "0,-inf,v1", "1,1e999,v2"  # 1e999 overflows to inf
    path.write_text("\n".join(rows) + "\n")
    schema = TabularSchema(label="y", dense=("x",), categorical=("c",))
    data = TabularDataset(path, schema, split="chronological", fractions=(1, 0, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (b,) = data.batches("train", 100)
    msgs = [str(w.message) for w in caught if issubclass(w.category, MalformedRowWarning)]
    assert [m.split(": malformed")[0] for m in msgs] == [f"{path}:{n}" for n in (5, 9, 11)]
    assert "column 2 value 'nan' is not finite" in msgs[0] and "'-inf' is not finite" in msgs[1]
    assert torch.isfinite(b.dense_features).all() and b.labels.numel() == 9
    assert data.malformed_rows == {"train": 3}
    with pytest.raises(MalformedRowError, match=rf"{path}:5:"):
        TabularDataset(path, schema, strict=True, split="chronological", fractions=(1, 0, 0)).scan()


def _numbered(path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = [
        _criteo(i % 2, [i, int(rng.integers(0, 9))], [f"{int(rng.zipf(1.3)) % 500:x}", "z"]) for i in range(n)
    ]
    lines[17] = "1\t2\n"
    lines[n // 2] = _criteo(1, ["x"])
    path.write_text("".join(lines))
    return lines


def test_small_segments_on_threads_give_the_same_rows_vocabulary_and_counts(tmp_path):
    path = tmp_path / "n.tsv"
    _numbered(path, 3000)
    kw = dict(seed=3, min_count=2, max_warnings=0)
    one = CriteoDataset(path, workers=1, **kw)  # one segment, inline
    many = CriteoDataset(path, workers=3, segment_bytes=4096, **kw)  # ~50 segments on 3 threads
    assert one.vocabulary == many.vocabulary
    for split in ("train", "val", "test"):
        a, b = list(one.batches(split, 256)), list(many.batches(split, 256))
        assert [x.labels.numel() for x in a] == [x.labels.numel() for x in b]
        for x, y in zip(a, b):
            assert torch.equal(x.dense_features, y.dense_features)
            assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
    assert one.malformed_rows == many.malformed_rows and sum(many.malformed_rows.values()) == 2
    assert one.scan() == many.scan()


def test_vectorised_vocabulary_equals_counting_and_lookup_by_dict(tmp_path):
    from collections import Counter

    path = tmp_path / "n.tsv"
    lines = _numbered(path, 2000, seed=1)
    data = CriteoDataset(path, split="chronological", fractions=(1, 0, 0), min_count=3, max_warnings=0)
    fields = [ln.rstrip("\n").split("\t") for ln in lines if ln.count("\t") == 39 and "\tx\t" not in ln]
    expected = Vocabulary.build({f"cat_{k}": Counter(f[14 + k] for f in fields) for k in range(26)}, 3)
    assert data.vocabulary == expected
    (b,) = list(data.batches("train", 5000))
    for name in ("cat_0", "cat_1", "cat_2"):
        raw = [f[14 + int(name[4:])] for f in fields]
        assert b.sparse_features[name].values().tolist() == expected.lookup(name, raw).tolist()


def test_prefetch_runs_ahead_keeps_order_and_raises_where_the_producer_failed():
    made = []

    def produce():
        for i in range(10):
            made.append(i)
            yield i
        raise ValueError("row 10 is bad")

    it = prefetch(produce(), depth=3)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(made) >= 4  # 1 consumed + 3 queued ahead
    assert list(it.__next__() for _ in range(9)) == list(range(1, 10))
    with pytest.raises(ValueError, match="row 10 is bad"):
        next(it)
    # Closing early stops and joins the producer thread.
    before = threading.active_count()
    it = prefetch(iter(range(10**9)), depth=2)
    assert next(it) == 0
    it.close()
    assert threading.active_count() <= before


def test_without_pyarrow_the_reader_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "x.tsv"
    path.write_text(_criteo(1, [1]))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install pyarrow"):
        CriteoDataset(path)

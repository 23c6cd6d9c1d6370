"""The binary data cache: the text reader's batches bit for bit, reused without parsing, rebuilt
when the file changes, never read when truncated or half written."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import warnings

import numpy as np
import pytest
import torch

from torchrec_lowprec.data import (
    CacheError,
    CacheWarning,
    CriteoDataset,
    MalformedRowError,
    MalformedRowWarning,
    TabularDataset,
    TabularSchema,
    open_cached,
)
from torchrec_lowprec.data import cache as cache_mod
from torchrec_lowprec.data.cache import MANIFEST


def _line(rng, label=None) -> str:
    ints = [str(int(rng.integers(0, 90))) if rng.random() > 0.1 else "" for _ in range(13)]
    cats = [f"{int(rng.integers(0, 40)):08x}" if rng.random() > 0.05 else "" for _ in range(26)]
    return "\t".join([str(int(rng.random() < 0.3)) if label is None else label, *ints, *cats])


@pytest.fixture
def tsv(tmp_path):
    rng = np.random.default_rng(0)
    lines = [_line(rng) for _ in range(3000)]
    lines[4] = "1\t2\t3"  # too few columns: line 5
    lines[2000] = _line(rng, label="nan")  # line 2001: a label that is not a number
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _batches(ds, split, bs=128):
    return list(ds.batches(split, bs))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense_features, y.dense_features)
        assert torch.equal(x.labels, y.labels)
        kx, ky = x.sparse_features, y.sparse_features
        assert kx.keys() == ky.keys()
        assert torch.equal(kx.values(), ky.values()) and kx.values().dtype == ky.values().dtype
        assert torch.equal(kx.lengths(), ky.lengths()) and kx.lengths().dtype == ky.lengths().dtype


def _open(path, cache_dir, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedRowWarning)
        return open_cached(CriteoDataset(path, **kw), cache_dir)


@pytest.mark.parametrize(
    "options",
    [
        dict(min_count=2, seed=3),
        dict(split="chronological", fractions=(0.7, 0.2, 0.1)),
        dict(int_features="categorical", min_count=3),
    ],
)
def test_cached_batches_are_the_text_readers_bit_for_bit(tsv, tmp_path, options):
    text = CriteoDataset(tsv, **options)
    with pytest.warns(MalformedRowWarning):
        cached = open_cached(CriteoDataset(tsv, **options), tmp_path / "c")
    for split in ("train", "val", "test"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MalformedRowWarning)
            _assert_same(_batches(text, split), _batches(cached, split))
            first = [
                np.concatenate([b.labels for b in d.blocks(split, num_rows=200)]) for d in (text, cached)
            ]
            assert first[0].shape == (200,) and np.array_equal(*first)
    assert cached.vocabulary == text.vocabulary and cached.feature_names == text.feature_names
    assert cached.malformed_rows == text.malformed_rows and sum(text.malformed_rows.values()) == 2


def test_a_second_open_reads_no_text_and_reports_the_same_malformed_rows(tsv, tmp_path, monkeypatch):
    first = _open(tsv, tmp_path / "c", seed=1)
    expected = {s: _batches(first, s) for s in ("train", "val", "test")}
    counts = dict(first.manifest["malformed_rows"])

    def no_parse(*a, **k):
        raise AssertionError("the text was parsed")

    monkeypatch.setattr(TabularDataset, "_parse", no_parse)
    monkeypatch.setattr(TabularDataset, "build_vocabulary", no_parse)
    second = open_cached(CriteoDataset(tsv, seed=1), tmp_path / "c")
    with pytest.warns(MalformedRowWarning) as record:
        for s in ("train", "val", "test"):
            _assert_same(expected[s], _batches(second, s))
    msgs = [str(w.message) for w in record]
    assert any(f"{tsv}:5: malformed row (3 columns" in m for m in msgs), msgs
    assert any(f"{tsv}:2001: malformed row" in m for m in msgs), msgs
    assert second.malformed_rows == counts and sum(counts.values()) == 2
    with pytest.raises(MalformedRowError, match=":5: malformed row"):  # strict sees them too
        open_cached(CriteoDataset(tsv, seed=1, strict=True), tmp_path / "c")


def _count_parses(monkeypatch) -> list[int]:
    calls = [0]
    real = TabularDataset._parse

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(TabularDataset, "_parse", counting)
    return calls


def test_a_changed_file_is_converted_again(tsv, tmp_path, monkeypatch):
    _open(tsv, tmp_path / "c")
    calls = _count_parses(monkeypatch)
    _open(tsv, tmp_path / "c")
    assert calls[0] == 0
    st = os.stat(tsv)
    os.utime(tsv, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: mtime only
    again = _open(tsv, tmp_path / "c")
    assert calls[0] > 0
    with open(tsv, "a") as f:  # 200 more rows: the size changes
        rng = np.random.default_rng(9)
        f.write("\n".join(_line(rng) for _ in range(200)) + "\n")
    grown = _open(tsv, tmp_path / "c")
    assert sum(grown.scan()["rows"].values()) == sum(again.scan()["rows"].values()) + 200
    _assert_same(_batches(CriteoDataset(tsv), "train"), _batches(grown, "train"))
    assert len([n for n in os.listdir(tmp_path / "c") if n.endswith(".npycache")]) == 1


def _break_array(entry):
    p = os.path.join(entry, "train", "cats.npy")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)


def _break_manifest(entry):
    p = os.path.join(entry, MANIFEST)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _other_settings(entry):
    p = os.path.join(entry, MANIFEST)
    m = json.load(open(p))
    m["settings"]["seed"] = 99
    open(p, "w").write(json.dumps(m))


def _break_header(entry):
    p = os.path.join(entry, "val", "dense.npy")
    a = np.load(p)
    np.save(p, a[:, :5].copy())  # another shape; a size check alone could miss it
    m = json.load(open(os.path.join(entry, MANIFEST)))
    m["arrays"]["val"]["dense"]["bytes"] = os.path.getsize(p)
    open(os.path.join(entry, MANIFEST), "w").write(json.dumps(m))


@pytest.mark.parametrize("damage", [_break_array, _break_manifest, _other_settings, _break_header])
def test_a_damaged_cache_is_never_read_but_rebuilt_with_a_warning(tsv, tmp_path, monkeypatch, damage):
    first = _open(tsv, tmp_path / "c")
    damage(first.cache_dir)
    calls = _count_parses(monkeypatch)
    with pytest.warns(CacheWarning, match="not read, rebuilding"):
        rebuilt = _open(tsv, tmp_path / "c")
    assert calls[0] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MalformedRowWarning)
        for s in ("train", "val"):
            _assert_same(_batches(CriteoDataset(tsv), s), _batches(rebuilt, s))


def _killed_conversion(path, root):
    def die(self, a):
        os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 in the middle of the writes

    cache_mod._NpyAppender.append = die
    warnings.simplefilter("ignore")
    open_cached(CriteoDataset(path), root)


def _open_in_child(path, root, q):
    warnings.simplefilter("ignore")
    c = open_cached(CriteoDataset(path), root)
    q.put((c.cache_dir, c.scan()["rows"]))


def test_a_killed_conversion_leaves_nothing_that_is_read(tsv, tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("fork")
    root = str(tmp_path / "c")
    p = ctx.Process(target=_killed_conversion, args=(tsv, root))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    names = os.listdir(root)
    assert not [n for n in names if n.endswith(".npycache")]  # no entry: only a temporary folder
    assert [n for n in names if n.startswith(".tmp-")]
    calls = _count_parses(monkeypatch)
    c = _open(tsv, root)
    assert calls[0] > 0 and not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    _assert_same(_batches(CriteoDataset(tsv), "train"), _batches(c, "train"))


def test_concurrent_opens_convert_once_and_agree(tsv, tmp_path):
    ctx = multiprocessing.get_context("fork")
    root = str(tmp_path / "c")
    q = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(tsv, root, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len({r[0] for r in results}) == 1 and all(r[1] == results[0][1] for r in results)
    assert sorted(n for n in os.listdir(root) if not n.endswith(".lock")) == [os.path.basename(results[0][0])]


def test_settings_that_change_the_rows_get_their_own_cache(tsv, tmp_path):
    a = _open(tsv, tmp_path / "c", seed=0)
    b = _open(tsv, tmp_path / "c", seed=1)
    c = _open(tsv, tmp_path / "c", min_count=5)
    assert len({a.cache_dir, b.cache_dir, c.cache_dir}) == 3
    assert _open(tsv, tmp_path / "c", seed=0, workers=1, segment_bytes=4096).cache_dir == a.cache_dir


def test_default_folder_is_beside_the_file_else_the_user_cache(tsv, tmp_path, monkeypatch):
    assert os.path.dirname(_open(tsv, None).cache_dir) == os.path.dirname(tsv)
    monkeypatch.setattr(cache_mod, "unwritable_reason", lambda p: "read-only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_mod.default_cache_root([tsv]) == str(tmp_path / "xdg" / "torchrec_lowprec" / "data")


def test_unusable_folders_and_multi_valued_schemas_are_errors(tsv, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CacheError, match="is a file, not a folder"):
        open_cached(CriteoDataset(tsv), tmp_path / "f")
    csv = tmp_path / "t.csv"
    csv.write_text("y,tags\n1,a|b\n0,c\n")
    schema = TabularSchema(label="y", multi_valued={"tags": "|"}, header=True)
    with pytest.raises(CacheError, match="multi-valued"):
        open_cached(TabularDataset(str(csv), schema), tmp_path / "c")

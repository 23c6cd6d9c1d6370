"""Criteo TSV reader: preprocessing, train-only vocabularies, splits, save/load, bad rows."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

from torchrec_lowprec.data import (
    OOV_ID,
    CriteoDataset,
    MalformedRowError,
    MalformedRowWarning,
    Vocabulary,
    criteo_int_to_bucket,
    criteo_int_to_dense,
    random_split_codes,
)


def criteo_line(label, ints, cats) -> str:
    ints = list(ints) + [""] * (13 - len(ints))
    cats = list(cats) + [""] * (26 - len(cats))
    return "\t".join([str(label), *map(str, ints), *cats]) + "\n"


def write(path, lines) -> str:
    with open(path, "w") as f:
        f.writelines(lines)
    return str(path)


def numbered_file(path, n: int) -> str:
    """Row i: label i%2, int_0 = i (so a row's line survives preprocessing), cat_0 = hex(i % 50)."""
    rng = np.random.default_rng(0)
    lines = [
        criteo_line(
            i % 2, [i, int(rng.integers(0, 100)), ""], [f"{i % 50:08x}", "", f"{int(rng.integers(0, 9)):08x}"]
        )
        for i in range(n)
    ]
    return write(path, lines)


def line_numbers(data: CriteoDataset, split: str) -> np.ndarray:
    dense = torch.cat([b.dense_features[:, 0] for b in data.batches(split, 1000)])
    return np.rint(np.expm1(dense.double().numpy())).astype(np.int64)


RAW = [0, 1, 2, 3, 10, -1, ""]


@pytest.fixture
def value_file(tmp_path):
    return write(tmp_path / "values.tsv", [criteo_line(1, [x, 7], ["aa", "bb"]) for x in RAW])


def test_preprocessing_functions():
    x = np.array([0, 1, 2, 3, 10, -1])
    assert criteo_int_to_dense(x).tolist() == pytest.approx(
        [0, math.log(2), math.log(3), math.log(4), math.log(11), 0]
    )
    assert criteo_int_to_bucket(x).tolist() == [0, 1, 2, 1, 5, -1]  # floor(ln(3)^2)=1, floor(ln(10)^2)=5


def test_dense_mode_values(value_file):
    data = CriteoDataset(value_file, split="chronological", fractions=(1, 0, 0))
    (batch,) = data.batches("train", 100)
    expected = [0, math.log(2), math.log(3), math.log(4), math.log(11), 0, 0]  # -1 clamps to 0, "" is 0
    assert batch.dense_features.shape == (7, 13)
    assert batch.dense_features[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert batch.dense_features[:, 1].tolist() == pytest.approx([math.log(8)] * 7, abs=1e-6)
    assert batch.dense_features[:, 2:].abs().sum() == 0
    assert batch.sparse_features.keys() == [f"cat_{i}" for i in range(26)]
    assert batch.labels.tolist() == [1.0] * 7


def test_categorical_mode_values(value_file):
    data = CriteoDataset(value_file, int_features="categorical", split="chronological", fractions=(1, 0, 0))
    (batch,) = data.batches("train", 100)
    kjt = batch.sparse_features
    assert kjt.keys()[:13] == [f"int_{i}" for i in range(13)] and len(kjt.keys()) == 39
    assert batch.dense_features.shape == (7, 0)
    ids = kjt["int_0"].values().tolist()
    tokens = ["<oov>", *data.vocabulary.tokens["int_0"]]
    assert [tokens[i] for i in ids] == ["0", "1", "2", "1", "5", "-1", "0"]  # "" counts as 0
    assert kjt["int_1"].values().tolist() == [1] * 7  # 7 -> floor(ln(7)^2) = 3, the only value


def test_oov_from_train_split_only(tmp_path):
    n = 4000
    codes = random_split_codes(0, 0, n, (0.8, 0.1, 0.1))
    test_lines = np.flatnonzero(codes == 2)
    train_lines = np.flatnonzero(codes == 0)
    lines = []
    for i in range(n):
        if i in test_lines[:20]:
            cat = "testonly"  # frequent, but only in test
        elif i == train_lines[0]:
            cat = "once"  # once in train: below min_count
        elif i in train_lines[1:4]:
            cat = "thrice"
        else:
            cat = f"u{i}"
        lines.append(criteo_line(0, [i], [cat]))
    data = CriteoDataset(write(tmp_path / "oov.tsv", lines), min_count=2, seed=0)
    vocab = data.vocabulary
    assert vocab.tokens["cat_0"] == ["thrice"]
    assert data.vocab_sizes["cat_0"] == 2
    assert vocab.lookup("cat_0", ["testonly", "once", "thrice", "never"]).tolist() == [
        OOV_ID,
        OOV_ID,
        1,
        OOV_ID,
    ]
    test_ids = torch.cat([b.sparse_features["cat_0"].values() for b in data.batches("test", 256)])
    assert test_ids.numel() == len(test_lines) and int(test_ids.max()) == OOV_ID
    # The train counts are in the vocabulary: 3 x "thrice", all other train rows OOV.
    assert vocab.frequencies("cat_0").tolist() == [len(train_lines) - 3, 3]


def test_random_split_is_8_1_1_disjoint_and_seeded(tmp_path):
    n = 20_000
    path = numbered_file(tmp_path / "rows.tsv", n)
    data = CriteoDataset(path, seed=3)
    got = {s: line_numbers(data, s) for s in ("train", "val", "test")}
    sizes = np.array([len(v) for v in got.values()]) / n
    assert sizes == pytest.approx([0.8, 0.1, 0.1], abs=0.01)
    everything = np.concatenate(list(got.values()))
    assert np.array_equal(np.sort(everything), np.arange(n))  # disjoint and complete
    codes = random_split_codes(3, 0, n, (0.8, 0.1, 0.1))
    assert np.array_equal(got["val"], np.flatnonzero(codes == 1))
    other = line_numbers(CriteoDataset(path, seed=4), "val")
    assert not np.array_equal(other, got["val"])
    assert data.scan()["rows"] == {s: len(v) for s, v in got.items()}


def test_chronological_split(tmp_path):
    path = numbered_file(tmp_path / "rows.tsv", 1001)
    with open(path, "a") as f:  # a last line without its newline still counts
        f.write(criteo_line(1, [1001], ["x"]).rstrip("\n"))
    data = CriteoDataset(path, split="chronological")
    assert data.line_count() == 1002
    assert line_numbers(data, "train").tolist() == list(range(801))
    assert line_numbers(data, "val").tolist() == list(range(801, 901))
    assert line_numbers(data, "test").tolist() == list(range(901, 1002))


def test_vocabulary_save_load_round_trip(tmp_path):
    path = numbered_file(tmp_path / "rows.tsv", 3000)
    built = CriteoDataset(path, min_count=3, int_features="categorical", seed=5)
    vocab_path = tmp_path / "vocab" / "criteo.json"
    built.save_vocabulary(vocab_path)
    assert os.listdir(vocab_path.parent) == ["criteo.json"]  # the temp file was renamed away
    loaded = Vocabulary.load(vocab_path)
    assert loaded == built.vocabulary and loaded.meta["split"]["seed"] == 5
    served = CriteoDataset(path, int_features="categorical", seed=5, vocabulary=str(vocab_path))
    for a, b in zip(built.batches("val", 128), served.batches("val", 128), strict=True):
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        assert torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="features"):
        CriteoDataset(path, int_features="dense", vocabulary=vocab_path)  # other schema
    with pytest.warns(UserWarning, match="split settings"):
        CriteoDataset(path, int_features="categorical", seed=6, vocabulary=vocab_path)
    doc = vocab_path.read_text().replace('"version":1', '"version":99')
    (tmp_path / "v99.json").write_text(doc)
    with pytest.raises(ValueError, match="version 99"):
        Vocabulary.load(tmp_path / "v99.json")


def test_malformed_rows_warn_with_file_and_line_or_raise_when_strict(tmp_path):
    good = [criteo_line(i % 2, [i], ["a"]) for i in range(30)]
    lines = good[:2] + ["1\t2\t3\n"] + good[2:10] + [criteo_line(0, ["abc"], ["b"])] + good[10:]
    path = write(tmp_path / "bad.tsv", lines)
    data = CriteoDataset(path, split="chronological", fractions=(1, 0, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = sum(b.labels.numel() for b in data.batches("train", 8))
    messages = [str(w.message) for w in caught if issubclass(w.category, MalformedRowWarning)]
    assert rows == 30
    assert len(messages) == 2  # each bad line once, although the vocab pass read them too
    assert messages[0].startswith(f"{path}:3: malformed row (3 columns, expected 40)")
    assert messages[1].startswith(f"{path}:12: malformed row") and "'abc' is not an integer" in messages[1]
    assert data.malformed_rows == {"train": 2}
    with pytest.raises(MalformedRowError, match=rf"{path}:3:"):
        CriteoDataset(path, strict=True, split="chronological", fractions=(1, 0, 0)).build_vocabulary()


def test_missing_file_and_wrong_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        CriteoDataset(tmp_path / "nope.tsv")
    csv = write(tmp_path / "avazu.csv", ["id,click,site\n"] + [f"{i},0,abc\n" for i in range(200)])
    with pytest.raises(ValueError, match="avazu.csv: the first 100 rows .* fail the schema 'criteo'"):
        with pytest.warns(MalformedRowWarning):
            CriteoDataset(csv).build_vocabulary()


def test_several_and_gzipped_files_form_one_line_stream(tmp_path):
    import gzip

    one = numbered_file(tmp_path / "all.tsv", 500)
    lines = open(one).readlines()
    first = write(tmp_path / "day_0.tsv", lines[:300])
    with gzip.open(tmp_path / "day_1.tsv.gz", "wt") as f:
        f.writelines(lines[300:])
    many = CriteoDataset([first, tmp_path / "day_1.tsv.gz"], split="chronological")
    single = CriteoDataset(one, split="chronological")
    assert many.line_count() == 500
    for split in ("train", "val", "test"):
        assert np.array_equal(line_numbers(many, split), line_numbers(single, split))
    assert many.vocabulary == single.vocabulary

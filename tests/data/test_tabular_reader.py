"""Generic schema reader: an Avazu-like CSV with a header and a multi-valued column."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchrec_lowprec.data import OOV_ID, TabularDataset, TabularSchema

AVAZU_HEADER = "id,click,hour,C1,banner_pos,site_id,app_id,device_type,price,tags\n"
SCHEMA_YAML = """\
name: avazu-like
label: click
dense: [price]
categorical: [C1, banner_pos, site_id, app_id, device_type, hour]
multi_valued: {tags: "|"}
delimiter: ","
header: true
"""


def avazu_rows(n: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        tags = "|".join(f"t{int(t)}" for t in rng.integers(0, 30, int(rng.integers(0, 4))))
        rows.append(
            [
                f"{10**18 + i}",
                str(int(rng.random() < 0.17)),
                f"141021{int(rng.integers(0, 24)):02d}",
                str(int(rng.choice([1005, 1002, 1010]))),
                str(int(rng.integers(0, 3))),
                f"{int(rng.zipf(1.5)) % 200:08x}",
                f"{int(rng.zipf(1.5)) % 300:08x}",
                str(int(rng.integers(0, 5))),
                f"{rng.exponential(3.0):.3f}" if i % 7 else "",
                tags,
            ]
        )
    return rows


@pytest.fixture
def avazu(tmp_path):
    rows = avazu_rows(3000)
    path = tmp_path / "avazu.csv"
    path.write_text(AVAZU_HEADER + "".join(",".join(r) + "\n" for r in rows))
    schema_path = tmp_path / "avazu.yaml"
    schema_path.write_text(SCHEMA_YAML)
    return str(path), str(schema_path), rows


def test_avazu_like_csv_with_header_and_multi_valued_column(avazu):
    path, schema_path, rows = avazu
    schema = TabularSchema.from_file(schema_path)
    data = TabularDataset(path, schema, split="chronological", fractions=(1, 0, 0))
    names = ["C1", "banner_pos", "site_id", "app_id", "device_type", "hour", "tags"]
    assert data.feature_names == names and data.dense_names == ["price"]
    batches = list(data.batches("train", 1000))
    assert [b.labels.numel() for b in batches] == [1000, 1000, 1000]
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == [float(r[1]) for r in rows]
    price = torch.cat([b.dense_features[:, 0] for b in batches]).double()
    expected = [math.log1p(float(r[8])) if r[8] else 0.0 for r in rows]
    assert price.tolist() == pytest.approx(expected, abs=1e-5)
    vocab = data.vocabulary
    for b, chunk in zip(batches, [rows[0:1000], rows[1000:2000], rows[2000:]]):
        kjt = b.sparse_features
        assert kjt.keys() == names
        site = kjt["site_id"].values()
        assert [vocab.tokens["site_id"][i - 1] for i in site.tolist()] == [r[5] for r in chunk]
        tags = kjt["tags"]
        assert tags.lengths().tolist() == [len(r[9].split("|")) if r[9] else 0 for r in chunk]
        flat = [t for r in chunk if r[9] for t in r[9].split("|")]
        assert [vocab.tokens["tags"][i - 1] for i in tags.values().tolist()] == flat
    # Ids are popularity ranks: id 1 is the most frequent value.
    counts = vocab.frequencies("site_id")
    assert counts[1] == counts[1:].max() and (np.diff(counts[1:]) <= 0).all()


def test_min_count_and_random_split_on_a_generic_schema(avazu):
    path, schema_path, _ = avazu
    schema = TabularSchema.from_file(schema_path)
    data = TabularDataset(path, schema, min_count=5, seed=1)
    scan = data.scan()
    assert sum(scan["rows"].values()) == 3000 and scan["malformed"] == {"train": 0, "val": 0, "test": 0}
    assert scan["rows"]["train"] == pytest.approx(2400, abs=80)
    assert min(data.vocabulary.counts["app_id"]) >= 5
    test_ids = torch.cat([b.sparse_features["app_id"].values() for b in data.batches("test", 500)])
    assert (test_ids == OOV_ID).any() and int(test_ids.max()) < data.vocab_sizes["app_id"]
    tables = data.embedding_bag_configs(dim=4)
    assert [(t.name, t.num_embeddings) for t in tables][2] == ("t_site_id", data.vocab_sizes["site_id"])


def test_columns_by_index_headerless_tsv_and_categorical_numbers(tmp_path):
    path = tmp_path / "plain.tsv"
    path.write_text("1\t5\tx\ta;b\n0\t-2\ty\t\n1\t30\tx\tb\n")
    schema = TabularSchema(
        label=0, dense=(1,), categorical=(2,), multi_valued={3: ";"}, delimiter="\t", header=False,
        int_features="categorical", dense_parse="int",
    )  # fmt: skip
    data = TabularDataset(path, schema, split="chronological", fractions=(1, 0, 0))
    assert data.feature_names == ["c1", "c2", "c3"]
    (b,) = data.batches("train", 10)
    tok = {k: ["<oov>", *v] for k, v in data.vocabulary.tokens.items()}
    assert [tok["c1"][i] for i in b.sparse_features["c1"].values().tolist()] == ["2", "-2", "11"]
    assert b.sparse_features["c3"].lengths().tolist() == [2, 0, 1]


def test_schema_errors_are_clear(tmp_path, avazu):
    path, _, _ = avazu
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TabularSchema.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("label: click\ncategoricals: [a]\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown schema keys \['categoricals'\]"):
        TabularSchema.from_file(bad)
    bad.write_text("label: click\ncategorical: [a]\n  - : broken")
    with pytest.raises(ValueError, match="bad.yaml: cannot parse"):
        TabularSchema.from_file(bad)
    with pytest.raises(ValueError, match=r"'site' is not in the header"):
        TabularDataset(path, TabularSchema(label="click", categorical=("site",)))
    with pytest.raises(ValueError, match="no header"):
        TabularSchema(label="click", categorical=("a",), header=False)
    with pytest.raises(ValueError, match="twice"):
        TabularSchema(label="a", categorical=("a",))


def test_schema_round_trip(tmp_path):
    schema = TabularSchema(label="y", dense=("d",), categorical=("a", 3), multi_valued={"m": "|"})
    for name in ("s.json", "s.yaml"):
        schema.save(tmp_path / name)
        assert TabularSchema.from_file(tmp_path / name) == schema


def test_vocabulary_counts_equal_counted_training_ids(avazu):
    from torchrec_lowprec.data import count_frequencies

    path, schema_path, _ = avazu
    data = TabularDataset(path, TabularSchema.from_file(schema_path), min_count=3, seed=2)
    counted = count_frequencies(data.batches("train", 400), data.vocab_sizes)
    stored = data.train_frequencies()
    assert counted.keys() == stored.keys()
    for k in counted:
        assert torch.equal(counted[k], stored[k]), k

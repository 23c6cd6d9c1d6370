"""The sequence example (examples/sequence): it trains on a tiny config and beats random AUC,
its fp32 tables match TorchRec's EmbeddingCollection, and a bad flag exits 2 with one line."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_DIR = os.path.join(ROOT, "examples", "sequence")

#: A tiny config: 500 items, 6k training rows, ~1 s per run.
TINY = ["--num-items", "500", "--train-rows", "6000", "--val-rows", "2000", "--test-rows", "2000",
        "--embedding-dim", "8", "--batch-size", "128", "--epochs", "2", "--threads", "1", "--quiet"]  # fmt: skip


def _load(name: str, path: str):
    # examples/dlrm/train.py is on sys.path as ``train`` (conftest): load ours under another name,
    # and take its folder off sys.path again (it puts it first), or a later ``import train`` of
    # the DLRM tests would find this example's train.py. Its seq_* modules stay imported.
    before = list(sys.path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    sys.path[:] = before
    return mod


seq_train = _load("seq_train", os.path.join(SEQ_DIR, "train.py"))


def test_trains_and_beats_random_at_int8_and_int4(tmp_path):
    out = tmp_path / "s.json"
    s8 = seq_train.main([*TINY, "--precision", "int8", "--summary", str(out)])
    s4 = seq_train.main([*TINY, "--precision", "int4"])
    for s in (s8, s4):
        assert s["val"]["auc"] > 0.6 and s["test"]["auc"] > 0.6, s["val"]
        assert s["test"]["auc"] < s["bayes"]["test"]["auc"] + 0.02  # the ceiling is a ceiling
        assert s["train"]["steps"] == 2 * 47
    assert s4["table_bytes"]["ours"] < s8["table_bytes"]["ours"] < s8["table_bytes"]["fp32_rowwise_adagrad"]
    written = json.loads(out.read_text())
    assert written["test"]["auc"] == s8["test"]["auc"] and written["model"]["precision"] == "int8"


def test_hot_rows_recipe_trains_a_mixed_precision_item_table():
    # docs/precision.md's int4 recipe on the sequence example: fixed step, hottest 60% at 8 bits
    s = seq_train.main([*TINY, "--precision", "int4", "--no-learn-step-size", "--hot-rows", "0.6:8"])
    assert s["model"]["collection"].endswith("MixedPrecisionEmbeddingCollection")
    assert s["test"]["auc"] > 0.6, s["test"]
    # 300 rows at int8 (8 codes + 4 B scale/bias), 200 at int4 (4 + 4), RowWiseAdagrad 4 B/row,
    # no master step, and the raw item id -> rank map 4 B/row
    assert s["table_bytes"]["ours"] == 300 * (12 + 4) + 200 * (8 + 4) + 500 * 4


def test_hot_rows_rank_by_training_counts():
    import seq_data
    import seq_model

    from torchrec_lowprec.data import count_frequencies

    args = seq_train.parse_args([*TINY, "--precision", "int4", "--hot-rows", "0.1:8"])
    data = seq_data.SequenceData(seq_train.data_spec(args))
    ec = seq_model.build_collection(args, args.num_items, data)
    rank = getattr(ec, f"row_map_{seq_model.TABLE}").long()  # raw item id -> frequency rank
    assert sorted(rank.tolist()) == list(range(args.num_items))
    counts = count_frequencies(
        (kjt for kjt, _ in data.train_batches(4096, torch.Generator().manual_seed(1))),
        {"history": args.num_items, "target": args.num_items},
    )
    total = counts["history"] + counts["target"]
    # the 50 rows at 8 bits are the 50 items seen most often in training, history and target together
    hot = set(torch.nonzero(rank < 50).flatten().tolist())
    assert total[list(hot)].min() >= total[[i for i in range(args.num_items) if i not in hot]].max()


def test_fp32_lowprec_collection_matches_torchrec_embedding_collection():
    """bits=32 with the fused RowWiseAdagrad and TorchRec's EC with in-backward RowWiseAdagrad
    train the same model (up to float summation order)."""
    small = [*TINY, "--epochs", "1", "--train-rows", "3000", "--precision", "fp32"]
    ours = seq_train.main([*small, "--collection", "lowprec"])
    ref = seq_train.main([*small, "--collection", "torchrec"])
    assert ours["model"]["collection"].endswith("LowPrecisionEmbeddingCollection")
    assert ref["model"]["collection"].endswith("torchrec.modules.embedding_modules.EmbeddingCollection")
    assert abs(ours["test"]["auc"] - ref["test"]["auc"]) < 2e-3
    assert abs(ours["train"]["final_loss"] - ref["train"]["final_loss"]) < 2e-3


def test_padded_by_recency_puts_the_latest_item_first():
    import seq_model  # on sys.path through train.py

    values = torch.arange(5, dtype=torch.float32).unsqueeze(1)  # rows: [0, 1, 2], [3, 4]
    out, mask = seq_model.padded_by_recency(values, torch.tensor([3, 2]), 4)
    assert out[:, :, 0].tolist() == [[2, 1, 0, 0], [4, 3, 0, 0]]
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False]]


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--emb-lr", "nan"], "--emb-lr must be a finite number"),
        (["--decay", "0"], "--decay must be a finite number in (0, 1]"),
        (["--mlp", "64,x"], "--mlp '64,x'"),
        (
            ["--precision", "int4", "--collection", "torchrec"],
            "--collection torchrec stores fp32 tables only",
        ),
        (["--precision", "int3"], "argument --precision: invalid choice"),
        (["--precision", "int4", "--hot-rows", "0.6:4"], "--hot-rows '0.6:4': hot rows at 4 bits are not wider"),
        (["--precision", "int2", "--hot-rows", "0.8:8,0.5:4"], "the hot shares add up to 1.3"),
        (["--precision", "fp32", "--collection", "torchrec", "--hot-rows", "0.1:32"], "--hot-rows needs --collection lowprec"),
    ],
)  # fmt: skip
def test_bad_flag_exits_2_with_one_error_line(capsys, argv, names):
    with pytest.raises(SystemExit) as e:
        seq_train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err


def test_bad_summary_path_is_refused_before_training(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        seq_train.main([*TINY, "--summary", str(tmp_path)])  # a directory
    assert e.value.code == 2
    assert "is a directory" in capsys.readouterr().err

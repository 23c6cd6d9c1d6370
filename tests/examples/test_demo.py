"""`make demo` (examples/dlrm/demo.py) on a tiny data set: one table, fp32 / int8 / int4 rows."""

import demo  # examples/dlrm, put on sys.path by conftest


def test_demo_prints_one_table(capsys):
    results = demo.main(
        ["--train-rows", "20000", "--test-rows", "5000", "--",
         "--vocab-sizes", "2000,300,50,10", "--embedding-dim", "8", "--batch-size", "256"]
    )  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| precision | test AUC | Bayes AUC")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| fp32", "| int8 ALPT", "| int4 ALPT"]
    ratios = [s["embedding_bytes"]["ratio"] for s in results]
    # dim 8: fp32 36 bytes/row; int8 ALPT 8 + 4 + 4 + 4 = 20; int4 ALPT 4 + 4 + 4 + 4 = 16.
    assert ratios == [1.0, 20 / 36, 16 / 36]
    assert all(s["test"]["auc"] > 0.6 for s in results)

"""`make demo` (examples/dlrm/demo.py) on a tiny data set: one table, fp32 / int8 / int4 rows."""

import demo  # examples/dlrm, put on sys.path by conftest
import pytest


def test_demo_prints_one_table_and_writes_it_between_the_markers(capsys, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- demo:start -->\n| old | table |\n<!-- demo:end -->\n\nafter\n")
    argv = ["--train-rows", "20000", "--test-rows", "5000", "--write", str(readme), "--",
            "--vocab-sizes", "2000,300,50,10", "--embedding-dim", "8", "--batch-size", "256"]  # fmt: skip
    results = demo.main(argv)
    out = capsys.readouterr().out
    text = readme.read_text()
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert "| old | table |" not in text and text.startswith("# x\n") and text.endswith("\nafter\n")
    assert "\n".join(table) in text  # the printed table, verbatim
    assert f"Written by `python examples/dlrm/demo.py {' '.join(argv)}` at commit " in text
    assert "logical cores" in text.split("Written by", 1)[1].split("\n", 1)[0]  # the machine, on that line
    rows = [line for line in table if line.startswith("| ")]
    assert rows[0].startswith("| precision | test AUC | Bayes AUC")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| fp32", "| int8 ALPT", "| int4 ALPT"]
    ratios = [s["embedding_bytes"]["ratio"] for s in results]
    # dim 8: fp32 36 bytes/row; int8 ALPT 8 + 4 + 4 + 4 = 20; int4 ALPT 4 + 4 + 4 + 4 = 16.
    assert ratios == [1.0, 20 / 36, 16 / 36]
    assert all(s["test"]["auc"] > 0.6 for s in results)


def test_demo_write_refuses_a_file_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="demo:start"):
        demo.write_table(str(readme), "python examples/dlrm/demo.py", ["| a |"])
    assert readme.read_text() == "no markers\n"

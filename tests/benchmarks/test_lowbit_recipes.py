"""lowbit_recipes' int8 line: the recipes' settings at int8 against fp32, with its verdict."""

import lowbit_recipes


def _runs(aucs):
    return [{"auc": a, "val_auc": a, "bytes": 1} for a in aucs]


def test_int8_line_pairs_to_fp32_and_says_met_or_not():
    names = [("fp32", 32, ()), ("int8 default", 8, ()), *((n, 8, f) for n, f in lowbit_recipes.INT8_RECIPES)]
    rows = {
        "fp32": _runs([0.70, 0.72, 0.71]),
        "int8 default": _runs([0.7003, 0.7202, 0.7104]),
        "int8 fixed step": _runs([0.6995, 0.7195, 0.7095]),  # -0.0005
        "int8 fixed step dithered": _runs([0.6980, 0.7185, 0.7090]),  # -0.0015
    }
    lines = [x for x in lowbit_recipes.verdict_lines(rows, names) if x.startswith("- int8")]
    assert len(lines) == 2
    assert "**int8 fixed step**: test -0.0005 ± 0.0000" in lines[0] and lines[0].endswith("**met**.")
    assert "**int8 fixed step dithered**: test -0.0015" in lines[1] and lines[1].endswith("**not met**.")
    assert "int8 default +0.0003" in lines[0]
    # without int8's default run (a partial cache) the line is left out, not guessed
    del rows["int8 default"]
    assert not [x for x in lowbit_recipes.verdict_lines(rows, names) if x.startswith("- int8")]

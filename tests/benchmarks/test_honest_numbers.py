"""The benchmarks' run cache is keyed by the code that produced a run, and their choices are
made on validation, never on test."""

import json

import compression
import mpe
import report


def _tree(tmp_path, text: str):
    (tmp_path / "torchrec_lowprec").mkdir(exist_ok=True)
    (tmp_path / "examples" / "dlrm").mkdir(parents=True, exist_ok=True)
    (tmp_path / "torchrec_lowprec" / "kernel.py").write_text(text)
    (tmp_path / "examples" / "dlrm" / "demo.py").write_text("print('table')\n")


def test_source_hash_follows_library_sources_not_the_demo_printer(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    _tree(tmp_path, "x = 1\n")
    h1 = report.code_version()["hash"]
    (tmp_path / "examples" / "dlrm" / "demo.py").write_text("print('another table')\n")
    assert report.code_version()["hash"] == h1
    _tree(tmp_path, "x = 2\n")
    assert report.code_version()["hash"] != h1
    assert report.code_version()["commit"] == "unknown"  # not a git checkout


def test_result_cache_reuses_runs_of_the_same_code_only(tmp_path, monkeypatch):
    calls = []
    versions = iter([{"hash": "aaaa", "commit": "c1", "dirty": False}, {"hash": "aaaa", "commit": "c1", "dirty": False},
                     {"hash": "bbbb", "commit": "c2", "dirty": True}])  # fmt: skip
    monkeypatch.setattr(report, "code_version", lambda: next(versions))
    path = str(tmp_path / "runs.jsonl")

    def compute():
        calls.append(1)
        return {"auc": 0.7}

    first = report.ResultCache(path).get(["data", ["--x"], 0], compute, seed=0)
    again = report.ResultCache(path).get(["data", ["--x"], 0], compute, seed=0)  # same code: reused
    changed = report.ResultCache(path).get(["data", ["--x"], 0], compute, seed=0)  # new code: rerun
    assert len(calls) == 2 and first == again and first["code"]["commit"] == "c1"
    assert changed["code"] == {"hash": "bbbb", "commit": "c2", "dirty": True}
    assert len(open(path).read().splitlines()) == 2
    assert json.loads(open(path).read().splitlines()[1])["result"]["code"]["hash"] == "bbbb"
    assert report.describe_code([first, again, changed]) == (
        "c1 (source aaaa): 2 run(s); c2 + uncommitted changes (source bbbb): 1 run(s)"
    )


def _run(val: float, test: float, serve: int) -> dict:
    return {"val_auc": val, "auc": test, "serve": serve}


def test_mpe_chooses_on_validation_not_on_test():
    fp32 = [_run(0.70, 0.70, 1000)] * 2
    # "a" compresses more and is within 0.001 on validation, but worse on test; "b" is the
    # reverse. Validation must pick "a"; picking by test AUC would pick "b".
    by_name = {"fp32": fp32, "a": [_run(0.6995, 0.690, 10)] * 2, "b": [_run(0.695, 0.70, 20)] * 2}
    assert mpe.choose(by_name, ["a", "b"], 1000)[0] == "a"
    by_name["a"] = [_run(0.690, 0.70, 10)] * 2  # nothing within 0.001: the best validation AUC
    name, rule = mpe.choose(by_name, ["a", "b"], 1000)
    assert name == "b" and "best validation AUC" in rule


def test_mpe_at_a_budget_is_chosen_on_validation_and_set_beside_the_uniform_table():
    fp32 = [_run(0.70, 0.70, 1000)] * 2
    plan = {"tables": {"t": {"group_ends": [10], "bits": [4]}}}

    def at(val, test, budget="int4"):
        return [{**_run(val, test, 200), "budget": budget, "plan": plan}] * 2

    # "a" is better on validation, "b" on test: the rule takes "a"
    by_name = {
        "fp32": fp32,
        "int4 ALPT": [_run(0.69, 0.69, 200)] * 2,
        "a": at(0.699, 0.690),
        "b": at(0.695, 0.70),
    }
    assert mpe.choose_at_budget(by_name, ["a", "b"]) == "a"

    class Args:
        dim = 1

    text = "\n".join(mpe.equal_bytes_lines(by_name, ["a", "b"], Args))
    assert "at int4's bytes **a** (of 2), test AUC minus uniform int4 per seed +0.0000, +0.0000" in text
    assert "| int4's | a |" in text and "| int4's | b |" not in text and "| int4's | int4 ALPT |" in text


def test_compression_reports_test_auc_only_for_the_setting_chosen_on_validation():
    def seed(mec_small_val, mec_small_test):
        return {
            "rows": [("fp32", "-", 0.70, 0.70, 1000, ""), ("int8 ALPT", "-", 0.70, 0.70, 280, ""),
                     ("int4 ALPT", "-", 0.69, 0.69, 160, ""),
                     ("MEC (count)", "L=1, K=2", mec_small_val, mec_small_test, 10, ""),
                     ("MEC (count)", "L=4, K=256", 0.6995, 0.6901, 40, "")],
            "exports": {}, "bayes": 0.75, "fp32_bytes": 1000, "compressed_rows": 1, "rows_total": 2,
        }  # fmt: skip

    class Args:
        dim, train_rows, val_rows, test_rows, batch_size, min_rows = 32, 10, 10, 10, 1, 1
        mec_steps, finetune_steps, finetune_lr, threads = 1, 1, 1e-5, 1

    # The smallest setting loses on validation (0.69) but would win on test (0.70): not chosen.
    lines = compression.report([seed(0.69, 0.70), seed(0.69, 0.70)], [0, 1], Args, (10, 10), "cmd", "code")
    text = "\n".join(lines)
    assert (
        "Chosen on validation (the smallest bytes with validation AUC >= fp32 - 0.002): **MEC (count) L=4, K=256**"
        in text
    )
    test_rows = text.split("**Test**")[1].split("**Target")[0]
    assert "L=4, K=256 | 0.6901" in test_rows and "L=1, K=2" not in test_rows
    assert "not met" in text  # -0.0099 on test


def test_lowbit_hot_share_is_the_fewest_bytes_meeting_the_target_on_validation():
    import lowbit

    def runs(val, test, nbytes):
        return [
            {"val_auc": val + d, "auc": test + d, "bytes": nbytes, "fp32_bytes": 1000} for d in (0.0, 0.01)
        ]

    names = [
        ("fp32", 32, ()),
        ("int4 default", 4, ()),
        ("int4 hot 5% at 8b", 4, ()),
        ("int4 hot 25% at 8b", 4, ()),
    ]
    rows = {
        "fp32": runs(0.700, 0.700, 1000),
        "int4 default": runs(0.690, 0.690, 300),
        # 5% meets the 0.004 target on validation but not on test; 25% is better on both: the
        # rule takes the fewer bytes that validation accepts, whatever test says
        "int4 hot 5% at 8b": runs(0.697, 0.694, 320),
        "int4 hot 25% at 8b": runs(0.699, 0.699, 380),
    }
    text = "\n".join(lowbit.selection(rows, names, [4], 0.4))
    assert "chosen on validation **int4 hot 5% at 8b**; test -0.0060" in text and "**not met**" in text
    assert "40% of int4 default's gap" in text and "+6.7% bytes over int4 default" in text
    rows["int4 hot 5% at 8b"] = runs(0.690, 0.699, 320)  # neither meets it: the best validation AUC
    rows["int4 hot 25% at 8b"] = runs(0.695, 0.690, 380)
    text = "\n".join(lowbit.selection(rows, names, [4], 0.4))
    assert "chosen on validation **int4 hot 25% at 8b**" in text
    # a better fp32 learning rate on validation becomes the second reference of every line
    names.append(("fp32 emb lr x2", 32, ()))
    rows["fp32 emb lr x2"] = runs(0.702, 0.703, 1000)
    text = "\n".join(lowbit.selection(rows, names, [4], 0.4))
    assert "the better fp32 is **fp32 emb lr x2**" in text and "vs fp32 emb lr x2 -0.0130" in text


def test_result_cache_keys_a_precision_plan_by_its_content(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "code_version", lambda: {"hash": "h", "commit": "c", "dirty": False})
    cache = report.ResultCache(str(tmp_path / "runs.jsonl"))
    a, b = tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.json"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text('{"t": 1}')

    def key(path):
        return cache.key(["synthetic", ["--precision", "int4", "--precision-plan", str(path), "--seed", "0"]])

    assert key(a) == key(b)  # the same plan written elsewhere
    b.write_text('{"t": 2}')
    assert key(a) != key(b)  # other rows at the same path: not the same run


def test_lowbit_recipes_serving_bytes_count_rows_by_plan_width(tmp_path):
    from types import SimpleNamespace

    import lowbit_recipes

    from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

    tables = [SimpleNamespace(name="a", num_embeddings=100, embedding_dim=16)]
    # int4 rows: 4 B of fp16 scale/bias + 8 B of codes; no master step, state or id map
    assert lowbit_recipes.serving_bytes(("--precision", "int4"), tables) == 100 * 12
    path = str(tmp_path / "plan.json")
    PrecisionPlan({"a": TablePrecision(100, 16, (10, 30, 100), (32, 8, 2))}).save(path)
    flags = ("--precision", "int2", "--precision-plan", path)
    assert lowbit_recipes.serving_bytes(flags, tables) == 10 * 64 + 20 * 20 + 70 * 8


def test_commit_label_marks_code_changes_not_documentation(tmp_path):
    import subprocess

    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("a\n")
    (tmp_path / "README.md").write_text("a\n")
    (tmp_path / "kernel.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert report.commit_label(str(tmp_path)) == head
    (tmp_path / "docs" / "benchmarks.md").write_text("b\n")  # a benchmark wrote its section
    (tmp_path / "README.md").write_text("b\n")
    assert report.commit_label(str(tmp_path)) == head
    (tmp_path / "kernel.py").write_text("x = 2\n")
    assert report.commit_label(str(tmp_path)) == head + "+uncommitted"
    assert report.commit_label(str(tmp_path / "docs")) == head + "+uncommitted"  # from a subfolder
    assert report.commit_label("/") == "n/a"


def test_each_machine_kind_writes_its_own_timing_section(monkeypatch):
    from torchrec_lowprec.kernels import cpu_native

    title = "Embedding train step vs FBGEMM"
    monkeypatch.setattr(cpu_native, "cpu_vector_class", lambda: "avx512")
    assert report.machine_section("embedding_step", title) == ("embedding_step", f"{title} (CPU)")
    monkeypatch.setattr(cpu_native, "cpu_vector_class", lambda: "avx2")
    assert report.machine_section("embedding_step", title) == (
        "embedding_step_avx2",
        f"{title} (CPU, AVX2 only)",
    )
    assert report.machine_section("embedding_step", title, quick=True) == (
        "embedding_step_avx2_quick",
        f"{title} (CPU, AVX2 only, quick)",
    )
    assert report.machine_section("sequence_step", "S", device="cuda") == ("sequence_step_cuda", "S (CUDA)")

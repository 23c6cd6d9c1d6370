"""Import layering: what each entry point pulls in, measured in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _tops(mods: set[str], prefix: str) -> list[str]:
    return sorted(m for m in mods if m == prefix or m.startswith(prefix + "."))


def test_package_root_imports_no_torch():
    mods = _imported_after("import torchrec_lowprec")
    assert _tops(mods, "torch") == []
    assert _tops(mods, "torchrec") == []


def test_cli_imports_no_torch():
    mods = _imported_after("import torchrec_lowprec.cli")
    assert _tops(mods, "torch") == []


def test_quant_imports_no_torchrec():
    mods = _imported_after("import torchrec_lowprec.quant")
    assert "torch" in mods
    assert _tops(mods, "torchrec") == []
    assert _tops(mods, "torchrec_lowprec.distributed") == []


def test_modules_do_not_import_distributed():
    mods = _imported_after("import torchrec_lowprec.modules, torchrec_lowprec.types")
    assert _tops(mods, "torchrec_lowprec.distributed") == []


def test_lazy_public_names_resolve():
    mods = _imported_after(
        "import torchrec_lowprec as lp\nassert 'sharders' in dir(lp)\nlp.LowPrecisionConfig"
    )
    assert "torchrec_lowprec.types" in mods
    assert _tops(mods, "torchrec_lowprec.distributed") == []
    mods = _imported_after("import torchrec_lowprec as lp\nlp.sharders")
    assert "torchrec_lowprec.distributed.sharder" in mods


def test_unknown_name_raises():
    import torchrec_lowprec as lp

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lp.nope  # noqa: B018


def _import_graph() -> dict[str, set[str]]:
    """Package module -> package modules it imports (module level and inside functions)."""
    pkg = os.path.join(ROOT, "torchrec_lowprec")
    graph: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            deps = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
            graph[name] = {d for d in deps if d.startswith("torchrec_lowprec.")}
    return graph


def test_no_import_cycle_between_submodules():
    graph = _import_graph()
    assert "torchrec_lowprec.distributed.checkpoint" in graph
    cycles = []
    for a, deps in graph.items():
        for b in deps:
            if a in graph.get(b, ()) and a < b:
                cycles.append((a, b))
    assert cycles == []


def test_catalog_configs_and_plan_schema_import_no_torch():
    # The CLI, config files and plan JSON are read before torch is loaded (and without it).
    mods = _imported_after(
        "import torchrec_lowprec.types, torchrec_lowprec.configs, torchrec_lowprec.planner.schema"
    )
    assert _tops(mods, "torch") == []


def test_the_layers_do_not_import_the_data_subpackage():
    # torchrec_lowprec.data (readers, vocabularies, the loader; pyarrow) serves the examples,
    # the benchmarks and users' trainers; the library reads only saved frequency files (CLI).
    users = sorted(
        m
        for m, deps in _import_graph().items()
        if not m.startswith("torchrec_lowprec.data")
        and any(d == "torchrec_lowprec.data" or d.startswith("torchrec_lowprec.data.") for d in deps)
    )
    assert users == ["torchrec_lowprec.cli"]

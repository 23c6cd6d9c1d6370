"""Every Triton kernel of the package compiles for sm_80 and sm_90 in every flag combination
``make test`` can afford (the update's pairwise cover of its launchable specialisations, both
row-block extremes; every row block of the draws helper), with IEEE-only fp32 ops and no
register spills. No GPU needed: Triton ships ptxas. ``TRITON_AOT_ARCHS=90`` narrows the
targets (the GPU check compiles for the GPU's own arch); a source scan fails the suite if a
``@triton.jit`` kernel is added without being in ``triton_aot.KERNELS``."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

PACKAGE = Path(__file__).resolve().parents[2] / "torchrec_lowprec"
ARCHS = tuple(int(a) for a in os.environ.get("TRITON_AOT_ARCHS", "80,90").split(","))


def _is_jit(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    if isinstance(target, ast.Attribute):
        return target.attr == "jit" and isinstance(target.value, ast.Name) and target.value.id == "triton"
    return isinstance(target, ast.Name) and target.id == "jit"


def jitted_functions() -> dict[str, set[str]]:
    """``module:function`` -> the names it calls, for every ``@triton.jit`` function in the
    package's sources (read as text: nothing is imported)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                calls = {
                    c.func.id
                    for c in ast.walk(node)
                    if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                }
                found[f"{module}:{node.name}"] = calls
    return found


def test_every_jitted_kernel_is_in_the_compile_cover():
    from torchrec_lowprec.kernels import triton_aot

    jitted = jitted_functions()
    called = {f"{k.split(':')[0]}:{name}" for k, names in jitted.items() for name in names}
    kernels = {k for k in jitted if k not in called}  # entry points: no jitted caller
    helpers = set(jitted) - kernels
    assert {"torchrec_lowprec.kernels.triton_kernels:_mix32_tail", "torchrec_lowprec.kernels.triton_kernels:_floor"} <= helpers  # fmt: skip
    assert kernels == set(triton_aot.KERNELS), (
        f"@triton.jit kernels not compiled by the AOT cover: {sorted(kernels - set(triton_aot.KERNELS))}; "
        f"listed but not found: {sorted(set(triton_aot.KERNELS) - kernels)}"
    )
    assert len(kernels) == 2 and len(helpers) >= 9, (kernels, helpers)
    for kernel in kernels:
        assert triton_aot.kernel_cover(kernel), kernel


def test_cover_of_launchable_specialisations():
    from torchrec_lowprec.kernels import triton_aot

    every = list(triton_aot.launchable_specialisations(blocks=(16, 1024)))
    cover = triton_aot.covering_specialisations()
    assert all(c in every for c in cover) and len(cover) < len(every) // 10
    for bits in {c["BITS"] for c in every}:
        for key in ("OPT", "STOCHASTIC", "LEARN", "GROW", "HAS_WD", "HAS_W", "TYPED", "EXACT_SUM", "BLOCK"):
            assert {c[key] for c in every if c["BITS"] == bits} == {
                c[key] for c in cover if c["BITS"] == bits
            }
    assert triton_aot.kernel_cover(triton_aot.DRAWS) == [{"BLOCK": b} for b in triton_aot.BLOCKS]


def test_every_covered_specialisation_compiles_without_spills():
    pytest.importorskip("triton.backends.nvidia.compiler")
    from torchrec_lowprec.kernels import triton_aot

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "torchrec_lowprec.kernels.triton_aot", "--archs", ",".join(map(str, ARCHS))],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0 and ("ptxas" in out.stderr or "LLVM" in out.stderr):
        pytest.skip(f"triton cannot compile for CUDA here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    results = ast.literal_eval(out.stdout.strip().splitlines()[-2])
    failed = [(kernel, arch, cx, why) for kernel, arch, cx, use, why in results if use == "error"]
    assert failed == [], failed[:3]
    want = {(k, a) for k in triton_aot.KERNELS for a in ARCHS}
    assert {(kernel, arch) for kernel, arch, *_ in results} == want
    n_update = len(triton_aot.covering_specialisations()) * len(ARCHS)
    assert len(results) == n_update + len(triton_aot.BLOCKS) * len(ARCHS)
    used: dict[str, set[str]] = {k: set() for k in triton_aot.KERNELS}
    for kernel, arch, cx, use, ops in results:
        assert use["local"] == 0, (kernel, arch, cx, use)  # no register spills to local memory
        # No FMA contraction, IEEE division and sqrt (no .approx / .full), no flush-to-zero but
        # in floor (cvt.rmi.ftz, which _floor corrects for negative subnormals).
        assert set(ops) <= {"div.rn.f32", "sqrt.rn.f32", "cvt.rmi.ftz.f32.f32"}, (kernel, arch, cx, ops)
        used[kernel] |= set(ops)
    assert {"div.rn.f32", "sqrt.rn.f32"} <= used[triton_aot.UPDATE]
    assert used[triton_aot.DRAWS] == set()  # integer hashing and one exact product

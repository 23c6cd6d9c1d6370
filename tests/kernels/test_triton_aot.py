"""The Triton update kernel compiles for sm_80 and sm_90 in every flag combination ``make test``
can afford (a pairwise cover of the launchable specialisations, both row-block extremes), with
IEEE-only fp32 ops and no register spills. No GPU needed: Triton ships ptxas."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


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


def test_every_covered_specialisation_compiles_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "torchrec_lowprec.kernels.triton_aot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0 and ("ptxas" in out.stderr or "LLVM" in out.stderr):
        pytest.skip(f"triton cannot compile for CUDA here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    results = ast.literal_eval(out.stdout.strip().splitlines()[-2])
    failed = [(arch, cx, why) for arch, cx, use, why in results if use == "error"]
    assert failed == [], failed[:3]
    assert {arch for arch, *_ in results} == {80, 90}
    used = set()
    for arch, cx, use, ops in results:
        assert use["local"] == 0, (arch, cx, use)  # no register spills to local memory
        # No FMA contraction, IEEE division and sqrt (no .approx / .full), no flush-to-zero but
        # in floor (cvt.rmi.ftz, which _floor corrects for negative subnormals).
        assert set(ops) <= {"div.rn.f32", "sqrt.rn.f32", "cvt.rmi.ftz.f32.f32"}, (arch, cx, ops)
        used |= set(ops)
    assert {"div.rn.f32", "sqrt.rn.f32"} <= used

"""Registers, spills and shared memory of the Triton update kernel, per launchable specialisation.

Compiles, without a GPU, every constexpr specialisation :func:`torchrec_lowprec.kernels.
triton_update.fused_update` can launch (``triton_aot.launchable_specialisations``) for sm_80 and
sm_90 at the row blocks given (``--blocks``; the launch's warps per block are
``triton_aot.num_warps_for``), reads each cubin's resource usage and writes the
``triton_resources`` section of ``--write``: per target, width and optimizer, the largest
register count, any spills (local memory), shared memory, and the number compiled; then the
register count per row block for the heaviest specialisation, the evidence for the warps chosen.

    python benchmarks/triton_resources.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real jit, not the interpreter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from report import code_version, publish  # noqa: E402

from torchrec_lowprec.kernels import triton_aot  # noqa: E402
from torchrec_lowprec.types import OPTIMIZERS  # noqa: E402

NAME_OF_CODE = {e.code: k.value for k, e in OPTIMIZERS.items()}


def _other_triton(python: str) -> str:
    """The make-test cover compiled by ``python`` (its own Triton), summarised in one line."""
    import ast
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(HERE)
    out = subprocess.run(
        [python, "-m", "torchrec_lowprec.kernels.triton_aot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        return (
            f"Triton of `{python}`: the cover did not compile: `{out.stderr.strip().splitlines()[-1][:200]}`"
        )
    *rows, version = (ast.literal_eval(x) for x in out.stdout.strip().splitlines()[-2:])
    results = [r[1:] for r in rows[0]]  # (kernel, arch, cx, use, ops) -> (arch, cx, use, ops)
    failed = [r for r in results if r[2] == "error"]
    spilled = [r for r in results if r[2] != "error" and r[2]["local"]]
    regs = {
        a: max(r[2]["registers"] for r in results if r[0] == a and r[2] != "error")
        for a in sorted({r[0] for r in results})
    }
    return (
        f"Triton {version} (`{python}`: a venv holding only `pip install triton=={version}`, the GPU image's "
        f"version, no torch): the make-test cover, {len(results)} compiles for "
        f"{', '.join(f'sm_{a}' for a in regs)}: {len(failed)} failed, {len(spilled)} spill; max registers "
        + ", ".join(f"sm_{a} {r}" for a, r in regs.items())
        + "."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="64", help="row blocks of the full product (comma list)")
    p.add_argument("--sweep-blocks", default="16,32,64,128,256,512,1024,2048", help="blocks of the sweep")
    p.add_argument("--archs", default="80,90")
    p.add_argument(
        "--also-python", action="append", default=[],
        help="another interpreter with triton (e.g. a venv with the GPU image's Triton): compile the "
        "make-test cover there too and report it",
    )  # fmt: skip
    p.add_argument("--write", help="markdown file whose triton_resources section is replaced")
    args = p.parse_args(argv)
    import triton

    blocks = tuple(int(b) for b in args.blocks.split(","))
    archs = [int(a) for a in args.archs.split(",")]
    t0 = time.perf_counter()
    worst: dict[tuple, dict] = defaultdict(
        lambda: {"registers": 0, "local": 0, "stack": 0, "shared": 0, "n": 0}
    )
    heaviest: dict[int, tuple[int, dict]] = {}
    for cx in triton_aot.launchable_specialisations(blocks):
        for arch in archs:
            use = triton_aot.resource_usage(triton_aot.compile_update(cx, arch))
            w = worst[(arch, cx["BITS"], cx["OPT"])]
            for k in ("registers", "local", "stack", "shared"):
                w[k] = max(w[k], use[k])
            w["n"] += 1
            if use["registers"] > heaviest.get(arch, (-1, {}))[0]:
                heaviest[arch] = (use["registers"], cx)
    lines = [
        f"Triton {triton.__version__}, compiled here without a GPU (`triton.compile(..., GPUTarget('cuda', arch, 32))`, "
        "no FP fusion); resources from each cubin (`cuobjdump --dump-resource-usage`). "
        f"Full product at row block(s) {', '.join(map(str, blocks))}: {sum(w['n'] for w in worst.values())} "
        f"compiles in {time.perf_counter() - t0:.0f} s (time includes hits of Triton's compile cache). Commit "
        f"{code_version()['commit']}. Register counts depend on the Triton version and target only, "
        "not on the machine that compiles.",
        "",
        "| target | bits | optimizer | specialisations | max registers | spills (local bytes) | stack bytes | shared bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (arch, bits, opt), w in sorted(worst.items()):
        lines.append(
            f"| sm_{arch} | {bits} | {NAME_OF_CODE[opt]} | {w['n']} | {w['registers']} | {w['local']} | "
            f"{w['stack']} | {w['shared']} |"
        )
    lines += [
        "",
        "Row block sweep of the heaviest specialisation per target (warps from `num_warps_for`):",
        "",
    ]
    lines += ["| target | specialisation | block | warps | registers | spills | shared |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arch in archs:
        cx = dict(heaviest[arch][1])
        label = f"{cx['BITS']}-bit {NAME_OF_CODE[cx['OPT']]}" + "".join(
            f", {k.lower()}"
            for k in ("STOCHASTIC", "LEARN", "GROW", "HAS_WD", "HAS_W", "TYPED", "EXACT_SUM")
            if cx[k]
        )
        for block in (int(b) for b in args.sweep_blocks.split(",")):
            cx["BLOCK"] = block
            use = triton_aot.resource_usage(triton_aot.compile_update(cx, arch))
            lines.append(
                f"| sm_{arch} | {label} | {block} | {triton_aot.num_warps_for(block)} | {use['registers']} | "
                f"{use['local']} | {use['shared']} |"
            )
    for py in args.also_python:
        lines += ["", _other_triton(py)]
    spills = sum(w["local"] for w in worst.values())
    lines += [
        "",
        f"Verdict: {'no specialisation spills' if spills == 0 else 'SPILLS: see the table'}. The warps grow with "
        "the block so that each lane keeps at most 8-16 columns in registers; timing the choice needs a GPU "
        "(`make gpu-check`), which this run did not have.",
    ]
    publish(
        args.write, "triton_resources", "Triton update kernel: registers and spills",
        "benchmarks/triton_resources.py", argv if argv is not None else sys.argv[1:], lines,
    )  # fmt: skip


if __name__ == "__main__":
    main()

"""Ahead-of-time compilation of the package's Triton kernels for NVIDIA targets, without a GPU.

:data:`KERNELS` lists every launched ``@triton.jit`` kernel (the fused update and the draws
helper of :mod:`.triton_kernels`; a test scans the sources so that a new one cannot be left
out). The launch in :mod:`.triton_update` specialises the update kernel on its
``tl.constexpr`` flags; this module enumerates the specialisations that launch can produce,
compiles any of them for a ``GPUTarget`` (sm_80, sm_90: Triton ships ptxas, so no driver is
needed) and reads the compiled kernel's registers, spills and shared memory from its cubin
(Triton's bundled ``cuobjdump``). All launches take their options from :func:`launch_options`.
``tests/kernels/test_triton_aot.py`` compiles a covering set in ``make test``;
``benchmarks/triton_resources.py`` compiles every specialisation and writes the table.

Neither torch nor triton is imported at module level: the launch reads :func:`block_for` and
:func:`launch_options` from here, and compiling needs only triton (so another Triton version can
be checked in a venv without torch). Run with ``TRITON_INTERPRET`` unset: the interpreter's
jitted functions cannot be compiled.

Example::

    c = compile_update(next(iter(launchable_specialisations())), arch=90)
    resource_usage(c)   # {"registers": 40, "stack": 0, "local": 0, "shared": 0}
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

from torchrec_lowprec.types import FLOAT_BITS, INT_BITS, OPTIMIZERS

#: Row block sizes the launch uses (``triton_update._block``: the next power of two >= dim,
#: at least 16); the enumerations take these unless given others.
BLOCKS = (16, 64, 256, 1024)
#: NVIDIA targets the kernel is compiled for in the tests (A100, H100).
ARCHS = (80, 90)

_PTR = {"rows_ptr": "*u8", "flag_ptr": "*i32"}
_I64_PTRS = {"uniq_ptr", "start_ptr", "count_ptr", "perm_ptr", "goff_ptr"}
_INTS = {"row_stride", "step_stride", "s1_stride", "s2_stride", "D", "key_lo", "key_hi", "row_offset", "col_offset", "dither"}  # fmt: skip


def launchable_specialisations(
    blocks: tuple[int, ...] = BLOCKS, exact_sum: tuple[bool, ...] = (True, False)
) -> Iterator[dict[str, Any]]:
    """Every constexpr combination :func:`.triton_update.fused_update` can launch: integer
    widths learn and grow their step or not; float widths use typed loads when aligned; any
    width may be stochastic, have weight decay and occurrence weights."""
    codes = sorted(entry.code for entry in OPTIMIZERS.values())
    for bits in (*INT_BITS, *FLOAT_BITS):
        integer = bits in INT_BITS
        for opt, stoch, learn, grow, wd, w, typed, exact, block in itertools.product(
            codes, (True, False), (True, False) if integer else (False,), (True, False) if integer else (False,),
            (True, False), (True, False), (False,) if integer else (True, False), exact_sum, blocks,
        ):  # fmt: skip
            yield dict(
                BITS=bits, OPT=opt, STOCHASTIC=stoch, LEARN=learn, GROW=grow, HAS_WD=wd, HAS_W=w,
                TYPED=typed, EXACT_SUM=exact, BLOCK=block,
            )  # fmt: skip


def covering_specialisations(blocks: tuple[int, ...] = (16, 1024)) -> list[dict[str, Any]]:
    """A small subset of :func:`launchable_specialisations` in which every width meets every
    optimizer, and every pair of flag values of one width appears (greedy pairwise cover):
    what ``make test`` compiles, since the whole product takes minutes."""
    chosen: list[dict[str, Any]] = []
    every = list(launchable_specialisations(blocks))
    for bits in (*INT_BITS, *FLOAT_BITS):
        mine = [c for c in every if c["BITS"] == bits]
        keys = [k for k in mine[0] if k != "BITS"]
        need = {
            ((a, c[a]), (b, c[b])) for c in mine for a, b in itertools.combinations(keys, 2)
        }  # every pair of (flag, value) this width can launch
        while need:
            best = max(
                mine,
                key=lambda c: sum(((a, c[a]), (b, c[b])) in need for a, b in itertools.combinations(keys, 2)),
            )
            chosen.append(best)
            need -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(keys, 2)}
    return chosen


def block_for(dim: int) -> int:
    """The row block of a table of ``dim`` columns: the next power of two, at least 16."""
    return max(1 << max(dim - 1, 0).bit_length(), 16)


def num_warps_for(block: int) -> int:
    """Warps per program for a row block (the launch's choice): the registers and spills of
    every launchable specialisation at these warps are in docs/benchmarks.md ("Triton update
    kernel: registers and spills", from ``benchmarks/triton_resources.py``)."""
    return 1 if block <= 256 else (2 if block <= 1024 else 4)


#: Every launched ``@triton.jit`` kernel of the package (``module:function``) -> its argument
#: types (pointer element types; unlisted ints are fp32 scalars). ``tests/kernels/test_triton_aot.py``
#: scans the package's sources and fails if a jitted kernel is missing here.
KERNELS = {
    "torchrec_lowprec.kernels.triton_kernels:fused_update_kernel": None,  # types from _PTR/_I64_PTRS/_INTS
    "torchrec_lowprec.kernels.triton_kernels:draws_kernel": {
        "rows_ptr": "*i64", "h_ptr": "*i64", "u_ptr": "*fp32",
        "D": "i32", "key_lo": "i32", "key_hi": "i32", "col_offset": "i32",
    },
}  # fmt: skip
UPDATE = "torchrec_lowprec.kernels.triton_kernels:fused_update_kernel"
DRAWS = "torchrec_lowprec.kernels.triton_kernels:draws_kernel"


def launch_options(block: int) -> dict[str, Any]:
    """The options every launch of the package's kernels passes (and the AOT compile uses):
    :func:`num_warps_for` warps and no FMA contraction."""
    return {"num_warps": num_warps_for(block), "enable_fp_fusion": False}


def kernel_cover(kernel: str) -> list[dict[str, Any]]:
    """The constexpr specialisations of ``kernel`` that ``make test`` compiles: the update's
    pairwise cover, every row block of the draws helper."""
    if kernel == UPDATE:
        return covering_specialisations()
    if kernel == DRAWS:
        return [{"BLOCK": b} for b in BLOCKS]
    raise KeyError(f"no cover for {kernel!r}: add it to triton_aot.KERNELS and kernel_cover")


def _jitted(kernel: str) -> Any:
    import importlib

    module, name = kernel.split(":")
    return getattr(importlib.import_module(module), name)


def _signature(kernel: str, kern: Any, cx: dict[str, Any]) -> dict[str, str]:
    types = KERNELS[kernel]
    sig = {}
    for name in kern.arg_names:
        if name in cx:
            sig[name] = "constexpr"
        elif types is not None:
            sig[name] = types.get(name, "fp32")
        elif name.endswith("_ptr"):
            sig[name] = _PTR.get(name, "*i64" if name in _I64_PTRS else "*fp32")
        else:
            sig[name] = "i32" if name in _INTS else "fp32"
    return sig


def compile_kernel(kernel: str, cx: dict[str, Any], arch: int = 90) -> Any:
    """``kernel`` (a key of :data:`KERNELS`) compiled for ``sm_<arch>`` with the constexprs
    ``cx`` and the launch's options (:func:`launch_options`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET unset (the interpreter cannot compile)")
    kern = _jitted(kernel)  # jitted at import: after the check above
    return triton.compile(
        ASTSource(kern, _signature(kernel, kern, cx), constexprs=cx),
        target=GPUTarget("cuda", arch, 32),
        options=launch_options(cx["BLOCK"]),
    )


def compile_update(cx: dict[str, Any], arch: int = 90) -> Any:
    """The update kernel compiled for ``sm_<arch>`` with the constexprs ``cx`` (and the launch's
    options: ``num_warps_for(BLOCK)`` warps, no FP fusion)."""
    return compile_kernel(UPDATE, cx, arch)


def resource_usage(compiled: Any) -> dict[str, int]:
    """``registers``, ``stack``, ``local`` (spills) and ``shared`` bytes of a compiled kernel,
    read from its cubin by Triton's bundled ``cuobjdump --dump-resource-usage``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        )
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource line: {out.stdout[-300:]}")
    regs, stack, shared, local = (int(v) for v in m.groups())
    return {"registers": regs, "stack": stack, "local": local, "shared": shared}


def non_ieee_ops(compiled: Any) -> dict[str, int]:
    """fp32 PTX ops other than IEEE ones (FMA, approximate, flush-to-zero), counted; the kernel
    allows only ``cvt.rmi.ftz.f32.f32`` (``_floor`` corrects it)."""
    seen: dict[str, int] = {}
    for op in re.findall(r"^\s*([a-z][a-z0-9._]*)", compiled.asm["ptx"], re.M):
        if any(w in op for w in ("fma", "approx", "ftz", "div", "sqrt", "rcp")):
            seen[op] = seen.get(op, 0) + 1
    return seen


def compile_cover(archs: tuple[int, ...] = ARCHS) -> list[tuple]:
    """``(kernel, arch, constexprs, resource_usage or "error", non-IEEE ops or the error)`` for
    every :func:`kernel_cover` entry of every kernel in :data:`KERNELS`, on every target in
    ``archs``."""
    out: list[tuple] = []
    for kernel in KERNELS:
        for cx in kernel_cover(kernel):
            for arch in archs:
                try:
                    c = compile_kernel(kernel, cx, arch)
                except Exception as e:  # noqa: BLE001 - reported, the caller decides
                    out.append((kernel, arch, cx, "error", repr(e)[:300]))
                    continue
                out.append((kernel, arch, cx, resource_usage(c), non_ieee_ops(c)))
    return out


if __name__ == "__main__":
    # `python -m torchrec_lowprec.kernels.triton_aot [--archs 90]` in any interpreter with triton
    # (another Triton version included, torch not needed): the cover's results, then the version.
    import argparse

    import triton

    p = argparse.ArgumentParser(description="compile the make-test cover of every Triton kernel")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma list of sm_ numbers")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    print(repr(compile_cover(tuple(int(a) for a in args.archs.split(",")))))
    print(repr(triton.__version__))

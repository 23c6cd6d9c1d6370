"""The fused update (:mod:`torchrec_lowprec.kernels.spec`) as one Triton kernel: the CUDA path.

One call groups the occurrences by row in torch (a stable sort of ``ids``, then segment
starts and counts by a scatter, with no data-dependent size) and launches ONE kernel with one
program per occurrence slot: slot ``r`` updates the ``r``-th touched row, slots past the last
one return at once. A program holds its row as a block of ``BLOCK >= D`` columns
(``tl.arange`` with a column mask) and does, in the order of the contract:

1. sums the row's occurrence gradients in occurrence order (a loop over its segment);
2. checks them for NaN/Inf (bit test); a bad row writes nothing and sets its flag;
3. dequantizes the stored row (fp16 scale times the signed code, codes unpacked from the
   bytes: nibble/crumb ``j`` of byte ``k`` is column ``k*(8/b)+j``), or reads the fp16/fp32
   values;
4. weight decay, the optimizer (SGD, Adagrad, row-wise Adagrad, Adam), ALPT's LSQ step
   update from the fp32 master step;
5. draws the counter-based uniforms (``mix32`` in uint32, bit-identical to
   :func:`torchrec_lowprec.quant.rounding.uniform_from_counter`), rounds
   ``floor(v + u)`` (or ``+ 0.5``), clamps, and writes back the fp16 scale/bias and the
   packed codes (codes sharing a byte are combined before one byte store), or the
   fp16 (stochastically rounded) / fp32 values.

Numerics. Every fp32 operation is the reference's operation in the reference's order:
PyTorch's ``c / t`` is ``reciprocal(t) * c`` (so ``1/s`` and ``lr / (sqrt(h)+eps)`` are a
reciprocal then a product), divisions are ``tl.div_rn`` and square roots ``tl.sqrt_rn``
(IEEE round-to-nearest; Triton's ``/`` and ``tl.sqrt`` are ``div.full`` / ``sqrt.approx``
on NVIDIA), the kernel is launched with ``enable_fp_fusion=False`` so that no ``a*b + c``
is contracted into an FMA, and ``floor`` is corrected for NVIDIA's flush-to-zero
``cvt.rmi.ftz`` (see ``_floor``). The sm_80 and sm_90 PTX hold no other approximate or FTZ
fp32 op (``tests/kernels/test_triton_aot.py`` compiles a pairwise cover of the launchable
specialisations for both without a GPU, via :mod:`.triton_aot`). So the result
equals the reference evaluated with IEEE fp32 ops (what torch does on CUDA) bit for bit.
Python float scalars enter as fp32, as in PyTorch's ops with a scalar operand.

The two sums over ``d`` (row-wise Adagrad's ``sum g^2`` and the LSQ gradient) are
sequential from column 0 in the contract. With ``exact_row_sums=True`` (default) the kernel
reproduces that chain exactly: for each ``d`` it extracts column ``d`` with a masked
``tl.sum`` (a sum of one value and zeros, exact in any order) and adds it to a scalar
accumulator: ``D`` block reductions per row, only for those two sums. With
``exact_row_sums=False`` one ``tl.sum`` tree reduction is used instead. A sum of ``D``
fp32 terms in any order is within ``(D-1) * 2**-24 * sum|terms|`` of the exact sum, so then
the row-wise Adagrad state is within ``D * 2**-23`` relative; a learned step within
``step_lr * lsq_scale * D * 2**-23 * sum_d |g_d * dxs_d|`` (plus an ulp), its fp16 copy
within one fp16 ulp; and a code differs by at most 1, only where ``x / s16 + u`` lies that
close to an integer or the fp16 step moved (tests: ``test_tree_row_sums_within_tolerance``).

CPU caveat: ``torch.sqrt`` on CPU (MKL VML) is not correctly rounded for some inputs on
some CPUs (about 18% of random inputs on this AMD EPYC), so the CPU reference and this
kernel under ``TRITON_INTERPRET=1`` can differ in the last bit of ``sqrt`` for Adagrad,
row-wise Adagrad and Adam; the tests compare against the reference with an IEEE square
root, which is what CUDA torch computes. NaN payloads (only where a finite gradient still
yields NaN, e.g. ``eps=0``) may differ between backends.

Inputs as for the C++ kernel: ``ids`` and ``grad_offsets`` int64 (the reference's hash
wraps in int32 for int32 ids), ids in ``[0, R)`` (not checked: an id out of range writes
out of bounds), ``grad`` fp32. No step of a call waits for the device: the grouping has no
data-dependent size (one program per occurrence slot, those past the last touched row return
at once) and the skipped-row count is returned as a device tensor. A program sums its row's
occurrences sequentially, so a very hot id (many occurrences in one call) is one long program.

Import-safe without triton: the jitted kernels live in :mod:`.triton_kernels`, imported on first use.
"""

from __future__ import annotations

import os

import torch

from torchrec_lowprec.kernels.spec import OPTIMIZER_CODES, TableUpdate
from torchrec_lowprec.kernels.triton_aot import block_for, launch_options
from torchrec_lowprec.quant.layout import row_bytes
from torchrec_lowprec.types import FLOAT_BITS, SUPPORTED_BITS

_KERNELS: dict[str, object] = {}


def is_available() -> bool:
    """Whether the Triton kernel can run here: triton importable, and a CUDA device or
    the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    if _interpreting():
        return True
    return torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _build() -> dict[str, object]:
    """The jitted kernels (imported once, on first use: this module imports without triton,
    and triton reads ``TRITON_INTERPRET`` when :mod:`.triton_kernels` jits them)."""
    if not _KERNELS:
        from torchrec_lowprec.kernels import triton_kernels

        _KERNELS["update"] = triton_kernels.fused_update_kernel
        _KERNELS["draws"] = triton_kernels.draws_kernel
    return _KERNELS


def _split_key(key: int) -> tuple[int, int]:
    if key < 0:
        raise ValueError(f"fused_update: spec.key must be >= 0, got {key}")
    return key & 0xFFFF, key >> 16


def counter_draws(
    key: int, global_rows: torch.Tensor, col_offset: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's counter-based draws for ``global_rows`` ``[U]`` and columns
    ``col_offset + [0, dim)``: ``(hash [U, dim] int64 in [0, 2**32), uniform [U, dim] fp32)``,
    computed by the same jitted helpers as :func:`fused_update` (for tests against
    :func:`torchrec_lowprec.quant.rounding.uniform_from_counter`)."""
    k = _build()
    n = global_rows.numel()
    h = torch.zeros(n, dim, dtype=torch.int64, device=global_rows.device)
    u = torch.zeros(n, dim, dtype=torch.float32, device=global_rows.device)
    if n == 0:
        return h, u
    lo, hi = _split_key(key)
    block = block_for(dim)
    k["draws"][(n,)](
        global_rows.to(torch.int64).contiguous(), h, u, dim, lo, hi, col_offset,
        BLOCK=block, **launch_options(block),
    )  # fmt: skip
    return h, u


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"fused_update (triton): {msg}")


def fused_update(
    update: TableUpdate,
    grad: torch.Tensor,
    bounded: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    *,
    exact_row_sums: bool = True,
) -> torch.Tensor:
    """Apply one fused update in place (see :mod:`torchrec_lowprec.kernels.spec`); returns
    the number of rows skipped for a non-finite gradient, as a 0-d int64 tensor on the
    update's device (an int would be a host sync per step).

    Same arguments and result as :func:`torchrec_lowprec.kernels.reference.reference_update`;
    all tensors on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``rows`` is a
    2-D uint8 tensor ``[R, >= row_bytes]`` with unit stride along a row (any row stride).
    ``bounded[0]`` (optional) counts the rows whose step hit ``max_step_size(bits)``.
    ``skip`` (optional 0-d bool tensor on the device): when true, no row is touched (every
    program finds an empty slot), without the host reading it.
    ``exact_row_sums=False`` uses a tree reduction for the two sums over ``d`` (faster,
    last-bit differences, see the module docstring).
    """
    rows, step_size, state1, state2, ids, grad_offsets, occ_weights, grad = update.tensors(grad)
    spec = update.spec
    if ids.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=rows.device)
    k = _build()
    bits, dim = spec.bits, spec.dim
    _check(bits in SUPPORTED_BITS, f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    _check(dim > 0, f"dim must be > 0, got {dim}")
    _check(
        bits >= 8 or dim % (8 // bits) == 0,
        f"dim {dim} is not a multiple of {8 // bits} as {bits}-bit packing needs",
    )
    nbytes = row_bytes(bits, dim)
    _check(
        rows.dtype == torch.uint8 and rows.dim() == 2,
        f"rows must be 2-D uint8, got {rows.dtype} {tuple(rows.shape)}",
    )
    _check(
        rows.size(1) >= nbytes,
        f"rows has {rows.size(1)} bytes per row, a {bits}-bit row of dim {dim} needs {nbytes}",
    )
    _check(rows.stride(1) == 1 or rows.size(1) == 1, "rows must have unit stride along a row")
    n_occ = ids.numel()
    _check(
        ids.dtype == torch.int64 and ids.dim() == 1,
        f"ids must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}",
    )
    _check(
        grad_offsets.dtype == torch.int64 and grad_offsets.shape == (n_occ,),
        f"grad_offsets must be int64 [{n_occ}] (one per id), got {grad_offsets.dtype} {tuple(grad_offsets.shape)}",
    )
    _check(
        occ_weights.numel() == 0 or (occ_weights.dtype == torch.float32 and occ_weights.shape == (n_occ,)),
        f"occ_weights must be float32 [{n_occ}] or empty, got {occ_weights.dtype} {tuple(occ_weights.shape)}",
    )
    _check(grad.dtype == torch.float32, f"grad must be float32, got {grad.dtype}")
    dev = rows.device
    for name, t in (("ids", ids), ("grad_offsets", grad_offsets), ("grad", grad)):
        _check(t.device == dev, f"{name} is on {t.device}, rows on {dev}")
    opt = OPTIMIZER_CODES[spec.optimizer.kind]
    f = spec.float_args()
    ints = spec.int_args()
    learn = bool(ints[4])
    stochastic = bool(ints[3])
    if opt in (1, 3):
        _check(
            state1.dim() == 2 and state1.size(1) == dim and state1.stride(1) == 1,
            "state1 must be [R, D] fp32 with unit stride along D",
        )
    if opt == 3:
        _check(
            state2.dim() == 2 and state2.size(1) == dim and state2.stride(1) == 1,
            "state2 must be [R, D] fp32 with unit stride along D",
        )
    if opt == 2:
        _check(
            state1.dim() == 1 and state1.numel() == rows.size(0),
            "state1 must be [R] fp32 for row-wise Adagrad",
        )
    if learn:
        _check(step_size.dim() == 1 and step_size.numel() == rows.size(0), "step_size must be [R] fp32")
    used = [("state1", state1)] if opt != 0 else []
    used += [("state2", state2)] if opt == 3 else []
    used += [("step_size", step_size)] if learn else []
    for name, t in used:
        _check(
            t.dtype == torch.float32 and t.device == dev,
            f"{name} must be float32 on {dev}, got {t.dtype} on {t.device}",
        )

    # Group the occurrences by row: stable, so each segment lists its occurrences in order.
    # Segment r starts at starts[r]; slots past the last segment get count 0. No op here has a
    # data-dependent size (unique_consecutive's would make the host wait for the device).
    sorted_ids, perm = torch.sort(ids, stable=True)
    n_occ = ids.numel()
    first = torch.ones(n_occ, dtype=torch.bool, device=dev)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = torch.cumsum(first, 0) - 1
    bounds = torch.full((n_occ + 1,), n_occ, dtype=torch.int64, device=dev)
    bounds.scatter_reduce_(0, segment, torch.arange(n_occ, device=dev), reduce="amin")
    starts, counts = bounds[:-1], bounds[1:] - bounds[:-1]
    if skip is not None:  # a batch the device-side input check refused: every slot empty
        counts = torch.where(skip, torch.zeros_like(counts), counts)
    uniq = sorted_ids[starts.clamp(max=n_occ - 1)]
    n_rows = n_occ  # programs: one per slot, empty ones return at once
    flags = torch.zeros(n_rows, dtype=torch.int32, device=dev)

    flat = grad.reshape(-1)
    dummy = flat
    s1 = state1 if opt in (1, 2, 3) else dummy
    s2 = state2 if opt == 3 else dummy
    st = step_size if learn else dummy
    has_w = occ_weights.numel() > 0
    occw = occ_weights if has_w else dummy
    align = 4 if bits == 32 else 2
    typed = bits in FLOAT_BITS and rows.data_ptr() % align == 0 and rows.stride(0) % align == 0
    lo, hi = _split_key(spec.key)
    block = block_for(dim)
    k["update"][(n_rows,)](
        rows, rows.stride(0),
        st, st.stride(0) if st.dim() else 0,
        s1, s1.stride(0) if s1.dim() else 0,
        s2, s2.stride(0) if s2.dim() else 0,
        uniq, starts, counts, perm,
        grad_offsets, occw, flat, flags,
        dim, float(dim),
        *f,
        lo, hi, spec.row_offset, spec.col_offset, ints[9],
        BITS=bits, OPT=opt, STOCHASTIC=stochastic, LEARN=learn, GROW=bool(ints[8]),
        HAS_WD=f[1] != 0.0, HAS_W=has_w, TYPED=typed, EXACT_SUM=bool(exact_row_sums),
        BLOCK=block, **launch_options(block),
    )  # fmt: skip
    if bounded is not None:
        bounded[0] += (flags == 2).sum().to(bounded.device)
    return (flags == 1).sum()  # on the device: reading it here would stall the step

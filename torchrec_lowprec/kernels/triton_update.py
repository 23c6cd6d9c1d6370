"""The fused update (:mod:`torchrec_lowprec.kernels.spec`) as one Triton kernel: the CUDA path.

One call groups the occurrences by row in torch (a stable sort of ``ids``, then
``unique_consecutive``: segment starts and counts) and launches ONE kernel with one program
per touched row. A program holds its row as a block of ``BLOCK >= D`` columns
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
``cvt.rmi.ftz`` (see ``_floor``). The sm_90 PTX holds no other approximate or FTZ fp32 op
(checked by the tests, which compile the kernel for CUDA without a GPU). So the result
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
out of bounds), ``grad`` fp32. One call syncs with the host twice (``unique_consecutive``'s
size and the returned count). A program sums its row's occurrences sequentially, so a very
hot id (many occurrences in one call) is one long program.

Import-safe without triton: triton is imported inside functions only.
"""

from __future__ import annotations

import os

import torch

from torchrec_lowprec.kernels.spec import OPTIMIZER_CODES, UpdateSpec
from torchrec_lowprec.quant.layout import row_bytes

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


# The kernels are plain functions here, jitted by _build() on first use: the module then
# imports without triton, and triton reads TRITON_INTERPRET when the kernel is built (jitted
# functions find each other through this module's globals, which _build() fills).
tl = None  # triton.language, set by _build()
_tl_sum = None  # tl.sum, set by _build() (see there)
_tl_max = None  # tl.max, likewise
_tl_min = None  # tl.min, likewise

_JIT_HELPERS = (
    "_mix32_u32", "_mix32_i64", "_row_key", "_element_hash", "_uniform", "_row_sum", "_floor", "_grown_step",
)  # fmt: skip
_JIT_KERNELS = {
    "_fused_update_kernel": ("key_lo", "key_hi", "row_offset", "col_offset"),
    "_draws_kernel": ("key_lo", "key_hi", "col_offset"),
}


def _mix32_u32(x):
    # lowbias32 on uint32 (products wrap modulo 2**32, shifts are logical)
    tl.static_assert(x.dtype == tl.uint32)
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


def _mix32_i64(x):
    # mix32 on an int64 value as quant/rounding.py evaluates it: the first xor-shift
    # sees all 64 bits, the rest is uint32
    tl.static_assert(x.dtype == tl.int64)
    y = (x ^ (x >> 16)).to(tl.uint32)
    y = y * tl.full(y.shape, 0x7FEB352D, tl.uint32)
    y = y ^ (y >> 15)
    y = y * tl.full(y.shape, 0x846CA68B, tl.uint32)
    y = y ^ (y >> 16)
    return y


def _row_key(grow, key_lo, key_hi):
    # quant.rounding.row_keys(key, grow) for an int64 global row (any shape)
    key = (key_hi.to(tl.int64) << 16) | key_lo.to(tl.int64)
    lo = grow & 0xFFFFFFFF
    hi = grow >> 32
    a = _mix32_i64(lo ^ key)
    return _mix32_i64(a.to(tl.int64) ^ hi)


def _element_hash(rk, gcol):
    # mix32((row_key + gcol * GOLDEN) mod 2**32), rk uint32, gcol any int
    c = gcol.to(tl.uint32)
    return _mix32_u32(rk + c * tl.full(c.shape, 0x9E3779B9, tl.uint32))


def _uniform(h):
    # (h >> 8) * 2**-24 in fp32: exact
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


def _floor(y):
    # IEEE floor. On NVIDIA tl.floor is cvt.rmi.ftz.f32: it flushes a negative subnormal
    # to -0 (floor -0) where IEEE gives -1; the compares below are exact (no ftz).
    t = tl.floor(y)
    return tl.where(y < 0.0, tl.where(t == 0.0, -1.0, t), t)


def _row_sum(p, cols, D, EXACT: tl.constexpr):
    # sum over the first D columns of p (p is 0 beyond D)
    if EXACT:
        # ((0 + p0) + p1) + ... : column d extracted by a sum of one value and zeros
        acc = tl.full((), 0.0, tl.float32)
        for d in range(D):
            acc = acc + _tl_sum(tl.where(cols == d, p, 0.0), axis=0)
    else:
        acc = _tl_sum(p, axis=0)
    return acc


def _grown_step(s, x, cmask, qmin, qmax, max_s, thr):
    # spec step 5b: the smallest step holding the updated row, if larger than s
    hi = _tl_max(tl.where(cmask, x, float("-inf")), axis=0)
    lo = _tl_min(tl.where(cmask, x, float("inf")), axis=0)
    need_hi = tl.div_rn(hi, qmax)
    need_lo = tl.div_rn(lo, qmin)
    need = tl.where(need_hi > need_lo, need_hi, need_lo)
    return tl.where(need > thr * s, tl.where(need > max_s, max_s, need), s)


def _fused_update_kernel(
    rows_ptr, row_stride,
    step_ptr, step_stride,
    s1_ptr, s1_stride,
    s2_ptr, s2_stride,
    uniq_ptr, start_ptr, count_ptr, perm_ptr,
    goff_ptr, occw_ptr, grad_ptr, flag_ptr,
    D, dim_f,
    lr, wd, eps, b1, omb1, b2, omb2, bc1, bc2, step_lr, lsq_scale, min_s, max_s, grow_thr,
    key_lo, key_hi, row_offset, col_offset,
    BITS: tl.constexpr, OPT: tl.constexpr, STOCHASTIC: tl.constexpr,
    LEARN: tl.constexpr, GROW: tl.constexpr, HAS_WD: tl.constexpr, HAS_W: tl.constexpr,
    TYPED: tl.constexpr, EXACT_SUM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    row = tl.load(uniq_ptr + pid).to(tl.int64)

    # 1. summed gradient, occurrences in order
    start = tl.load(start_ptr + pid).to(tl.int64)
    count = tl.load(count_ptr + pid).to(tl.int64)
    g = tl.full([BLOCK], 0.0, tl.float32)
    for k in range(start, start + count):
        occ = tl.load(perm_ptr + k).to(tl.int64)
        off = tl.load(goff_ptr + occ).to(tl.int64)
        gi = tl.load(grad_ptr + off + cols, mask=cmask, other=0.0)
        if HAS_W:
            gi = tl.load(occw_ptr + occ) * gi
        g = g + gi

    # 2. non-finite check (exponent all ones), on the bits
    gb = g.to(tl.uint32, bitcast=True)
    nbad = _tl_sum(((gb & 0x7F800000) == 0x7F800000).to(tl.int32), axis=0)
    ok = nbad == 0
    tl.store(flag_ptr + pid, (nbad != 0).to(tl.int32))
    d_ok = tl.where(ok, D, 0)
    smask = cols < d_ok  # the columns to store: none for a skipped row

    # 3. dequantize
    base = rows_ptr + row * row_stride
    if BITS == 32:
        if TYPED:
            x = tl.load(base.to(tl.pointer_type(tl.float32)) + cols, mask=cmask, other=0.0)
        else:
            w = tl.full([BLOCK], 0, tl.uint32)
            for j in tl.static_range(4):
                bj = tl.load(base + 4 * cols + j, mask=cmask, other=0).to(tl.uint32)
                w = w | (bj << (8 * j))
            x = w.to(tl.float32, bitcast=True)
    elif BITS == 16:
        if TYPED:
            xh = tl.load(base.to(tl.pointer_type(tl.float16)) + cols, mask=cmask, other=0.0)
        else:
            b0 = tl.load(base + 2 * cols, mask=cmask, other=0).to(tl.uint16)
            b1_ = tl.load(base + 2 * cols + 1, mask=cmask, other=0).to(tl.uint16)
            xh = (b0 | (b1_ << 8)).to(tl.float16, bitcast=True)
        x = xh.to(tl.float32)
    else:
        PER: tl.constexpr = 8 // BITS
        HALF: tl.constexpr = 1 << (BITS - 1)
        h0 = tl.load(base).to(tl.uint16)
        h1 = tl.load(base + 1).to(tl.uint16)
        s16_old = (h0 | (h1 << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        byte = tl.load(base + 4 + cols // PER, mask=cmask, other=0).to(tl.int32)
        code = (byte >> ((cols % PER) * BITS)) & ((1 << BITS) - 1)
        x = s16_old * (code - HALF).to(tl.float32)

    # 4. weight decay and optimizer
    if HAS_WD:
        go = g + wd * x
    else:
        go = g
    if OPT == 0:
        x = x - lr * go
    elif OPT == 1:
        hp = s1_ptr + row * s1_stride + cols
        h = tl.load(hp, mask=cmask, other=0.0) + go * go
        tl.store(hp, h, mask=smask)
        den = tl.sqrt_rn(h) + eps
        x = x - tl.where(den == 0.0, 0.0, tl.div_rn(lr * go, den))  # eps = 0, zero state: no step
    elif OPT == 2:
        hp = s1_ptr + row * s1_stride
        sq = tl.where(cmask, go * go, 0.0)
        h = tl.load(hp) + tl.div_rn(_row_sum(sq, cols, D, EXACT_SUM), dim_f)
        tl.store(hp, h, mask=ok)
        den = tl.sqrt_rn(h) + eps
        rate = tl.where(den == 0.0, 0.0, tl.div_rn(1.0, den) * lr)
        x = x - rate * go
    else:
        mp = s1_ptr + row * s1_stride + cols
        vp = s2_ptr + row * s2_stride + cols
        m = b1 * tl.load(mp, mask=cmask, other=0.0) + omb1 * go
        v = b2 * tl.load(vp, mask=cmask, other=0.0) + omb2 * (go * go)
        tl.store(mp, m, mask=smask)
        tl.store(vp, v, mask=smask)
        den = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
        x = x - tl.where(den == 0.0, 0.0, tl.div_rn(lr * tl.div_rn(m, bc1), den))

    # 5. write back
    if BITS == 32:
        if TYPED:
            tl.store(base.to(tl.pointer_type(tl.float32)) + cols, x, mask=smask)
        else:
            w = x.to(tl.uint32, bitcast=True)
            for j in tl.static_range(4):
                tl.store(base + 4 * cols + j, ((w >> (8 * j)) & 0xFF).to(tl.uint8), mask=smask)
    elif BITS == 16:
        if STOCHASTIC:
            rk = _row_key(row + row_offset, key_lo, key_hi)
            hsh = _element_hash(rk, cols + col_offset)
            xb = x.to(tl.uint32, bitcast=True)
            tb = (xb + (hsh & 0x1FFF)) & 0xFFFFE000
            fin = (xb & 0x7F800000) != 0x7F800000
            x = tl.where(fin, tb, xb).to(tl.float32, bitcast=True)
        y = x.to(tl.float16)
        if TYPED:
            tl.store(base.to(tl.pointer_type(tl.float16)) + cols, y, mask=smask)
        else:
            yb = y.to(tl.uint16, bitcast=True)
            tl.store(base + 2 * cols, (yb & 0xFF).to(tl.uint8), mask=smask)
            tl.store(base + 2 * cols + 1, (yb >> 8).to(tl.uint8), mask=smask)
    else:
        QMIN: tl.constexpr = -HALF
        QMAX: tl.constexpr = HALF - 1
        if LEARN:
            # ALPT: LSQ gradient at the updated row, raw gradient g, fp32 master step
            sp = step_ptr + row * step_stride
            s = tl.load(sp)
            v = x * tl.div_rn(1.0, s)
            inner = _floor(v + 0.5) - v
            dxs = tl.where(v <= QMIN, QMIN * 1.0, tl.where(v >= QMAX, QMAX * 1.0, inner))
            prod = tl.where(cmask, g * dxs, 0.0)
            lsq = _row_sum(prod, cols, D, EXACT_SUM) * lsq_scale
            sn = s - step_lr * lsq
            sn = tl.where(sn < min_s, min_s, sn)  # torch.clamp: NaN stays NaN
            sn = tl.where(sn > max_s, max_s, sn)
            if GROW:
                sn = _grown_step(sn, x, cmask, QMIN * 1.0, QMAX * 1.0, max_s, grow_thr)
            tl.store(sp, sn, mask=ok)
            tl.store(flag_ptr + pid, 2, mask=ok & (sn >= max_s))  # hit the step bound (spec 5c)
            s16 = sn.to(tl.float16).to(tl.float32)
        elif GROW:
            sn = _grown_step(s16_old, x, cmask, QMIN * 1.0, QMAX * 1.0, max_s, grow_thr)
            tl.store(flag_ptr + pid, 2, mask=ok & (sn >= max_s))
            s16 = sn.to(tl.float16).to(tl.float32)
        else:
            s16 = s16_old
        vq = x * tl.div_rn(1.0, s16)
        if STOCHASTIC:
            rk = _row_key(row + row_offset, key_lo, key_hi)
            t = _floor(vq + _uniform(_element_hash(rk, cols + col_offset)))
        else:
            t = _floor(vq + 0.5)
        t = tl.where(t < QMIN, QMIN * 1.0, t)
        t = tl.where(t > QMAX, QMAX * 1.0, t)
        t = tl.where(t == t, t, 0.0)  # NaN: the reference's cast and packing give code 0
        ucode = t.to(tl.int32) + HALF
        # head: fp16 scale, fp16 bias = -HALF * scale (4 bytes, little-endian)
        sbits = s16.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        bbits = (s16 * (-HALF * 1.0)).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        word = sbits | (bbits << 16)
        hidx = tl.arange(0, 4)
        tl.store(base + hidx, ((word >> (8 * hidx)) & 0xFF).to(tl.uint8), mask=hidx < tl.where(ok, 4, 0))
        if PER == 1:
            tl.store(base + 4 + cols, ucode.to(tl.uint8), mask=smask)
        else:
            c2 = tl.reshape(ucode, (BLOCK // PER, PER))
            sh = tl.arange(0, PER) * BITS
            packed = _tl_sum(c2 << sh[None, :], axis=1)
            bidx = tl.arange(0, BLOCK // PER)
            tl.store(base + 4 + bidx, packed.to(tl.uint8), mask=bidx < d_ok // PER)


def _draws_kernel(rows_ptr, h_ptr, u_ptr, D, key_lo, key_hi, col_offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    grow = tl.load(rows_ptr + pid).to(tl.int64)
    h = _element_hash(_row_key(grow, key_lo, key_hi), cols + col_offset)
    tl.store(h_ptr + pid * D + cols, h.to(tl.int64), mask=cmask)
    tl.store(u_ptr + pid * D + cols, _uniform(h), mask=cmask)


# the plain functions, before _build() replaces their module globals by jitted ones
_RAW = {name: globals()[name] for name in (*_JIT_HELPERS, *_JIT_KERNELS)}


def _build() -> dict[str, object]:
    """Jit the kernels (once)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language

    g = globals()
    g["tl"] = triton.language
    # The kernels use only triton.language builtins, plus tl.sum (a @jit function of
    # triton's standard library). If triton was imported before TRITON_INTERPRET=1 was set
    # (torchrec imports it), its standard library holds compiled-mode JITFunctions, which
    # the interpreter cannot call: re-jit tl.sum here, in the current mode.
    for name in ("sum", "max", "min"):
        fn = getattr(triton.language, name)
        g[f"_tl_{name}"] = triton.jit(fn.fn) if _interpreting() else fn
    for name in _JIT_HELPERS:
        g[name] = triton.jit(_RAW[name])
    for name, dns in _JIT_KERNELS.items():
        g[name] = triton.jit(do_not_specialize=list(dns))(_RAW[name])
    _KERNELS["update"] = g["_fused_update_kernel"]
    _KERNELS["draws"] = g["_draws_kernel"]
    _KERNELS["next_pow2"] = triton.next_power_of_2
    return _KERNELS


def _block(dim: int, next_pow2) -> int:
    return max(int(next_pow2(dim)), 16)


def _num_warps(block: int) -> int:
    return 1 if block <= 256 else (2 if block <= 1024 else 4)


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
    k["draws"][(n,)](
        global_rows.to(torch.int64).contiguous(), h, u, dim, lo, hi, col_offset,
        BLOCK=_block(dim, k["next_pow2"]),
    )  # fmt: skip
    return h, u


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"fused_update (triton): {msg}")


def fused_update(
    rows: torch.Tensor,
    step_size: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    ids: torch.Tensor,
    grad_offsets: torch.Tensor,
    occ_weights: torch.Tensor,
    grad: torch.Tensor,
    spec: UpdateSpec,
    bounded: torch.Tensor | None = None,
    *,
    exact_row_sums: bool = True,
) -> int:
    """Apply one fused update in place (see :mod:`torchrec_lowprec.kernels.spec`); returns
    the number of rows skipped for a non-finite gradient.

    Same arguments and result as :func:`torchrec_lowprec.kernels.reference.reference_update`;
    all tensors on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``). ``rows`` is a
    2-D uint8 tensor ``[R, >= row_bytes]`` with unit stride along a row (any row stride).
    ``bounded[0]`` (optional) counts the rows whose step hit ``max_step_size(bits)``.
    ``exact_row_sums=False`` uses a tree reduction for the two sums over ``d`` (faster,
    last-bit differences, see the module docstring).
    """
    if ids.numel() == 0:
        return 0
    k = _build()
    bits, dim = spec.bits, spec.dim
    _check(bits in (8, 4, 2, 16, 32), f"bits must be one of 8, 4, 2, 16, 32, got {bits}")
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
    sorted_ids, perm = torch.sort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    n_rows = uniq.numel()
    flags = torch.zeros(n_rows, dtype=torch.int32, device=dev)

    flat = grad.reshape(-1)
    dummy = flat
    s1 = state1 if opt in (1, 2, 3) else dummy
    s2 = state2 if opt == 3 else dummy
    st = step_size if learn else dummy
    has_w = occ_weights.numel() > 0
    occw = occ_weights if has_w else dummy
    align = 4 if bits == 32 else 2
    typed = bits in (16, 32) and rows.data_ptr() % align == 0 and rows.stride(0) % align == 0
    lo, hi = _split_key(spec.key)
    block = _block(dim, k["next_pow2"])
    k["update"][(n_rows,)](
        rows, rows.stride(0),
        st, st.stride(0) if st.dim() else 0,
        s1, s1.stride(0) if s1.dim() else 0,
        s2, s2.stride(0) if s2.dim() else 0,
        uniq, starts, counts, perm,
        grad_offsets, occw, flat, flags,
        dim, float(dim),
        *f,
        lo, hi, spec.row_offset, spec.col_offset,
        BITS=bits, OPT=opt, STOCHASTIC=stochastic, LEARN=learn, GROW=bool(ints[8]),
        HAS_WD=f[1] != 0.0, HAS_W=has_w, TYPED=typed, EXACT_SUM=bool(exact_row_sums),
        BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=False,
    )  # fmt: skip
    if bounded is not None:
        bounded[0] += (flags == 2).sum().to(bounded.device)
    return int((flags == 1).sum())

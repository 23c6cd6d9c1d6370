"""The Triton kernels of :mod:`.triton_update` (jitted at import; imported only by its
``_build()``, so that the package imports without triton and triton reads
``TRITON_INTERPRET`` when the kernels are jitted). The launch wrapper, argument checks and
the math they implement (kernels/spec.py) live there.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _stdlib(fn):
    # The kernels use triton.language builtins plus tl.sum/max/min (@jit functions of
    # triton's standard library). If triton was imported before TRITON_INTERPRET=1 was set
    # (torchrec imports it), those are compiled-mode JITFunctions the interpreter cannot
    # call: re-jit them in the current mode.
    return triton.jit(fn.fn) if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else fn


_tl_sum = _stdlib(tl.sum)
_tl_max = _stdlib(tl.max)
_tl_min = _stdlib(tl.min)


@triton.jit
def _mix32_tail(y):
    # lowbias32 after its first xor-shift, on uint32 (products wrap modulo 2**32, shifts logical)
    y = y * tl.full(y.shape, 0x7FEB352D, tl.uint32)
    y = y ^ (y >> 15)
    y = y * tl.full(y.shape, 0x846CA68B, tl.uint32)
    return y ^ (y >> 16)


@triton.jit
def _mix32_u32(x):
    # lowbias32 on uint32
    tl.static_assert(x.dtype == tl.uint32)
    return _mix32_tail(x ^ (x >> 16))


@triton.jit
def _mix32_i64(x):
    # mix32 on an int64 value as quant/rounding.py evaluates it: the first xor-shift
    # sees all 64 bits, the rest is uint32
    tl.static_assert(x.dtype == tl.int64)
    return _mix32_tail((x ^ (x >> 16)).to(tl.uint32))


@triton.jit
def _row_key(grow, key_lo, key_hi):
    # quant.rounding.row_keys(key, grow) for an int64 global row (any shape)
    key = (key_hi.to(tl.int64) << 16) | key_lo.to(tl.int64)
    lo = grow & 0xFFFFFFFF
    hi = grow >> 32
    a = _mix32_i64(lo ^ key)
    return _mix32_i64(a.to(tl.int64) ^ hi)


@triton.jit
def _element_hash(rk, gcol):
    # mix32((row_key + gcol * GOLDEN) mod 2**32), rk uint32, gcol any int
    c = gcol.to(tl.uint32)
    return _mix32_u32(rk + c * tl.full(c.shape, 0x9E3779B9, tl.uint32))


@triton.jit
def _uniform(h):
    # (h >> 8) * 2**-24 in fp32: exact
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _uniform_dithered(h, dither):
    # (((h >> 8) + dither) mod 2**24) * 2**-24 (spec step 6; dither 0: _uniform)
    return (((h >> 8) + dither.to(tl.uint32)) & 0xFFFFFF).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def _floor(y):
    # IEEE floor. On NVIDIA tl.floor is cvt.rmi.ftz.f32: it flushes a negative subnormal
    # to -0 (floor -0) where IEEE gives -1; the compares below are exact (no ftz).
    t = tl.floor(y)
    return tl.where(y < 0.0, tl.where(t == 0.0, -1.0, t), t)


@triton.jit
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


@triton.jit
def _grown_step(s, x, cmask, qmin, qmax, max_s, thr):
    # spec step 5b: the smallest step holding the updated row, if larger than s
    hi = _tl_max(tl.where(cmask, x, float("-inf")), axis=0)
    lo = _tl_min(tl.where(cmask, x, float("inf")), axis=0)
    need_hi = tl.div_rn(hi, qmax)
    need_lo = tl.div_rn(lo, qmin)
    need = tl.where(need_hi > need_lo, need_hi, need_lo)
    return tl.where(need > thr * s, tl.where(need > max_s, max_s, need), s)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "row_offset", "col_offset", "dither"])
def fused_update_kernel(
    rows_ptr, row_stride,
    step_ptr, step_stride,
    s1_ptr, s1_stride,
    s2_ptr, s2_stride,
    uniq_ptr, start_ptr, count_ptr, perm_ptr,
    goff_ptr, occw_ptr, grad_ptr, flag_ptr,
    D, dim_f,
    lr, wd, eps, b1, omb1, b2, omb2, bc1, bc2, step_lr, lsq_scale, min_s, max_s, grow_thr,
    key_lo, key_hi, row_offset, col_offset, dither,
    BITS: tl.constexpr, OPT: tl.constexpr, STOCHASTIC: tl.constexpr,
    LEARN: tl.constexpr, GROW: tl.constexpr, HAS_WD: tl.constexpr, HAS_W: tl.constexpr,
    TYPED: tl.constexpr, EXACT_SUM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    # One program per occurrence slot; slots past the last touched row have no occurrences
    # (the grid is not sized by the number of rows, which only the device knows).
    count = tl.load(count_ptr + pid).to(tl.int64)
    if count == 0:
        return
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    row = tl.load(uniq_ptr + pid).to(tl.int64)

    # 1. summed gradient, occurrences in order
    start = tl.load(start_ptr + pid).to(tl.int64)
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
            tb = (xb + (((hsh & 0x1FFF) + (dither.to(tl.uint32) >> 11)) & 0x1FFF)) & 0xFFFFE000
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
            t = _floor(vq + _uniform_dithered(_element_hash(rk, cols + col_offset), dither))
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


@triton.jit(do_not_specialize=["key_lo", "key_hi", "col_offset"])
def draws_kernel(rows_ptr, h_ptr, u_ptr, D, key_lo, key_hi, col_offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < D
    grow = tl.load(rows_ptr + pid).to(tl.int64)
    h = _element_hash(_row_key(grow, key_lo, key_hi), cols + col_offset)
    tl.store(h_ptr + pid * D + cols, h.to(tl.int64), mask=cmask)
    tl.store(u_ptr + pid * D + cols, _uniform(h), mask=cmask)

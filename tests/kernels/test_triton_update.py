"""The Triton fused update against the PyTorch reference, from identical clones.

Runs the kernel with the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, set
below before triton is imported). On a CUDA machine, ``TRITON_INTERPRET=0 pytest
tests/kernels/test_triton_update.py`` runs the same comparisons with the compiled kernel on
the GPU (the reference then runs on CUDA too).

The reference computes square roots correctly rounded (IEEE), as the kernel's
``tl.sqrt_rn`` does; every case below is byte-for-byte equal
with ``exact_row_sums=True`` (the default); ``test_tree_row_sums_within_tolerance`` states
and checks what the faster tree reduction costs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tests.helpers import call_update  # noqa: E402
from torchrec_lowprec.kernels import triton_update  # noqa: E402
from torchrec_lowprec.kernels.reference import reference_update  # noqa: E402
from torchrec_lowprec.kernels.spec import OptimizerParams, UpdateSpec  # noqa: E402
from torchrec_lowprec.optim.fused import allocate_state  # noqa: E402
from torchrec_lowprec.quant.layout import (  # noqa: E402
    code_range,
    dequantize_rows,
    quantize_rows,
    row_bytes,
    split_row,
)
from torchrec_lowprec.quant.lsq import init_step_size, lsq_grad_scale  # noqa: E402
from torchrec_lowprec.quant.rounding import MASK32, dither_offset, mix32, row_keys, uniform_from_counter  # noqa: E402
from torchrec_lowprec.types import OptimizerType

# numpy's warnings from the interpreter evaluating masked-off lanes / skipped rows (inf - inf,
# float -> int casts of inf), which the GPU computes silently too
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)
DEV = torch.device("cpu" if INTERPRET else "cuda")
R = 40
KINDS = list(OptimizerType)
_reference = reference_update  # the oracle's sqrt is IEEE, like the kernel's sqrt_rn


def _table(bits, dim, seed, scale=0.1, init="lsq"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, dim, generator=g) * scale
    s = init_step_size(x, bits, init) if bits <= 8 else torch.empty(0)
    rows = quantize_rows(x, s, bits)
    return rows.to(DEV), s.to(DEV)


def _batch(dim, seed, n=24, weighted=False, max_id=R // 2, gscale=1.0):
    """n occurrences over ids < max_id (repeats on purpose: rows touched by several bags)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max_id, (n,), generator=g)
    # gradient slices at shuffled offsets (one slice per occurrence, not in id order)
    goff = torch.randperm(n, generator=g) * dim
    grad = torch.randn(n * dim, generator=g) * gscale
    w = torch.rand(n, generator=g) + 0.5 if weighted else torch.empty(0)
    return ids.to(DEV), goff.to(DEV), w.to(DEV), grad.to(DEV)


def _states(kind, dim, seed):
    st1, st2 = allocate_state(kind, R, dim, DEV)
    g = torch.Generator().manual_seed(seed)
    if st1.numel():  # non-trivial optimizer state, as after some steps
        st1.copy_((torch.rand(st1.shape, generator=g) * 0.02).to(DEV))
        if kind == OptimizerType.ADAM:
            st1.sub_(0.01)
    if st2.numel():
        st2.copy_((torch.rand(st2.shape, generator=g) * 0.02).to(DEV))
    return st1, st2


def _run_both(tensors, ids, goff, w, grad, spec, **kw):
    """Run reference and kernel on clones of ``tensors`` = (rows, step, st1, st2)."""
    a = [t.clone() for t in tensors]
    b = [t.clone() for t in tensors]
    na = call_update(_reference, *a, ids, goff, w, grad, spec)
    nb = call_update(triton_update.fused_update, *b, ids, goff, w, grad, spec, **kw)
    return (na, a), (nb, b)


def _assert_same(ref, got):
    (na, a), (nb, b) = ref, got
    assert nb == na
    for name, x, y in zip(("rows", "step_size", "state1", "state2"), a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.dtype == torch.float32:  # compare bits (NaN-safe, -0.0 vs 0.0 distinguished)
            x, y = x.view(torch.int32), y.view(torch.int32)
        assert torch.equal(x, y), f"{name} differs"


def test_is_available():
    assert triton_update.is_available()


def test_empty_ids():
    rows, s = _table(8, 16, 0)
    st1, st2 = _states(OptimizerType.ADAM, 16, 0)
    before = [t.clone() for t in (rows, s, st1, st2)]
    spec = UpdateSpec(8, 16, OptimizerParams(OptimizerType.ADAM, 0.1), 1, True, True, 0.1, 7)
    e = torch.empty(0, dtype=torch.int64, device=DEV)
    assert (
        call_update(
            triton_update.fused_update,
            rows,
            s,
            st1,
            st2,
            e,
            e,
            torch.empty(0, device=DEV),
            torch.empty(0, device=DEV),
            spec,
        )
        == 0
    )
    for x, y in zip(before, (rows, s, st1, st2)):
        assert torch.equal(x, y)


def test_rejects_int32_ids():
    # like the C++ kernel: the reference's hash on int32 ids would wrap in int32
    rows, s = _table(8, 8, 0)
    spec = UpdateSpec(8, 8, OptimizerParams(OptimizerType.SGD, 0.1), 1, True, False, 0.0, 7)
    ids = torch.tensor([1, 2], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="int64"):
        call_update(
            triton_update.fused_update,
            rows,
            s,
            torch.empty(0),
            torch.empty(0),
            ids,
            ids.long() * 8,
            torch.empty(0),
            torch.randn(16),
            spec,
        )


@pytest.mark.parametrize(
    "key,rows,col_offset",
    [
        (0, [0, 1, 39], 0),
        (1, [5, 2**31 + 3], 1000),
        (0xDEADBEEF, [0, 2**32 + 7, 123456789012], 3),
        (2**32 - 1, [7, 2**40], 2**31 - 5),
        (2**40 + 5, [0, 2**33 + 1], 17),
    ],
)
def test_draws_bit_identical_to_uniform_from_counter(key, rows, col_offset):
    dim = 24
    grows = torch.tensor(rows, dtype=torch.int64)
    h, u = triton_update.counter_draws(key, grows.to(DEV), col_offset, dim)
    rk = row_keys(key, grows)[:, None]
    cols = torch.arange(dim, dtype=torch.int64) + col_offset
    want_h = mix32((rk + cols * 0x9E3779B9) & MASK32)
    assert torch.equal(h.cpu(), want_h)
    assert torch.equal(u.cpu().view(torch.int32), uniform_from_counter(rk, cols).view(torch.int32))


_CASES = [
    (bits, kind, stochastic, learn)
    for bits in (8, 4, 2, 16, 32)
    for kind in KINDS
    for stochastic in (True, False)
    for learn in ((True, False) if bits <= 8 else (False,))
]


@pytest.mark.parametrize("bits,kind,stochastic,learn", _CASES)
def test_matches_reference_bit_for_bit(bits, kind, stochastic, learn):
    i = _CASES.index((bits, kind, stochastic, learn))
    dim = (8, 16, 32)[i % 3]
    wd = 0.01 if i % 2 else 0.0
    weighted = i % 4 in (1, 2)
    rows, s = _table(bits, dim, seed=i)
    st1, st2 = _states(kind, dim, seed=i)
    tensors = (rows, s, st1, st2)
    lr = 0.05 if bits >= 8 else 0.2  # low-bit grids are coarse: big enough steps to move codes
    opt = OptimizerParams(kind, lr=lr, weight_decay=wd, eps=1e-8, beta1=0.9, beta2=0.99)
    # two steps in sequence (the second one sees the first one's rows, states and steps)
    for step in (1, 2):
        ids, goff, w, grad = _batch(dim, seed=100 * i + step, weighted=weighted)
        spec = UpdateSpec(
            bits, dim, opt, step, stochastic, learn, 0.05, key=1000 * i + step, grow_step=i % 2 == 0
        )
        ref, got = _run_both(tensors, ids, goff, w, grad, spec)
        _assert_same(ref, got)
        assert ref[0] == 0
        tensors = tuple(ref[1])
    assert not torch.equal(tensors[0], rows)  # the update did something


@pytest.mark.parametrize("bits,learn", [(8, True), (4, False), (2, True), (16, False)])
def test_dithered_draws_match_reference_bit_for_bit(bits, learn):
    # rounding="dithered": a fixed key and a 24-bit golden-ratio offset per step (spec step 6),
    # the last one wrapping modulo 2**24
    dim = 16
    rows, s = _table(bits, dim, seed=bits)
    st1, st2 = _states(OptimizerType.ROWWISE_ADAGRAD, dim, seed=bits)
    tensors = (rows, s, st1, st2)
    opt = OptimizerParams(OptimizerType.ROWWISE_ADAGRAD, lr=0.2)
    for step in (1, 2, 3):
        ids, goff, w, grad = _batch(dim, seed=10 * bits + step)
        spec = UpdateSpec(
            bits, dim, opt, step, True, learn, 0.05, key=4242, grow_step=True,
            dither=dither_offset(step) if step < 3 else 0xFFFFFF,
        )  # fmt: skip
        ref, got = _run_both(tensors, ids, goff, w, grad, spec)
        _assert_same(ref, got)
        tensors = tuple(ref[1])
    assert not torch.equal(tensors[0], rows)


@pytest.mark.parametrize(
    "bits,kind",
    [
        (8, OptimizerType.ROWWISE_ADAGRAD),
        (4, OptimizerType.ADAM),
        (16, OptimizerType.ADAGRAD),
        (2, OptimizerType.SGD),
    ],
)
def test_nonfinite_gradient_rows_skipped_and_counted(bits, kind):
    dim = 16
    rows, s = _table(bits, dim, seed=3)
    st1, st2 = _states(kind, dim, seed=3)
    ids = torch.tensor([1, 2, 2, 3, 4, 3, 5], device=DEV)
    goff = torch.arange(7, device=DEV) * dim
    grad = torch.randn(7 * dim, generator=torch.Generator().manual_seed(4)).to(DEV)
    grad[1 * dim + 3] = float("nan")  # row 2 (first of its two occurrences)
    grad[3 * dim + 0] = float("inf")  # row 3
    grad[6 * dim + 15] = float("-inf")  # row 5, last column
    spec = UpdateSpec(bits, dim, OptimizerParams(kind, 0.1, weight_decay=0.01), 1, True, True, 1e-2, 3)
    ref, got = _run_both((rows, s, st1, st2), ids, goff, torch.empty(0, device=DEV), grad, spec)
    _assert_same(ref, got)
    assert got[0] == 3
    after = got[1][0]
    for r in (2, 3, 5):
        assert torch.equal(after[r], rows[r])
    for r in (1, 4):
        assert not torch.equal(after[r], rows[r])


@pytest.mark.parametrize("bits", [8, 4, 2, 16, 32])
@pytest.mark.parametrize("pad", [3, 8])
def test_strided_rows_view_and_offsets(bits, pad):
    # rows: a view into a wider buffer (row stride > row bytes) at a storage offset, with
    # global row/col offsets. pad=3: odd stride and address, so 16/32-bit rows take the
    # byte-wise path; pad=8: 4-byte aligned rows, typed fp16/fp32 loads and stores.
    dim = 8 if bits != 2 else 16
    nb = row_bytes(bits, dim)
    c0 = 1 if pad == 3 else 4
    rows0, s = _table(bits, dim, seed=11 + pad)
    buf = torch.full((R + 1, nb + pad), 0xAB, dtype=torch.uint8, device=DEV)
    view = buf[1:, c0 : c0 + nb]
    assert (view.data_ptr() % 4 == 0 and view.stride(0) % 4 == 0) == (pad == 8)
    view.copy_(rows0)
    kind = OptimizerType.ROWWISE_ADAGRAD if pad == 3 else OptimizerType.ADAM
    st1, st2 = _states(kind, dim, seed=5)
    ids, goff, w, grad = _batch(dim, seed=6, weighted=True, max_id=R)
    spec = UpdateSpec(
        bits,
        dim,
        OptimizerParams(kind, 0.05),
        3,
        True,
        True,
        0.05,
        key=0xC0FFEE,
        row_offset=1000 + pad,
        col_offset=64 * pad,
    )
    bufs = []
    for fn in (_reference, triton_update.fused_update):
        b = buf.clone()
        v = b[1:, c0 : c0 + nb]
        t = [s.clone(), st1.clone(), st2.clone()]
        n = call_update(fn, v, t[0], t[1], t[2], ids, goff, w, grad, spec)
        bufs.append((n, b, t))
    (na, ba, ta), (nb_, bb, tb) = bufs
    assert na == nb_ == 0
    assert torch.equal(ba, bb)
    for x, y in zip(ta, tb):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    # nothing outside the rows' bytes was written
    outside = torch.ones_like(bb, dtype=torch.bool)
    outside[1:, c0 : c0 + nb] = False
    assert bool((bb[outside] == 0xAB).all())
    assert not torch.equal(bb, buf)


@pytest.mark.parametrize("bits", [8, 4, 2, 16])
def test_saturation_and_step_clamps(bits):
    # Large steps push codes to the grid's ends, a huge step-size lr drives steps to the
    # MIN_STEP_SIZE / MAX_STEP_SIZE clamps, 16-bit values overflow fp16 or go subnormal.
    dim = 16
    rows, s = _table(bits, dim, seed=21, scale=1.0 if bits <= 8 else 3e4)
    if bits == 16:
        rows[:4] = (
            torch.tensor([1e-7, -3e-6, 6e-5, 65000.0] * 4, dtype=torch.float16, device=DEV)
            .view(torch.uint8)
            .repeat(4, 1)
        )
    ids, goff, w, grad = _batch(dim, seed=22, n=30, max_id=R, gscale=50.0)
    for step_lr in (0.0, 1e3, -1e6):
        spec = UpdateSpec(
            bits, dim, OptimizerParams(OptimizerType.SGD, 1.0), 1, True, step_lr != 0.0, step_lr, key=5
        )
        ref, got = _run_both(
            (rows, s, torch.empty(0, device=DEV), torch.empty(0, device=DEV)), ids, goff, w, grad, spec
        )
        _assert_same(ref, got)
    if bits <= 8:
        qmin, qmax = code_range(bits)
        _, q = split_row(got[1][0], bits, dim)
        assert bool((q == qmin).any()) and bool((q == qmax).any())


@pytest.mark.parametrize("bits", [8, 2, 16])
def test_matches_cpu_reference_as_is_without_sqrt(bits):
    # SGD involves no sqrt
    dim = 16
    rows, s = _table(bits, dim, seed=31)
    ids, goff, w, grad = _batch(dim, seed=32, weighted=True)
    spec = UpdateSpec(
        bits, dim, OptimizerParams(OptimizerType.SGD, 0.1, weight_decay=0.1), 1, True, True, 0.1, 9
    )
    e = torch.empty(0, device=DEV)
    a = [rows.clone(), s.clone(), e, e]
    b = [rows.clone(), s.clone(), e, e]
    _assert_same(
        (call_update(reference_update, *a, ids, goff, w, grad, spec), a),
        (call_update(triton_update.fused_update, *b, ids, goff, w, grad, spec), b),
    )


@pytest.mark.parametrize("bits,learn", [(8, True), (4, False), (2, True), (16, False), (32, False)])
def test_nan_values_from_finite_gradients(bits, learn):
    # Adagrad with finite gradients whose square overflows: h = inf and lr * g = +-inf, so the
    # step is inf / inf = NaN. The reference writes code 0 (q = 0) for NaN, a NaN step stays
    # NaN, 16/32-bit rows keep NaN. (This test used eps = 0 with a zero gradient, 0 / 0; that
    # case now takes no step: issue 12 item 11, tests/kernels/test_step_bound.py.)
    dim = 16
    rows, s = _table(bits, dim, seed=41)
    st1, st2 = allocate_state(OptimizerType.ADAGRAD, R, dim, DEV)
    ids, goff, w, grad = _batch(dim, seed=42)
    grad.view(-1, dim)[:, 3] = 1e30
    grad.view(-1, dim)[:, 10] = -1e30
    spec = UpdateSpec(
        bits, dim, OptimizerParams(OptimizerType.ADAGRAD, 1e10, eps=1e-8), 1, True, learn, 0.1, 4
    )
    (na, a), (nb, b) = _run_both((rows, s, st1, st2), ids, goff, w, grad, spec)
    assert na == nb == 0
    # equal up to NaN payloads (which differ between numpy, x86 and CUDA)
    if bits <= 8:
        assert torch.equal(a[0][:, 4:], b[0][:, 4:])  # the codes
        heads = [split_row(t, bits, dim)[0] for t in (a[0], b[0])]
        touched = torch.unique(ids)
        assert bool((split_row(b[0], bits, dim)[1][touched][:, [3, 10]] == 0).all())  # NaN -> q = 0
        assert bool(heads[0][touched].isnan().all()) == learn  # LSQ of a NaN row: NaN step
    else:
        heads = [dequantize_rows(t, bits, dim) for t in (a[0], b[0])]
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0, equal_nan=True)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_tree_row_sums_within_tolerance():
    """``exact_row_sums=False``: a tl.sum tree instead of the sequential sum over d.

    Tolerance: a sum of D fp32 terms in any order is within ``(D-1) * 2**-24 * sum|terms|``
    of the exact one, so (a) row-wise Adagrad's state (positive terms) is within
    ``D * 2**-23`` relative, and the rows' codes are equal but where ``x/s16 + u`` lies
    within that much of an integer (|code difference| <= 1, a tiny fraction of elements);
    (b) a learned step differs by at most ``step_lr * lsq_scale * D * 2**-23 * sum|g*dxs|``
    (+ one ulp of the step), its fp16 copy by at most one fp16 ulp, and with SGD (no other
    reduction) a row whose fp16 step matches is byte-for-byte equal; elsewhere codes move
    by at most 1.
    """
    n_diff = n_all = 0
    for bits in (8, 4, 2):
        for dim in (16, 32):
            seed = bits * 100 + dim
            # (a) row-wise Adagrad, fixed step
            rows, s = _table(bits, dim, seed=seed)
            st1, st2 = _states(OptimizerType.ROWWISE_ADAGRAD, dim, seed=seed)
            ids, goff, w, grad = _batch(dim, seed=seed + 1, n=40, max_id=R)
            spec = UpdateSpec(
                bits, dim, OptimizerParams(OptimizerType.ROWWISE_ADAGRAD, 0.05), 1, True, False, 0.0, key=seed
            )
            (na, a), (nb, b) = _run_both((rows, s, st1, st2), ids, goff, w, grad, spec, exact_row_sums=False)
            assert na == nb == 0
            rel = (a[2] - b[2]).abs() / a[2].abs()
            assert float(rel.max()) <= dim * 2.0**-23
            _, qa = split_row(a[0], bits, dim)
            _, qb = split_row(b[0], bits, dim)
            assert int((qa - qb).abs().max()) <= 1
            n_diff += int((qa != qb).sum())
            n_all += qa.numel()

            # (b) SGD with a learned step
            spec = UpdateSpec(
                bits, dim, OptimizerParams(OptimizerType.SGD, 0.05), 1, True, True, 0.2, key=seed
            )
            (na, a), (nb, b) = _run_both((rows, s, st1, st2), ids, goff, w, grad, spec, exact_row_sums=False)
            assert na == nb == 0
            # the terms of the LSQ sum, from the (identical) SGD-updated rows
            x0_s, x0_q = split_row(rows, bits, dim)
            g = torch.zeros(R, dim, device=DEV).index_add_(0, ids, grad.view(-1, dim)[goff // dim])
            x1 = x0_s[:, None] * x0_q.float() - 0.05 * g
            qmin, qmax = code_range(bits)
            v = x1 * (1.0 / s)[:, None]
            dxs = torch.where(
                v <= qmin, float(qmin), torch.where(v >= qmax, float(qmax), torch.floor(v + 0.5) - v)
            )
            bound = 0.2 * lsq_grad_scale(bits, dim) * dim * 2.0**-23 * (g * dxs).abs().sum(1)
            bound = bound + torch.finfo(torch.float32).eps * a[1].abs()
            assert bool(((a[1] - b[1]).abs() <= bound).all())
            sa, qa = split_row(a[0], bits, dim)
            sb, qb = split_row(b[0], bits, dim)
            same = sa == sb
            assert torch.equal(a[0][same], b[0][same])
            ulp16 = torch.finfo(torch.float16).eps * sa.abs()
            assert bool(((sa - sb).abs() <= ulp16).all())
            assert int((qa - qb).abs().max()) <= 1
            n_diff += int((qa != qb).sum())
            n_all += qa.numel()
    assert n_diff <= 0.02 * n_all

"""The reference update against independent fp32 math: one step equals the fp32 optimizer step
followed by rounding (exactly for nearest rounding), and stochastic write-back is unbiased."""

import pytest
import torch

from tests.helpers import call_update
from torchrec_lowprec.kernels.reference import reference_update
from torchrec_lowprec.kernels.spec import OptimizerParams, UpdateSpec
from torchrec_lowprec.optim.fused import allocate_state
from torchrec_lowprec.quant.layout import code_range, dequantize_rows, quantize_rows, row_bytes
from torchrec_lowprec.quant.lsq import MIN_STEP_SIZE, init_step_size, lsq_step_size_grad
from torchrec_lowprec.types import OptimizerType

R, D = 40, 16


def _stateless(rows, step_size, ids, grad_offsets, grad, spec):
    """The reference update of an optimizer without state (SGD), unweighted occurrences."""
    e = torch.empty(0)
    return call_update(reference_update, rows, step_size, e, e, ids, grad_offsets, e, grad, spec)


def _table(bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, D, generator=g) * 0.1
    s = init_step_size(x, bits, "absmax") if bits <= 8 else torch.empty(0)
    rows = quantize_rows(x, s, bits)
    return rows, s.to(torch.float16).float() if bits <= 8 else s


def _batch(seed=1, n=30):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, R // 2, (n,), generator=g)  # repeats on purpose
    grad = torch.randn(n * D, generator=g)
    return ids, torch.arange(n) * D, grad


def _row_grads(ids, grad):
    g = torch.zeros(R, D)
    g.index_add_(0, ids, grad.view(-1, D))
    return g


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", list(OptimizerType))
def test_one_step_equals_fp32_step_then_nearest_rounding(bits, kind):
    rows, s = _table(bits)
    x0 = dequantize_rows(rows, bits, D)
    ids, goff, grad = _batch()
    opt = OptimizerParams(kind, lr=0.05, eps=1e-8)
    st1, st2 = allocate_state(kind, R, D, torch.device("cpu"))
    spec = UpdateSpec(bits, D, opt, step=1, stochastic=False, learn_step_size=False, step_size_lr=0.0, key=1)
    assert (
        call_update(reference_update, rows, s.clone(), st1, st2, ids, goff, torch.empty(0), grad, spec) == 0
    )

    # Independent fp32 math, in float64 to be sure of the expectation, then nearest rounding.
    g = _row_grads(ids, grad).double()
    x = x0.double()
    if kind == OptimizerType.SGD:
        x1 = x - 0.05 * g
    elif kind == OptimizerType.ADAGRAD:
        x1 = x - 0.05 * g / (g.abs() + 1e-8)
    elif kind == OptimizerType.ROWWISE_ADAGRAD:
        h = (g * g).mean(dim=1, keepdim=True)
        x1 = x - 0.05 * g / (h.sqrt() + 1e-8)
    else:  # Adam, first step: m/bc1 = g, v/bc2 = g^2
        x1 = x - 0.05 * g / (g.abs() + 1e-8)
    touched = torch.zeros(R, dtype=torch.bool)
    touched[ids] = True
    qmin, qmax = code_range(bits)
    want_q = torch.clamp(torch.floor(x1 / s.double()[:, None] + 0.5), qmin, qmax)
    got = dequantize_rows(rows, bits, D)
    got_q = torch.round(got / s[:, None]).double()
    # fp32 vs fp64 can only differ where x1/s lies within rounding error of a .5 boundary.
    frac = (x1 / s.double()[:, None]) - torch.floor(x1 / s.double()[:, None])
    safe = (frac - 0.5).abs() > 1e-4
    assert torch.equal(got_q[touched][safe[touched]], want_q[touched][safe[touched]])
    assert torch.equal(got[~touched], x0[~touched])  # untouched rows are not rewritten


def test_sgd_exact_on_dyadic_values():
    # With values, grads and lr that are exact in fp32, the step is exact and nearest
    # rounding reproduces it bit for bit.
    bits = 8
    s = torch.full((R,), 0.5)
    q0 = torch.randint(-60, 60, (R, D))
    rows = quantize_rows(q0.float() * 0.5, s, bits)
    ids = torch.tensor([3, 5, 3])
    grad = torch.randint(-4, 5, (3 * D,)).float()
    spec = UpdateSpec(bits, D, OptimizerParams(OptimizerType.SGD, lr=0.5), 1, False, False, 0.0, 9)
    _stateless(rows, s.clone(), ids, torch.arange(3) * D, grad, spec)
    want = q0.float() * 0.5
    g = _row_grads(ids, grad)
    want = want - 0.5 * g
    assert torch.equal(dequantize_rows(rows, bits, D), want)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_alpt_order_update_row_then_step_then_round(bits):
    rows, s = _table(bits, seed=3)
    master = s.clone()
    x0 = dequantize_rows(rows, bits, D)
    ids, goff, grad = _batch(seed=4)
    opt = OptimizerParams(OptimizerType.SGD, lr=0.01)
    spec = UpdateSpec(bits, D, opt, 1, stochastic=False, learn_step_size=True, step_size_lr=0.1, key=2)
    call_update(
        reference_update, rows, master, torch.empty(0), torch.empty(0), ids, goff, torch.empty(0), grad, spec
    )
    touched = torch.unique(ids)
    g = _row_grads(ids, grad)[touched]
    x1 = x0[touched] - 0.01 * g
    s_new = torch.clamp(s[touched] - 0.1 * lsq_step_size_grad(x1, s[touched], g, bits), min=MIN_STEP_SIZE)
    assert torch.allclose(master[touched], s_new, rtol=1e-6)
    assert not torch.equal(master[touched], s[touched])  # the step size did move
    s16 = s_new.to(torch.float16).float()
    qmin, qmax = code_range(bits)
    q = torch.clamp(torch.floor(x1 * (1 / s16)[:, None] + 0.5), qmin, qmax)
    assert torch.equal(dequantize_rows(rows, bits, D)[touched], s16[:, None] * q)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stochastic_write_back_is_unbiased(bits):
    # The same fp32 update written back with 2000 different steps (different draws): the mean
    # of the stored values equals the fp32 result to within the sampling error.
    rows0, s = _table(bits, seed=5)
    ids = torch.arange(8)
    grad = torch.randn(8 * D) * 0.3
    opt = OptimizerParams(OptimizerType.SGD, lr=0.01)
    n = 2000
    acc = torch.zeros(8, D, dtype=torch.float64)
    for step in range(1, n + 1):
        rows = rows0.clone()
        spec = UpdateSpec(bits, D, opt, step, True, False, 0.0, key=step * 7919)
        _stateless(rows, s.clone(), ids, ids * D, grad, spec)
        acc += dequantize_rows(rows[:8], bits, D).double()
    x1 = dequantize_rows(rows0[:8], bits, D).double() - 0.01 * grad.view(8, D).double()
    qmin, qmax = code_range(bits)
    inside = ((x1 / s[:8, None].double()) > qmin) & ((x1 / s[:8, None].double()) < qmax)
    err = (acc / n - x1)[inside] / s[:8, None].double().expand_as(x1)[inside]
    assert err.abs().max() < 5 * 0.5 / n**0.5  # in units of the step: sd <= 0.5/sqrt(n)
    assert abs(err.mean()) < 0.01


def test_nonfinite_gradient_rows_are_skipped():
    rows, s = _table(8)
    before = rows.clone()
    ids = torch.tensor([1, 2, 2])
    grad = torch.randn(3 * D)
    grad[D + 3] = float("nan")  # row 2, first occurrence
    st1, st2 = allocate_state(OptimizerType.ROWWISE_ADAGRAD, R, D, torch.device("cpu"))
    spec = UpdateSpec(8, D, OptimizerParams(OptimizerType.ROWWISE_ADAGRAD, 0.1), 1, True, True, 1e-3, 3)
    master = s.clone()
    assert (
        call_update(
            reference_update, rows, master, st1, st2, ids, torch.arange(3) * D, torch.empty(0), grad, spec
        )
        == 1
    )
    assert torch.equal(rows[2], before[2]) and st1[2] == 0 and master[2] == s[2]
    assert not torch.equal(rows[1], before[1]) and st1[1] > 0


def test_row_bytes_only_are_written():
    rows, s = _table(4)
    wide = torch.full((R, row_bytes(4, D) + 5), 0xAB, dtype=torch.uint8)
    wide[:, : row_bytes(4, D)] = rows
    ids, goff, grad = _batch()
    spec = UpdateSpec(4, D, OptimizerParams(OptimizerType.SGD, 0.1), 1, True, False, 0.0, 4)
    call_update(
        reference_update, wide, s, torch.empty(0), torch.empty(0), ids, goff, torch.empty(0), grad, spec
    )
    assert bool((wide[:, row_bytes(4, D) :] == 0xAB).all())


def test_dithered_rounding_tracks_a_steady_update_where_stochastic_random_walks():
    # Every element of 64 rows gets the same update, a quarter of a grid step, 16 steps in a
    # row (SGD, fixed step, no growth): the ideal row moves 4 steps. Stochastic rounding moves
    # each element Binomial(16, 1/4) steps (sd sqrt(3)); dithered draws frac(c + step * 0.618)
    # hit [0.75, 1) in 4 +- 1 of 16 steps whatever c is, so every element moves 3 to 5 steps
    # and the mean over elements stays unbiased.
    from torchrec_lowprec.quant.layout import encode_rows
    from torchrec_lowprec.quant.rounding import dither_offset, hash_key

    rows_n, step = 64, 0.125
    ids = torch.arange(rows_n)
    grad = torch.full((rows_n * D,), -1.0)  # x -= lr * g: +lr per step
    moved = {}
    for mode in ("stochastic", "dithered"):
        rows = encode_rows(torch.full((rows_n, D), -8), torch.full((rows_n,), step), 4)
        start = dequantize_rows(rows, 4, D)
        for t in range(1, 17):
            spec = UpdateSpec(
                4, D, OptimizerParams(OptimizerType.SGD, lr=step / 4), t, True, False, 0.0,
                key=hash_key(3, 5, 0 if mode == "dithered" else t), dither=dither_offset(t) if mode == "dithered" else 0,
            )  # fmt: skip
            _stateless(rows, torch.empty(0), ids, ids * D, grad, spec)
        moved[mode] = (dequantize_rows(rows, 4, D) - start) / step
    assert moved["dithered"].min() >= 3 and moved["dithered"].max() <= 5
    assert abs(moved["dithered"].mean() - 4) < 0.1 and abs(moved["stochastic"].mean() - 4) < 0.3
    assert moved["stochastic"].std() > 2.5 * moved["dithered"].std()  # measured 1.75 vs 0.59

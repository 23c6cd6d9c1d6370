"""Issue 12 items 10 and 11 (kernel side).

10: a b-bit row stores ``bias = -2**(b-1) * scale`` in fp16, so a step above
``max_step_size(b) = 65504 / 2**(b-1)`` makes the bias -inf and FBGEMM's forward reads
-inf/NaN while our decoder (``scale * q``) reads finite values. Every kernel clamps the step at
that bound and counts the rows that hit it; at the bound FBGEMM's forward equals our decoder.

11: ``eps = 0`` with an exactly-zero gradient (zero optimizer state) made ``0/0`` in Adagrad,
RowWiseAdagrad and Adam; the kernels now take no step there (rows unchanged, no NaN).

Each case runs on every backend available here (reference, native CPU, Triton interpreter)
and checks they agree bit for bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode  # noqa: E402

from tests.helpers import call_update  # noqa: E402
from torchrec_lowprec.kernels import cpu_native  # noqa: E402
from torchrec_lowprec.kernels.lookup import FeatureSlot, FusedPooledLookup  # noqa: E402
from torchrec_lowprec.kernels.reference import reference_update  # noqa: E402
from torchrec_lowprec.kernels.spec import OptimizerParams, UpdateSpec  # noqa: E402
from torchrec_lowprec.quant.layout import (  # noqa: E402
    code_range,
    dequantize_rows,
    encode_rows,
    max_step_size,
    quantize_rows,
)
from torchrec_lowprec.quant.lsq import init_step_size  # noqa: E402
from torchrec_lowprec.types import OptimizerType

INT_BITS = (8, 4, 2)
DIM = 16


def _backends():
    out = [("reference", reference_update)]
    if cpu_native.is_available():
        out.append(("cpu_native", cpu_native.fused_update))
    try:
        from torchrec_lowprec.kernels import triton_update

        if triton_update.is_available():
            out.append(("triton", triton_update.fused_update))
    except ImportError:
        pass
    return out


BACKENDS = _backends()


def fbgemm_rows_forward(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """FBGEMM's IntNBit forward of each stored row alone (one id per bag): ``[N, DIM]``."""
    n = rows.shape[0]
    lookup = FusedPooledLookup([FeatureSlot(0, bits, DIM)], PoolingMode.SUM, 1, torch.device("cpu"))
    ids = torch.arange(n, dtype=torch.int32)
    offsets = torch.arange(n + 1, dtype=torch.int32)
    return lookup(rows.contiguous().reshape(-1), ids, offsets, None)


def all_codes_rows(step: float, bits: int) -> torch.Tensor:
    """Rows at fp16 step ``step`` holding every code of the grid, the extremes included."""
    qmin, qmax = code_range(bits)
    q = torch.arange(DIM) % (qmax - qmin + 1) + qmin
    q = torch.stack([q, q.flip(0)])
    q[:, 0], q[:, 1] = qmin, qmax
    return encode_rows(q, torch.full((2,), step), bits)


@pytest.mark.parametrize("bits", INT_BITS)
def test_bound_is_the_tightest_fbgemm_keeps_finite(bits):
    bound = max_step_size(bits)
    assert bound == {8: 511.75, 4: 8188.0, 2: 32752.0}[bits]
    assert float(torch.tensor(bound).half()) == bound  # an fp16 value: clamping then rounding keeps it
    at = all_codes_rows(bound, bits)
    out = fbgemm_rows_forward(at, bits)
    assert torch.isfinite(out).all()
    assert torch.equal(out, dequantize_rows(at, bits, DIM))  # FBGEMM reads what our decoder reads
    # the next fp16 above the bound: the bias overflows and FBGEMM's forward is no longer finite
    above = float(torch.nextafter(torch.tensor(bound).half(), torch.tensor(float("inf")).half()))
    out = fbgemm_rows_forward(all_codes_rows(above, bits), bits)
    assert not torch.isfinite(out).all()


def _table(bits: int, n: int, opt: OptimizerType, scale: float = 0.1):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(n, DIM, generator=g) * scale
    step = init_step_size(x, bits, "lsq")
    rows = quantize_rows(x, step, bits)
    if opt == OptimizerType.ROWWISE_ADAGRAD:
        s1, s2 = torch.zeros(n), torch.empty(0)
    elif opt == OptimizerType.ADAGRAD:
        s1, s2 = torch.zeros(n, DIM), torch.empty(0)
    elif opt == OptimizerType.ADAM:
        s1, s2 = torch.zeros(n, DIM), torch.zeros(n, DIM)
    else:
        s1, s2 = torch.empty(0), torch.empty(0)
    return [rows, step, s1, s2]


def _run_all(table, ids, goff, grad, spec):
    """Run every backend on clones; assert identical bits; return (skipped, bounded, tensors)."""
    results = []
    for name, fn in BACKENDS:
        t = [x.clone() for x in table]
        bounded = torch.zeros(1, dtype=torch.int64)
        skipped = call_update(fn, *t, ids, goff, torch.empty(0), grad, spec, bounded)
        results.append((name, skipped, int(bounded[0]), t))
    _, k0, b0, t0 = results[0]
    for name, k, b, t in results[1:]:
        assert (k, b) == (k0, b0), name
        for a, c in zip(t0, t):
            assert torch.equal(a, c), name
    return k0, b0, t0


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("mode", ["learn", "grow", "learn+grow"])
def test_step_clamped_at_bound_counted_and_fbgemm_finite(bits, mode):
    n = 6
    table = _table(bits, n, OptimizerType.SGD)
    learn, grow = "learn" in mode, "grow" in mode
    # SGD with lr 1e3 on a gradient of -1e3: the rows jump to ~1e6, far off any fp16-stored grid;
    # the LSQ gradient then pushes the learned step up by ~1e6 too, and growth asks for 1e6/Qp.
    spec = UpdateSpec(
        bits=bits, dim=DIM, optimizer=OptimizerParams(OptimizerType.SGD, 1e3, eps=1e-8), step=1,
        stochastic=True, learn_step_size=learn, step_size_lr=1e3 if learn else 0.0, key=7, grow_step=grow,
    )  # fmt: skip
    ids = torch.tensor([0, 2, 4, 5], dtype=torch.int64)
    grad = torch.full((4, DIM), -1e3)
    goff = torch.arange(4, dtype=torch.int64) * DIM
    skipped, bounded, (rows, step, _, _) = _run_all(table, ids, goff, grad, spec)
    assert skipped == 0
    assert bounded == 4
    bound = max_step_size(bits)
    scales = rows[:, 0:2].contiguous().view(torch.float16).float().reshape(-1)
    assert torch.equal(scales[ids], torch.full((4,), bound))
    if learn:
        assert torch.equal(step[ids], torch.full((4,), bound))
    out = fbgemm_rows_forward(rows, bits)
    assert torch.isfinite(out).all()
    assert torch.equal(out, dequantize_rows(rows, bits, DIM))
    # untouched rows are not counted; a step below the bound is not counted
    small = UpdateSpec(
        bits=bits, dim=DIM, optimizer=OptimizerParams(OptimizerType.SGD, 1e-3), step=2, stochastic=True,
        learn_step_size=learn, step_size_lr=1e-3 if learn else 0.0, key=7, grow_step=grow,
    )  # fmt: skip
    _, bounded, _ = _run_all(_table(bits, n, OptimizerType.SGD), ids, goff, grad * 1e-6, small)
    assert bounded == 0


@pytest.mark.parametrize("bits", (8, 4, 2, 16, 32))
@pytest.mark.parametrize(
    "opt", [OptimizerType.ADAGRAD, OptimizerType.ROWWISE_ADAGRAD, OptimizerType.ADAM], ids=lambda o: o.value
)
def test_eps_zero_with_zero_gradient_keeps_rows(bits, opt):
    n = 5
    if bits <= 8:
        table = _table(bits, n, opt)
    else:
        x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(3)) * 0.1
        table = [quantize_rows(x, None, bits), torch.empty(0), *_table(8, n, opt)[2:]]
    learn = bits <= 8  # ALPT on the integer widths
    spec = UpdateSpec(
        bits=bits, dim=DIM, optimizer=OptimizerParams(opt, 0.1, eps=0.0), step=1, stochastic=False,
        learn_step_size=learn, step_size_lr=1e-2, key=11,
    )  # fmt: skip
    ids = torch.tensor([1, 3, 3], dtype=torch.int64)
    grad = torch.zeros(3, DIM)
    goff = torch.arange(3, dtype=torch.int64) * DIM
    skipped, _, (rows, step, s1, s2) = _run_all(table, ids, goff, grad, spec)
    assert skipped == 0
    assert torch.equal(rows, table[0])  # no step taken: every byte unchanged (no NaN)
    assert torch.isfinite(dequantize_rows(rows, bits, DIM)).all()
    if learn:
        assert torch.equal(step, table[1])
    for s in (s1, s2):
        assert torch.isfinite(s).all()
    # a nonzero gradient with eps = 0 still moves the rows (the guard only catches 0/0)
    grad[:, 0] = 1.0
    _, _, (rows2, _, _, _) = _run_all(table, ids, goff, grad, spec)
    assert not torch.equal(rows2, table[0])
    assert torch.isfinite(dequantize_rows(rows2, bits, DIM)).all()


@pytest.mark.parametrize("bits", INT_BITS)
def test_module_counts_rows_at_the_bound_and_forward_stays_finite(bits):
    import torchrec

    import torchrec_lowprec as lp

    tables = [
        torchrec.EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=10, feature_names=["f0"])
    ]
    cfg = lp.LowPrecisionConfig(bits=bits, optimizer="sgd", learning_rate=1e3, step_size_lr=1e3)
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=cfg)
    kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(
        ["f0"], torch.tensor([1, 4, 4, 7]), torch.tensor([1, 2, 1])
    )
    ebc(kjt).values().backward(torch.full((3, DIM), -1e3))
    assert ebc.step_bound_rows() == {"t0": 3}  # rows 1, 4, 7
    out = ebc(kjt).values()
    assert torch.isfinite(out).all()
    assert out.abs().max() > 1e4  # the rows really are that large, not zeroed


def test_table_buffer_is_zeroed_writable_and_huge_page_advised():
    from torchrec_lowprec.kernels.lookup import HUGE_PAGE_BYTES, table_buffer

    small = table_buffer(1000, "cpu")
    assert small.dtype == torch.uint8 and small.shape == (1000,) and not small.any()
    big = table_buffer(4 * HUGE_PAGE_BYTES, "cpu")
    assert big.shape == (4 * HUGE_PAGE_BYTES,) and not big.any()
    big[123] = 7
    assert int(big.sum()) == 7
    # the mapping is advised MADV_HUGEPAGE (VmFlags "hg") where the kernel has the flag
    addr, advised, cur = big.data_ptr(), None, False
    try:
        smaps = open("/proc/self/smaps").read().splitlines()
    except OSError:
        pytest.skip("no /proc/self/smaps")
    for line in smaps:
        head = line.split()
        if head and "-" in head[0] and len(head) > 4:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            cur = lo <= addr < hi
        elif cur and head and head[0] == "VmFlags:":
            advised = "hg" in head[1:]
    assert advised is True

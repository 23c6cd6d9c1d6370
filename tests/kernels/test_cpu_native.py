"""The native CPU fused update is bit-identical to the PyTorch reference.

Every comparison starts both backends from identical clones and checks the stored rows (all
bytes), the step sizes and the optimizer states with ``torch.equal``.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tests.helpers import as_updates, call_update
from torchrec_lowprec.kernels import cpu_native
from torchrec_lowprec.kernels.reference import reference_update
from torchrec_lowprec.kernels.spec import OptimizerParams, UpdateSpec
from torchrec_lowprec.quant.layout import code_range, quantize_rows, row_bytes, unpack_codes
from torchrec_lowprec.quant.lsq import init_step_size
from torchrec_lowprec.quant.rounding import dither_offset
from torchrec_lowprec.types import OptimizerType

if not cpu_native.is_available():
    pytest.skip(f"native CPU kernel not available: {cpu_native.load_error()}", allow_module_level=True)

BITS = (8, 4, 2, 16, 32)
OPTIMIZERS = tuple(OptimizerType)
EMPTY = torch.empty(0)


def make_table(bits: int, num_rows: int, dim: int, opt: OptimizerType, seed: int, scale: float = 0.1):
    """Quantized rows, fp32 master step sizes and optimizer states, as a module would hold them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, dim, generator=g) * scale
    if bits <= 8:
        step = init_step_size(x, bits, "lsq")
        rows = quantize_rows(x, step, bits)
    else:
        step = EMPTY.clone()
        rows = quantize_rows(x, None, bits)
    if opt == OptimizerType.ROWWISE_ADAGRAD:
        s1, s2 = torch.rand(num_rows, generator=g) * 0.1, EMPTY.clone()
    elif opt == OptimizerType.ADAGRAD:
        s1, s2 = torch.rand(num_rows, dim, generator=g) * 0.1, EMPTY.clone()
    elif opt == OptimizerType.ADAM:
        s1 = torch.randn(num_rows, dim, generator=g) * 0.01
        s2 = torch.rand(num_rows, dim, generator=g) * 0.01
    else:
        s1, s2 = EMPTY.clone(), EMPTY.clone()
    return rows, step, s1, s2


def make_batch(num_rows: int, dim: int, seed: int, n_random: int = 120, weights: bool = True):
    """Occurrences with repeats: one row hit many times, several rows hit by several bags.

    ``grad`` is ``[bags, features * dim]`` and each occurrence points at a ``[bag, feature]`` slice.
    """
    g = torch.Generator().manual_seed(seed)
    bags, feats = 32, 4
    hot = [3] * 25
    multi = [r for r in range(5, 11) for _ in range(4)]
    rand = torch.randint(0, num_rows, (n_random,), generator=g).tolist()
    ids = torch.tensor(hot + multi + rand, dtype=torch.int64)
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    n = ids.numel()
    bag = torch.randint(0, bags, (n,), generator=g)
    feat = torch.randint(0, feats, (n,), generator=g)
    offsets = bag * (feats * dim) + feat * dim
    grad = torch.randn(bags, feats * dim, generator=g)
    w = (torch.rand(n, generator=g) * 2 - 0.5) if weights else EMPTY
    return ids, offsets, w, grad


def make_spec(
    bits, dim, opt, stochastic, learn, *, step=3, wd=0.01, lr=0.05, key=0x2545F491, ro=0, co=0, grow=False
):
    return UpdateSpec(
        bits=bits,
        dim=dim,
        optimizer=OptimizerParams(opt, lr, weight_decay=wd),
        step=step,
        stochastic=stochastic,
        learn_step_size=learn,
        step_size_lr=1e-2,
        key=key,
        row_offset=ro,
        col_offset=co,
        grow_step=grow,
    )


def run_both(table, batch, spec, rows_view=None):
    """Run reference and native on clones of ``table``; return both (skipped, tensors)."""
    ref = [t.clone() for t in table]
    nat = [t.clone() for t in table]
    if rows_view is not None:
        nat[0] = rows_view(nat[0])
    k_ref = call_update(reference_update, *ref, *batch, spec)
    k_nat = call_update(cpu_native.fused_update, *nat, *batch, spec)
    return (k_ref, ref), (k_nat, nat)


def assert_same(a, b):
    (k_ref, ref), (k_nat, nat) = a, b
    assert k_ref == k_nat
    names = ("rows", "step_size", "state1", "state2")
    for name, r, n in zip(names, ref, nat):
        assert r.shape == n.shape, name
        assert torch.equal(r, n), f"{name} differs in {(r != n).sum().item()} places"


@pytest.mark.parametrize("learn", [True, False], ids=["learn", "fixed"])
@pytest.mark.parametrize("stochastic", [True, False], ids=["sr", "nearest"])
@pytest.mark.parametrize("opt", OPTIMIZERS, ids=[o.value for o in OPTIMIZERS])
@pytest.mark.parametrize("bits", BITS)
def test_matches_reference(bits, opt, stochastic, learn):
    # Three consecutive updates (states and step sizes evolve, Adam's bias corrections change),
    # with weight decay, occurrence weights, repeated ids and nonzero row/col offsets.
    for i, dim in enumerate((8, 16, 64)):
        seed = 1000 * bits + 10 * i + OPTIMIZERS.index(opt)
        table = make_table(bits, 50, dim, opt, seed)
        ref, nat = [t.clone() for t in table], [t.clone() for t in table]
        for step in (1, 2, 3):
            batch = make_batch(50, dim, seed + step)
            # lr 0.2 moves rows past their grid: step-size growth (dims 8 and 64) triggers.
            spec = make_spec(
                bits, dim, opt, stochastic, learn, step=step, lr=0.2, key=seed * 7 + step, ro=11, co=5,
                grow=i != 1,
            )  # fmt: skip
            k_ref = call_update(reference_update, *ref, *batch, spec)
            k_nat = call_update(cpu_native.fused_update, *nat, *batch, spec)
            assert_same((k_ref, ref), (k_nat, nat))
        assert any(not torch.equal(a, b) for a, b in zip(nat, table))  # something was updated


@pytest.mark.parametrize("opt", [OptimizerType.ROWWISE_ADAGRAD, OptimizerType.ADAM], ids=["rowwise", "adam"])
@pytest.mark.parametrize("bits", BITS)
def test_dithered_draws_match_reference(bits, opt):
    # rounding="dithered": a key fixed over steps and a 24-bit golden-ratio offset per step
    # (spec step 6), including offsets whose sum with the hash wraps modulo 2**24.
    dim = 16
    seed = 77 * bits + OPTIMIZERS.index(opt)
    table = make_table(bits, 50, dim, opt, seed)
    ref, nat = [t.clone() for t in table], [t.clone() for t in table]
    for step in (1, 2, 3, 1000):
        batch = make_batch(50, dim, seed + step)
        spec = dataclasses.replace(
            make_spec(bits, dim, opt, True, True, step=step, lr=0.2, key=seed, ro=3, co=2, grow=True),
            dither=dither_offset(step) if step != 1000 else 0xFFFFFF,
        )
        k_ref = call_update(reference_update, *ref, *batch, spec)
        k_nat = call_update(cpu_native.fused_update, *nat, *batch, spec)
        assert_same((k_ref, ref), (k_nat, nat))
    if bits <= 16:  # the offset changes the draws (offset 0: plain stochastic rounding)
        a, b = [t.clone() for t in table], [t.clone() for t in table]
        batch = make_batch(50, dim, seed)
        spec = make_spec(bits, dim, opt, True, True, lr=0.2, key=seed)
        call_update(cpu_native.fused_update, *a, *batch, spec)
        call_update(cpu_native.fused_update, *b, *batch, dataclasses.replace(spec, dither=1 << 23))
        assert not torch.equal(a[0], b[0])


@pytest.mark.parametrize("bits", BITS)
def test_no_weights_no_decay(bits):
    for opt in OPTIMIZERS:
        table = make_table(bits, 40, 16, opt, seed=7)
        batch = make_batch(40, 16, seed=8, weights=False)
        spec = make_spec(bits, 16, opt, True, True, wd=0.0)
        assert_same(*run_both(table, batch, spec))


@pytest.mark.parametrize("bits", BITS)
def test_strided_rows(bits):
    dim, num_rows = 16, 30
    nbytes = row_bytes(bits, dim)
    table = make_table(bits, num_rows, dim, OptimizerType.ROWWISE_ADAGRAD, seed=3)
    batch = make_batch(num_rows, dim, seed=4)
    spec = make_spec(bits, dim, OptimizerType.ROWWISE_ADAGRAD, True, True)

    def wide(rows):  # a [:, :row_bytes] slice of a wider buffer whose tail must stay untouched
        buf = torch.full((num_rows, nbytes + 13), 0xAB, dtype=torch.uint8)
        view = buf[:, :nbytes]
        view.copy_(rows)
        return view

    def offset(rows):  # rows at an odd offset into a flat buffer (unaligned), padded stride
        stride = nbytes + 3
        flat = torch.full((5 + num_rows * stride,), 0xCD, dtype=torch.uint8)
        view = flat[5:].view(num_rows, stride)[:, :nbytes]
        view.copy_(rows)
        return view

    for make_view in (wide, offset):
        ref_out, nat_out = run_both(table, batch, spec, rows_view=make_view)
        view = nat_out[1][0]
        assert view.stride(0) > nbytes
        assert_same(ref_out, (nat_out[0], [view.contiguous()] + nat_out[1][1:]))
        full = view.as_strided((num_rows, view.stride(0)), (view.stride(0), 1))
        assert bool((full[:, nbytes:] == (0xAB if make_view is wide else 0xCD)).all())


def test_empty_ids():
    for bits in BITS:
        table = make_table(bits, 20, 8, OptimizerType.ADAM, seed=5)
        nat = [t.clone() for t in table]
        ids = torch.empty(0, dtype=torch.int64)
        spec = make_spec(bits, 8, OptimizerType.ADAM, True, True)
        assert (
            call_update(cpu_native.fused_update, *nat, ids, ids.clone(), EMPTY, torch.randn(4, 8), spec) == 0
        )
        for a, b in zip(table, nat):
            assert torch.equal(a, b)


def test_shard_without_rows():
    # A shard that holds no rows of the table: empty rows, step sizes and states are valid.
    for bits in BITS:
        for opt in OPTIMIZERS:
            rows = torch.empty(0, row_bytes(bits, 8), dtype=torch.uint8)
            s1 = torch.empty(0) if opt == OptimizerType.ROWWISE_ADAGRAD else torch.empty(0, 8)
            table = (rows, torch.empty(0), s1, torch.empty(0, 8))
            ids = torch.empty(0, dtype=torch.int64)
            spec = make_spec(bits, 8, opt, True, True)
            assert (
                call_update(cpu_native.fused_update, *table, ids, ids.clone(), EMPTY, torch.randn(4, 8), spec)
                == 0
            )


@pytest.mark.parametrize("bits", BITS)
def test_non_finite_rows_skipped(bits):
    dim = 16
    for opt in OPTIMIZERS:
        table = make_table(bits, 30, dim, opt, seed=9)
        ids, offsets, w, grad = make_batch(30, dim, seed=10)
        # Poison every occurrence of three rows: a NaN in one, +Inf in another, and +Inf / -Inf
        # in different occurrences of the third (each occurrence finite-weighted, sum non-finite).
        bad_nan, bad_inf, bad_mix = int(ids[0]), int(ids[1]), int(ids[2])
        assert len({bad_nan, bad_inf, bad_mix}) == 3
        bad = (ids == bad_nan) | (ids == bad_inf) | (ids == bad_mix)
        flat = grad.reshape(-1)
        clean = flat.numel()  # healthy occurrences that share a poisoned slice move to a clean one
        grad = torch.cat([flat, torch.randn(dim, generator=torch.Generator().manual_seed(1))])
        poisoned = set(offsets[bad].tolist())
        offsets = torch.tensor(
            [clean if (not b and o in poisoned) else o for o, b in zip(offsets.tolist(), bad)]
        )
        mix_seen = 0
        for i, r in enumerate(ids.tolist()):
            if r == bad_nan:
                grad[offsets[i] + 3] = float("nan")
            elif r == bad_inf:
                grad[offsets[i] + 5] = float("inf")
            elif r == bad_mix:
                grad[offsets[i] + 1] = float("inf") if mix_seen % 2 == 0 else float("-inf")
                mix_seen += 1
        w = w.abs() + 0.1
        a, b = run_both(table, (ids, offsets, w, grad), spec=make_spec(bits, dim, opt, True, True))
        assert_same(a, b)
        assert b[0] == 3
        nat = b[1]
        for r in (bad_nan, bad_inf, bad_mix):
            assert torch.equal(nat[0][r], table[0][r])
            for t, t0 in zip(nat[1:], table[1:]):
                if t.numel():
                    assert torch.equal(t[r], t0[r])
        assert not torch.equal(nat[0], table[0])  # the healthy rows were updated


def test_offsets_change_draws_like_reference():
    dim = 16
    table = make_table(8, 40, dim, OptimizerType.SGD, seed=11)
    batch = make_batch(40, dim, seed=12)
    outs = []
    for ro, co in ((0, 0), (1000, 0), (0, 64), (2**33 + 5, 2**31 + 3)):
        spec = make_spec(8, dim, OptimizerType.SGD, True, False, ro=ro, co=co)
        a, b = run_both(table, batch, spec)
        assert_same(a, b)
        outs.append(b[1][0])
    for x, y in itertools.combinations(outs, 2):
        assert not torch.equal(x, y)


def test_extreme_values_saturate_like_reference():
    # Huge gradients: codes clamp at the grid ends, step sizes clamp at [MIN, MAX], fp16 rows overflow.
    dim = 16
    for bits in BITS:
        for opt in (OptimizerType.SGD, OptimizerType.ADAGRAD):
            table = make_table(bits, 20, dim, opt, seed=13)
            ids, offsets, w, grad = make_batch(20, dim, seed=14)
            grad = grad * 1e4
            for step_lr in (1e3, -1e3):
                spec = UpdateSpec(
                    bits, dim, OptimizerParams(opt, 50.0), 1, True, True, step_lr, key=99, row_offset=0
                )
                assert_same(*run_both(table, (ids, offsets, w, grad), spec))


def test_many_rows_parallel_and_threads():
    # Enough touched rows for the multi-chunk (parallel) path; large ids (3 radix passes).
    dim, num_rows, n = 8, (1 << 22) + 3, 6000
    g = torch.Generator().manual_seed(15)
    ids = torch.cat(
        [torch.randint(0, 3000, (n // 2,), generator=g), torch.randint(0, num_rows, (n // 2,), generator=g)]
    )
    ids[:50] = num_rows - 1
    touched = torch.unique(ids)
    x = torch.randn(touched.numel(), dim, generator=g) * 0.1
    step_t = init_step_size(x, 8, "lsq")
    rows = torch.zeros(num_rows, row_bytes(8, dim), dtype=torch.uint8)
    rows[touched] = quantize_rows(x, step_t, 8)
    step = torch.ones(num_rows)
    step[touched] = step_t
    s1 = torch.zeros(num_rows)
    grad = torch.randn(512, 4 * dim, generator=g)
    offsets = (
        torch.randint(0, 512, (n,), generator=g) * (4 * dim) + torch.randint(0, 4, (n,), generator=g) * dim
    )
    batch = (ids, offsets, EMPTY, grad)
    spec = make_spec(8, dim, OptimizerType.ROWWISE_ADAGRAD, True, True)
    table = (rows, step, s1, EMPTY)
    a, _ = run_both(table, batch, spec)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            nat = [x.clone() for x in table]
            k = call_update(cpu_native.fused_update, *nat, *batch, spec)
            assert_same(a, (k, nat))
    finally:
        torch.set_num_threads(threads)


def test_int32_indices():
    table = make_table(4, 30, 16, OptimizerType.ADAM, seed=18)
    ids, offsets, w, grad = make_batch(30, 16, seed=19)
    spec = make_spec(4, 16, OptimizerType.ADAM, True, True)
    a, _ = run_both(table, (ids, offsets, w, grad), spec)
    nat = [t.clone() for t in table]
    k = call_update(
        cpu_native.fused_update, *nat, ids.to(torch.int32), offsets.to(torch.int32), w, grad, spec
    )
    assert_same(a, (k, nat))


def test_rejects_bad_inputs():
    dim = 8
    rows, step, s1, s2 = make_table(8, 20, dim, OptimizerType.ROWWISE_ADAGRAD, seed=16)
    ids, offsets, w, grad = make_batch(20, dim, seed=17, n_random=5)
    spec = make_spec(8, dim, OptimizerType.ROWWISE_ADAGRAD, True, True)
    with pytest.raises(RuntimeError, match="rows must be uint8"):
        call_update(cpu_native.fused_update, rows.float(), step, s1, s2, ids, offsets, w, grad, spec)
    with pytest.raises(RuntimeError, match="ids must be in"):
        call_update(cpu_native.fused_update, rows, step, s1, s2, ids + 20, offsets, w, grad, spec)
    with pytest.raises(RuntimeError, match="grad_offsets must be in"):
        call_update(cpu_native.fused_update, rows, step, s1, s2, ids, offsets + grad.numel(), w, grad, spec)
    with pytest.raises(RuntimeError, match="state1 must have shape"):
        call_update(cpu_native.fused_update, rows, step, s1[:5], s2, ids, offsets, w, grad, spec)
    with pytest.raises(RuntimeError, match="step_size"):
        call_update(cpu_native.fused_update, rows, EMPTY, s1, s2, ids, offsets, w, grad, spec)
    with pytest.raises(RuntimeError, match="ids must be a 1-D int64"):
        call_update(cpu_native.fused_update, rows, step, s1, s2, ids.float(), offsets, w, grad, spec)
    with pytest.raises(RuntimeError, match="occ_weights"):
        call_update(cpu_native.fused_update, rows, step, s1, s2, ids, offsets, w[:3], grad, spec)


# ----- fused_update_many: many tables in one call -----

# (bits, dim, optimizer, stochastic, learn_step_size, weighted, kind); kind: "" (plain),
# "big" (> 256 touched rows: several work chunks), "empty" (no ids), "nan" (one row's
# gradient is NaN: skipped).
MANY_TABLES = (
    (8, 16, OptimizerType.ROWWISE_ADAGRAD, True, True, True, "big"),
    (4, 8, OptimizerType.ADAM, False, True, False, ""),
    (2, 16, OptimizerType.ADAGRAD, True, False, True, ""),
    (16, 8, OptimizerType.SGD, True, False, True, ""),
    (32, 24, OptimizerType.ADAM, False, False, False, ""),
    (4, 32, OptimizerType.ROWWISE_ADAGRAD, True, True, True, "empty"),
    (8, 8, OptimizerType.SGD, False, True, False, "nan"),
    (2, 8, OptimizerType.ROWWISE_ADAGRAD, False, True, True, ""),
    (16, 16, OptimizerType.ADAGRAD, False, False, False, "big"),
)


def make_many(seed: int, step: int, tables=MANY_TABLES):
    """Tables and their occurrences, all pointing into one shared ``grad`` ``[bags + 1, sum(dims)]``.

    Each table reads its own column range of ``grad`` (as a module's tables do); the extra
    last bag row is NaN, read only by the occurrences of one row of the "nan" table.
    """
    g = torch.Generator().manual_seed(seed)
    bags = 48
    dims = [t[1] for t in tables]
    total = sum(dims)
    grad = torch.randn(bags + 1, total, generator=g)
    grad[bags] = float("nan")
    items, col = [], 0
    for i, (bits, dim, opt, stochastic, learn, weighted, kind) in enumerate(tables):
        num_rows = 1500 if kind == "big" else 60
        table = make_table(bits, num_rows, dim, opt, seed=seed * 31 + i)
        if kind == "empty":
            ids = torch.empty(0, dtype=torch.int64)
            offsets, w = ids.clone(), EMPTY
        else:
            n = 1200 if kind == "big" else 150
            ids = torch.cat([torch.full((9,), 3), torch.randint(0, num_rows, (n,), generator=g)])
            ids = ids[torch.randperm(ids.numel(), generator=g)]
            bag = torch.randint(0, bags, (ids.numel(),), generator=g)
            if kind == "nan":
                bad = int(ids[ids != 3][0])
                bag[ids == bad] = bags
            offsets = bag * total + col
            w = (torch.rand(ids.numel(), generator=g) * 2 - 0.5) if weighted else EMPTY
        spec = make_spec(
            bits, dim, opt, stochastic, learn, step=step, lr=0.2, key=seed * 7 + i, ro=13 * i, co=5 * i
        )
        items.append((table, (ids, offsets, w), spec))
        col += dim
    return items, grad


def _clone(table):
    return [t.clone() for t in table]


@pytest.mark.parametrize("threads", [1, 2])
def test_many_matches_single_and_reference(threads):
    # Three consecutive steps of a mix of tables: batched == one call per table == reference.
    items, _ = make_many(seed=21, step=1)
    tables = [item[0] for item in items]
    ref = [_clone(t) for t in tables]
    one = [_clone(t) for t in tables]
    many = [_clone(t) for t in tables]
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for step in (1, 2, 3):
            batch_items, grad = make_many(seed=21 + step, step=step)
            batches = [(b, spec) for _, b, spec in batch_items]
            k_ref = [call_update(reference_update, *t, *b, grad, spec) for t, (b, spec) in zip(ref, batches)]
            k_one = [
                call_update(cpu_native.fused_update, *t, *b, grad, spec) for t, (b, spec) in zip(one, batches)
            ]
            k_many = cpu_native.fused_update_many(
                as_updates([(*t, *b, spec) for t, (b, spec) in zip(many, batches)]), grad
            )
            assert k_many == k_one == k_ref
            assert k_many[6] == 1 and k_many[5] == 0  # the NaN row, the empty table
            for i, (r, o, m) in enumerate(zip(ref, one, many)):
                assert_same((k_ref[i], r), (k_one[i], o))
                assert_same((k_ref[i], r), (k_many[i], m))
    finally:
        torch.set_num_threads(saved)
    for i, (t, m) in enumerate(zip(tables, many)):
        assert torch.equal(t[0], m[0]) == (MANY_TABLES[i][6] == "empty")


def test_many_dispatch_and_fallback(monkeypatch):
    from torchrec_lowprec.kernels import dispatch

    batch_items, grad = make_many(seed=40, step=2)
    outs = []
    for backend in ("cpu_native", "reference"):
        monkeypatch.setattr(dispatch, "backend_for", lambda device, b=backend: b)
        tables = [_clone(t) for t, _, _ in batch_items]
        k = dispatch.fused_update_many(
            as_updates([(*t, *b, spec) for t, (_, b, spec) in zip(tables, batch_items)]), grad
        )
        outs.append((k, tables))
    (k_nat, nat), (k_ref, ref) = outs
    for i in range(len(nat)):
        assert_same((k_ref[i], ref[i]), (k_nat[i], nat[i]))
    assert dispatch.fused_update_many([], grad) == []
    assert cpu_native.fused_update_many([], grad) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_many_errors_like_a_loop_of_single_calls(threads):
    batch_items, grad = make_many(seed=50, step=1)
    items = [(*t, *b, spec) for t, b, spec in batch_items]
    expect = [_clone(t) for t, _, _ in batch_items]
    for t, (_, b, spec) in zip(expect[:4], batch_items[:4]):
        call_update(cpu_native.fused_update, *t, *b, grad, spec)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        # An out-of-range id, then grad offset, in table 4: tables 0-3 are updated, 4- are not.
        for arg, shift, msg in ((4, 10_000, "ids"), (5, grad.numel(), "grad_offsets")):
            tables = [_clone(t) for t, _, _ in batch_items]
            run = [(*t, *item[4:]) for t, item in zip(tables, items)]
            bad = list(run[4])
            bad[arg] = bad[arg] + shift
            run[4] = tuple(bad)
            with pytest.raises(RuntimeError, match=f"fused_update_many: table 4: {msg} must be in"):
                cpu_native.fused_update_many(as_updates(run), grad)
            for i, (t, e, (t0, _, _)) in enumerate(zip(tables, expect, batch_items)):
                for a, b in zip(t, e if i < 4 else t0):
                    assert torch.equal(a, b), i
    finally:
        torch.set_num_threads(saved)


def test_many_rejects_bad_arguments():
    batch_items, grad = make_many(seed=51, step=1)
    items = [(*t, *b, spec) for t, b, spec in batch_items]
    # A bad argument in the last table: raised before anything is written.
    before = [_clone(t) for t, _, _ in batch_items]
    bad = list(items[-1])
    bad[0] = bad[0].float()
    with pytest.raises(RuntimeError, match="fused_update_many: table 8: rows must be uint8"):
        cpu_native.fused_update_many(as_updates(items[:-1] + [tuple(bad)]), grad)
    for t0, item in zip(before, items):
        for a, b in zip(t0, item[:4]):
            assert torch.equal(a, b)
    # Tables that write the same memory are rejected: the same table twice, or two views
    # of one table's storage whose row ranges overlap.
    with pytest.raises(RuntimeError, match="must not share storage"):
        cpu_native.fused_update_many(as_updates([items[0], items[1], items[0]]), grad)
    rows, step, s1, s2, ids, offsets, w, spec = items[0]

    def part(lo, hi):
        keep = ids < hi - lo
        return (rows[lo:hi], step[lo:hi], s1[lo:hi], s2, ids[keep], offsets[keep], w[keep], spec)

    with pytest.raises(RuntimeError, match="table 1 writes memory"):
        cpu_native.fused_update_many(as_updates([part(0, 40), part(30, 70)]), grad)
    # Adjacent, disjoint views of one storage are fine.
    assert len(cpu_native.fused_update_many(as_updates([part(0, 40), part(40, 80)]), grad)) == 2
    with pytest.raises(RuntimeError, match="fused_update_many: every per-table list"):
        cpu_native._load().fused_update_many([items[0][0]], [], [], [], [], [], [], grad, [], [])


@pytest.mark.parametrize("learn", [True, False], ids=["learn", "fixed"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_step_grows_instead_of_clipping(bits, learn):
    # A tiny-step table (TorchRec-like init of a big table) and large updates: with growth the
    # updated rows are held (max |x| fits the grid), without it they saturate.
    dim, n = 16, 40
    table = make_table(bits, n, dim, OptimizerType.SGD, seed=5, scale=0.001)
    batch = make_batch(n, dim, seed=6)
    outs = {}
    for grow in (False, True):
        spec = make_spec(bits, dim, OptimizerType.SGD, True, learn, step=1, lr=1.0, grow=grow)
        a, b = run_both(table, batch, spec)
        assert_same(a, b)
        outs[grow] = a[1]
    ids = batch[0].unique()
    qmin, qmax = code_range(bits)
    for grow, (rows, step, _, _) in outs.items():
        codes = unpack_codes(rows[ids, 4:].contiguous(), bits)
        saturated = ((codes == 0) | (codes == qmax - qmin)).float().mean()
        if grow:
            s16 = rows[ids, :2].contiguous().view(torch.float16).float().flatten()
            s0 = table[0][ids, :2].contiguous().view(torch.float16).float().flatten()
            assert (s16 > s0).float().mean() > 0.5  # most touched rows grew their step
            if learn:
                assert torch.all(step[ids].to(torch.float16).float() == s16)
        elif not learn:  # (ALPT's own LSQ step here may already widen the grid in one step)
            assert saturated > 0.3


def test_cpu_description_names_the_cpu_its_extensions_and_cores():
    import os

    model, extensions, cores = cpu_native.cpu_description().split("; ")
    assert model and cores.startswith(f"{os.cpu_count()} logical cores")
    flag_lines = [
        line for line in cpu_native._cpuinfo().splitlines() if line.startswith(("flags", "Features"))
    ]
    flags = set(flag_lines[0].split(":", 1)[1].split()) if flag_lines else set()
    expected = [name for name, flag in cpu_native.VECTOR_EXTENSIONS if flag in flags]
    assert extensions == "vector extensions: " + (", ".join(expected) or "none of AVX2/AVX-512/AMX")
    # The machine kind the benchmark sections are keyed by agrees with the extensions named.
    kind = cpu_native.cpu_vector_class()
    assert kind == ("avx512" if "AVX-512F" in expected else "avx2" if "AVX2" in expected else "other")

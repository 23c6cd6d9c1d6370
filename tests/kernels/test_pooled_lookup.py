"""The native CPU pooled lookup against FBGEMM's IntNBit op on the same buffer: bit for bit."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

from torchrec_lowprec.kernels import cpu_native
from torchrec_lowprec.kernels.lookup import FeatureSlot, FusedPooledLookup
from torchrec_lowprec.quant.layout import encode_float_rows, encode_rows

pytestmark = pytest.mark.skipif(not cpu_native.is_available(), reason="native CPU kernel not built")


def _table(bits: int, rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``rows`` random rows of ``bits`` x ``dim`` in FBGEMM's IntNBit layout (uint8 [rows, bytes])."""
    if bits in (16, 32):
        return encode_float_rows(torch.randn(rows, dim, generator=gen), bits)
    half = 1 << (bits - 1)
    q = torch.randint(-half, half, (rows, dim), generator=gen)
    scale16 = (torch.rand(rows, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    out = encode_rows(q, scale16, bits)
    # Any fp16 bias, not only ours (-2^(b-1) * scale): the kernel must match FBGEMM on any row.
    out[:, 2:4] = torch.randn(rows, 1, generator=gen).to(torch.float16).view(torch.uint8)
    return out


def _buffer(specs, gen):
    """Flat buffer holding one table per (bits, rows, dim), 128-byte aligned; the slots."""
    parts, slots, off = [], [], 0
    for bits, rows, dim in specs:
        t = _table(bits, rows, dim, gen).reshape(-1)
        pad = (-off) % 128
        parts += [torch.zeros(pad, dtype=torch.uint8), t]
        off += pad
        slots.append(FeatureSlot(off, bits, dim, rows))
        off += t.numel()
    return torch.cat(parts), slots


def _ids(slots, batch, max_len, gen, hot: bool):
    lengths = torch.randint(0, max_len + 1, (len(slots) * batch,), generator=gen)
    values = []
    for t, s in enumerate(slots):
        n = int(lengths[t * batch : (t + 1) * batch].sum())
        v = torch.randint(0, s.rows, (n,), generator=gen)
        if hot and n:
            v[torch.rand(n, generator=gen) < 0.5] = 3 % s.rows  # many repeats of one row
        values.append(v)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return torch.cat(values), offsets


def _native_and_fbgemm(slots, mode, flat, values, offsets, psw, monkeypatch):
    """The pooled output of our native lookup and of FBGEMM's op on the same buffer and ids."""
    native = FusedPooledLookup(slots, mode, 1, torch.device("cpu"))
    monkeypatch.setenv("TORCHREC_LOWPREC_LOOKUP", "fbgemm")
    fbgemm = FusedPooledLookup(slots, mode, 1, torch.device("cpu"))
    out_f = fbgemm(flat, values, offsets, psw)
    monkeypatch.delenv("TORCHREC_LOWPREC_LOOKUP")
    out_n = native(flat, values, offsets, psw)  # the backend is chosen at the first call
    assert (native.backend, fbgemm.backend) == ("cpu_native", "fbgemm")
    return out_n, out_f


@pytest.mark.parametrize("mode", [PoolingMode.SUM, PoolingMode.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "specs",
    [
        [(8, 1000, 64)],
        [(4, 500, 32), (2, 300, 16)],
        [(8, 700, 128), (4, 40, 8), (2, 90, 64), (16, 50, 24), (32, 60, 12), (8, 1, 4)],
    ],
    ids=["int8", "int4+int2", "mixed"],
)
def test_native_lookup_equals_fbgemm(specs, mode, weighted, index_dtype, monkeypatch):
    gen = torch.Generator().manual_seed(len(specs) * 10 + mode + 2 * weighted)
    flat, slots = _buffer(specs, gen)
    values, offsets = _ids(slots, batch=37, max_len=9, gen=gen, hot=weighted)
    values, offsets = values.to(index_dtype), offsets.to(index_dtype)
    psw = torch.rand(values.numel(), generator=gen) * 2 - 0.5 if weighted else None

    out_n, out_f = _native_and_fbgemm(slots, mode, flat, values, offsets, psw, monkeypatch)
    assert out_n.shape == out_f.shape == (37, sum(s.dim for s in slots))
    assert torch.equal(out_n, out_f), (out_n - out_f).abs().max()


@pytest.mark.parametrize("mode", [PoolingMode.SUM, PoolingMode.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_lookup_in_register_blocks_equals_fbgemm(mode, weighted, monkeypatch):
    # int8/int4/int2 bags are pooled 64 columns (int8: then 16) at a time over up to 32 rows
    # per pass: dims with a 16-column and a scalar tail (int8 88 = 64 + 16 + 8, 40, 7; int4 88
    # = 64 + 24; int2 136 = 128 + 8) and bags of up to 70 ids (three passes) must still give
    # FBGEMM's bits.
    gen = torch.Generator().manual_seed(11 + mode + 2 * weighted)
    specs = [(8, 400, 88), (8, 300, 40), (8, 50, 7), (8, 90, 128), (4, 200, 88), (4, 60, 64), (2, 150, 136)]
    flat, slots = _buffer(specs, gen)
    values, offsets = _ids(slots, batch=23, max_len=70, gen=gen, hot=True)
    psw = torch.rand(values.numel(), generator=gen) * 2 - 0.5 if weighted else None
    out_n, out_f = _native_and_fbgemm(slots, mode, flat, values, offsets, psw, monkeypatch)
    assert int(offsets.diff().max()) > 64
    assert torch.equal(out_n, out_f), (out_n - out_f).abs().max()


def test_native_lookup_threads_give_the_same_bits():
    gen = torch.Generator().manual_seed(7)
    flat, slots = _buffer([(8, 5000, 64), (4, 3000, 32)], gen)
    values, offsets = _ids(slots, batch=512, max_len=12, gen=gen, hot=True)
    lookup = FusedPooledLookup(slots, PoolingMode.SUM, 1, torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lookup(flat, values, offsets, None)
        torch.set_num_threads(max(2, threads))
        many = lookup(flat, values, offsets, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_native_lookup_refuses_an_id_out_of_range():
    gen = torch.Generator().manual_seed(3)
    flat, slots = _buffer([(8, 10, 16)], gen)
    lookup = FusedPooledLookup(slots, PoolingMode.SUM, 1, torch.device("cpu"))
    with pytest.raises(IndexError, match="out of range"):
        lookup(flat, torch.tensor([1, 10]), torch.tensor([0, 1, 2]), None)
    with pytest.raises(RuntimeError, match="does not fit"):
        FusedPooledLookup([FeatureSlot(0, 8, 16, 11)], PoolingMode.SUM, 1, torch.device("cpu"))(
            flat, torch.tensor([1]), torch.tensor([0, 1]), None
        )


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_count_out_of_range(index_dtype):
    rows = [10, 1, 1000]
    lengths = torch.tensor([2, 0, 1, 3, 0, 2], dtype=index_dtype)  # 3 features x batch 2
    values = torch.tensor([0, 9, 10, 0, 1, -1, 999, 1000], dtype=index_dtype)
    #                      f0 ok ok  f1: 10 bad | f1: 0 ok, 1 bad, -1 bad | f2: ok, bad
    assert cpu_native.count_out_of_range(values, lengths, rows, 2) == 4
    assert cpu_native.count_out_of_range(values.clamp(0, 0), lengths, rows, 2) == 0
    big = torch.randint(0, 50, (300_000,), dtype=index_dtype)
    big[123_457] = 50
    assert cpu_native.count_out_of_range(big, torch.tensor([300_000]), [50], 1) == 1


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_kjt_length_stats_equals_the_torch_reductions(index_dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 7, (3 * 50,), generator=gen, dtype=index_dtype)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    per_key = lengths.view(3, 50).sum(dim=1).tolist()
    total = int(lengths.sum())
    assert cpu_native.kjt_length_stats(lengths, offsets, 3) == (
        int(lengths.min()),
        int(lengths.argmin()),
        total,
        0,
        total,
        per_key,
    )
    assert cpu_native.kjt_length_stats(lengths, None, 3)[2:] == (total, 0, total, per_key)
    bad = lengths.clone()
    bad[[7, 80]] = torch.tensor([-2, -5], dtype=index_dtype)
    low, at, *_ = cpu_native.kjt_length_stats(bad, offsets[1:], 3)  # offsets from its 2nd entry
    assert (low, at) == (-5, 80) and cpu_native.kjt_length_stats(bad, offsets[1:], 3)[3] == int(offsets[1])
    assert cpu_native.kjt_length_stats(torch.empty(0, dtype=index_dtype), None, 3) == (
        0,
        0,
        0,
        0,
        0,
        [0, 0, 0],
    )
    with pytest.raises(RuntimeError, match="multiple of 3"):
        cpu_native.kjt_length_stats(lengths[:-1], None, 3)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("widths", [(8,), (4, 2), (16, 32, 8, 4)])
def test_sequence_lookup_equals_fbgemm_pooling_none(index_dtype, widths):
    """PoolingMode.NONE (an EmbeddingCollection's lookup): one row per id, bit for bit."""
    gen = torch.Generator().manual_seed(len(widths))
    flat, slots = _buffer([(b, 50 + 7 * i, 64) for i, b in enumerate(widths)], gen)
    values, offsets = _ids(slots, batch=33, max_len=12, gen=gen, hot=True)
    values, offsets = values.to(index_dtype), offsets.to(index_dtype)
    native = FusedPooledLookup(slots, PoolingMode.NONE, 1, torch.device("cpu"))
    fbgemm = FusedPooledLookup(slots, PoolingMode.NONE, 1, torch.device("cpu"))
    fbgemm.backend = "fbgemm"
    a, b = native(flat, values, offsets, None), fbgemm(flat, values, offsets, None)
    assert native.backend == "cpu_native"
    assert a.shape == (values.numel(), 64)
    assert torch.equal(a, b)


def test_sequence_lookup_needs_one_dim():
    gen = torch.Generator().manual_seed(0)
    _, slots = _buffer([(8, 10, 64), (8, 10, 32)], gen)
    with pytest.raises(ValueError, match="one dim for every feature"):
        FusedPooledLookup(slots, PoolingMode.NONE, 1, torch.device("cpu"))

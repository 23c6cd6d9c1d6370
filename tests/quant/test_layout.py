import pytest
import torch

from torchrec_lowprec.quant.layout import (
    code_range,
    dequantize_rows,
    encode_rows,
    pack_codes,
    quantize_rows,
    row_bytes,
    split_row,
    unpack_codes,
)
from torchrec_lowprec.quant.lsq import init_step_size


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_roundtrip(bits):
    u = torch.randint(0, 2**bits, (7, 16))
    packed = pack_codes(u, bits)
    assert packed.shape == (7, 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), u.to(torch.int32))


def test_row_bytes_match_fbgemm():
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import unpadded_row_size_in_bytes

    for bits, ty in [
        (8, SparseType.INT8),
        (4, SparseType.INT4),
        (2, SparseType.INT2),
        (16, SparseType.FP16),
        (32, SparseType.FP32),
    ]:
        for d in (4, 64, 128):
            assert row_bytes(bits, d) == unpadded_row_size_in_bytes(d, ty)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_symmetric_grid_and_exact_dequantize(bits):
    qmin, qmax = code_range(bits)
    assert (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    q = torch.randint(qmin, qmax + 1, (5, 8))
    s = torch.tensor([0.5, 1e-3, 3.0, 1e-6, 7.25])
    rows = encode_rows(q, s, bits)
    scale, q_back = split_row(rows, bits, 8)
    assert torch.equal(q_back, q.to(torch.int32))
    s16 = s.to(torch.float16).float()
    assert torch.equal(scale, s16)
    # bias = -2^(b-1)*scale exactly, so FBGEMM's scale*u + bias == scale*q exactly.
    bias = rows[:, 2:4].contiguous().view(torch.float16).flatten().float()
    assert torch.equal(bias, -(2 ** (bits - 1)) * s16)
    assert torch.equal(dequantize_rows(rows, bits, 8), s16[:, None] * q.float())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_nearest_quantization_error_bounded(bits):
    x = torch.randn(100, 16)
    s = init_step_size(x, bits, "absmax")
    deq = dequantize_rows(quantize_rows(x, s, bits), bits, 16)
    s16 = s.to(torch.float16).float()
    # absmax keeps every value inside the grid (up to fp16 rounding of s): error <= s/2 there.
    inside = (x / s16[:, None]).abs() <= code_range(bits)[1]
    err = (deq - x).abs()
    assert bool((err[inside] <= 0.5 * s16[:, None].expand_as(x)[inside] * (1 + 1e-5)).all())

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


# ----- RowFormat: the one owner of row bytes -----
def test_row_format_bytes():
    from torchrec_lowprec.quant.layout import RowFormat

    f = RowFormat(4, 128)
    assert (f.row_bytes, f.stride(1), f.stride(16)) == (68, 68, 80)
    assert f.master_step_bytes(True) == 4 and f.master_step_bytes(False) == 0
    assert [f.optimizer_bytes(k) for k in ("sgd", "rowwise_adagrad", "adagrad", "adam")] == [0, 4, 512, 1024]
    assert f.bytes_per_row(16, "rowwise_adagrad", True) == 88
    assert RowFormat(2, 12).row_bytes == 7 and RowFormat(16, 12).row_bytes == 24
    assert RowFormat(32, 12).master_step_bytes(True) == 0  # float rows keep no step size
    with pytest.raises(ValueError, match="not storable"):
        RowFormat(3, 8)


def test_max_step_size_is_the_largest_step_the_fp16_bias_holds():
    from torchrec_lowprec.quant.layout import RowFormat, encode_rows, max_step_size, split_row

    assert [max_step_size(b) for b in (8, 4, 2)] == [511.75, 8188.0, 32752.0]
    assert RowFormat(16, 8).max_step_size is None
    for bits in (8, 4, 2):
        qmin, qmax = code_range(bits)
        q = torch.tensor([[qmin, qmax, 0, 1, 0, 0, 0, 0]])
        top = torch.tensor([max_step_size(bits)])
        row = encode_rows(q, top, bits)
        bias = row[:, 2:4].contiguous().view(torch.float16).float()
        assert torch.isfinite(bias).all()
        scale, back = split_row(row, bits, 8)
        assert scale.item() == max_step_size(bits) and torch.equal(back, q.to(back.dtype))
        # One fp16 step above, the bias overflows to -inf.
        above = torch.tensor([float(torch.tensor(max_step_size(bits), dtype=torch.float16).float()) * 1.001])
        bias = encode_rows(q, above, bits)[:, 2:4].contiguous().view(torch.float16).float()
        assert torch.isinf(bias).all()

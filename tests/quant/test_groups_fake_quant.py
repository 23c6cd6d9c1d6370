"""Frequency ranks/groups and LSQ+ fake quantization (the MPE search's tensor math)."""

import pytest
import torch

from torchrec_lowprec.quant.fake_quant import lsq_plus_fake_quant, signed_range
from torchrec_lowprec.quant.groups import frequency_groups, frequency_rank


def test_frequency_rank_orders_by_count_ties_by_id():
    counts = torch.tensor([5, 9, 0, 9, 1])
    rank = frequency_rank(counts)
    assert rank.tolist() == [2, 0, 4, 1, 3]
    assert torch.equal(torch.sort(counts, descending=True).values, counts[torch.argsort(rank)])


def test_frequency_groups_equal_rows_and_masses():
    counts = torch.tensor([100, 50, 25, 10, 5, 5, 3, 2] * 8)  # 64 rows, raw order
    ends, mass = frequency_groups(counts, num_groups=4, min_rows_per_group=1)
    assert ends == (16, 32, 48, 64)
    s = torch.sort(counts, descending=True).values.double()
    want = [float(s[a:e].sum() / s.sum()) for a, e in zip((0, 16, 32, 48), ends)]
    assert mass == pytest.approx(want, abs=1e-12)
    assert sum(mass) == pytest.approx(1.0)
    assert list(mass) == sorted(mass, reverse=True)


def test_tiny_tables_get_fewer_groups_and_unseen_tables_uniform_mass():
    ends, mass = frequency_groups(torch.zeros(40, dtype=torch.int64), num_groups=16, min_rows_per_group=16)
    assert ends == (20, 40) and mass == pytest.approx((0.5, 0.5))
    assert frequency_groups(torch.ones(3), 16)[0] == (3,)
    with pytest.raises(ValueError, match="num_groups"):
        frequency_groups(torch.ones(3), 0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fake_quant_grid_and_lsq_gradients(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 8, generator=g, requires_grad=True)
    step = torch.tensor(0.3, requires_grad=True)
    offset = (0.05 * torch.randn(8, generator=g)).requires_grad_()
    q = lsq_plus_fake_quant(w, step, offset, bits)
    qn, qp = signed_range(bits)
    codes = (q - offset) / step
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert codes.min() >= qn - 1e-5 and codes.max() <= qp + 1e-5
    up = torch.randn(64, 8, generator=g)
    (q * up).sum().backward()
    v = ((w - offset) / step).detach()
    inside = (v > qn) & (v < qp)
    # LSQ: d q / d s = round(v) - v inside the grid, Qn / Qp where clipped; d q / d w = 1 inside.
    dq_ds = torch.where(inside, v.round() - v, torch.where(v <= qn, float(qn), float(qp)))
    torch.testing.assert_close(step.grad, (up * dq_ds).sum(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, up * inside, rtol=0, atol=1e-6)
    torch.testing.assert_close(offset.grad, (up * (~inside)).sum(0), rtol=1e-4, atol=1e-4)


def test_fake_quant_special_widths():
    w = torch.randn(4, 8)
    s, o = torch.tensor(0.1), torch.zeros(8)
    assert torch.equal(lsq_plus_fake_quant(w, s, o, 0), torch.zeros_like(w))
    assert torch.equal(lsq_plus_fake_quant(w, s, o, 32), w)
    assert torch.equal(lsq_plus_fake_quant(w, s, o, 16), w.half().float())
    with pytest.raises(ValueError, match="bits=9"):
        lsq_plus_fake_quant(w, s, o, 9)

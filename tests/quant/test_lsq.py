import pytest
import torch

from torchrec_lowprec.quant.layout import code_range
from torchrec_lowprec.quant.lsq import init_step_size, lsq_grad_scale, lsq_step_size_grad


def _lsq_autograd(x, s, g, bits):
    """LSQ fake-quant with a straight-through round, differentiated by autograd."""
    qmin, qmax = code_range(bits)
    s = s.clone().requires_grad_(True)
    v = torch.clamp(x / s[:, None], qmin, qmax)
    xq = (v + (torch.floor(v + 0.5) - v).detach()) * s[:, None]
    (xq * g).sum().backward()
    return s.grad * lsq_grad_scale(bits, x.shape[1])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_step_size_grad_matches_autograd(bits):
    x = torch.randn(50, 16, dtype=torch.float64)
    s = init_step_size(x.float(), bits, "lsq").double()
    g = torch.randn(50, 16, dtype=torch.float64)
    ours = lsq_step_size_grad(x, s, g, bits)
    assert torch.allclose(ours, _lsq_autograd(x, s, g, bits), rtol=1e-10, atol=1e-12)


def test_step_size_grad_finite_difference_inside_grid():
    # Away from rounding boundaries, d/ds sum(g * s*clamp(round(x/s))) is the LSQ formula with
    # round() held fixed: check with a central difference on the clipped part (piecewise linear).
    bits = 4
    x = torch.tensor([[10.0, -10.0, 0.3]], dtype=torch.float64)  # two clipped, one inside
    s = torch.tensor([1.0], dtype=torch.float64)
    g = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    qmin, qmax = code_range(bits)
    ours = lsq_step_size_grad(x, s, g, bits) / lsq_grad_scale(bits, 3)
    assert ours.item() == pytest.approx(1.0 * qmax + 2.0 * qmin)


def test_init_methods():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert init_step_size(x, 8, "absmax")[0].item() == pytest.approx(2.0 / 127)
    assert init_step_size(x, 8, "lsq")[0].item() == pytest.approx(2 * 1.0 / 127**0.5)
    assert init_step_size(x, 8, 0.25).tolist() == [0.25, 0.25]
    assert init_step_size(x, 8, "lsq")[1].item() > 0  # zero rows get the floor, not 0
    with pytest.raises(ValueError, match="step_size_init"):
        init_step_size(x, 8, "bogus")

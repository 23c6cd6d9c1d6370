import torch

from torchrec_lowprec.quant.rounding import (
    hash_key,
    mix32,
    mix32_int,
    round_to_grid,
    row_keys,
    table_hash,
    uniform_from_counter,
)


def test_mix32_tensor_equals_int():
    xs = [0, 1, 2, 12345, 2**31, 2**32 - 1, 0xDEADBEEF]
    got = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [mix32_int(x) for x in xs]


def test_table_hash_is_stable():
    # FNV-1a of "t_user"; the same in every process (Python's hash() is salted, this is not).
    assert table_hash("t_user") == table_hash("t_user") != table_hash("t_item")
    assert table_hash("") == 0x811C9DC5


def test_uniform_draws_are_uniform():
    keys = row_keys(hash_key(0, 1, 1), torch.arange(2000))[:, None]
    u = uniform_from_counter(keys, torch.arange(64))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.002  # 128k draws: sd of the mean ~0.0008
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 0.003
    # Distinct (row, col) and distinct steps give distinct streams.
    u2 = uniform_from_counter(row_keys(hash_key(0, 1, 2), torch.arange(2000))[:, None], torch.arange(64))
    assert abs(torch.corrcoef(torch.stack([u.flatten(), u2.flatten()]))[0, 1].item()) < 0.01


def test_stochastic_rounding_is_unbiased():
    # 256 values between grid points, each rounded with 4096 independent draws (one per step).
    v = torch.linspace(-3.9, 3.9, 256)
    acc = torch.zeros(256, dtype=torch.float64)
    n = 4096
    for step in range(n):
        u = uniform_from_counter(
            row_keys(hash_key(7, 3, step), torch.zeros(1, dtype=torch.int64))[:, None], torch.arange(256)
        )
        acc += round_to_grid(v[None], -128, 127, u)[0].double()
    mean_err = acc / n - v.double()
    # Each rounding has variance <= 1/4, so the mean over n has sd <= 1/(2*sqrt(n)) = 0.0078.
    assert mean_err.abs().max() < 5 * 0.0078
    assert abs(mean_err.mean()) < 0.002


def test_nearest_ignores_noise_and_clamps():
    v = torch.tensor([-200.0, -1.5, -0.49, 0.5, 2.4999, 126.6, 300.0])
    assert round_to_grid(v, -128, 127, None).tolist() == [-128, -1, 0, 1, 2, 127, 127]

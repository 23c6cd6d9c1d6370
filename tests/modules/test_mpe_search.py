"""MPE search: regulariser and its gradient, the selection rule, lambda's effect, retrain."""

import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_search import MPESearchEmbeddingBagCollection, search_collections

ROWS, DIM = 512, 8


def _tables():
    return [
        torchrec.EmbeddingBagConfig(name="t0", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f0"])
    ]


def _zipf_counts():
    return {"f0": (100_000 / torch.arange(1, ROWS + 1, dtype=torch.float64) ** 1.1).long()}


def test_regulariser_value_and_gradient():
    cfg = MPESearchConfig(
        candidate_bits=(0, 2, 4, 8), num_groups=4, min_rows_per_group=1, temperature=0.5, reg_lambda=0.1
    )
    m = MPESearchEmbeddingBagCollection(_tables(), cfg, _zipf_counts())
    with torch.no_grad():
        m.bit_logits["t0"].copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    mass = torch.tensor(m._group_mass["t0"], dtype=torch.float64) + 1e-6
    c = mass / mass.min()
    bits = torch.tensor([0.0, 2, 4, 8], dtype=torch.float64)
    p = torch.softmax(m.bit_logits["t0"].detach().double() / 0.5, dim=1)
    want = 0.1 * ((p @ bits) / c).sum()
    reg = m.regularization()
    torch.testing.assert_close(reg.double(), want, rtol=1e-5, atol=0)
    reg.backward()
    # d/d alpha_gj of lambda/c_g * sum_i p_gi b_i = lambda/(c_g T) * p_gj (b_j - E_g[b])
    grad = 0.1 / (c[:, None] * 0.5) * p * (bits[None, :] - (p @ bits)[:, None])
    torch.testing.assert_close(m.bit_logits["t0"].grad.double(), grad, rtol=1e-4, atol=1e-7)
    # Frequent groups are penalised less: c_g is largest for the first group.
    assert c[0] == c.max() and c[-1] == c.min() == 1


def test_selection_rule_highest_width_above_one_over_2m():
    cfg = MPESearchConfig(candidate_bits=(0, 1, 2, 3, 4, 5, 6), num_groups=4, min_rows_per_group=1)
    m = MPESearchEmbeddingBagCollection(_tables(), cfg)
    m_cands, thresh = 7, 1 / 14
    logits = torch.full((4, m_cands), -20.0)
    logits[0, 6] = 0.0  # 6 bits certain -> stored at 8
    logits[1, 0], logits[1, 3] = (
        0.0,
        torch.log(torch.tensor(thresh / (1 - thresh))) + 0.01,
    )  # 3 bits just above
    logits[2, 0], logits[2, 5] = (
        0.0,
        torch.log(torch.tensor(thresh / (1 - thresh))) - 0.05,
    )  # 5 bits just below
    logits[3, 1] = 0.0  # 1 bit -> stored at 2
    with torch.no_grad():
        m.bit_logits["t0"].copy_(logits)
    p = m.bit_probabilities()["t0"]
    assert p[1, 3] >= thresh > p[2, 5]
    assert m.select().tables["t0"].bits == (8, 4, 0, 2)


def _train_search(reg_lambda: float, steps: int = 150) -> MPESearchEmbeddingBagCollection:
    torch.manual_seed(0)
    cfg = MPESearchConfig(num_groups=8, min_rows_per_group=1, reg_lambda=reg_lambda)
    m = MPESearchEmbeddingBagCollection(_tables(), cfg, _zipf_counts())
    target = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        ids = torch.randint(0, ROWS, (128,), generator=g)
        kjt = KeyedJaggedTensor(keys=["f0"], values=ids, lengths=torch.ones(128, dtype=torch.long))
        loss = ((m(kjt).values() - target[ids]) ** 2).mean() + m.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def test_strong_lambda_prunes_rare_groups_zero_lambda_keeps_top_width():
    free = _train_search(0.0).select().tables["t0"].bits
    assert free == (8,) * 8
    strong = _train_search(1.0).select().tables["t0"].bits
    assert strong[-1] == 0 and strong[-2] == 0  # rarest groups pruned
    assert strong[0] > 0
    assert list(strong) == sorted(strong, reverse=True)  # never more bits for a rarer group


@pytest.mark.parametrize("candidates", [(0, 8, 32), (0, 16, 32)])
def test_search_module_matches_float_collection_when_fp32_is_certain(candidates):
    tables = _tables()
    fl = torchrec.EmbeddingBagCollection(tables)
    model = torch.nn.Sequential()
    model.add_module("ebc", fl)
    ref = torchrec.EmbeddingBagCollection(tables)
    ref.load_state_dict(fl.state_dict())
    lp.convert(model, MPESearchConfig(candidate_bits=candidates, num_groups=2, min_rows_per_group=1))
    (search,) = search_collections(model)
    with torch.no_grad():
        search.bit_logits["t0"].copy_(torch.tensor([[-1e4, -1e4, 0.0]] * 2))
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 5, 9, 400]), lengths=torch.tensor([2, 0, 2]))
    torch.testing.assert_close(model.ebc(kjt).values(), ref(kjt).values(), rtol=1e-6, atol=1e-6)


def test_selection_retrains_as_a_mixed_collection():
    m = _train_search(1.0, steps=60)
    plan = m.select()
    ebc = MixedPrecisionEmbeddingBagCollection(_tables(), plan=plan, config=lp.LowPrecisionConfig())
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([0, 511]), lengths=torch.tensor([1, 1]))
    out = ebc(kjt).values()
    assert out.shape == (2, DIM)
    if plan.tables["t0"].bits[-1] == 0:
        assert torch.count_nonzero(out[1]) == 0


def test_bad_search_config():
    with pytest.raises(ValueError, match="candidate_bits"):
        MPESearchConfig(candidate_bits=(8,))
    with pytest.raises(ValueError, match="candidate_bits"):
        MPESearchConfig(candidate_bits=(0, 12))
    with pytest.raises(ValueError, match="has 3 counts but table 't0' has 512 rows"):
        MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(), {"f0": torch.ones(3)})

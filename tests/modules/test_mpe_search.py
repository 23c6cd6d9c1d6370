"""MPE search: regulariser and its gradient, the selection rule, lambda's effect, retrain; the
byte-budget form (target_bits: dual ascent of lambda, a selection that fits, refused budgets)."""

import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_budget import plan_bits, uniform_bits
from torchrec_lowprec.modules.mpe_search import (
    MPESearchEmbeddingBagCollection,
    budget_step,
    search_collections,
)
from torchrec_lowprec.planner.schema import PrecisionPlan

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


def _train_search(
    reg_lambda: float, steps: int = 150, groups: int = 8, **budget
) -> MPESearchEmbeddingBagCollection:
    """A search fitting random targets; ``budget``: ``target_bits`` / ``budget_lr`` (then a
    dual-ascent step after every optimizer step)."""
    torch.manual_seed(0)
    cfg = MPESearchConfig(num_groups=groups, min_rows_per_group=1, reg_lambda=reg_lambda, **budget)
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
        m.budget_step()  # a no-op without target_bits
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


# ----- MPE at a byte budget (MPESearchConfig.target_bits) -----


def _budget_search(target_bits, steps=300, groups=32, reg_lambda=1e-4, budget_lr=0.2):
    return _train_search(reg_lambda, steps, groups, target_bits=target_bits, budget_lr=budget_lr)


def test_uniform_bits_counts_scale_and_bias_like_the_stored_rows():
    # dim 8: int4 rows are 4 B of codes + 4 B of fp16 scale/bias = 8 bits per value
    assert uniform_bits(_tables(), 4) == 8.0 and uniform_bits(_tables(), 2) == 6.0
    assert uniform_bits(_tables(), 0) == 0.0 and uniform_bits(_tables(), 32) == 32.0
    plan = PrecisionPlan.uniform({"t0": (ROWS, DIM)}, 4)
    assert plan_bits(plan) == uniform_bits(_tables(), 4)
    assert (
        MixedPrecisionEmbeddingBagCollection(_tables(), plan=plan).memory_bytes(per_table=True)["t0"]["rows"]
        == plan.tables["t0"].serving_bytes()
        == ROWS * DIM * 8 // 8
    )


@pytest.mark.parametrize("width", [4, 2])
def test_budget_search_meets_the_target_within_two_percent(width):
    """Dual ascent brings the expected bits near the target; the selection fits it exactly."""
    target = uniform_bits(_tables(), width)
    m = _budget_search(target)
    plan = m.select()
    got = plan_bits(plan)
    assert plan.tables["t0"].serving_bytes() <= m.budget_bytes == ROWS * DIM * target / 8
    assert got <= target and got >= 0.98 * target, (got, target, plan.tables["t0"].bits)
    assert abs(float(m.expected_serving_bits()) - target) / target < 0.2
    bits = plan.tables["t0"].bits
    assert bits[0] > 0 and list(bits) == sorted(bits, reverse=True)  # rarer groups never get more


def test_budget_lambda_moves_toward_the_target():
    tight = _budget_search(uniform_bits(_tables(), 2), steps=60)
    loose = _budget_search(uniform_bits(_tables(), 8), steps=60)
    assert float(tight.current_lambda()) > 1e-4 > float(loose.current_lambda())
    assert isinstance(tight.current_lambda(), torch.Tensor) and "log_lambda" in tight.state_dict()
    assert "log_lambda" not in _train_search(0.0, steps=1).state_dict()  # no budget: no new state


def _with_logits(cfg, seed):
    m = MPESearchEmbeddingBagCollection(_tables(), cfg, _zipf_counts())
    with torch.no_grad():
        m.bit_logits["t0"].copy_(
            3 * torch.randn(m.bit_logits["t0"].shape, generator=torch.Generator().manual_seed(seed))
        )
    return m


@pytest.mark.parametrize("seed", range(4))
def test_budget_selection_never_exceeds_the_budget_and_is_the_papers_rule_at_its_own_bytes(seed):
    for target in (0.3, 1.0, 2.5, 4.0, 6.0, 7.9, 9.0, 12.0):
        m = _with_logits(MPESearchConfig(num_groups=16, min_rows_per_group=1, target_bits=target), seed)
        plan = m.select()
        assert plan.tables["t0"].serving_bytes() <= m.budget_bytes, target
        assert plan_bits(plan) <= target
        bits = plan.tables["t0"].bits
        assert list(bits) == sorted(bits, reverse=True)  # never fewer bits for a more frequent group
    # logits favouring wide widths for frequent groups: the paper's plan is monotone, and at
    # exactly its bytes the budgeted rule returns it
    slope = 1.5 - (0.15 + 0.05 * seed) * torch.arange(16.0)[:, None]
    logits = torch.arange(4.0)[None, :] * slope
    free = MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(num_groups=16, min_rows_per_group=1))
    with torch.no_grad():
        free.bit_logits["t0"].copy_(logits)
    paper = free.select()
    assert list(paper.tables["t0"].bits) == sorted(paper.tables["t0"].bits, reverse=True)
    assert len(set(paper.tables["t0"].bits)) > 1
    cfg = MPESearchConfig(num_groups=16, min_rows_per_group=1, target_bits=plan_bits(paper))
    own = MPESearchEmbeddingBagCollection(_tables(), cfg)
    with torch.no_grad():
        own.bit_logits["t0"].copy_(logits)
    assert own.select() == paper


def test_budget_below_the_most_probable_widths_lowers_rare_groups_first():
    cfg = MPESearchConfig(num_groups=8, min_rows_per_group=1, target_bits=uniform_bits(_tables(), 2))
    m = MPESearchEmbeddingBagCollection(_tables(), cfg, _zipf_counts())
    with torch.no_grad():
        m.bit_logits["t0"].copy_(torch.tensor([[-9.0, -9.0, -9.0, 9.0]] * 8))  # 8 bits certain
    plan = m.select().tables["t0"]
    assert plan.serving_bytes() <= m.budget_bytes
    assert list(plan.bits) == sorted(plan.bits, reverse=True) and plan.bits[0] == 8 and plan.bits[-1] < 8


def test_impossible_budgets_are_refused_before_any_step():
    for bad in (0, -1.0, 32.5, float("nan"), float("inf"), "4", True):
        with pytest.raises(ValueError, match="target_bits"):
            MPESearchConfig(target_bits=bad)
    with pytest.raises(ValueError, match="below the narrowest candidate width"):
        MPESearchConfig(candidate_bits=(2, 8), target_bits=1.5)
    with pytest.raises(ValueError, match="reg_lambda must be > 0 with target_bits"):
        MPESearchConfig(target_bits=4.0, reg_lambda=0.0)
    with pytest.raises(ValueError, match="budget_lr"):
        MPESearchConfig(target_bits=4.0, budget_lr=0.0)
    # per-table bounds need the tables: int2 rows at dim 8 are 6 bits per value with scale/bias
    with pytest.raises(ValueError, match=r"target_bits=3\.0 is below 6\.0000.*narrowest candidate \(2 bits"):
        MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(candidate_bits=(2, 8), target_bits=3.0))
    with pytest.raises(ValueError, match=r"above 12\.0000.*constrains nothing"):
        MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(candidate_bits=(0, 8), target_bits=16.0))
    model = torch.nn.Sequential()
    model.add_module("ebc", torchrec.EmbeddingBagCollection(_tables()))
    with pytest.raises(ValueError, match="constrains nothing"):
        lp.convert(model, MPESearchConfig(candidate_bits=(0, 8), target_bits=16.0))
    # the widest candidate's own bytes and fp32's are allowed
    MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(candidate_bits=(0, 8), target_bits=12.0))
    MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(candidate_bits=(0, 32), target_bits=32))


def test_budget_step_and_regulariser_add_no_host_sync():
    from tests.modules.test_host_syncs import _count_syncs

    m = MPESearchEmbeddingBagCollection(_tables(), MPESearchConfig(target_bits=5.0), _zipf_counts())

    def step():
        m.regularization().backward()
        m.budget_step()

    assert _count_syncs(step) == {}
    assert budget_step([m]) is None  # the module-level form

"""MPE search for sequence features (MPESearchEmbeddingCollection): its rows against the pooled
search's, convert on models holding an EmbeddingCollection, and the selected plan's bytes
against the regulariser on a synthetic frequency-skewed sequence set (fixed seeds)."""

import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection, MixedPrecisionEmbeddingCollection
from torchrec_lowprec.modules.mpe_search import (
    MPESearchEmbeddingBagCollection,
    merge_plans,
    search_collections,
)
from torchrec_lowprec.modules.mpe_search_ec import MPESearchEmbeddingCollection

ROWS, DIM = 512, 8
ZIPF = 1 / torch.arange(1, ROWS + 1, dtype=torch.float64) ** 1.1


def _ec_tables():
    return [
        torchrec.EmbeddingConfig(name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["hist"])
    ]


def _sequences(n, seed=0, batch=32):
    """``n`` KJTs of ``batch`` sequences (1..8 ids each) drawn from a Zipf(1.1) over the rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(1, 9, (batch,), generator=g)
        ids = torch.multinomial(ZIPF, int(lengths.sum()), replacement=True, generator=g)
        out.append(KeyedJaggedTensor(keys=["hist"], values=ids, lengths=lengths))
    return out


def test_sequence_rows_are_the_pooled_search_rows_before_pooling():
    bag = [
        torchrec.EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["hist"])
    ]
    cfg = MPESearchConfig(candidate_bits=(0, 2, 4, 8, 32), num_groups=4, min_rows_per_group=1)
    counts = {"hist": (1000 * ZIPF).long()}
    seq = MPESearchEmbeddingCollection(_ec_tables(), cfg, counts, need_indices=True)
    pooled = MPESearchEmbeddingBagCollection(bag, cfg, counts)
    pooled.load_state_dict(seq.state_dict())
    with torch.no_grad():
        seq.bit_logits["t"].copy_(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)))
        pooled.bit_logits["t"].copy_(seq.bit_logits["t"])
    (kjt,) = _sequences(1, batch=5)
    out = seq(kjt)
    assert list(out) == ["hist"] and torch.equal(out["hist"].lengths(), kjt.lengths())
    assert torch.equal(out["hist"].weights(), kjt.values())  # need_indices
    rows = out["hist"].values()
    assert rows.shape == (kjt.values().numel(), DIM)
    bag_of = torch.repeat_interleave(torch.arange(5), kjt.lengths())
    summed = torch.zeros(5, DIM).index_add(0, bag_of, rows)
    torch.testing.assert_close(summed, pooled(kjt).values(), rtol=1e-6, atol=1e-6)
    # the rows are a p-weighted mix of the widths: gradients reach the logits of the groups read
    rows.sum().backward()
    groups_read = torch.unique(torch.searchsorted(seq.group_ends_t, kjt.values(), right=True))
    assert torch.all(seq.bit_logits["t"].grad[groups_read].abs().sum(1) > 0)


def test_convert_searches_sequence_and_pooled_collections_then_swaps_both():
    bag = [torchrec.EmbeddingBagConfig(name="u", embedding_dim=16, num_embeddings=64, feature_names=["d"])]
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"seq": torchrec.EmbeddingCollection(_ec_tables()), "pooled": torchrec.EmbeddingBagCollection(bag)}
    )
    w = model["seq"].embeddings["t"].weight.detach().clone()
    counts = {"hist": (1000 * ZIPF).long(), "d": torch.arange(64, 0, -1)}
    cfg = MPESearchConfig(candidate_bits=(0, 8, 32), num_groups=2, min_rows_per_group=1)
    lp.convert(model, cfg, frequencies=counts)
    found = search_collections(model)
    assert [type(s) for s in found] == [MPESearchEmbeddingCollection, MPESearchEmbeddingBagCollection]
    seq = model["seq"]
    assert torch.equal(seq.weights["t"], w)  # from_float kept the weights
    with torch.no_grad():  # fp32 certain in both groups: the float EC's rows
        seq.bit_logits["t"].copy_(torch.tensor([[-1e4, -1e4, 0.0]] * 2))
    kjt = KeyedJaggedTensor(
        keys=["hist"], values=torch.tensor([0, 5, 300, 511, 17]), lengths=torch.tensor([2, 0, 3])
    )
    torch.testing.assert_close(seq(kjt)["hist"].values(), w[kjt.values()], rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # the rare half pruned
        seq.bit_logits["t"].copy_(torch.tensor([[-1e4, 0.0, -1e4], [0.0, -1e4, -1e4]]))
    plan = merge_plans([s.select() for s in found])
    assert plan.tables["t"].bits == (8, 0) and plan.tables["t"].group_ends == (256, 512)
    fresh = torch.nn.ModuleDict(
        {"seq": torchrec.EmbeddingCollection(_ec_tables()), "pooled": torchrec.EmbeddingBagCollection(bag)}
    )
    lp.convert(fresh, lp.MixedPrecisionConfig(plan))
    assert isinstance(fresh["seq"], MixedPrecisionEmbeddingCollection)
    assert isinstance(fresh["pooled"], MixedPrecisionEmbeddingBagCollection)
    rows = fresh["seq"](kjt)["hist"].values()
    rare = kjt.values() >= 256
    assert rare.any() and torch.count_nonzero(rows[rare]) == 0
    assert torch.all(rows[~rare].abs().sum(1) > 0)


def _search(reg_lambda, data, counts):
    torch.manual_seed(0)
    cfg = MPESearchConfig(num_groups=8, min_rows_per_group=1, reg_lambda=reg_lambda, temperature=0.1)
    m = MPESearchEmbeddingCollection(_ec_tables(), cfg, {"hist": counts})
    target = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for kjt in data:
        out = m(kjt)["hist"].values()
        loss = ((out - target[kjt.values()]) ** 2).mean() + m.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m


def test_plan_bytes_fall_with_the_regulariser_on_a_skewed_sequence_set():
    data = _sequences(150)
    counts = torch.bincount(torch.cat([k.values() for k in data]), minlength=ROWS)  # counted on train
    results = []
    for lam in (0.0, 1e-3, 1e-2):
        m = _search(lam, data, counts)
        plan = m.select()
        tp = plan.tables["t"]
        inv_c = m.inv_rel_mass_t  # 1 / c_g
        # the regulariser without lambda, sum_g E_g[bits] / c_g, and the same sum over the plan's bits
        expected = float((m.expected_bits()["t"] * inv_c).sum())
        chosen = float((torch.tensor(tp.bits, dtype=torch.float32) * inv_c).sum())
        if lam:
            assert float(m.regularization().detach()) == pytest.approx(lam * expected, rel=1e-5)
            # a converged search (T = 0.1): the plan keeps what the regulariser paid for
            assert chosen == pytest.approx(expected, rel=0.1)
        mixed = MixedPrecisionEmbeddingCollection(_ec_tables(), plan=plan, config=lp.LowPrecisionConfig())
        results.append((lam, expected, mixed.memory_bytes(), tp.serving_bytes(), tp.bits))
    (_, r0, b0, s0, bits0), (_, r1, b1, s1, _), (_, r2, b2, s2, bits2) = results
    assert r0 > r1 > r2 and b0 > b1 > b2 and s0 > s1 > s2, results
    assert max(bits0) == 8 and bits2[0] > 0 and bits2[-1] == 0  # the rarest group pruned, the top kept
    assert b2 < 0.5 * b0


def test_bad_search_inputs():
    with pytest.raises(ValueError, match="has 3 counts but table 't' has 512 rows"):
        MPESearchEmbeddingCollection(_ec_tables(), MPESearchConfig(), {"hist": torch.ones(3)})
    two = _ec_tables() + [
        torchrec.EmbeddingConfig(name="t2", embedding_dim=16, num_embeddings=8, feature_names=["x"])
    ]
    with pytest.raises(ValueError, match="same embedding_dim"):
        MPESearchEmbeddingCollection(two)
    m = MPESearchEmbeddingCollection(_ec_tables())
    bad = KeyedJaggedTensor(keys=["hist"], values=torch.tensor([3, 512]), lengths=torch.tensor([2]))
    with pytest.raises(IndexError, match=r"feature 'hist' has an id outside \[0, 512\) of table 't'"):
        m(bad)


def test_sequence_search_at_a_byte_budget_selects_within_it():
    from torchrec_lowprec.modules.mpe_budget import plan_bits, uniform_bits

    target = uniform_bits(_ec_tables(), 4)
    cfg = MPESearchConfig(num_groups=8, min_rows_per_group=1, target_bits=target)
    m = MPESearchEmbeddingCollection(_ec_tables(), cfg, {"hist": (1000 * ZIPF).long()})
    with torch.no_grad():
        m.bit_logits["t"].copy_(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    m.regularization().backward()
    m.budget_step()
    plan = m.select()
    assert plan.tables["t"].serving_bytes() <= m.budget_bytes and plan_bits(plan) <= target

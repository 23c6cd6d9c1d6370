"""Bad inputs to the collections: inconsistent KJTs, non-finite hyper-parameters, bad row maps.

Each raises one ``ValueError`` saying what is wrong before any kernel reads the input, and
leaves the tables untouched (issue 12, items 11-13).
"""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.compress import CodebookConfig, CodebookEmbeddingBagCollection
from torchrec_lowprec.compress.codebook_ebc import CodebookTable
from torchrec_lowprec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_search import MPESearchConfig, MPESearchEmbeddingBagCollection
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

KEYS = ["a", "b", "c"]  # make_tables(): t0 (60 x 8) reads a, b; t1 (40 x 16) reads c
I64 = torch.int64


def _kjt(values, lengths, weights=None, offsets=None, **kw) -> KeyedJaggedTensor:
    v = torch.tensor(values, dtype=I64)
    w = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    if offsets is not None:
        return KeyedJaggedTensor(
            keys=KEYS, values=v, offsets=torch.tensor(offsets, dtype=I64), weights=w, **kw
        )
    return KeyedJaggedTensor(keys=KEYS, values=v, lengths=torch.tensor(lengths, dtype=I64), weights=w, **kw)


def _collection(kind: str, weighted: bool):
    tables = make_tables()
    if kind == "lp":
        return lp.LowPrecisionEmbeddingBagCollection(
            tables, config=lp.LowPrecisionConfig(bits=4), is_weighted=weighted
        )
    if kind == "mixed":
        plan = PrecisionPlan({"t0": TablePrecision(60, 8, (10, 40, 60), (8, 4, 0))})
        return MixedPrecisionEmbeddingBagCollection(tables, plan=plan, is_weighted=weighted)
    if kind == "search":
        return MPESearchEmbeddingBagCollection(tables, MPESearchConfig(num_groups=2), is_weighted=weighted)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (60, 2), generator=g, dtype=torch.uint8)
    table = CodebookTable(codes, torch.randn(2, 4, 4, generator=g))
    rest = lp.LowPrecisionEmbeddingBagCollection(tables[1:], is_weighted=weighted)
    return CodebookEmbeddingBagCollection(tables, {"t0": table}, rest, is_weighted=weighted)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


# (name, kjt, weighted collection, message)
BAD = [
    # values=[] with lengths [3, 3, ...] segfaulted in FBGEMM's lookup
    ("empty_values", lambda: _kjt([], [3, 3, 1, 1, 0, 0]), False, r"lengths sum to 8 but values holds 0 ids"),
    ("lengths_past_values", lambda: _kjt([1, 2, 3], [1, 1, 1, 1, 1, 1]), False, r"sum to 6 but values holds 3"),
    ("lengths_short_of_values", lambda: _kjt([1, 2, 3, 4], [1, 1, 1, 0, 0, 0]), False, r"sum to 3 but values"),
    ("negative_length", lambda: _kjt([1, 2, 3, 4], [3, -1, 1, 1, 0, 0]), False, r"negative .*-1 at key 'a', sample 1"),
    ("lengths_wrong_size", lambda: _kjt([1, 2, 3, 4], [1, 1, 1, 1], stride=2), False, r"4 lengths for 3 keys x batch size 2"),
    ("offsets_not_from_0", lambda: _kjt([1, 2, 3, 4], None, offsets=[1, 1, 2, 3, 4, 4, 4]), False, r"offsets run from 1"),
    ("offsets_decreasing", lambda: _kjt([1, 2, 3, 4], None, offsets=[0, 3, 1, 2, 4, 4, 4]), False, r"negative .*-2 at key 'a', sample 1"),
    # per-sample weights shorter than values: the forward read past their end
    ("short_weights", lambda: _kjt([1, 2, 3, 4, 5, 6], [1] * 6, weights=[1.0, 1.0, 1.0]), True, r"3 weights for 6 values"),
    ("missing_weights", lambda: _kjt([1, 2], [1, 0, 0, 1, 0, 0]), True, r"is_weighted=True\) but the KJT has no weights"),
    ("float_values", lambda: KeyedJaggedTensor(keys=KEYS, values=torch.ones(2), lengths=torch.tensor([1, 0, 0, 1, 0, 0])), False, r"int32/int64 tensor of ids, got torch.float32"),
]  # fmt: skip
KINDS = ["lp", "mixed", "search", "codebook"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train", [False, True], ids=["forward", "training"])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_inconsistent_kjt_raises_value_error_and_changes_nothing(kind, train, case):
    _, make, weighted, msg = case
    module = _collection(kind, weighted)
    before = _state(module)
    with torch.set_grad_enabled(train), pytest.raises(ValueError, match=msg):
        out = module(make())
        out.values().sum().backward()
    after = _state(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A good batch still works afterwards.
    good = random_kjt(make_tables(), batch=2, weighted=weighted)
    with torch.set_grad_enabled(train):
        out = module(good)
        assert out.values().shape == (2, 8 + 8 + 16) and bool(torch.isfinite(out.values()).all())
        if train:
            out.values().sum().backward()


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_the_tensor_kjt_check_gives_the_native_checks_messages(case, monkeypatch):
    from torchrec_lowprec.modules import bounds

    # CUDA (and CPU without the C++ kernel) check with one torch reduction instead.
    monkeypatch.setattr(bounds, "backend_for", lambda device: "reference")
    _, make, weighted, msg = case
    with pytest.raises(ValueError, match=msg):
        _collection("lp", weighted)(make())


def test_consistent_offsets_and_lengths_are_accepted():
    module = _collection("lp", False)
    by_lengths = _kjt([1, 2, 3, 4], [3, 0, 1, 0, 0, 0])
    by_offsets = _kjt([1, 2, 3, 4], None, offsets=[0, 3, 3, 4, 4, 4, 4])
    with torch.no_grad():
        torch.testing.assert_close(module(by_offsets).values(), module(by_lengths).values(), rtol=0, atol=0)
    empty = _kjt([], [0] * 6)
    with torch.no_grad():
        assert torch.equal(module(empty).values(), torch.zeros(2, 32))


# ----- item 11: hyper-parameters -----
@pytest.mark.parametrize(
    "field, value, msg",
    [
        ("eps", 0.0, r"eps=0.0 must be a finite number > 0"),
        ("eps", -1e-8, r"eps=-1e-08 must be a finite number > 0"),
        ("eps", math.inf, r"eps=inf"),
        ("eps", math.nan, r"eps=nan"),
        ("learning_rate", math.inf, r"learning_rate=inf must be a finite number >= 0"),
        ("learning_rate", math.nan, r"learning_rate=nan"),
        ("learning_rate", -0.1, r"learning_rate=-0.1"),
        ("step_size_lr", math.inf, r"step_size_lr=inf"),
        ("step_size_lr", math.nan, r"step_size_lr=nan"),
        ("weight_decay", math.inf, r"weight_decay=inf"),
        ("weight_decay", math.nan, r"weight_decay=nan"),
        ("step_size_init", math.inf, r"step_size_init=inf must be 'lsq', 'absmax' or a finite float > 0"),
        ("step_size_init", math.nan, r"step_size_init=nan"),
        ("step_size_init", 0.0, r"step_size_init=0.0"),
        ("learning_rate", True, r"learning_rate=True"),
    ],
)
def test_low_precision_config_rejects_non_finite_and_zero_eps(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        lp.LowPrecisionConfig(**{field: value})
    with pytest.raises(ValueError, match=msg):
        lp.LowPrecisionConfig().replace(**{field: value})


def test_good_configs_still_accepted():
    cfg = lp.LowPrecisionConfig(
        eps=1e-10, learning_rate=0.0, step_size_lr=0, weight_decay=0, step_size_init=0.02
    )
    assert cfg.eps == 1e-10 and cfg.step_size_init == 0.02


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: MPESearchConfig(temperature=math.inf), r"temperature=inf must be finite"),
        (lambda: MPESearchConfig(temperature=math.nan), r"temperature=nan"),
        (lambda: MPESearchConfig(reg_lambda=math.inf), r"reg_lambda=inf finite"),
        (lambda: MPESearchConfig(reg_lambda=math.nan), r"reg_lambda=nan"),
        (lambda: CodebookConfig(lr=math.inf), r"lr=inf must be finite and > 0"),
        (lambda: CodebookConfig(lr=math.nan), r"lr=nan"),
        (lambda: CodebookConfig(temperature=math.inf), r"temperature=inf must be finite"),
        (lambda: CodebookConfig(commitment_weight=math.inf), r"commitment_weight=inf must be finite"),
        (lambda: CodebookConfig(balance_weight=math.nan), r"balance_weight=nan"),
        (lambda: CodebookConfig(contrastive_weight=math.inf), r"contrastive_weight=inf"),
    ],
)
def test_search_and_codebook_configs_reject_non_finite(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


# ----- item 13: MPE row maps -----
def _remapped(row_map, name="t0"):
    plan = PrecisionPlan({"t0": TablePrecision(60, 8, (10, 60), (8, 4), remapped=True)})
    return MixedPrecisionEmbeddingBagCollection(make_tables(), plan=plan, row_maps={name: row_map})


@pytest.mark.parametrize(
    "row_map, msg",
    [
        (torch.arange(60).flip(0).index_fill(0, torch.tensor([5]), 60), r"row_maps\['t0'\] maps raw id 5 to rank 60, outside \[0, 60\) of table 't0'"),
        (torch.arange(60).index_fill(0, torch.tensor([7]), -3), r"raw id 7 to rank -3"),
        (torch.arange(59), r"row_maps\['t0'\] has shape \(59,\) .*expected \(60,\)"),
        (torch.arange(60).view(6, 10), r"shape \(6, 10\)"),
        (torch.arange(60, dtype=torch.float32), r"must be an integer tensor"),
        (torch.arange(60).index_fill(0, torch.tensor([3]), 0), r"not a permutation of \[0, 60\): rank 0 is given to 2 raw ids"),
    ],
)  # fmt: skip
def test_bad_row_maps_raise_naming_the_table(row_map, msg):
    with pytest.raises(ValueError, match=msg):
        _remapped(row_map)


def test_row_map_for_table_not_remapped_and_bad_map_in_checkpoint():
    with pytest.raises(ValueError, match=r"row_maps given for table\(s\) \['t1'\] that the precision plan"):
        plan = PrecisionPlan({"t0": TablePrecision(60, 8, (10, 60), (8, 4), remapped=True)})
        MixedPrecisionEmbeddingBagCollection(
            make_tables(), plan=plan, row_maps={"t0": torch.arange(60), "t1": torch.arange(40)}
        )
    good = _remapped(torch.arange(60).flip(0))
    sd = good.state_dict()
    before = _state(good)
    sd["row_map_t0"] = sd["row_map_t0"].clone().index_fill(0, torch.tensor([0]), 99)
    with pytest.raises(ValueError, match=r"row_maps\['t0'\] maps raw id 0 to rank 99"):
        good.load_state_dict(sd)
    after = _state(good)
    assert all(torch.equal(before[k], after[k]) for k in before)

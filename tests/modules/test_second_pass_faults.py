"""Issue 23's faults in the collections: each silently trained wrong before."""

from __future__ import annotations

import threading

import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision


def _dup_kjt():
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "a", "b", "c"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])
    )


def test_a_kjt_with_a_duplicate_key_is_refused_by_every_collection():
    tables = make_tables(features=(("a", "b"), ("c",)))
    plan = PrecisionPlan({"t0": TablePrecision(60, 8, (10, 60), (8, 4))})
    for ebc in (
        lp.LowPrecisionEmbeddingBagCollection(tables),
        lp.MixedPrecisionEmbeddingBagCollection(tables, plan=plan),
    ):
        with pytest.raises(ValueError, match=r"duplicate key\(s\) \['a'\]"):
            ebc(_dup_kjt())


def test_concurrent_backward_passes_lose_no_update():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=4))
    kjts = [random_kjt(tables, gen=torch.Generator().manual_seed(i)) for i in range(4)]
    errors = []

    def work(k):
        try:
            for _ in range(25):
                ebc(k).values().sum().backward()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in kjts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert int(ebc.step) == 100  # every update counted (the step is part of the rounding key)


def _trained():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8))
    ebc(random_kjt(tables)).values().sum().backward()
    return tables, ebc


@pytest.mark.parametrize(
    "entry, poison, match",
    [
        ("step_size", float("nan"), r"step_size must be finite and in"),
        ("step_size", 1e6, r"step_size must be finite and in"),
        ("momentum1", float("inf"), r"momentum1 \(optimizer state\) must be finite and >= 0"),
        ("momentum1", -1.0, r"momentum1 \(optimizer state\) must be finite and >= 0"),
        ("qweight", float("nan"), r"qweight has non-finite fp16 scale/bias"),
    ],
)
def test_a_checkpoint_with_untrainable_values_is_refused_before_loading(entry, poison, match):
    tables, src = _trained()
    sd = src.state_dict()
    key = f"tables.t0.{entry}"
    if entry == "qweight":
        scale = sd[key][:, :2].contiguous().view(torch.float16)
        scale[3] = poison
        sd[key] = sd[key].clone()
        sd[key][:, :2] = scale.view(torch.uint8)
    else:
        sd[key] = sd[key].clone()
        sd[key][3] = poison
    dst = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=8, seed=7))
    before = {k: v.clone() for k, v in dst.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k  # nothing was loaded


@pytest.mark.parametrize("bits", [8, 4, 2, 16])
def test_values_beyond_fp16_range_saturate_with_a_warning(bits):
    t = torchrec.EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=4, feature_names=["f"])
    fl = torchrec.EmbeddingBagCollection([t])
    with torch.no_grad():
        fl.embedding_bags["t"].weight[1] = 7e4
        fl.embedding_bags["t"].weight[2, 0] = -1e5
    with pytest.warns(RuntimeWarning, match=r"table 't': 2 row\(s\) hold values beyond \+-65504"):
        ebc = lp.convert(fl, lp.LowPrecisionConfig(bits=bits))
    w = ebc.dequantized_weight("t")
    assert torch.isfinite(w).all()
    assert w[1].min() > 3e4 and w[2, 0] < -3e4  # saturated, not wrapped or zeroed
    with torch.no_grad():
        fl.embedding_bags["t"].weight[0, 3] = float("nan")
    with pytest.raises(
        ValueError, match=r"table 't': the float weight has NaN/Inf values \(first in row 0\)"
    ):
        lp.convert(fl, lp.LowPrecisionConfig(bits=bits))


def test_dtype_casts_of_a_converted_model_are_refused_device_moves_work():
    ebc = lp.LowPrecisionEmbeddingBagCollection(make_tables())
    model = torch.nn.Sequential(ebc, torch.nn.Linear(2, 2))
    model.to("cpu")
    model.float()
    for cast in (lambda m: m.half(), lambda m: m.double(), lambda m: m.to(torch.bfloat16)):
        with pytest.raises(TypeError, match="keeps its own storage .* cannot be cast to torch"):
            cast(model)
    assert ebc.tables["t0"].step_size.dtype == torch.float32
    model[1].half()  # the dense parts alone cast fine


def test_a_precision_plan_with_fractional_numbers_is_refused():
    doc = PrecisionPlan({"t": TablePrecision(10, 8, (5, 10), (8, 4))}).to_dict()
    doc["tables"]["t"]["bits"] = [8.9, 4.2]
    with pytest.raises(ValueError, match="bits"):
        PrecisionPlan.from_dict(doc)
    doc["tables"]["t"]["bits"] = [8, 4]
    doc["tables"]["t"]["group_ends"] = [5.5, 10]
    with pytest.raises(ValueError, match="group_ends"):
        PrecisionPlan.from_dict(doc)

"""The one transform verb: config-type dispatch, one walker, filter_fn, nothing-converted
reporting, subclasses of EmbeddingBagCollection, and the old names as wrappers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchrec
from torch import nn

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.compress import compress_
from torchrec_lowprec.compress.codebook_ebc import CodebookEmbeddingBagCollection
from torchrec_lowprec.configs import CodebookConfig, InferenceConfig, MPESearchConfig, PerTableConfig
from torchrec_lowprec.export import to_inference
from torchrec_lowprec.modules.mpe_search import (
    MPESearchEmbeddingBagCollection,
    mpe_search_,
    search_collections,
)
from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.transform import IN_BACKWARD_TAGS, register_transform


def _ebc(tables=None, seed=0):
    torch.manual_seed(seed)
    return torchrec.EmbeddingBagCollection(tables or make_tables(), device=torch.device("cpu"))


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = _ebc(make_tables(), 0)
        self.item = nn.Sequential(_ebc(make_tables(features=(("d",), ("e",))), 1))


def test_filter_fn_picks_collections_by_fqn():
    model = Two()
    seen = []

    def only_user(module, fqn):
        seen.append(fqn)
        return fqn == "user"

    out = lp.convert(model, lp.LowPrecisionConfig(bits=4), filter_fn=only_user)
    assert out is model
    assert seen == ["user", "item.0"]
    assert isinstance(model.user, lp.LowPrecisionEmbeddingBagCollection)
    assert model.user.table_config("t0").bits == 4
    assert type(model.item[0]) is torchrec.EmbeddingBagCollection


def test_root_target_returns_the_new_module_and_matches_from_float():
    a, b = _ebc(seed=3), _ebc(seed=3)
    via_verb = lp.convert(a, lp.LowPrecisionConfig(bits=8))
    with pytest.warns(DeprecationWarning, match="from_float"):
        via_wrapper = lp.from_float(b, lp.LowPrecisionConfig(bits=8))
    assert isinstance(via_verb, lp.LowPrecisionEmbeddingBagCollection)
    for t in make_tables():
        assert torch.equal(via_verb.quantized_weight(t.name), via_wrapper.quantized_weight(t.name))


def test_per_table_and_mixed_precision_configs():
    model = lp.convert(
        _ebc(), PerTableConfig({"t1": lp.LowPrecisionConfig(bits=2)}, lp.LowPrecisionConfig(bits=4))
    )
    assert [model.table_config(n).bits for n in ("t0", "t1")] == [4, 2]
    plan = PrecisionPlan.uniform({"t0": (60, 8), "t1": (40, 16)}, 8)
    mixed = lp.convert(_ebc(), lp.MixedPrecisionConfig(plan))
    assert isinstance(mixed, lp.MixedPrecisionEmbeddingBagCollection)
    with pytest.warns(DeprecationWarning, match="torchrec_lowprec: convert\\(..., precision_plan=...\\)"):
        legacy = lp.convert(_ebc(), None, precision_plan=plan)
    kjt = random_kjt(make_tables())
    assert torch.equal(mixed(kjt).values(), legacy(kjt).values())


def test_shared_collection_is_transformed_once():
    shared = _ebc()
    model = nn.ModuleDict({"a": shared, "b": nn.ModuleDict({"c": shared})})
    lp.convert(model, lp.LowPrecisionConfig(bits=8))
    assert model["a"] is model["b"]["c"]
    assert isinstance(model["a"], lp.LowPrecisionEmbeddingBagCollection)


def test_bad_config_types_raise_type_error():
    with pytest.raises(TypeError, match="config is a dict"):
        lp.convert(_ebc(), {"bits": 4})
    with pytest.raises(TypeError, match="no transform for a config of type int"):
        lp.convert(_ebc(), 4)
    with pytest.raises(TypeError, match="table name -> LowPrecisionConfig"):
        PerTableConfig({"t0": 4})


def test_new_config_type_registers_without_touching_the_verb():
    class Halve:
        pass

    @register_transform(Halve, is_target=lambda m: isinstance(m, nn.Linear), targets="nn.Linear")
    def _halve(module, config, fqn):
        with torch.no_grad():
            module.weight.mul_(0.5)
        return module

    lin = nn.Linear(2, 2, bias=False)
    w = lin.weight.detach().clone()
    lp.convert(nn.Sequential(lin), Halve())
    assert torch.equal(lin.weight, w * 0.5)


# ----- item 7: subclasses, nothing converted -----
class MyEBC(torchrec.EmbeddingBagCollection):
    """A user subclass keeping EBC semantics (e.g. adds logging)."""


def test_subclass_of_embedding_bag_collection_is_converted():
    torch.manual_seed(0)
    sub = MyEBC(make_tables(), device=torch.device("cpu"))
    model = nn.Sequential(sub)
    kjt = random_kjt(make_tables())
    ref = sub(kjt).values()
    lp.convert(model, lp.LowPrecisionConfig(bits=8))
    assert isinstance(model[0], lp.LowPrecisionEmbeddingBagCollection)
    # int8 of TorchRec's init (|w| <= 1/sqrt(rows)): per-row step = absmax/127-ish.
    torch.testing.assert_close(model[0](kjt).values(), ref, atol=0.02, rtol=0)


def test_embedding_collection_is_converted_and_named_where_it_is_not():
    def ec():
        return torchrec.EmbeddingCollection(
            [torchrec.EmbeddingConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])],
            device=torch.device("cpu"),
        )

    model = nn.Sequential(nn.Linear(2, 2), ec())
    assert lp.convert(model, lp.LowPrecisionConfig(bits=8)) is model
    assert isinstance(model[1], lp.LowPrecisionEmbeddingCollection)
    # The MPE search converts it too (tests/modules/test_mpe_search_ec.py).
    model = nn.Sequential(nn.Linear(2, 2), ec())
    out = lp.convert(model, lp.MPESearchConfig())
    assert type(out[1]).__name__ == "MPESearchEmbeddingCollection"


def test_no_collection_warns_and_a_converted_model_warns_again():
    with pytest.warns(UserWarning, match="holds no embedding module"):
        lp.convert(nn.Linear(2, 2), lp.LowPrecisionConfig())
    model = lp.convert(nn.Sequential(_ebc()), lp.LowPrecisionConfig())
    with pytest.warns(UserWarning, match="LowPrecisionEmbeddingBagCollection at '0'"):
        lp.convert(model, lp.LowPrecisionConfig())
    with pytest.warns(UserWarning, match="filter_fn rejected"):
        lp.convert(nn.Sequential(_ebc()), lp.LowPrecisionConfig(), filter_fn=lambda m, fqn: False)


def test_convert_with_a_collection_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lp.convert(nn.Sequential(_ebc()), lp.LowPrecisionConfig())


# ----- the old names are the verb -----
def test_mpe_search_wrapper_is_the_verb():
    counts = {
        f: torch.arange(r, 0, -1)
        for t in make_tables()
        for f, r in [(f, t.num_embeddings) for f in t.feature_names]
    }
    a, b = nn.Sequential(_ebc(seed=5)), nn.Sequential(_ebc(seed=5))
    with pytest.warns(DeprecationWarning, match="mpe_search_"):
        found = mpe_search_(a, MPESearchConfig(num_groups=2), counts)
    lp.convert(b, MPESearchConfig(num_groups=2), frequencies=counts)
    assert search_collections(b) == [b[0]]
    assert found == [a[0]] and isinstance(b[0], MPESearchEmbeddingBagCollection)
    assert a[0]._group_ends == b[0]._group_ends
    assert a[0]._group_mass == b[0]._group_mass


def test_compress_and_inference_wrappers_are_the_verb():
    mec = CodebookConfig(num_subspaces=2, codebook_size=4, min_rows=50, steps=0)
    with pytest.warns(DeprecationWarning, match="compress_"):
        a = compress_(nn.Sequential(_ebc(seed=2)), None, mec)
    b = lp.convert(nn.Sequential(_ebc(seed=2)), mec)
    kjt = random_kjt(make_tables())
    assert isinstance(b[0], CodebookEmbeddingBagCollection)
    assert torch.equal(a[0](kjt).values(), b[0](kjt).values())
    lp_model = lp.convert(nn.Sequential(_ebc(seed=2)), lp.LowPrecisionConfig(bits=4))
    served = lp.convert(lp_model, InferenceConfig())
    assert not served.training
    assert type(served[0]).__module__.startswith("torchrec.quant")
    with pytest.raises(ValueError, match="holds no LowPrecisionEmbeddingBagCollection"):
        with pytest.warns(DeprecationWarning, match="to_inference"):
            to_inference(nn.Sequential(_ebc()))


def test_in_backward_tags_defined_once():
    import pathlib

    root = pathlib.Path(lp.__file__).parent
    hits = [p for p in root.rglob("*.py") if '"_optimizer_kwargs")' in p.read_text()]
    assert [p.name for p in hits] == ["transform.py"]
    assert IN_BACKWARD_TAGS == ("_optimizer_classes", "_optimizer_kwargs")

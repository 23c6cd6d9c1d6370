"""The public API is what docs/design.md lists; old spellings warn; configs round-trip."""

from __future__ import annotations

import json
import pathlib
import re
import warnings

import pytest
import torch

import torchrec_lowprec as lp
from torchrec_lowprec import configs
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_design_doc_lists_exactly_the_public_api():
    text = (ROOT / "docs" / "design.md").read_text()
    block = re.search(r"<!-- public-api -->(.*?)<!-- /public-api -->", text, re.S)
    assert block, "docs/design.md lost its public-api block"
    assert sorted(re.findall(r"`(\w+)`", block.group(1))) == sorted(lp.__all__)
    for name in lp.__all__:
        assert getattr(lp, name) is not None
        assert getattr(lp, name).__doc__, f"{name} has no docstring"


@pytest.mark.parametrize(
    "access, match",
    [
        (lambda: lp.from_float, "torchrec_lowprec.from_float"),
        (lambda: lp.to_float, "torchrec_lowprec.to_float"),
        (lambda: configs.MECConfig, "MECConfig"),
        (lambda: __import__("torchrec_lowprec.types").types.LowPrecisionConfig, "types.LowPrecisionConfig"),
        (lambda: __import__("torchrec_lowprec.types").types.PrecisionPlan, "types.PrecisionPlan"),
    ],
)
def test_old_names_warn_and_still_resolve(access, match):
    with pytest.warns(DeprecationWarning, match=f"^torchrec_lowprec: .*{re.escape(match)}.*0.2"):
        assert access() is not None


def test_the_suite_turns_our_deprecations_into_errors():
    # pyproject.toml's filterwarnings: a stray old spelling in this project fails its test.
    with pytest.raises(DeprecationWarning):
        lp.from_float  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert lp.from_float is not None


def test_convert_refuses_inputs_its_handler_does_not_take():
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['frequencies'\]"):
        lp.convert(torch.nn.Sequential(), lp.LowPrecisionConfig(), frequencies={})


PLAN = PrecisionPlan({"t": TablePrecision(100, 8, (10, 100), (8, 4))})


@pytest.mark.parametrize(
    "cfg",
    [
        lp.LowPrecisionConfig(),
        lp.LowPrecisionConfig(bits=4, optimizer="adam", learning_rate=1e-3, rounding="nearest", seed=3),
        lp.PerTableConfig({"a": lp.LowPrecisionConfig(bits=2)}, lp.LowPrecisionConfig(bits=16)),
        lp.MixedPrecisionConfig(PLAN, lp.LowPrecisionConfig(bits=8), {"t": lp.LowPrecisionConfig(seed=1)}),
        lp.MPESearchConfig(candidate_bits=(0, 2, 8, 32), num_groups=4),
        lp.MPESearchConfig(candidate_bits=(0, 2, 4, 8), target_bits=5.0, budget_lr=0.2),
        lp.CodebookConfig(num_subspaces=2, codebook_size=16),
        lp.InferenceConfig(output_dtype=torch.float16, register_tbes=True),
    ],
    ids=lambda c: type(c).__name__,
)
def test_configs_round_trip_through_json(cfg):
    doc = json.loads(json.dumps(cfg.to_dict()))
    assert doc["type"] == type(cfg).__name__ and doc["version"] == type(cfg).VERSION
    assert type(cfg).from_dict(doc) == cfg
    with pytest.raises(ValueError, match="version"):
        type(cfg).from_dict({**doc, "version": type(cfg).VERSION + 1})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['nope'\]"):
        type(cfg).from_dict({**doc, "nope": 1})


def test_configs_are_frozen_and_hold_no_tensors():
    for cls in (lp.LowPrecisionConfig, lp.MixedPrecisionConfig, lp.MPESearchConfig, lp.CodebookConfig):
        names = {f for f in cls.__dataclass_fields__}
        assert not names & {"row_maps", "frequencies", "mec"}, cls
    with pytest.raises(AttributeError):
        lp.LowPrecisionConfig().bits = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="bits=8.0"):
        lp.LowPrecisionConfig(bits=8.0)

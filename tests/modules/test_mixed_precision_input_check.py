"""The mixed-precision collections on the CUDA path, run here on CPU with
``input_check.checks_on_device`` made true and the update on Triton (its interpreter): routing
ids to row groups needs each group's id count on the host, so the KJT check, the id check and
those counts come back in one read, the step's only host sync; a step trains bit for bit as the
host-checked one, and a bad batch raises in its own step and updates nothing."""

from __future__ import annotations

import collections

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from tests.modules import test_mixed_precision as mp_ebc
from tests.modules import test_mixed_precision_ec as mp_ec
from tests.modules.test_host_syncs import _count_syncs
from tests.modules.test_input_check import _snapshot, _train
from torchrec_lowprec.kernels import dispatch
from torchrec_lowprec.modules import (
    MixedPrecisionEmbeddingBagCollection,
    MixedPrecisionEmbeddingCollection,
    input_check,
)

ONE_READ = collections.Counter({("modules/row_groups.py", "_routed_on_device", "tolist"): 1})


@pytest.fixture(autouse=True)
def triton_update(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(dispatch, "backend_for", lambda device: "triton")


def _module(kind: str, **cfg):
    torch.manual_seed(0)
    config = lp.LowPrecisionConfig(optimizer="adam", **cfg)
    if kind == "ebc":
        tables = make_tables()
        return MixedPrecisionEmbeddingBagCollection(tables, plan=mp_ebc._plan(), config=config), random_kjt(
            tables
        )
    return MixedPrecisionEmbeddingCollection(mp_ec._tables(), plan=mp_ec._plan(), config=config), mp_ec._kjt()


def _with_id(kjt: KeyedJaggedTensor, position: int, bad_id: int) -> KeyedJaggedTensor:
    values = kjt.values().clone()
    values[position] = bad_id
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths())


def _on_device(monkeypatch):
    monkeypatch.setattr(input_check, "checks_on_device", lambda device: True)


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_a_device_checked_step_reads_once_and_trains_as_the_host_checked_one(kind, monkeypatch):
    host, kjt = _module(kind)
    for _ in range(2):
        _train(host, kjt)
    _on_device(monkeypatch)
    here, kjt = _module(kind)
    _train(here, kjt)
    assert kjt.length_per_key_or_none() is not None
    assert _count_syncs(lambda: _train(here, kjt), direct=True) == ONE_READ
    a, b = _snapshot(here), _snapshot(host)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("bad_id", [60, -3])
def test_a_bad_id_raises_in_its_own_step_and_updates_nothing(kind, bad_id, monkeypatch):
    _on_device(monkeypatch)
    module, kjt = _module(kind)
    _train(module, kjt)
    before = _snapshot(module)
    with pytest.raises(
        IndexError,
        match=rf"id {bad_id} of feature 'a' is out of range for table 't0' with 60 .*in this batch",
    ):
        _train(module, _with_id(kjt, 0, bad_id))
    assert all(torch.equal(before[k], v) for k, v in _snapshot(module).items())
    _train(module, kjt)  # nothing left pending
    assert not torch.equal(
        before["row_groups.tables.t0__g0.qweight"], _snapshot(module)["row_groups.tables.t0__g0.qweight"]
    )


def test_a_kjt_whose_lengths_disagree_with_length_per_key_is_refused_in_its_step(monkeypatch):
    _on_device(monkeypatch)
    module, kjt = _module("ebc")
    known = list(kjt.length_per_key())
    known[0], known[1] = known[0] - 1, known[1] + 1
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), length_per_key=known)
    with pytest.raises(
        ValueError, match=r"KJT lengths disagree with its length_per_key.*key 'a'.*in this batch"
    ):
        _train(module, bad)


def test_warn_tables_keep_the_host_check(monkeypatch):
    _on_device(monkeypatch)
    module, kjt = _module("ebc", bounds_check="warn")
    with pytest.warns(RuntimeWarning, match="id 60 of feature 'a' is out of range"):
        _train(module, _with_id(kjt, 0, 60))


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_a_batch_without_ids_takes_the_device_path(kind, monkeypatch):
    _on_device(monkeypatch)
    module, kjt = _module(kind)
    keys, stride = kjt.keys(), kjt.stride()
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.zeros(0, dtype=torch.int64),
        lengths=torch.zeros(len(keys) * stride, dtype=torch.int64),
    )
    out = _train(module, empty)
    values = out.values() if not isinstance(out, dict) else torch.cat([jt.values() for jt in out.values()])
    assert not values.any()

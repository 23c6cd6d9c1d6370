"""The MPE search collections' id checks on the device (the CUDA path), run here on CPU with
``input_check.checks_on_device`` made true: a search step (forward, regulariser, backward)
makes no host sync and computes what the host-checked one does; a bad id reads nothing, gets no
gradient, and is raised by the next forward or ``check_inputs()``."""

from __future__ import annotations

import collections

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.helpers import make_tables, random_kjt
from tests.modules.test_host_syncs import _count_syncs, _ec_tables
from tests.modules.test_input_check import _bad_kjt
from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.modules import input_check
from torchrec_lowprec.modules.mpe_search import MPESearchEmbeddingBagCollection
from torchrec_lowprec.modules.mpe_search_ec import MPESearchEmbeddingCollection


def _search(kind: str):
    tables = make_tables()
    torch.manual_seed(0)
    if kind == "ebc":
        return MPESearchEmbeddingBagCollection(tables, MPESearchConfig(reg_lambda=1e-3)), tables
    return MPESearchEmbeddingCollection(_ec_tables(tables), MPESearchConfig(reg_lambda=1e-3)), tables


def _outputs(out) -> torch.Tensor:
    return out.values() if not isinstance(out, dict) else torch.cat([jt.values() for jt in out.values()])


def _step(search, kjt) -> torch.Tensor:
    out = _outputs(search(kjt))
    (out.square().sum() + search.regularization()).backward()
    return out.detach()


def _grads(search) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in search.named_parameters() if p.grad is not None}


def _without(kjt: KeyedJaggedTensor, position: int) -> KeyedJaggedTensor:
    """``kjt`` with the id at ``position`` (of ``values``) removed from its bag."""
    lengths = kjt.lengths().clone()
    lengths[int(torch.searchsorted(kjt.offsets(), position, right=True)) - 1] -= 1
    values = torch.cat([kjt.values()[:position], kjt.values()[position + 1 :]])
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=lengths)


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_a_device_checked_search_step_makes_no_host_sync_and_equals_the_host_checked_one(kind, monkeypatch):
    kjt = random_kjt(make_tables())
    host, _ = _search(kind)
    want = _step(host, kjt)
    monkeypatch.setattr(input_check, "checks_on_device", lambda device: True)
    here, _ = _search(kind)
    got = _step(here, kjt)
    assert torch.equal(got, want)
    a, b = _grads(here), _grads(host)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _count_syncs(lambda: _step(here, kjt), direct=True) == collections.Counter()


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("bad_id", [40, -3])
def test_a_bad_id_reads_nothing_gets_no_gradient_and_the_next_forward_raises(kind, bad_id, monkeypatch):
    monkeypatch.setattr(input_check, "checks_on_device", lambda device: True)
    tables = make_tables()
    bad = _bad_kjt(tables, bad_id)
    position = sum(bad.length_per_key()[:2]) + 1  # where _bad_kjt put it
    searched, _ = _search(kind)
    got = _step(searched, bad)  # no exception: the step does not wait for the verdict
    # What the search learns from the batch is what the batch without the bad id teaches.
    reference, _ = _search(kind)
    out = _step(reference, _without(bad, position))
    a, b = _grads(searched), _grads(reference)
    assert a.keys() == b.keys()
    # (Not the step sizes' and offsets': LSQ scales their gradient by 1/sqrt(ids looked up).)
    learned = [k for k in a if k.startswith(("weights.", "bit_logits."))]
    assert len(learned) == 4, sorted(a)
    for k in learned:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)
    if kind == "ec":  # the bad id's own row is zero, the others are the reference's
        assert not got[position].any()
        got = torch.cat([got[:position], got[position + 1 :]])
    torch.testing.assert_close(got, out, rtol=1e-6, atol=1e-7)
    with pytest.raises(
        IndexError, match=rf"id {bad_id} of feature 'c' is out of range for table 't1' with 40"
    ):
        searched(random_kjt(tables))
    searched(random_kjt(tables))  # reported once


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_check_inputs_raises_a_pending_search_error(kind, monkeypatch):
    monkeypatch.setattr(input_check, "checks_on_device", lambda device: True)
    search, tables = _search(kind)
    with torch.no_grad():
        search(_bad_kjt(tables, 1000))
    with pytest.raises(IndexError, match="id 1000 of feature 'c'.*in the batch of step 1"):
        search.check_inputs()
    search.check_inputs()  # nothing left


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_a_search_batch_without_ids_takes_the_device_path(kind, monkeypatch):
    monkeypatch.setattr(input_check, "checks_on_device", lambda device: True)
    search, tables = _search(kind)
    kjt = random_kjt(tables)
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros_like(kjt.lengths())
    )
    assert not _step(search, empty).any()
    search.check_inputs()

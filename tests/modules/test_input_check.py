"""Input checks made on the device (the CUDA path, ``modules/input_check.py``), run here on CPU:
``input_check.checks_on_device`` is made true, so the collections take the device path
with CPU tensors; the fused update runs on the Triton interpreter, the PyTorch reference or
the C++ kernel. A bad batch must update nothing and be raised by the next forward (or by
``check_inputs()``), and a good batch must train exactly as the host-checked path does."""

from __future__ import annotations

import collections

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from tests.modules.test_host_syncs import _count_syncs, _ec_tables
from torchrec_lowprec.modules import input_check

BACKENDS = ["cpu_native", "reference", "triton"]


@pytest.fixture
def on_device(monkeypatch):
    monkeypatch.setattr(input_check, "checks_on_device", lambda device: True)


def _use_backend(monkeypatch, backend):
    from torchrec_lowprec.kernels import dispatch

    if backend == "triton":
        pytest.importorskip("triton")
    if backend != "cpu_native":
        monkeypatch.setattr(dispatch, "backend_for", lambda device: backend)


def _module(kind, bits=4, **cfg):
    tables = make_tables()
    config = lp.LowPrecisionConfig(bits=bits, **cfg)
    if kind == "ebc":
        return lp.LowPrecisionEmbeddingBagCollection(tables, config=config), tables
    return lp.LowPrecisionEmbeddingCollection(_ec_tables(tables), config=config), tables


def _train(module, kjt):
    out = module(kjt)
    if isinstance(out, dict):  # the EC's JaggedTensors
        sum(jt.values().square().sum() for jt in out.values()).backward()
    else:
        out.values().square().sum().backward()
    return out


def _snapshot(module):
    return {
        k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor) and k != "step"
    }


def _bad_kjt(tables, bad_id):
    """``random_kjt``'s batch with one id of feature ``c`` (table t1, 40 rows) set to ``bad_id``."""
    kjt = random_kjt(tables)
    values = kjt.values().clone()
    c_start = sum(kjt.length_per_key()[:2])
    assert kjt.length_per_key()[2] > 0
    values[c_start + 1] = bad_id
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths())


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_a_device_checked_step_makes_no_host_sync_and_trains_as_the_host_checked_one(
    kind, on_device, monkeypatch
):
    _use_backend(monkeypatch, "triton")
    checked_here, tables = _module(kind)
    kjt = random_kjt(tables)
    assert kjt.length_per_key_or_none() is not None  # as TorchRec's pipelines and .to() keep it
    _train(checked_here, kjt)
    assert _count_syncs(lambda: _train(checked_here, kjt), direct=True) == collections.Counter()

    monkeypatch.setattr(input_check, "checks_on_device", lambda device: False)
    checked_on_host, _ = _module(kind)
    _train(checked_on_host, kjt)
    _train(checked_on_host, kjt)
    for name in ("t0", "t1"):
        assert torch.equal(checked_here.quantized_weight(name), checked_on_host.quantized_weight(name))
    a, b = _snapshot(checked_here), _snapshot(checked_on_host)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("bad_id", [40, -3, 2**40])
def test_a_bad_id_updates_nothing_and_the_next_forward_raises(kind, backend, bad_id, on_device, monkeypatch):
    _use_backend(monkeypatch, backend)
    module, tables = _module(kind, optimizer="adam")
    _train(module, random_kjt(tables))
    before = _snapshot(module)
    _train(module, _bad_kjt(tables, bad_id))  # no exception: the step does not wait for the verdict
    after = _snapshot(module)
    assert all(torch.equal(before[k], after[k]) for k in before), "a bad batch changed a table"
    assert int(module.step) == 2  # the skipped batch still counts a step
    message = (
        rf"id {bad_id} of feature 'c' is out of range for table 't1' with 40 rows \(1 bad id\(s\)\) in the "
    )
    with pytest.raises(IndexError, match=message + r"batch of step 2 .*that batch updated no table"):
        module(random_kjt(tables))
    _train(module, random_kjt(tables, gen=torch.Generator().manual_seed(5)))  # reported once; trains on
    assert not torch.equal(after["tables.t1.qweight"], module.quantized_weight("t1"))


@pytest.mark.parametrize("kind", ["ebc", "ec"])
def test_check_inputs_raises_a_pending_error_at_once(kind, on_device):
    module, tables = _module(kind)
    _train(module, _bad_kjt(tables, 1000))
    with pytest.raises(IndexError, match="id 1000 of feature 'c'"):
        module.check_inputs()
    module.check_inputs()  # nothing left
    module(random_kjt(tables))


def _kjt_with(keys, values, lengths, length_per_key):
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        length_per_key=length_per_key,
        stride=len(lengths) // len(keys),
    )


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize(
    "lengths",
    [
        [2, 1, 0, 1, 2, 1],  # key a holds 3 ids, its length_per_key says 2
        [3, -1, 1, 1, 1, 1],  # per-key sums agree, one length is negative
    ],
)
def test_a_kjt_whose_lengths_disagree_with_length_per_key_reads_in_bounds_and_updates_nothing(
    kind, lengths, on_device
):
    module, tables = _module(kind)
    _train(module, random_kjt(tables))
    before = _snapshot(module)
    values = torch.tensor([1, 2, 3, 4, 5, 6])
    kjt = _kjt_with(["a", "b", "c"], values, torch.tensor(lengths), [2, 2, 2])
    _train(module, kjt)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(module).items())
    with pytest.raises(ValueError, match=r"KJT lengths disagree with its length_per_key.*key 'a'"):
        module.check_inputs()


def test_a_length_per_key_that_does_not_sum_to_the_values_is_refused_at_once(on_device):
    module, _ = _module("ebc")
    kjt = _kjt_with(["a", "b", "c"], torch.arange(6), torch.tensor([1, 1, 1, 1, 1, 1]), [2, 2, 3])
    with pytest.raises(ValueError, match="length_per_key sums to 7 but values holds 6 ids"):
        module(kjt)


def test_a_kjt_without_length_per_key_is_checked_with_one_read(on_device, monkeypatch):
    from torchrec_lowprec.modules import bounds

    _use_backend(monkeypatch, "triton")
    monkeypatch.setattr(bounds, "backend_for", lambda device: "reference")  # the KJT check as on CUDA
    module, tables = _module("ebc")
    kjt = random_kjt(tables)

    def bare():
        return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())

    _train(module, bare())
    counts = _count_syncs(lambda: _train(module, bare()), direct=True)
    assert counts == collections.Counter({("modules/bounds.py", "validate_kjt", "tolist"): 1})


def test_warn_tables_keep_the_host_check(on_device):
    module, tables = _module("ebc", bounds_check="warn")
    with pytest.warns(RuntimeWarning, match="id 40 of feature 'c' is out of range"):
        _train(module, _bad_kjt(tables, 40))
    module.check_inputs()  # nothing deferred


def test_the_pending_reports_are_bounded():
    errors = input_check.DeferredInputErrors()
    ok = torch.zeros(4, dtype=torch.int64)
    for step in range(3 * input_check.MAX_PENDING):
        errors.record(ok, step, lambda numbers, step: AssertionError("not raised"))
    assert len(errors) <= input_check.MAX_PENDING
    errors.flush()
    assert len(errors) == 0

"""The sharded collections' input checks on the device (the CUDA path,
``distributed/global_input.py``), run here on 2 gloo ranks with ``input_check.checks_on_device``
made true: a step makes no host sync and trains exactly as the host-checked one; a bad batch on
one rank updates no shard on any rank, and every rank raises (the feeding rank names the id,
the other names that rank) at its next forward or ``check_inputs()``."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_sharded_host_syncs import sharded_model
from tests.modules.test_host_syncs import _count_syncs
from torchrec_lowprec.kernels import dispatch
from torchrec_lowprec.modules import input_check

pytestmark = pytest.mark.slow


def _train(dmp, kjt) -> None:
    sum(v.square().sum() for v in dmp(kjt).values()).backward()


def _local_state(dmp) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in dmp.state_dict().items():
        if isinstance(v, ShardedTensor):
            for i, shard in enumerate(v.local_shards()):
                out[f"{k}#{i}"] = shard.tensor.clone()
        elif isinstance(v, torch.Tensor) and not k.endswith(".step"):
            out[k] = v.clone()
    return out


def _with_id(kjt: KeyedJaggedTensor, bad_id: int) -> KeyedJaggedTensor:
    """``kjt`` with its second id of feature f0 (table t0, 40 rows) set to ``bad_id``."""
    values = kjt.values().clone()
    assert kjt.length_per_key()[0] >= 2
    values[1] = bad_id
    return KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=values, lengths=kjt.lengths())


def _with_wrong_length_per_key(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``kjt`` claiming one id of f0 belongs to f1 (sums still agree with ``values``)."""
    known = list(kjt.length_per_key())
    known[0], known[1] = known[0] - 1, known[1] + 1
    return KeyedJaggedTensor(
        keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), length_per_key=known
    )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _body(rank: int, world: int, kind: str, sharding: str) -> None:
    # A spawned process of its own: switched for the whole body. The CUDA path's update
    # (Triton, on its interpreter) for both models.
    dispatch.backend_for = lambda device: "triton"
    torch.manual_seed(0)
    host, _, kjt = sharded_model(rank, world, kind, sharding)
    for _ in range(2):
        _train(host, kjt)
    input_check.checks_on_device = lambda device: True
    torch.manual_seed(0)
    dmp, key, kjt = sharded_model(rank, world, kind, sharding)
    sharded = getattr(dmp.module, key)
    _train(dmp, kjt)
    calls = _count_syncs(direct=True, step=lambda: _train(dmp, kjt))
    assert calls == collections.Counter(), calls
    assert _same(_local_state(dmp), _local_state(host)), "device-checked steps trained differently"
    sharded.check_inputs()  # nothing pending

    # Rank 0 feeds an out-of-range id: no rank's shards change; both raise at the next forward.
    before = _local_state(dmp)
    _train(dmp, _with_id(kjt, 10**6) if rank == 0 else kjt)
    assert _same(_local_state(dmp), before), f"rank {rank}: a bad step updated a shard"
    with pytest.raises(IndexError) as e:
        _train(dmp, kjt)
    expected = (
        "id 1000000 of feature 'f0' is out of range for table 't0' with 40 rows"
        if rank == 0
        else "rank 0 fed out-of-range ids to this sharded collection in the batch of step 3"
    )
    assert expected in str(e.value), str(e.value)

    # Rank 1 feeds a KJT whose length_per_key disagrees with its lengths: check_inputs().
    _train(dmp, _with_wrong_length_per_key(kjt) if rank == 1 else kjt)
    assert _same(_local_state(dmp), before), f"rank {rank}: a bad KJT updated a shard"
    with pytest.raises(ValueError) as e:
        sharded.check_inputs()
    expected = "KJT lengths disagree" if rank == 1 else "rank 1 fed an inconsistent KJT"
    assert expected in str(e.value), str(e.value)

    # Nothing is left pending, and training goes on.
    sharded.check_inputs()
    _train(dmp, kjt)
    assert not _same(_local_state(dmp), before)


@pytest.mark.parametrize("kind,sharding", [("ebc", "rw"), ("ebc", "tw"), ("ec", "rw"), ("ec", "tw")])
def test_a_device_checked_sharded_step_agrees_on_bad_input(kind, sharding):
    pytest.importorskip("triton")
    run_multiprocess(_body, kind, sharding)

"""Host synchronisations in a training step (each one stalls TorchRec's pipelined training on
CUDA). Counted by patching the tensor methods that sync and recording calls made from
torchrec_lowprec's own code during forward + backward (the fused update included)."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt

SYNCING = ("item", "tolist", "__bool__", "cpu", "__int__", "__float__", "__index__")


def _count_syncs(step, direct: bool = False) -> collections.Counter:
    """Syncing calls made while ``step()`` runs, by (file, function, method) of the last
    torchrec_lowprec frame on the stack; ``direct``: only calls made by our code itself (a
    TorchRec sync under one of our frames is not counted)."""
    calls: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, orig):
        def counted(self, *a, **k):
            stack = traceback.extract_stack()[:-1]
            ours = [f for f in (stack[-1:] if direct else stack) if "/torchrec_lowprec/" in f.filename]
            if ours:
                calls[(ours[-1].filename.rsplit("torchrec_lowprec/", 1)[1], ours[-1].name, name)] += 1
            return orig(self, *a, **k)

        return counted

    try:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, wrap(name, orig))
        step()
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
    return calls


@pytest.mark.parametrize("bits", [8, 4])
def test_one_sync_per_training_step_the_kjt_check(bits):
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables, config=lp.LowPrecisionConfig(bits=bits))
    kjt = random_kjt(tables)
    ebc(kjt).values().sum().backward()  # first step: optimizer state is set up
    calls = _count_syncs(lambda: ebc(kjt).values().sum().backward())
    # Left: validate_kjt's one reduction (lengths' min, sum and per-key sums, which also split
    # the fused update by table). The step counter, the per-table split and the step-bound
    # counters no longer sync.
    assert calls == collections.Counter({("modules/bounds.py", "validate_kjt", "tolist"): 1})
    assert int(ebc.step) == 2
    assert set(ebc.step_bound_rows()) == {t.name for t in tables}


def test_the_step_counter_follows_writes_from_outside():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables)
    kjt = random_kjt(tables)
    ebc(kjt).values().sum().backward()
    with torch.no_grad():
        ebc.step.fill_(41)  # e.g. a checkpoint load or a sharded parent's copy
    ebc(kjt).values().sum().backward()
    assert int(ebc.step) == 42

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


def _ec_tables(tables):
    import torchrec

    return [
        torchrec.EmbeddingConfig(name=t.name, embedding_dim=8, num_embeddings=t.num_embeddings,
                                 feature_names=t.feature_names)
        for t in tables
    ]  # fmt: skip


def _steps(kind: str, bits: int):
    """A collection's training step, after a first one (which sets up optimizer state); the
    two tables at different widths (two lookup groups)."""
    tables = make_tables()
    per_table = {"t1": lp.LowPrecisionConfig(bits=8)}
    if kind == "ebc":
        module = lp.LowPrecisionEmbeddingBagCollection(
            tables, config=lp.LowPrecisionConfig(bits=bits), per_table_configs=per_table
        )
        kjt = random_kjt(tables)

        def step():
            module(kjt).values().sum().backward()
    else:
        module = lp.LowPrecisionEmbeddingCollection(
            _ec_tables(tables), config=lp.LowPrecisionConfig(bits=bits), per_table_configs=per_table
        )
        kjt = random_kjt(tables)

        def step():
            sum(jt.values().sum() for jt in module(kjt).values()).backward()

    step()
    return module, step


@pytest.mark.parametrize("kind", ["ebc", "ec"])
@pytest.mark.parametrize("bits", [8, 4])
def test_a_training_step_makes_no_host_sync(kind, bits):
    module, step = _steps(kind, bits)
    # The KJT check and the id bounds check read the host tensors in place (native passes);
    # the per-key sums split the fused update by table; the step counter is mirrored on the
    # host; the step-bound and skipped-row counters stay where they are counted.
    assert _count_syncs(step) == collections.Counter()
    assert int(module.step) == 2
    assert set(module.step_bound_rows()) == {"t0", "t1"}


def test_without_the_native_kernel_each_check_syncs_once(monkeypatch):
    from torchrec_lowprec.modules import bounds

    # The path every non-CPU device takes (and CPU without a C++ compiler): one reduction
    # read back, plus the tensor bounds check's test.
    module, step = _steps("ebc", 4)
    monkeypatch.setattr(bounds, "backend_for", lambda device: "reference")
    assert _count_syncs(step) == collections.Counter(
        {
            ("modules/bounds.py", "validate_kjt", "tolist"): 1,
            ("modules/bounds.py", "check_ids", "__bool__"): 1,
        }
    )


def test_the_triton_update_leaves_its_counts_on_the_device(monkeypatch):
    pytest.importorskip("triton")
    from torchrec_lowprec.kernels import dispatch

    # The CUDA update's Python side, run by Triton's interpreter on CPU: nothing of ours reads
    # a count back (the interpreter's own copies are not ours: direct=True).
    module, step = _steps("ebc", 4)
    monkeypatch.setattr(dispatch, "backend_for", lambda device: "triton")
    assert _count_syncs(step, direct=True) == collections.Counter()
    assert module.nonfinite_rows_skipped() == {"t0": 0, "t1": 0}


def test_a_device_counted_nonfinite_skip_warns_when_read(monkeypatch):
    pytest.importorskip("triton")
    from torchrec_lowprec.kernels import dispatch

    module, step = _steps("ebc", 4)
    monkeypatch.setattr(dispatch, "backend_for", lambda device: "triton")
    kjt = random_kjt(make_tables())
    before = module.quantized_weight("t0").clone()
    (module(kjt).values() * float("nan")).sum().backward()  # every touched row skipped
    assert torch.equal(before, module.quantized_weight("t0"))
    with pytest.warns(RuntimeWarning, match=r"table 't0': \d+ row\(s\) got a NaN/Inf gradient by step 2"):
        skipped = module.nonfinite_rows_skipped()
    assert skipped["t0"] > 0 and skipped["t1"] > 0
    assert module.nonfinite_rows_skipped() == skipped  # read once, not counted twice
    assert module.state_dict()["_extra_state"]["nonfinite_rows"] == skipped


def test_the_step_counter_follows_writes_from_outside():
    tables = make_tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tables)
    kjt = random_kjt(tables)
    ebc(kjt).values().sum().backward()
    with torch.no_grad():
        ebc.step.fill_(41)  # e.g. a checkpoint load or a sharded parent's copy
    ebc(kjt).values().sum().backward()
    assert int(ebc.step) == 42

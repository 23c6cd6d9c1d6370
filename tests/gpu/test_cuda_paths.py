"""The CUDA path against the CPU path on the same inputs (run by ``scripts/gpu_check.sh``).

On a machine with a GPU these run the compiled Triton update and FBGEMM's CUDA IntNBit
forward. Without one they are skipped, except under ``GPU_CHECK_DRY=1`` (the check script's
dry run), where the "device" is the CPU and Triton runs in its interpreter: the same code,
so the script cannot rot on machines without a GPU. ``GPU_CHECK_CASES=subset`` keeps every
seventh update case (the dry run's budget); the GPU run takes all of them.

What is compared, bit for bit:

- the fused update: Triton on the device == the PyTorch reference on the CPU == the native
  C++ kernel on the CPU, for every bits x optimizer x rounding x ALPT x growth case, with
  repeated ids and one very hot row (half of all occurrences);
- the forward: our collection on the device (FBGEMM's IntNBit kernel on our buffer) ==
  ``torchrec.EmbeddingBagCollection`` on the dequantized weights (to fp32 rounding);
- export: ``to_inference`` on the device serves the trained collection's outputs exactly.
"""

from __future__ import annotations

import os

import pytest
import torch

DRY = os.environ.get("GPU_CHECK_DRY", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not (HAS_CUDA or DRY):
    pytest.skip("needs a CUDA device (or GPU_CHECK_DRY=1 for the CPU dry run)", allow_module_level=True)
pytest.importorskip("triton")

import torchrec_lowprec as lp  # noqa: E402
from tests.helpers import call_update  # noqa: E402
from torchrec_lowprec.configs import InferenceConfig  # noqa: E402
from torchrec_lowprec.kernels import triton_update  # noqa: E402
from torchrec_lowprec.kernels.reference import reference_update  # noqa: E402
from torchrec_lowprec.kernels.spec import OptimizerParams, UpdateSpec  # noqa: E402
from torchrec_lowprec.optim.fused import allocate_state  # noqa: E402
from torchrec_lowprec.quant.layout import quantize_rows  # noqa: E402
from torchrec_lowprec.quant.lsq import init_step_size  # noqa: E402
from torchrec_lowprec.types import OptimizerType  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
ROWS = 64
CASES = [
    (bits, kind, stochastic, learn, grow)
    for bits in (8, 4, 2, 16, 32)
    for kind in OptimizerType
    for stochastic in (True, False)
    for learn in ((True, False) if bits <= 8 else (False,))
    for grow in ((True, False) if bits <= 8 else (False,))
]
if os.environ.get("GPU_CHECK_CASES", "all") == "subset":
    CASES = CASES[::7]


def _native():
    from torchrec_lowprec.kernels import cpu_native

    return cpu_native if cpu_native.is_available() else None


def _inputs(bits: int, kind: OptimizerType, dim: int, seed: int):
    """A table, its optimizer state after some steps, and a batch with a very hot row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, dim, generator=g) * 0.1
    step = init_step_size(x, bits, "lsq") if bits <= 8 else torch.empty(0)
    rows = quantize_rows(x, step, bits)
    st1, st2 = allocate_state(kind, ROWS, dim, torch.device("cpu"))
    if st1.numel():
        st1.copy_(torch.rand(st1.shape, generator=g) * 0.02)
    if st2.numel():
        st2.copy_(torch.rand(st2.shape, generator=g) * 0.02)
    n = 96
    ids = torch.randint(0, ROWS // 2, (n,), generator=g)
    ids[torch.rand(n, generator=g) < 0.5] = 3  # one very hot row: half of all occurrences
    goff = torch.randperm(n, generator=g) * dim
    grad = torch.randn(n * dim, generator=g)
    w = torch.rand(n, generator=g) + 0.5 if seed % 2 else torch.empty(0)
    return (rows, step, st1, st2), (ids, goff, w, grad)


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("bits,kind,stochastic,learn,grow", CASES)
def test_update_device_equals_cpu_reference_and_native(bits, kind, stochastic, learn, grow):
    i = CASES.index((bits, kind, stochastic, learn, grow))
    dim = (8, 16, 64)[i % 3]
    state, batch = _inputs(bits, kind, dim, seed=i)
    lr = 0.05 if bits >= 8 else 0.2
    opt = OptimizerParams(kind, lr=lr, weight_decay=0.01 * (i % 2), eps=1e-8, beta1=0.9, beta2=0.99)
    results = {
        "reference (cpu)": [t.clone() for t in state],
        f"triton ({DEV.type})": [t.to(DEV, copy=True) for t in state],
    }
    native = _native()
    if native is not None:
        results["native C++ (cpu)"] = [t.clone() for t in state]
    for step in (1, 2):
        spec = UpdateSpec(bits, dim, opt, step, stochastic, learn, 0.05, key=977 * i + step, grow_step=grow)
        skipped = {
            "reference (cpu)": call_update(reference_update, *results["reference (cpu)"], *batch, spec),
            f"triton ({DEV.type})": call_update(
                triton_update.fused_update,
                *results[f"triton ({DEV.type})"],
                *(t.to(DEV) for t in batch),
                spec,
            ),
        }
        if native is not None:
            skipped["native C++ (cpu)"] = call_update(
                native.fused_update, *results["native C++ (cpu)"], *batch, spec
            )
        assert len(set(skipped.values())) == 1, skipped
    ref = results.pop("reference (cpu)")
    for name, got in results.items():
        for what, a, b in zip(("rows", "step_size", "state1", "state2"), ref, got):
            assert torch.equal(_bits_of(a), _bits_of(b)), f"{name}: {what} differs from the CPU reference"
    assert not torch.equal(ref[0], state[0]), "the update changed nothing: the case tests nothing"


def _collection(bits: int, weighted: bool):
    torchrec = pytest.importorskip("torchrec")
    pytest.importorskip("fbgemm_gpu")
    import torchrec_lowprec as lp
    from tests.helpers import make_tables, random_kjt

    tables = make_tables(dims=(8, 16), rows=(60, 40))
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=bits), is_weighted=weighted, device=DEV
    )
    for s in range(3):  # trained codes and scales, not the init
        kjt = random_kjt(tables, batch=16, weighted=weighted, gen=torch.Generator().manual_seed(s))
        ebc(kjt.to(DEV)).values().pow(2).sum().backward()
    kjt = random_kjt(tables, batch=9, weighted=weighted, gen=torch.Generator().manual_seed(9)).to(DEV)
    return torchrec, lp, tables, ebc.eval(), kjt


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_on_device_equals_float_reference(bits, weighted):
    torchrec, _, tables, ebc, kjt = _collection(bits, weighted)
    ref = torchrec.EmbeddingBagCollection(tables, is_weighted=weighted, device=DEV)
    with torch.no_grad():
        for t in tables:
            ref.embedding_bags[t.name].weight.copy_(ebc.dequantized_weight(t.name))
        got, want = ebc(kjt), ref(kjt)
    assert got.keys() == want.keys()
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_export_on_device_is_bit_identical(bits):
    _, _, _, ebc, kjt = _collection(bits, weighted=False)

    with torch.no_grad():
        want = ebc(kjt).values()
        served = lp.convert(ebc, InferenceConfig())
        got = served(kjt).values()
    assert torch.equal(got.float(), want.float())

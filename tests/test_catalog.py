"""The catalog (``torchrec_lowprec.types``: storage formats and optimizer kinds) is the one
home of those decisions: every layer that names a width or an optimizer agrees with it, for
every entry. Adding a width or an optimizer is an entry there plus its kernels; this test then
says which layer does not follow yet."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
import torchrec
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.modules.embedding_configs import DataType

import torchrec_lowprec as lp
from tests.helpers import random_kjt
from torchrec_lowprec import cli
from torchrec_lowprec.distributed.sharder import table_bytes
from torchrec_lowprec.export.inference import check_servable
from torchrec_lowprec.kernels import cpu_native, lookup
from torchrec_lowprec.kernels.reference import reference_update
from torchrec_lowprec.kernels.spec import OPTIMIZER_CODES, OptimizerParams, TableUpdate, UpdateSpec
from torchrec_lowprec.modules.data_type import BITS_OF_DATA_TYPE, DATA_TYPE_OF_BITS
from torchrec_lowprec.optim.fused import (
    OPTIMIZER_STATE_NAMES,
    allocate_state,
    config_with_fused_params,
    resolve_optimizer,
)
from torchrec_lowprec.planner.precision import LADDER
from torchrec_lowprec.planner.schema import TablePrecision
from torchrec_lowprec.quant.layout import RowFormat, optimizer_state_bytes, quantize_rows
from torchrec_lowprec.types import (
    FLOAT_BITS,
    FORMATS,
    HBM_DEVICES,
    INT_BITS,
    OPTIMIZERS,
    PLAN_BITS,
    ROW_ALIGNMENT,
    SUPPORTED_BITS,
    OptimizerType,
)

TRAINABLE = [b for b, f in FORMATS.items() if f.trainable]
DIM = 8
#: The in-backward optimizer class of each kind (TorchRec's users tag tables with these).
OPTIMIZER_CLASSES = {
    OptimizerType.SGD: torch.optim.SGD,
    OptimizerType.ADAGRAD: torch.optim.Adagrad,
    OptimizerType.ROWWISE_ADAGRAD: torchrec.optim.RowWiseAdagrad,
    OptimizerType.ADAM: torch.optim.Adam,
}


def test_derived_width_lists_follow_the_formats():
    assert set(SUPPORTED_BITS) == set(INT_BITS) | set(FLOAT_BITS)
    assert set(LADDER) == set(PLAN_BITS) and list(LADDER) == sorted(LADDER, reverse=True)
    assert set(ROW_ALIGNMENT) >= set(HBM_DEVICES) | {"cpu"}


@pytest.mark.parametrize("bits", sorted(FORMATS))
def test_each_format_agrees_across_layers(bits):
    fmt = FORMATS[bits]
    # TorchRec and FBGEMM types, as the modules, export and lookup use them.
    if fmt.data_type is not None:
        dt = DataType[fmt.data_type]
        assert BITS_OF_DATA_TYPE[dt] == bits and DATA_TYPE_OF_BITS[bits] is dt
    if fmt.sparse_type is not None:
        assert lookup.SPARSE_TYPE_OF_BITS[bits] == SparseType[fmt.sparse_type].as_int()
        assert SparseType[fmt.sparse_type].bit_rate() == bits
    # A precision plan takes exactly the plannable widths.
    if fmt.plannable:
        TablePrecision(16, DIM, (16,), (bits,))
    if not fmt.trainable:
        return
    row = RowFormat(bits, DIM)
    assert row.is_integer == fmt.integer
    check_servable("t", bits, DIM)
    # A collection at this width: its data_type, its stored row bytes, the planner's bytes.
    table = torchrec.EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=16, feature_names=["f"])
    ebc = lp.LowPrecisionEmbeddingBagCollection([table], config=lp.LowPrecisionConfig(bits=bits))
    assert ebc.embedding_bag_configs()[0].data_type == DataType[fmt.data_type]
    assert ebc.quantized_weight("t").shape == (16, row.row_bytes)
    assert table_bytes(ebc, "t", "cpu") == ebc.memory_bytes(per_table=True)["t"]["total"]
    # The float collection converted with no config (the table's data_type decides).
    typed = torchrec.EmbeddingBagConfig(
        name="t", embedding_dim=DIM, num_embeddings=16, feature_names=["f"], data_type=DataType[fmt.data_type]
    )
    assert lp.convert(torchrec.EmbeddingBagCollection([typed])).table_config("t").bits == bits


def test_cli_choices_are_the_catalog():
    sub = argparse.ArgumentParser().add_subparsers()
    cli._plan_parser(sub)
    choices = {a.dest: a.choices for a in sub.choices["plan"]._actions if a.choices}
    assert set(choices["min_bits"]) == set(PLAN_BITS)
    assert set(choices["max_bits"]) == set(SUPPORTED_BITS)
    assert set(choices["optimizer"]) == {o.value for o in OptimizerType}
    # and the CLI module still imports without torch
    code = "import sys, torchrec_lowprec.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_optimizer_codes_are_distinct_and_aliases_are_fbgemms():
    assert sorted(OPTIMIZER_CODES.values()) == list(range(len(OPTIMIZERS)))
    fbgemm = {e.value for e in EmbOptimType}
    for entry in OPTIMIZERS.values():
        assert set(entry.emb_opt_types) <= fbgemm, entry.kind
        assert entry.uses >= {"learning_rate", "weight_decay"}


@pytest.mark.parametrize("kind", list(OptimizerType), ids=[o.value for o in OptimizerType])
def test_each_optimizer_agrees_across_layers(kind):
    entry = OPTIMIZERS[kind]
    assert OPTIMIZER_STATE_NAMES[kind] == entry.state_names
    s1, s2 = allocate_state(kind, 5, DIM, torch.device("cpu"))
    assert s1.numel() + s2.numel() == 5 * entry.state_floats(DIM)
    assert optimizer_state_bytes(kind, DIM) == 4 * entry.state_floats(DIM)
    # The in-backward tag of its class resolves to it; the fused_params alias too.
    table = torchrec.EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=16, feature_names=["f"])
    fl = torchrec.EmbeddingBagCollection([table])
    _apply_optimizer_in_backward(OPTIMIZER_CLASSES[kind], fl.parameters(), {"lr": 0.1})
    ebc = lp.convert(fl, lp.LowPrecisionConfig(bits=8))
    assert resolve_optimizer(ebc.tables["t"].handle, ebc.table_config("t")).kind is kind
    for alias in entry.emb_opt_types:
        cfg = lp.LowPrecisionConfig(bits=8)
        assert config_with_fused_params(cfg, {"optimizer": EmbOptimType(alias)}).optimizer is kind
    # One training step: the state the checkpoint holds is the catalog's, shaped as it says.
    ebc(random_kjt([table], batch=4)).values().sum().backward()
    sd = ebc.state_dict()
    held = {k.rsplit(".", 1)[1] for k, v in sd.items() if k.startswith("tables.t.momentum") and v.numel()}
    assert held == set(entry.state_names)
    for name, per_row, per_dim in entry.state:
        assert sd[f"tables.t.{name}"].numel() == 16 * (per_row + per_dim * DIM)


@pytest.mark.parametrize("bits", TRAINABLE)
@pytest.mark.parametrize("kind", list(OptimizerType), ids=[o.value for o in OptimizerType])
def test_every_backend_runs_every_entry(bits, kind):
    # The reference and the native kernel take every (width, optimizer) of the catalog and agree.
    if not cpu_native.is_available():
        pytest.skip(f"native kernel not built: {cpu_native.load_error()}")
    g = torch.Generator().manual_seed(bits * 10 + OPTIMIZER_CODES[kind])
    x = torch.randn(6, DIM, generator=g) * 0.1
    step = (x.abs().amax(1) / 2 ** (bits - 1)).clamp(min=1e-4) if bits in INT_BITS else torch.empty(0)
    rows = quantize_rows(x, step if bits in INT_BITS else None, bits)
    spec = UpdateSpec(bits, DIM, OptimizerParams(kind, 0.05), 1, True, bits in INT_BITS, 1e-3, 7)
    ids = torch.tensor([0, 3, 3, 5])
    goff = torch.arange(4) * DIM
    grad = torch.randn(4, DIM, generator=g)
    out = []
    for fn in (reference_update, cpu_native.fused_update):
        t = [rows.clone(), step.clone(), *allocate_state(kind, 6, DIM, torch.device("cpu"))]
        assert fn(TableUpdate(*t, ids, goff, torch.empty(0), spec), grad) == 0
        out.append(t)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    assert not torch.equal(out[0][0], rows)

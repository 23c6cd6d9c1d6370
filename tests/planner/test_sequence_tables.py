"""EmbeddingCollection (sequence) tables in the precision planner: counted exactly as the
LowPrecisionEmbeddingCollection's memory_bytes(), one width each, planned beside pooled tables."""

from __future__ import annotations

import logging

import pytest
import torch
import torchrec
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.planner import Topology

import torchrec_lowprec as lp
from torchrec_lowprec.cli import main
from torchrec_lowprec.modules.table_layout import stored_bytes
from torchrec_lowprec.planner import GiB, MemoryPlan, plan_precision, shard_bytes
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision
from torchrec_lowprec.planner.sequence import sequence_config
from torchrec_lowprec.planner.tables_file import read_tables

logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
MiB = 1 << 20


def _seq(name: str, rows: int, dim: int = 64, feature: str | None = None) -> torchrec.EmbeddingConfig:
    return torchrec.EmbeddingConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[feature or f"f_{name}"]
    )


@pytest.mark.parametrize("bits", [32, 16, 8, 4, 2])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_shard_bytes_of_an_ec_table_are_its_memory_bytes(bits, optimizer):
    cfg = lp.LowPrecisionConfig(bits=bits, optimizer=optimizer, learn_step_size=bits == 4)
    ec = lp.LowPrecisionEmbeddingCollection([_seq("s", 1000, dim=12)], config=cfg, init_weights=False)
    held = ec.memory_bytes(per_table=True)["s"]["total"]
    assert shard_bytes(ec, "s", 1000, 12, "cpu") == held  # CPU rows are not padded
    assert held == stored_bytes(1000, 12, bits, optimizer, cfg.keeps_master_step_size, 1)
    # On CUDA rows are padded to 16 B, as the planner counts them there.
    assert shard_bytes(ec, "s", 1000, 12, "cuda") == stored_bytes(
        1000, 12, bits, optimizer, cfg.keeps_master_step_size, 16
    )


def test_in_backward_tag_decides_the_optimizer_bytes_counted():
    float_ec = torchrec.EmbeddingCollection([_seq("s", 500)], device=torch.device("meta"))
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, float_ec.parameters(), {"lr": 0.1})
    ec = lp.convert(float_ec, lp.LowPrecisionConfig(bits=8, optimizer="adam"))
    rows = 500 * (64 + 4)
    # Row-wise Adagrad (the tag) keeps one fp32 per row, not Adam's two per element.
    assert shard_bytes(ec, "s", 500, 64, "cpu") == rows + 500 * 4 + 500 * 4
    assert ec.memory_bytes() == shard_bytes(ec, "s", 500, 64, "cpu")


def test_model_with_an_ebc_and_an_ec_is_planned_and_the_plan_holds_what_the_ec_holds():
    bags = [
        torchrec.EmbeddingBagConfig(name="b0", embedding_dim=64, num_embeddings=400_000, feature_names=["u"])
    ]
    seqs = [_seq("s0", 300_000), _seq("s1", 1000)]
    cfg = lp.LowPrecisionConfig()  # row-wise Adagrad, ALPT
    fp32 = sum(stored_bytes(t.num_embeddings, 64, 32, cfg.optimizer, True, 1) for t in bags + seqs)
    budget = int(fp32 / 3 / 0.85)  # about a third of fp32 on each of 2 ranks: must be lowered
    topo = Topology(world_size=2, compute_device="cpu", hbm_cap=0, ddr_cap=budget)
    mp = plan_precision(bags + seqs, topo, cfg, batch_size=256, min_bits=0, sequence_module_path="sparse.ec")
    assert mp.sequence_tables == ["s0", "s1"] and mp.sequence_module_path == "sparse.ec"
    assert {k: sorted(v) for k, v in mp.sharding.plan.items()} == {
        "row_groups": ["b0"],
        "sparse.ec": ["s0", "s1"],
    }
    for name in ("s0", "s1"):  # one width per sequence table, never pruned
        tp = mp.precision.tables[name]
        assert tp.num_groups == 1 and tp.bits[0] >= 2
    assert mp.precision.tables["s0"].bits[0] < 32 and max(mp.per_rank_bytes) <= budget * 0.85
    # The EC converted with the planned widths holds exactly the bytes the plan counted.
    ec = torchrec.EmbeddingCollection(seqs, device=torch.device("cpu"))
    model = nn.ModuleDict({"ec": ec})
    lp.convert(model, sequence_config(mp.precision, mp.sequence_tables, cfg))
    held = model["ec"].memory_bytes(per_table=True)
    for name in ("s0", "s1"):
        assert model["ec"].table_config(name).bits == mp.precision.tables[name].bits[0]
        assert mp.table_bytes[name] == held[name]["total"]
    assert sum(mp.per_rank_bytes) == sum(mp.table_bytes.values())


def test_bad_sequence_plans_are_refused():
    seqs = [_seq("s0", 1000)]
    topo = Topology(world_size=1, compute_device="cpu", hbm_cap=0, ddr_cap=GiB)
    with pytest.raises(
        ValueError, match=r"\['s0'\] are EmbeddingCollection \(sequence\) tables; pass sequence_module_path"
    ):
        plan_precision(seqs, topo)
    with pytest.raises(ValueError, match="not 'row_groups', the pooled tables' key"):
        plan_precision(seqs, topo, sequence_module_path="row_groups")
    start = PrecisionPlan({"s0": TablePrecision(1000, 64, (100, 1000), (8, 4))})
    with pytest.raises(
        ValueError,
        match="sequence table 's0' is planned with groups \\[8, 4\\]; an EmbeddingCollection stores",
    ):
        plan_precision(seqs, topo, precision_plan=start, sequence_module_path="ec")
    with pytest.raises(
        TypeError, match="tables must be torchrec EmbeddingBagConfig / EmbeddingConfig, got dict"
    ):
        plan_precision([{"name": "s0"}], topo)
    # Frequencies do not split a sequence table into groups.
    counts = {"f_s0": torch.arange(1000, 0, -1)}
    mp = plan_precision(seqs, topo, frequencies=counts, num_groups=4, sequence_module_path="ec")
    assert mp.precision.tables["s0"].num_groups == 1


def test_cli_plans_pooling_none_tables(tmp_path, capsys):
    tables = tmp_path / "tables.yaml"
    tables.write_text(
        "- {name: big, rows: 2000000, dim: 64}\n- {name: hist, rows: 1000000, dim: 64, pooling: none}\n"
    )
    assert [type(t).__name__ for t in read_tables(str(tables))] == ["EmbeddingBagConfig", "EmbeddingConfig"]
    out = tmp_path / "plan.json"
    args = ["plan", "--tables", str(tables), "--world-size", "2", "--hbm-gb", "0.25", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 2
    assert "pass sequence_module_path" in capsys.readouterr().err
    assert main([*args, "--sequence-module-path", "sparse.ec", "--out", str(out)]) == 0
    assert "hist" in capsys.readouterr().out
    mp = MemoryPlan.load(str(out))
    assert mp.sequence_tables == ["hist"] and set(mp.sharding.plan) == {"row_groups", "sparse.ec"}
    assert mp.precision.tables["hist"].num_groups == 1

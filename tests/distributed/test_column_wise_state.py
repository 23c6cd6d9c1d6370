"""Column-wise sharding keeps a trained table's state (issue 12, item 9): sharding an already
trained module COLUMN_WISE carries the optimizer state and the step counter, and a checkpoint
saved under one column split loads under another split, under TABLE/ROW-wise and unsharded,
each value within half of its new step (the bound of docs/sharding.md). 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_checkpoint import _dmp
from tests.distributed.test_sharding import ALPT_SR, Wrap, global_batch, loss_weights, tables
from torchrec_lowprec.distributed import checkpoint
from torchrec_lowprec.distributed.embedding_bag import ShardedLowPrecisionEmbeddingBagCollection
from torchrec_lowprec.distributed.sharded_base import ShardedLowPrecisionMixin
from torchrec_lowprec.modules.collection_base import LowPrecisionTables
from torchrec_lowprec.quant.layout import dequantize_rows, row_bytes

pytestmark = pytest.mark.slow
PER_TABLE = {"t1": ALPT_SR.replace(bits=4), "t2": ALPT_SR.replace(bits=4, optimizer="adam")}


def _trained(steps: int = 3) -> lp.LowPrecisionEmbeddingBagCollection:
    tbls = tables()
    ebc = lp.LowPrecisionEmbeddingBagCollection(tbls, config=ALPT_SR, per_table_configs=PER_TABLE)
    W = loss_weights(tbls)
    for step in range(steps):
        out = Wrap(ebc)(global_batch(tbls, step, 2))
        sum((out[k] * W[k]).sum() for k in out).backward()
    return ebc


def _sharded(model) -> ShardedLowPrecisionEmbeddingBagCollection:
    return next(m for m in model.modules() if isinstance(m, ShardedLowPrecisionEmbeddingBagCollection))


def _carry_body(rank: int, world: int) -> None:
    src = _trained()
    assert int(src.step) == 3
    cw = _dmp(
        src,
        {"t0": column_wise(ranks=[0, 1]), "t1": table_wise(rank=0), "t2": column_wise(ranks=[1, 0])},
        world,
    )
    checked = 0
    for lk in _sharded(cw)._lp_lookups():
        if lk.ebc is None:
            continue
        assert int(lk.ebc.step) == 3  # rounding draws and Adam's bias correction go on
        for s in lk.shards:
            st, ref = lk.ebc.tables[s.local_name], src.tables[s.table]
            rows, cols = (
                slice(s.row_offset, s.row_offset + s.rows),
                slice(s.col_offset, s.col_offset + s.cols),
            )
            for name in ("momentum1", "momentum2"):
                want = getattr(ref, name)
                want = want[rows] if want.dim() == 1 else want[rows, cols]
                assert torch.equal(getattr(st, name), want), (s.local_name, name)
                checked += int(want.numel() > 0 and bool(want.abs().sum() > 0))
    assert checked >= 1


def test_column_wise_sharding_of_a_trained_module_carries_state_and_step():
    run_multiprocess(_carry_body)


def _block_floats(entries: dict, dim: int, bits: int, widths: list[int]) -> torch.Tensor:
    """The float rows a column-split checkpoint holds (its blocks dequantized side by side)."""
    out, off = [], 0
    for w in widths:
        nb = row_bytes(bits, w)
        out.append(dequantize_rows(entries[:, off : off + nb], bits, w))
        off += nb
    return torch.cat(out, dim=1)


def _local_tables(model, names):
    """``(collection, local name, table, row offset, col offset, rows, cols)`` of what ``model``
    holds (an EBC's or an EC's tables, sharded or not)."""
    sharded = [m for m in model.modules() if isinstance(m, ShardedLowPrecisionMixin)]
    if not sharded:
        inner = next(m for m in model.modules() if isinstance(m, LowPrecisionTables))
        for t in names:
            rows, cols = inner.quantized_weight(t).shape[0], inner.dequantized_weight(t).shape[1]
            yield inner, t, t, 0, 0, rows, cols
        return
    for lk in sharded[0]._lp_lookups():
        for s in lk.shards if lk.ebc is not None else []:
            if s.table in names:
                yield lk.ebc, s.local_name, s.table, s.row_offset, s.col_offset, s.rows, s.cols


def _assert_within_half_step(model, want: dict[str, torch.Tensor], bits: dict[str, int]) -> int:
    """Every local table (or shard) of ``model`` dequantizes to ``want`` within half its step."""
    checked = 0
    for ebc, local, table, r0, c0, nr, nc in _local_tables(model, want):
        got = ebc.dequantized_weight(local)
        ref = want[table][r0 : r0 + nr, c0 : c0 + nc]
        qp = 2 ** (bits[table] - 1) - 1
        step = ref.abs().amax(dim=1, keepdim=True) / qp  # the absmax step of the new block
        err = (got - ref).abs()
        assert bool((err <= 0.5 * step * 1.002 + 1e-7).all()), (table, float((err / step).max()))
        checked += 1
    return checked


SPLITS = {
    "cw2": {"t0": column_wise(ranks=[0, 1]), "t1": table_wise(rank=0), "t2": column_wise(ranks=[1, 0])},
    "cw4": {"t0": column_wise(ranks=[0, 1, 0, 1]), "t1": table_wise(rank=1), "t2": column_wise(ranks=[0, 1, 1, 0])},
    "tw": {"t0": table_wise(rank=1), "t1": table_wise(rank=0), "t2": table_wise(rank=0)},
    "rw": {"t0": row_wise(), "t1": row_wise(), "t2": row_wise()},
}  # fmt: skip


def _resplit_body(rank: int, world: int, path: str) -> None:
    src = _trained()
    cw = _dmp(src, SPLITS["cw2"], world)
    checkpoint.save(cw, path)
    torch.distributed.barrier()
    # The floats the checkpoint holds, read back without the library's loader.
    raw = {f"ebc.tables.{t}.qweight": torch.empty(40 if t == "t0" else 50, 2 * row_bytes(8 if t == "t0" else 4, 8),
                                                  dtype=torch.uint8) for t in ("t0", "t2")}  # fmt: skip
    dcp.load(raw, checkpoint_id=path)
    bits = {"t0": 8, "t1": 4, "t2": 4}
    want = {t: _block_floats(raw[f"ebc.tables.{t}.qweight"], 16, bits[t], [8, 8]) for t in ("t0", "t2")}
    for kind in ("cw4", "tw", "rw"):
        fresh = lp.LowPrecisionEmbeddingBagCollection(
            tables(), config=ALPT_SR.replace(seed=9), per_table_configs=PER_TABLE
        )
        dst = _dmp(fresh, SPLITS[kind], world)
        checkpoint.load(dst, path)
        assert int(_sharded(dst)._step_tensor()) == 3
        _assert_within_half_step(dst, want, bits)
        # Adam's element-wise state is copied whatever the split: compare it where t2 lives.
        for lk in _sharded(dst)._lp_lookups():
            for s in lk.shards if lk.ebc is not None else []:
                if s.table == "t2":
                    m = lk.ebc.tables[s.local_name].momentum1
                    assert m.abs().sum() > 0, kind
    if rank == 0:
        torch.save(want, path + "-want.pt")


def test_column_split_checkpoint_loads_under_other_splits_and_unsharded(tmp_path):
    path = str(tmp_path / "cw")
    run_multiprocess(_resplit_body, path)
    want = torch.load(path + "-want.pt")
    single = lp.LowPrecisionEmbeddingBagCollection(
        tables(), config=ALPT_SR.replace(seed=4), per_table_configs=PER_TABLE
    )
    checkpoint.load(Wrap(single), path)
    assert int(single.step) == 3
    assert _assert_within_half_step(Wrap(single), want, {"t0": 8, "t2": 4}) == 2
    # t1 (table-wise in the checkpoint) is copied byte for byte, and RowWiseAdagrad's per-block
    # accumulators of t0 become their mean per row (exact here: one block takes both).
    src = _trained()
    assert torch.equal(single.quantized_weight("t1"), src.quantized_weight("t1"))
    torch.testing.assert_close(single.tables["t0"].momentum1, src.tables["t0"].momentum1, rtol=1e-6, atol=0)

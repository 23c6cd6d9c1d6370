"""A column-wise checkpoint of a trained LowPrecisionEmbeddingCollection loads under another
column split, table-wise, row-wise and unsharded, each value within half of its new block's
step (docs/sharding.md's bound, as the EBC's test in test_column_wise_state.py), the step
counter and Adam's state carried; training goes on. 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torchrec

import torchrec_lowprec as lp
from tests.distributed.multiprocess import run_multiprocess
from tests.distributed.test_column_wise_state import SPLITS, _assert_within_half_step, _block_floats
from tests.distributed.test_ec_sharding import Wrap, _dmp
from tests.distributed.test_sharding import ALPT_SR, global_batch
from torchrec_lowprec.distributed import checkpoint
from torchrec_lowprec.quant.layout import row_bytes

pytestmark = pytest.mark.slow
DIM = 16  # test_ec_sharding's dim: two column blocks of 8 under "cw2", four of 4 under "cw4"
PER_TABLE = {"t1": ALPT_SR.replace(bits=4), "t2": ALPT_SR.replace(bits=4, optimizer="adam")}
ROWS = {"t0": 40, "t1": 30, "t2": 50}
BITS = {"t0": 8, "t1": 4, "t2": 4}


def tables() -> list[torchrec.EmbeddingConfig]:
    spec = [("t0", ["f0", "f1"]), ("t1", ["f2"]), ("t2", ["f3"])]
    return [
        torchrec.EmbeddingConfig(name=n, embedding_dim=DIM, num_embeddings=ROWS[n], feature_names=f)
        for n, f in spec
    ]


def _ec(seed: int = 0) -> lp.LowPrecisionEmbeddingCollection:
    return lp.LowPrecisionEmbeddingCollection(
        tables(), config=ALPT_SR.replace(seed=seed), per_table_configs=PER_TABLE
    )


def _train(model, steps: range, world: int, rank: int | None = None) -> None:
    """Steps of a fixed loss on the global batch (unsharded) or this rank's part of it."""
    from tests.distributed.test_sharding import rank_slice

    for step in steps:
        kjt = global_batch(tables(), step, world)
        out = model(kjt if rank is None else rank_slice(kjt, rank))
        sum((v * (1 + i)).sum() for i, v in enumerate(out.values())).backward()


def _body(rank: int, world: int, path: str) -> None:
    torch.manual_seed(0)
    src = _ec()
    _train(Wrap(src), range(3), world)
    cw = _dmp(src, SPLITS["cw2"], world)
    checkpoint.save(cw, path)
    torch.distributed.barrier()
    # The floats the checkpoint holds, read back without the library's loader.
    raw = {
        f"ec.tables.{t}.qweight": torch.empty(ROWS[t], 2 * row_bytes(BITS[t], DIM // 2), dtype=torch.uint8)
        for t in ("t0", "t2")
    }
    dcp.load(raw, checkpoint_id=path)
    want = {
        t: _block_floats(raw[f"ec.tables.{t}.qweight"], DIM, BITS[t], [DIM // 2] * 2) for t in ("t0", "t2")
    }
    for kind in ("cw4", "tw", "rw"):
        dst = _dmp(_ec(seed=9), SPLITS[kind], world)
        checkpoint.load(dst, path)
        assert int(dst.state_dict()["ec.step"]) == 3, kind
        assert _assert_within_half_step(dst, want, BITS) > 0, kind
        _train(dst, range(3, 4), world, rank)  # goes on
        assert int(dst.state_dict()["ec.step"]) == 4, kind
    if rank == 0:
        torch.save(want, path + "-want.pt")


def test_column_split_ec_checkpoint_loads_under_other_splits_and_unsharded(tmp_path):
    path = str(tmp_path / "cw")
    run_multiprocess(_body, path)
    want = torch.load(path + "-want.pt")
    single = _ec(seed=4)
    checkpoint.load(Wrap(single), path)
    assert int(single.step) == 3
    assert _assert_within_half_step(Wrap(single), want, BITS) == 2
    assert single.tables["t2"].momentum1.abs().sum() > 0  # Adam's state came along
    torch.manual_seed(0)
    src = _ec()
    _train(Wrap(src), range(3), 2)
    assert torch.equal(single.quantized_weight("t1"), src.quantized_weight("t1"))  # t1 was table-wise

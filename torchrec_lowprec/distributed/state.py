"""State-dict entries of a sharded low-precision collection, as ShardedTensors.

Keys and global shapes equal the unsharded module's (``tables.<t>.qweight``,
``tables.<t>.step_size``, ``tables.<t>.momentum1``, ``tables.<t>.momentum2``, ``step``,
``_extra_state``), so ``torch.distributed.checkpoint`` moves a checkpoint between plans
(table-wise <-> row-wise) and into an unsharded module. Column-wise shards keep one step size
per row *per column shard*; their tables are saved as ``[rows, sum of shard row bytes]``
codes and ``[rows, column shards]`` step sizes; :func:`convert_column_split` rewrites them for
another split (``torchrec_lowprec.distributed.checkpoint.load`` does, re-quantizing per block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

from torchrec_lowprec.distributed.lookup import LocalShard, LowPrecisionShardLookup
from torchrec_lowprec.modules.checkpoint import check_table_values
from torchrec_lowprec.optim.fused import OPTIMIZER_STATE_NAMES
from torchrec_lowprec.quant.layout import row_bytes
from torchrec_lowprec.types import INT_BITS, OptimizerType


@dataclass(frozen=True)
class TableMeta:
    """Global facts of one table, the same on every rank."""

    rows: int
    dim: int
    bits: int
    col_starts: tuple[int, ...]
    learn_step_size: bool
    optimizer: OptimizerType

    @property
    def col_widths(self) -> list[int]:
        ends = list(self.col_starts[1:]) + [self.dim]
        return [e - s for s, e in zip(self.col_starts, ends)]

    @property
    def column_sharded(self) -> bool:
        return len(self.col_starts) > 1

    def byte_offset(self, col: int) -> int:
        k = self.col_starts.index(col)
        return sum(row_bytes(self.bits, w) for w in self.col_widths[:k])

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        n = len(self.col_starts)
        per_row = (self.rows, n) if self.column_sharded else (self.rows,)
        shapes = {"qweight": (self.rows, sum(row_bytes(self.bits, w) for w in self.col_widths))}
        shapes["step_size"] = per_row if self.learn_step_size else (0,)
        names = OPTIMIZER_STATE_NAMES[self.optimizer]
        for name in ("momentum1", "momentum2"):
            if name not in names:
                shapes[name] = (0,)
            elif self.optimizer == OptimizerType.ROWWISE_ADAGRAD:
                shapes[name] = per_row
            else:
                shapes[name] = (self.rows, self.dim)
        return shapes


def _local_pieces(meta: TableMeta, shard: LocalShard, lookup: LowPrecisionShardLookup) -> dict:
    """``key -> (local tensor view, global offsets)`` for one local shard."""
    local = lookup.local
    st = local.tables[shard.local_name]
    k = meta.col_starts.index(shard.col_offset)
    row = shard.row_offset
    out = {"qweight": (local.quantized_weight(shard.local_name), [row, meta.byte_offset(shard.col_offset)])}

    def per_row(t: torch.Tensor):
        return (t.view(-1, 1), [row, k]) if meta.column_sharded else (t, [row])

    if meta.learn_step_size:
        out["step_size"] = per_row(st.step_size)
    for name in OPTIMIZER_STATE_NAMES[meta.optimizer]:
        t = getattr(st, name)
        out[name] = per_row(t) if t.dim() == 1 else (t, [row, shard.col_offset])
    return out


def build_sharded_state(
    metas: dict[str, TableMeta],
    lookups: list[LowPrecisionShardLookup],
    pg: dist.ProcessGroup,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """``tables.<t>.<entry>`` -> ShardedTensor over this rank's live shard storage (or an empty
    tensor for entries the table does not keep). Collective: every rank calls it."""
    rank = dist.get_rank(pg)
    pieces: dict[str, list] = {}
    for lookup in lookups:
        for shard in lookup.shards:
            for key, piece in _local_pieces(metas[shard.table], shard, lookup).items():
                pieces.setdefault(f"tables.{shard.table}.{key}", []).append(piece)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(metas):
        for key, shape in metas[name].global_shapes().items():
            full = f"tables.{name}.{key}"
            if shape == (0,):
                out[full] = torch.empty(0, device=device)
                continue
            local = [
                Shard(t, ShardMetadata(list(off), list(t.shape), f"rank:{rank}/{t.device}"))
                for t, off in pieces.get(full, [])
            ]
            out[full] = ShardedTensor._init_from_local_shards(local, list(shape), process_group=pg)
    return out


def load_into_shards(
    metas: dict[str, TableMeta],
    lookups: list[LowPrecisionShardLookup],
    state_dict: dict,
    prefix: str,
) -> None:
    """Copy ``state_dict`` entries (ShardedTensors with matching shards, or full tensors, e.g.
    from an unsharded module) into this rank's shards. Shapes were validated beforehand."""
    # Every piece is found and its values checked before any is copied: a bad checkpoint
    # leaves the shards as they were.
    copies = []
    for lookup in lookups:
        for shard in lookup.shards:
            meta = metas[shard.table]
            pieces = {}
            for key, (local, off) in _local_pieces(meta, shard, lookup).items():
                src = state_dict.get(f"{prefix}tables.{shard.table}.{key}")
                if src is None:
                    continue
                if isinstance(src, ShardedTensor):
                    match = [s for s in src.local_shards() if list(s.metadata.shard_offsets) == list(off)]
                    if not match:
                        raise ValueError(
                            f"table {shard.table!r}: the {key} entry has no local shard at offsets {off} on "
                            "this rank; load resharded checkpoints with torch.distributed.checkpoint "
                            "(torchrec_lowprec.distributed.checkpoint.load)"
                        )
                    piece = match[0].tensor
                else:
                    piece = src[tuple(slice(o, o + n) for o, n in zip(off, local.shape))]
                pieces[key] = piece
                copies.append((local, piece))
            check_table_values(
                shard.table, meta.bits, meta.optimizer, pieces, where=f"{prefix}tables.{shard.table}."
            )
    for local, piece in copies:
        local.copy_(piece)


def convert_column_split(
    entries: dict[str, torch.Tensor], src: TableMeta, dst: TableMeta
) -> dict[str, torch.Tensor]:
    """One table's checkpoint entries saved under ``src.col_starts``, rewritten for
    ``dst.col_starts`` (another column split, or one block: TABLE/ROW-wise, unsharded).

    The codes are dequantized block by block and re-quantized per destination block with a
    fresh ``absmax`` step size (``max|x| / Qp`` over the row's block, nearest rounding): no value
    is clipped and each moves by at most half of its new step (the bound docs/sharding.md states). Element-wise optimizer state
    (Adam, Adagrad) is copied; RowWiseAdagrad's per-block accumulator becomes, for each
    destination block, the width-weighted mean of the source blocks it overlaps (exact when a
    destination block is a union of source blocks, e.g. column-wise -> one block).
    """
    from torchrec_lowprec.quant.layout import dequantize_rows, quantize_rows
    from torchrec_lowprec.quant.lsq import init_step_size

    rows, dim, bits = src.rows, src.dim, src.bits
    weight = torch.empty(rows, dim, dtype=torch.float32)
    per_col = torch.empty(rows, dim, dtype=torch.float32)  # RowWiseAdagrad accumulator per column
    row_wise = src.optimizer == OptimizerType.ROWWISE_ADAGRAD
    off = 0
    for k, (c0, w) in enumerate(zip(src.col_starts, src.col_widths)):
        nb = row_bytes(bits, w)
        weight[:, c0 : c0 + w] = dequantize_rows(entries["qweight"][:, off : off + nb], bits, w)
        off += nb
        if row_wise:
            m = entries["momentum1"]
            per_col[:, c0 : c0 + w] = (m[:, k] if src.column_sharded else m).unsqueeze(1)
    codes, steps, accs = [], [], []
    for c0, w in zip(dst.col_starts, dst.col_widths):
        x = weight[:, c0 : c0 + w]
        s = init_step_size(x, bits, "absmax") if bits in INT_BITS else None
        codes.append(quantize_rows(x, s, bits))
        if s is not None:
            steps.append(s.to(torch.float16).to(torch.float32))
        accs.append(per_col[:, c0 : c0 + w].mean(dim=1))
    out = {k: v for k, v in entries.items() if k not in ("qweight", "step_size")}
    out["qweight"] = torch.cat(codes, dim=1)

    def per_row(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(parts, dim=1) if dst.column_sharded else parts[0]

    out["step_size"] = per_row(steps) if dst.learn_step_size and steps else torch.empty(0)
    if row_wise:
        out["momentum1"] = per_row(accs)
    for key, shape in dst.global_shapes().items():
        if tuple(out[key].shape) != tuple(shape):
            raise ValueError(
                f"column-split conversion of {key}: got {tuple(out[key].shape)}, expected {shape}"
            )
    return out

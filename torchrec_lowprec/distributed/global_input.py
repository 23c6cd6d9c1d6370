"""The checks of the KJT a rank feeds a sharded collection, made on *global* ids before
TorchRec's input dist: on the host (CPU; tables whose ``bounds_check`` drops ids), or on the
device with every rank agreeing on the verdict (CUDA, ``bounds_check="raise"``).

After the input dist an id is shard-local (a row-wise shard sees ``id - row_offset``, and
FBGEMM's bucketizer turns an id past the table into ``id // world_size``, ``-1`` into
``2**63 - 1``), so an error raised there would name an id the user never fed.

On the device (``input_check.checks_on_device``) a bad batch cannot be refused before the input
dist without reading the verdict back, and a rank's ids update the shards of every rank, so
"the batch updates nothing" (the unsharded collections' rule) needs every rank to know. Each
rank's verdict goes into one all-reduce of one int64, started before the input dist and waited
for on the device (an NCCL stream wait, no host sync) when the lookups run: if any rank fed a
bad batch, no rank's lookups update their shards in that step, and every rank raises at a
later forward or ``check_inputs()`` (the rank that fed it names the id, the others name that
rank). The cost: that all-reduce, one per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.modules import input_check
from torchrec_lowprec.modules.bounds import (
    check_ids,
    describe_report,
    ids_checked_on_device,
    in_feature_order,
    in_range_mask,
)
from torchrec_lowprec.modules.embedding_collection import ZEROED
from torchrec_lowprec.modules.input_check import (
    REPORT_BAD_ELSEWHERE,
    REPORT_BAD_KJT,
    REPORT_OK,
    DeferredInputErrors,
    combined,
)

_RANK_BITS = 32  # the agreed flag: (kind << 32) | (rank + 1); its max names one bad rank


def _global_slots(tables: list[BaseEmbeddingConfig]) -> tuple[list[str], dict[str, BaseEmbeddingConfig]]:
    """TorchRec's input dist takes each feature once, also one read by two tables: its ids are
    checked against the smallest of those tables (the error names it)."""
    order = list(dict.fromkeys(f for t in tables for f in t.feature_names))
    table_of: dict[str, BaseEmbeddingConfig] = {}
    for t in tables:
        for f in t.feature_names:
            if f not in table_of or t.num_embeddings < table_of[f].num_embeddings:
                table_of[f] = t
    return order, table_of


def check_global_input(
    features: KeyedJaggedTensor,
    tables: list[BaseEmbeddingConfig],
    configs: dict[str, LowPrecisionConfig],
    weighted: bool,
    keep_positions: bool = False,
) -> KeyedJaggedTensor:
    """The KJT a rank feeds a sharded collection, checked on the host before the input dist.

    Consistency (:func:`~torchrec_lowprec.modules.bounds.validate_kjt`) and id bounds against
    each table's full size. Ids a table's ``bounds_check`` drops (``"warn"`` / ``"ignore"``)
    are dropped here; with ``keep_positions`` (sequence collections, whose outputs must keep
    one row per id) they are replaced by ``-1`` instead, which is out of range on every shard
    after the input dist (TorchRec's bucketizer maps it to ``2**63 - 1``), so the local lookup
    returns a zero row there and updates nothing, as the unsharded collection does. Returns the
    KJT in table feature order.
    """
    order, table_of = _global_slots(tables)
    kjt = in_feature_order(features, order, weighted)
    rows = [table_of[f].num_embeddings for f in order]
    values, lengths, weights = check_ids(
        kjt.values(),
        kjt.lengths(),
        kjt.weights_or_none(),
        order,
        rows,
        kjt.stride(),
        [configs[table_of[f].name].bounds_check for f in order],
        [table_of[f].name for f in order],
        **({"dropped": ZEROED} if keep_positions else {}),
    )
    if values is kjt.values():
        return kjt
    if keep_positions:
        ids = kjt.values()
        kept = in_range_mask(ids, kjt.lengths(), rows, kjt.stride())
        ids = torch.where(kept, ids, torch.full_like(ids, -1))
        return KeyedJaggedTensor(
            keys=order, values=ids, lengths=kjt.lengths(), weights=kjt.weights_or_none(), stride=kjt.stride()
        )
    return KeyedJaggedTensor(keys=order, values=values, lengths=lengths, weights=weights, stride=kjt.stride())


@dataclass
class AgreedCheck:
    """One step's device-side verdict: this rank's report, and the all-reduced flag every rank
    reads (``work``: the all-reduce in flight; ``None`` once waited for)."""

    report: torch.Tensor
    flag: torch.Tensor
    work: dist.Work | None
    describe: Callable[[list[int], int], Exception]

    def skip(self, errors: DeferredInputErrors, step: int) -> torch.Tensor:
        """The device verdict every rank's lookups read for this step (true: no shard is
        updated); queues this rank's report (its own error, or the bad rank's) in ``errors``."""
        if self.work is not None:
            self.work.wait()  # NCCL: the current stream waits for the all-reduce; the host does not
            self.work = None
        if self.flag.is_cuda:
            # Made on the pipeline's data-dist stream, read here on the compute stream: keep their
            # memory until this stream is done with them (the caching allocator's rule).
            self.report.record_stream(torch.cuda.current_stream(self.flag.device))
            self.flag.record_stream(torch.cuda.current_stream(self.flag.device))
        flag = self.flag[0]
        elsewhere = torch.stack(
            [
                torch.where(flag > 0, REPORT_BAD_ELSEWHERE, REPORT_OK),
                flag >> _RANK_BITS,
                (flag & ((1 << _RANK_BITS) - 1)) - 1,
                torch.zeros_like(flag),
            ]
        )
        errors.record(combined(self.report, elsewhere), step, self.describe)
        return flag > 0


def check_global_on_device(
    features: KeyedJaggedTensor,
    tables: list[BaseEmbeddingConfig],
    configs: dict[str, LowPrecisionConfig],
    weighted: bool,
    group: dist.ProcessGroup | None,
) -> tuple[KeyedJaggedTensor, AgreedCheck] | None:
    """:func:`check_global_input` for a batch whose checks run on the device (every table's
    ``bounds_check`` ``"raise"``), or ``None`` (the caller checks on the host): the KJT in table
    feature order with bad ids reading row 0 (its ``length_per_key`` kept for the input dist),
    and the verdict, whose all-reduce over ``group`` is started here. A KJT without
    ``length_per_key`` is checked with one read back (``bounds.ordered_on_device``)."""
    values = features.values()
    if not input_check.checks_on_device(values.device):
        return None
    if any(configs[t.name].bounds_check != "raise" for t in tables):
        return None
    order, table_of = _global_slots(tables)
    rows = [table_of[f].num_embeddings for f in order]
    kjt, _, report, _ = ids_checked_on_device(features, order, rows, weighted)
    rank = dist.get_rank(group)
    flag = torch.where(report[0] != REPORT_OK, (report[0] << _RANK_BITS) | (rank + 1), 0).reshape(1)
    work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group, async_op=True)
    names = [table_of[f].name for f in order]
    return kjt, AgreedCheck(report, flag, work, _describe(features.keys(), order, names, rows, values.device))


def _describe(
    kjt_keys: list[str], features: list[str], tables: list[str], rows: list[int], device: torch.device
) -> Callable[[list[int], int], Exception]:
    own = describe_report(kjt_keys, features, tables, rows, device)

    def describe(numbers: list[int], step: int) -> Exception:
        kind, other_kind, other_rank, _ = numbers
        if kind != REPORT_BAD_ELSEWHERE:
            return own(numbers, step)
        what = "an inconsistent KJT" if other_kind == REPORT_BAD_KJT else "out-of-range ids"
        error = ValueError if other_kind == REPORT_BAD_KJT else IndexError
        return error(
            f"rank {other_rank} fed {what} to this sharded collection in the batch of step {step} "
            f"(its error names them; checked on {device.type} without waiting for it, so raised "
            "a step or more later); no rank's shards were updated by that step"
        )

    return describe

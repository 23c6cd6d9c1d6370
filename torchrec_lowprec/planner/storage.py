"""A storage estimator for TorchRec's planner that counts the bytes low-precision shards hold
(of a ``LowPrecisionEmbeddingBagCollection`` or a ``LowPrecisionEmbeddingCollection``).

TorchRec's default estimator already sizes our tables by their real bytes, through the
parameters our sharder hands it (:class:`~torchrec_lowprec.distributed.sharder.PlannerParameter`),
exactly for shards of whole rows. Column shards repeat each row's fixed bytes (fp16
scale/bias, master step size, row-wise state), which TorchRec's "bytes per element" split
cannot see; this estimator replaces TorchRec's tensor + optimizer part shard by shard with
:func:`~torchrec_lowprec.distributed.sharder.table_bytes` of the shard (one byte source:
``RowFormat``), exact for every sharding type. Input/output (pipeline) bytes are kept.
"""

from __future__ import annotations

from torchrec.distributed.planner.shard_estimators import (
    EmbeddingStorageEstimator,
    _calculate_storage_specific_sizes,
)
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ShardingType

from torchrec_lowprec.distributed.sharder import table_bytes
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.modules.embedding_collection import LowPrecisionEmbeddingCollection
from torchrec_lowprec.types import HBM_DEVICES

#: The collections whose shards this estimator sizes.
SIZED = (LowPrecisionEmbeddingBagCollection, LowPrecisionEmbeddingCollection)


def shard_bytes(
    module: LowPrecisionEmbeddingBagCollection | LowPrecisionEmbeddingCollection,
    table: str,
    shard_rows: int,
    shard_cols: int,
    compute_device: str,
) -> int:
    """Bytes one shard of ``table`` (``shard_rows`` x ``shard_cols``) holds on ``compute_device``:
    ``table_layout.stored_bytes`` of the table's width, the optimizer it will run (its in-backward
    tag, else its config) and ALPT's master step sizes, as ``memory_bytes()`` counts them.

    Example::

        shard_bytes(lp_ec, "t_hist", 1000, 64, "cuda")  # == lp_ec.memory_bytes(True)["t_hist"]["total"] on CUDA
    """
    return table_bytes(module, table, compute_device, shard_rows, shard_cols)


class LowPrecisionStorageEstimator(EmbeddingStorageEstimator):
    """``EmbeddingStorageEstimator`` that sizes low-precision tables by their real bytes.

    Takes ``EmbeddingStorageEstimator``'s arguments. Options of other modules (TorchRec float
    collections) keep TorchRec's estimate.

    Example::

        enumerator = EmbeddingEnumerator(topology, batch_size, estimator=[
            EmbeddingPerfEstimator(topology), LowPrecisionStorageEstimator(topology)])
        planner = EmbeddingShardingPlanner(topology, batch_size, enumerator=enumerator)
    """

    def estimate(self, sharding_options: list[ShardingOption], sharder_data_map=None) -> None:  # type: ignore[override]
        super().estimate(sharding_options, sharder_data_map)
        device = self._topology.compute_device
        for so in sharding_options:
            module = so.module[1]
            if not isinstance(module, SIZED):
                continue
            sizes = [list(s.size) for s in so.shards]
            # What TorchRec just counted for tensor + optimizer (the rest is I/O): removed.
            tensor = so.tensor
            theirs = _calculate_storage_specific_sizes(
                storage=tensor.numel() * tensor.element_size(),
                shape=tensor.shape,
                shard_sizes=sizes,
                sharding_type=so.sharding_type,
                optimizer_class=getattr(tensor, "_optimizer_classes", [None])[0],
                is_inference=self._is_inference,
            )
            for shard, size, their_bytes in zip(so.shards, sizes, theirs):
                rows, cols = size
                if so.sharding_type == ShardingType.DATA_PARALLEL.value:
                    rows, cols = tensor.shape
                ours = shard_bytes(module, so.name, rows, cols, device)
                st = shard.storage
                if device in HBM_DEVICES:
                    st.hbm = st.hbm - their_bytes + ours
                else:
                    st.ddr = st.ddr - their_bytes + ours

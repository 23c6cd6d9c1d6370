"""``LowPrecisionEmbeddingCollection``: a drop-in ``torchrec.EmbeddingCollection`` (one
embedding per id, for sequence features) whose tables are stored as 8/4/2-bit codes (or
fp16/fp32) and trained by the fused sparse optimizer in the backward pass."""

from __future__ import annotations

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.kernels.lookup import FeatureSlot, FusedPooledLookup
from torchrec_lowprec.modules.bounds import check_ids, in_range_mask, ordered_with_totals
from torchrec_lowprec.modules.collection_base import LowPrecisionTables, TableSpan
from torchrec_lowprec.modules.table_layout import SequenceAccessors, ShardOrigin, check_collection_args

#: What a sequence collection does with an id its ``bounds_check`` drops (the warning's end).
ZEROED = "their embeddings are zero (lengths kept) and no row is updated for them"


class _SequenceLookupFunction(torch.autograd.Function):
    """Sequence lookup whose backward runs the fused optimizer instead of returning weight grads."""

    @staticmethod
    def forward(ctx, module, update, lookup_ids, offsets, *handles):  # type: ignore[override]
        ctx.module = module
        ctx.update = update
        ctx.num_handles = len(handles)
        return module._lookup(module._flat, lookup_ids, offsets, None)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        ctx.module._sequence_backward(grad_out, *ctx.update)
        return (None,) * (4 + ctx.num_handles)


class LowPrecisionEmbeddingCollection(LowPrecisionTables, SequenceAccessors, EmbeddingCollectionInterface):
    """An ``EmbeddingCollection`` with tables stored in low precision and trained in place.

    The output is TorchRec's: ``Dict[str, JaggedTensor]`` keyed by embedding name (the feature,
    or ``feature@table`` for a feature two tables read), in table order, each holding one fp32
    ``[dim]`` row per id and the KJT's lengths (and the ids as ``weights`` when
    ``need_indices``). Rows are stored as in :class:`LowPrecisionEmbeddingBagCollection` (FBGEMM
    IntNBit layout, per-row fp16 step size and bias); the forward is one dequantizing gather
    (FBGEMM's ``PoolingMode.NONE`` lookup; on CPU our native kernel, bit-identical to it), and
    the backward runs the same fused update: the gradients of an id's occurrences are summed
    into one row update (dequantize, fp32 optimizer step, ALPT step size, stochastic or nearest
    rounding), and no weight gradient is returned.

    The positional arguments are ``torchrec.EmbeddingCollection``'s (``tables, device,
    need_indices``); everything else is keyword-only. As TorchRec's, every table has the same
    ``embedding_dim``.

    Args:
        tables: the TorchRec ``EmbeddingConfig`` s.
        device: where the tables live (``meta`` allocates nothing).
        need_indices: also return each feature's ids, as the ``weights`` of its JaggedTensor.
        config: the default :class:`LowPrecisionConfig` of every table. ``None``: each table's
            width comes from its ``data_type`` (TorchRec's default FP32 included).
        per_table_configs: table name -> config, overriding ``config`` (and ``data_type``).
        init_weights: fill the tables as TorchRec would (``init_fn`` or its uniform init), quantized.
        shard_origins: for a sharded lookup: table name -> where this local table sits in its
            global table (keys the rounding draws by global table, row and column).

    Ids out of range follow each table's ``bounds_check``: ``"raise"`` (default) raises
    ``IndexError`` naming the table, feature and id; ``"warn"`` / ``"ignore"`` return a zero
    embedding at that position (lengths unchanged, so sequences stay aligned) and update nothing.

    Example::

        tables = [EmbeddingConfig(name="t_item", embedding_dim=64, num_embeddings=100_000,
                                  feature_names=["history"])]
        ec = LowPrecisionEmbeddingCollection(tables, config=LowPrecisionConfig(bits=4))
        out = ec(kjt)                       # {"history": JaggedTensor}, values [N, 64]
        out["history"].values().sum().backward()  # the int4 table is updated in place
    """

    def __init__(
        self,
        tables: list[EmbeddingConfig],
        device: torch.device | str | None = None,
        need_indices: bool = False,
        *,
        config: LowPrecisionConfig | None = None,
        per_table_configs: dict[str, LowPrecisionConfig] | None = None,
        init_weights: bool = True,
        shard_origins: dict[str, ShardOrigin] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_collection_args(
            owner, tables, need_indices, device, config, per_table_configs, EmbeddingConfig, "need_indices"
        )
        dims = {t.embedding_dim for t in tables}
        if len(dims) > 1:
            raise ValueError(
                f"{owner}: every table needs the same embedding_dim (as torchrec.EmbeddingCollection), got "
                f"{ {t.name: t.embedding_dim for t in tables} }; use one collection per dim"
            )
        self._need_indices = need_indices
        self._embedding_configs = self._init_tables(
            tables, device, config, per_table_configs, init_weights, shard_origins
        )
        self._embedding_dim = self._layouts[0].dim
        self._embedding_names_by_table = get_embedding_names_by_table(self._layouts)
        self._embedding_names = [n for names in self._embedding_names_by_table for n in names]
        # A slot is one (table, feature) pair in table order: a feature read by two tables is two
        # slots, and the KJT permute repeats its ids.
        self._lookup_tables = [lay for lay in self._layouts for _ in lay.feature_names]
        self._lookup_order = [f for lay in self._layouts for f in lay.feature_names]
        self._lookup = FusedPooledLookup(
            [FeatureSlot(lay.offset, lay.bits, lay.dim, lay.rows) for lay in self._lookup_tables],
            PoolingMode.NONE,
            self._row_alignment,
            self._flat.device,
        )

    # ----- forward -----
    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out, features, totals = self._sequence_embeddings(features)
        values, lengths = features.values(), features.lengths()
        per_feature_lengths = lengths.view(len(totals), features.stride())
        return {
            name: JaggedTensor(
                values=v, lengths=per_feature_lengths[i], weights=ids if self._need_indices else None
            )
            for i, (name, v, ids) in enumerate(
                zip(self._embedding_names, out.split(totals), values.split(totals))
            )
        }

    def _sequence_embeddings(
        self, features: KeyedJaggedTensor, known: list[int] | None = None, skip: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KeyedJaggedTensor, list[int]]:
        """The ``[ids, dim]`` rows of every id in lookup order (the sharded lookup's output),
        the KJT in that order, and the number of ids of each of its features. ``known``: those
        numbers, for a sharded lookup's input (see ``bounds.ordered_with_totals``); ``skip``:
        its device verdict (true: the update changes nothing)."""
        on_device = self._checked_on_device(features, False, known, skip)
        mask = None
        if on_device is not None:  # checked on the device: reported later, never waited for
            features, totals, safe, skip = on_device
            offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(features.lengths())
            lookup_ids = safe.to(offsets.dtype) if safe.dtype != offsets.dtype else safe
            update = (lookup_ids, None, totals, skip)
        else:
            features, totals, lookup_ids, offsets, mask, update = self._checked_on_host(features, known)
            update = update if skip is None else (*update[:3], skip)
        handles = [h for h in self._handles() if h.requires_grad]
        if torch.is_grad_enabled() and handles:
            out = _SequenceLookupFunction.apply(self, update, lookup_ids, offsets, *handles)
        else:
            out = self._lookup(self._flat, lookup_ids, offsets, None)
        if mask is not None:
            out = out * mask.unsqueeze(1)
        return out, features, totals

    def _checked_on_host(self, features: KeyedJaggedTensor, known: list[int] | None):
        """The KJT in lookup order, ids per slot, ids to look up, offsets, the in-range mask
        (``None``: all kept) and the update's arguments, checked on the host (``bounds_check``
        "warn" / "ignore" zero the rows of out-of-range ids here)."""
        features, totals = ordered_with_totals(features, self._lookup_order, known=known)
        batch = features.stride()
        values, lengths = features.values(), features.lengths()
        names = [lay.name for lay in self._lookup_tables]
        rows = [lay.rows for lay in self._lookup_tables]
        kept, kept_lengths, _ = check_ids(
            values,
            lengths,
            None,
            self._lookup_order,
            rows,
            batch,
            self._bounds_modes(self._lookup_tables),
            names,
            dropped=ZEROED,
        )
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
        lookup_ids = values.to(offsets.dtype) if values.dtype != offsets.dtype else values
        mask = None
        if kept_lengths is not lengths:  # bounds_check warn/ignore dropped ids: zero rows there
            mask, lookup_ids, update = self._masked(
                values, lengths, rows, lookup_ids, kept, kept_lengths, batch
            )
        else:
            update = (lookup_ids, None, totals, None)
        return features, totals, lookup_ids, offsets, mask, update

    def _masked(self, values, lengths, rows, lookup_ids, kept, kept_lengths, batch):
        """The in-range mask, ids safe to look up (bad ones read row 0, then zeroed) and the
        update's (ids, gradient offsets, per-slot counts) for the kept occurrences only."""
        mask = in_range_mask(values, lengths, rows, batch)
        safe = torch.where(mask, lookup_ids, torch.zeros_like(lookup_ids))
        goff = torch.nonzero(mask).flatten() * self._embedding_dim
        kept_totals = kept_lengths.view(len(rows), batch).sum(dim=1).tolist()
        return mask.to(torch.float32), safe, (kept.to(lookup_ids.dtype), goff, kept_totals, None)

    # ----- backward: the fused update -----
    def _sequence_backward(
        self,
        grad_out: torch.Tensor,
        ids: torch.Tensor,
        goff: torch.Tensor | None,
        per_slot: list[int],
        skip: torch.Tensor | None,
    ) -> None:
        """The fused update from the gradient of the ``[N, dim]`` output: occurrence ``p`` reads
        gradient row ``p``; an id's occurrences are summed into one row update (``skip``: see
        :meth:`_fused_backward`)."""
        grad = grad_out.contiguous().to(torch.float32)
        if goff is None:
            goff = torch.arange(ids.numel(), device=ids.device, dtype=torch.int64) * self._embedding_dim
        spans, start, f = [], 0, 0
        for lay in self._layouts:
            nf = len(lay.feature_names)
            end = start + sum(per_slot[f : f + nf])
            spans.append(TableSpan(lay, start, end))
            f, start = f + nf, end
        self._fused_backward(grad, ids, goff, torch.empty(0, device=ids.device), spans, skip)

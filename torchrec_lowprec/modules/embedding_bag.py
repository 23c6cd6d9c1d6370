"""``LowPrecisionEmbeddingBagCollection``: a drop-in ``torchrec.EmbeddingBagCollection`` whose
tables are stored as 8/4/2-bit codes (or fp16/fp32) and trained by a fused sparse optimizer
in the backward pass (LPT / ALPT)."""

from __future__ import annotations

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_lowprec.configs import LowPrecisionConfig
from torchrec_lowprec.kernels.lookup import FeatureSlot, FusedPooledLookup
from torchrec_lowprec.modules.bounds import check_ids, ordered_with_totals
from torchrec_lowprec.modules.collection_base import LowPrecisionTables, TableSpan
from torchrec_lowprec.modules.table_layout import CollectionAccessors, ShardOrigin, check_collection_args
from torchrec_lowprec.quant.pooling import MeanColumns


class _FusedLookupFunction(torch.autograd.Function):
    """Pooled lookup whose backward runs the fused optimizer instead of returning weight grads."""

    @staticmethod
    def forward(ctx, module, totals, values, offsets, lengths, weights, skip, *handles):  # type: ignore[override]
        ctx.module = module
        ctx.totals = totals
        ctx.skip = skip
        ctx.num_handles = len(handles)
        ctx.save_for_backward(values, lengths, weights)
        return module._pooled(values, offsets, weights)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, lengths, weights = ctx.saved_tensors
        ctx.module._pooled_backward(grad_out, values, lengths, weights, ctx.totals, ctx.skip)
        return (None,) * (7 + ctx.num_handles)


class LowPrecisionEmbeddingBagCollection(
    LowPrecisionTables, CollectionAccessors, EmbeddingBagCollectionInterface
):
    """An ``EmbeddingBagCollection`` with tables stored in low precision and trained in place.

    Tables use FBGEMM's IntNBit row layout (fp16 step size and bias, then packed codes), so the
    forward pass is FBGEMM's fused quantized kernel (on CPU: our native lookup, which gives the
    same bits on all threads; see ``kernels/lookup.py``). The backward pass runs the fused optimizer
    on the touched rows (dequantize, fp32 step, ALPT step-size update, stochastic or nearest
    rounding) and returns no weight gradient, like TorchRec's fused TBE optimizers. Output
    keys, order and shapes match ``torchrec.EmbeddingBagCollection``.

    The positional arguments are ``torchrec.EmbeddingBagCollection``'s (``tables, is_weighted,
    device``); everything else is keyword-only.

    Args:
        tables: the TorchRec table configs (SUM or MEAN pooling, any dims).
        config: the default :class:`LowPrecisionConfig` of every table. ``None``: each table's
            width comes from its ``data_type`` (``DataType.INT8/INT4/INT2/FP16/FP32``, TorchRec's
            default FP32 included) with the other settings at their defaults.
        per_table_configs: table name -> config, overriding ``config`` (and ``data_type``) for
            that table. ``embedding_bag_configs()`` reports each table's real width as its
            ``data_type``.
        is_weighted: use KJT weights as per-sample weights (as TorchRec's ``is_weighted``).
        device: where the tables live (``meta`` allocates nothing).
        config: the default :class:`LowPrecisionConfig` of every table.
        per_table_configs: table name -> config, overriding ``config`` for that table.
        init_weights: fill the tables with TorchRec's default uniform init (quantized).
        shard_origins: for the sharded lookup: table name -> where this local table sits in
            its global table (keys the rounding draws by global table, row and column).

    Example::

        tables = [EmbeddingBagConfig(name="t_user", embedding_dim=64, num_embeddings=1000,
                                     feature_names=["user"])]
        ebc = LowPrecisionEmbeddingBagCollection(tables, config=LowPrecisionConfig(bits=4))
        pooled = ebc(kjt)               # KeyedTensor with key "user", [B, 64]
        pooled.values().sum().backward()  # the int4 table is updated in place
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        *,
        config: LowPrecisionConfig | None = None,
        per_table_configs: dict[str, LowPrecisionConfig] | None = None,
        init_weights: bool = True,
        shard_origins: dict[str, ShardOrigin] | None = None,
    ) -> None:
        super().__init__()
        check_collection_args(type(self).__name__, tables, is_weighted, device, config, per_table_configs)
        self._is_weighted = is_weighted
        self._embedding_bag_configs = self._init_tables(
            tables, device, config, per_table_configs, init_weights, shard_origins
        )
        self._build_lookups()

    # ----- structure -----
    def _build_lookups(self) -> None:
        """Group features by pooling mode (one FBGEMM call each) and record column offsets.

        A *slot* is one (table, feature) pair: a feature read by two tables is two slots, looked
        up twice (the KJT permute repeats its ids) and named ``feature@table`` in the output,
        as ``torchrec.EmbeddingBagCollection`` names it (``get_embedding_names_by_table``)."""
        self._feature_names = [f for lay in self._layouts for f in lay.feature_names]
        self._embedding_names = [n for names in get_embedding_names_by_table(self._layouts) for n in names]
        self._lengths_per_embedding = [lay.dim for lay in self._layouts for _ in lay.feature_names]
        col = 0
        out_cols: dict[tuple[int, str], int] = {}  # (table index, feature) -> first output column
        for i, lay in enumerate(self._layouts):
            for f in lay.feature_names:
                out_cols[(i, f)] = col
                col += lay.dim
        self._total_dim = col
        groups: dict[PoolingMode, list[int]] = {}
        for i, lay in enumerate(self._layouts):
            mode = PoolingMode.MEAN if lay.pooling == PoolingType.MEAN else PoolingMode.SUM
            groups.setdefault(mode, []).append(i)
        self._groups = []
        slots: list[tuple[int, str]] = []  # in the order FBGEMM sees them
        for mode, idx in groups.items():
            lays = [self._layouts[i] for i in idx]
            fbgemm_slots = [
                FeatureSlot(lay.offset, lay.bits, lay.dim, lay.rows)
                for lay in lays
                for _ in lay.feature_names
            ]
            self._groups.append(
                (mode, lays, FusedPooledLookup(fbgemm_slots, mode, self._row_alignment, self._flat.device))
            )
            slots.extend((i, f) for i in idx for f in self._layouts[i].feature_names)
        self._lookup_order = [f for _, f in slots]  # KJT keys in lookup order (repeats if shared)
        self._lookup_tables = [self._layouts[i] for i, _ in slots]  # the table of each slot
        self._lookup_cols = torch.tensor([out_cols[s] for s in slots], dtype=torch.int64)
        self._lookup_dims = [lay.dim for lay in self._lookup_tables]
        # MEAN bags' gradients are divided by the bag length in backward (quant/pooling.py).
        self._mean_columns = MeanColumns.of(
            [lay.pooling == PoolingType.MEAN for lay in self._lookup_tables],
            self._lookup_dims,
            [out_cols[s] for s in slots],
        )
        if len(self._groups) > 1:
            pieces = [torch.arange(out_cols[s], out_cols[s] + d) for s, d in zip(slots, self._lookup_dims)]
            self._col_perm = torch.argsort(torch.cat(pieces))
        else:
            self._col_perm = None

    # ----- forward -----
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self._pooled_forward(features)

    def _pooled_forward(
        self, features: KeyedJaggedTensor, known: list[int] | None = None, skip: torch.Tensor | None = None
    ) -> KeyedTensor:
        """:meth:`forward`; ``known``: the ids per lookup slot, for a sharded lookup's input
        (see :func:`~torchrec_lowprec.modules.bounds.ordered_with_totals`); ``skip``: its
        device verdict (true: the update changes nothing)."""
        if features.variable_stride_per_key():
            raise ValueError("variable batch size per feature (VBE) KJTs are not supported")
        on_device = self._checked_on_device(features, self._is_weighted, known, skip)
        if on_device is not None:  # checked on the device: reported later, never waited for
            features, totals, values, skip = on_device
            lengths = features.lengths()
            weights = features.weights().float() if self._is_weighted else None
        else:
            features, totals, values, lengths, weights = self._checked_on_host(features, known)
        batch = features.stride()
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
        values = values.to(offsets.dtype) if values.dtype != offsets.dtype else values
        handles = [h for h in self._handles() if h.requires_grad]
        if torch.is_grad_enabled() and handles:
            out = _FusedLookupFunction.apply(self, totals, values, offsets, lengths, weights, skip, *handles)
        else:
            out = self._pooled(values, offsets, weights)
        out = out.view(batch, self._total_dim) if out.numel() else out.reshape(batch, self._total_dim)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=out)

    def _checked_on_host(
        self, features: KeyedJaggedTensor, known: list[int] | None
    ) -> tuple[KeyedJaggedTensor, list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(KJT in lookup order, ids per slot, values, lengths, weights)`` checked on the host
        (``bounds_check`` "warn" / "ignore" drop out-of-range ids here)."""
        features, totals = ordered_with_totals(features, self._lookup_order, self._is_weighted, known)
        batch = features.stride()
        values = features.values()
        lengths = features.lengths()
        weights = features.weights().float() if self._is_weighted else None
        rows = [lay.rows for lay in self._lookup_tables]
        values, lengths, weights = check_ids(
            values,
            lengths,
            weights,
            self._lookup_order,
            rows,
            batch,
            self._bounds_modes(self._lookup_tables),
            [lay.name for lay in self._lookup_tables],
        )
        if lengths is not features.lengths():  # ids were dropped (bounds_check warn/ignore)
            totals = lengths.view(len(totals), batch).sum(dim=1).tolist()
        return features, totals, values, lengths, weights

    def _pooled(
        self, values: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, total_dim]`` pooled embeddings in output (table) order."""
        if len(self._groups) == 1:
            return self._groups[0][2](self._flat, values, offsets, weights)
        batch = (offsets.numel() - 1) // len(self._lookup_order)
        outs, f0 = [], 0
        for _, lays, lookup in self._groups:
            nf = sum(len(lay.feature_names) for lay in lays)
            o = offsets[f0 * batch : (f0 + nf) * batch + 1]
            v = values[o[0] : o[-1]]
            w = weights[o[0] : o[-1]] if weights is not None else None
            outs.append(lookup(self._flat, v, o - o[0], w))
            f0 += nf
        return torch.cat(outs, dim=1)[:, self._col_perm.to(values.device)]

    # ----- backward: the fused update -----
    def _pooled_backward(
        self,
        grad_out: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        per_feature: list[int],
        skip: torch.Tensor | None = None,
    ) -> None:
        """The fused update from the pooled output's gradient: every id of a bag reads the bag's
        gradient columns (divided by the bag length for MEAN), scaled by its weight (``skip``:
        see :meth:`_fused_backward`)."""
        grad = grad_out.contiguous().to(torch.float32)
        batch = lengths.numel() // len(self._lookup_order)
        dev = values.device
        # output_size: without it the op reads sum(lengths) back from the device.
        bag = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=dev), lengths, output_size=values.numel()
        )
        feat = torch.div(bag, batch, rounding_mode="floor")
        goff = (bag - feat * batch) * self._total_dim + self._lookup_cols.to(dev)[feat]
        grad = self._mean_columns.divide(grad, lengths)
        occ_w = weights.contiguous() if weights is not None else torch.empty(0, device=dev)
        spans, start, f = [], 0, 0
        for _, lays, _ in self._groups:
            for lay in lays:
                nf = len(lay.feature_names)
                end = start + sum(per_feature[f : f + nf])
                spans.append(TableSpan(lay, start, end))
                f, start = f + nf, end
        self._fused_backward(grad, values, goff, occ_w, spans, skip)

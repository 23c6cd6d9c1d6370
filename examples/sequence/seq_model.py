"""The sequence model of the example: one item table read by two features, and a small
target-attention (or mean) pooling over the history followed by an MLP.

``build_collection`` is the one place the table's precision is decided:

- ``--collection lowprec`` (default): :class:`torchrec_lowprec.LowPrecisionEmbeddingCollection`
  at ``--precision`` bits (32 and 16 run the same fused update, unquantized), trained by its
  fused RowWiseAdagrad in the backward; with ``--hot-rows`` a
  :class:`torchrec_lowprec.MixedPrecisionEmbeddingCollection` whose most frequent rows are wider;
- ``--collection torchrec`` (fp32 only): TorchRec's unsharded ``torchrec.EmbeddingCollection``
  tagged with ``torchrec.optim.RowWiseAdagrad`` through ``_apply_optimizer_in_backward``, as
  TorchRec's examples do (the optimizer runs in the backward, on the table's dense gradient).

Both start from TorchRec's init of the table under ``--seed``, so for one seed every precision
starts from the same weights (quantized for int8/4/2).
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torchrec
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp
from torchrec_lowprec.data import count_frequencies, frequency_rank
from torchrec_lowprec.flags import parse_hot_rows
from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.quant.groups import table_counts

PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
TABLE = "t_item"
EPS = 1e-8  # RowWiseAdagrad's eps, the same on both collections


def item_table(num_items: int, dim: int) -> EmbeddingConfig:
    """The one item table, read by the ``history`` and ``target`` features."""
    return EmbeddingConfig(
        name=TABLE, embedding_dim=dim, num_embeddings=num_items, feature_names=["history", "target"]
    )


def build_collection(args: argparse.Namespace, num_items: int, data=None) -> nn.Module:
    """The embedding collection the flags describe, initialised by TorchRec from ``--seed``.
    ``data`` (a ``SequenceData``): the training split whose item counts rank the rows for
    ``--hot-rows``."""
    torch.manual_seed(args.seed)
    table = item_table(num_items, args.embedding_dim)
    ec = torchrec.EmbeddingCollection([table], device=torch.device("cpu"))
    if args.collection == "torchrec":
        _apply_optimizer_in_backward(
            torchrec.optim.RowWiseAdagrad, ec.parameters(), {"lr": args.emb_lr, "eps": EPS}
        )
        return ec
    cfg = lp.LowPrecisionConfig(
        bits=PRECISION_BITS[args.precision],
        optimizer="rowwise_adagrad",
        learning_rate=args.emb_lr,
        eps=EPS,
        rounding=args.rounding,
        learn_step_size=getattr(args, "learn_step_size", True),
        seed=args.seed,
    )
    if getattr(args, "hot_rows", None):
        return _with_hot_rows(ec, table, cfg, args, data)
    ours = lp.LowPrecisionEmbeddingCollection([table], config=cfg, init_weights=False)
    ours.load_float_weight(TABLE, ec.embeddings[TABLE].weight.detach())
    return ours


def _with_hot_rows(ec, table: EmbeddingConfig, cfg, args: argparse.Namespace, data) -> nn.Module:
    """``ec`` as a MixedPrecisionEmbeddingCollection: the item table at ``--precision`` with its
    ``--hot-rows`` wider. Item ids are not popularity-ranked, so the table keeps a raw id ->
    rank map (4 B/row, counted) from the training split's counts of both features."""
    if data is None:
        raise ValueError("--hot-rows ranks the rows by the training split's counts: the data are needed")
    bits = PRECISION_BITS[args.precision]
    plan = PrecisionPlan.hot_rows(
        {TABLE: (table.num_embeddings, table.embedding_dim)}, bits, parse_hot_rows(args.hot_rows, bits)
    )
    plan = PrecisionPlan({TABLE: dataclasses.replace(plan.tables[TABLE], remapped=True)})
    gen = torch.Generator().manual_seed(0)  # the order of the batches does not change the counts
    feats = dict.fromkeys(table.feature_names, table.num_embeddings)
    counts = count_frequencies((kjt for kjt, _ in data.train_batches(65536, gen)), feats)
    maps = {TABLE: frequency_rank(table_counts(table, counts))}
    return lp.convert(ec, lp.MixedPrecisionConfig(plan, cfg), row_maps=maps)


def table_bytes(ec: nn.Module) -> int:
    """Bytes of the table's state: ours from ``memory_bytes()`` (codes, scales, optimizer
    state), TorchRec's as fp32 rows + RowWiseAdagrad's one fp32 per row."""
    if isinstance(ec, (lp.LowPrecisionEmbeddingCollection, lp.MixedPrecisionEmbeddingCollection)):
        return int(ec.memory_bytes())
    return fp32_bytes(ec.embedding_configs())


def fp32_bytes(tables: list[EmbeddingConfig]) -> int:
    """What FP32 tables with RowWiseAdagrad hold: ``rows * (4 * dim + 4)``."""
    return sum(t.num_embeddings * (4 * t.embedding_dim + 4) for t in tables)


def padded_by_recency(
    values: torch.Tensor, lengths: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, width, D]`` history embeddings with slot 0 = the latest item, and the ``[B, width]``
    validity mask (differentiable in ``values``)."""
    batch = lengths.numel()
    row = torch.repeat_interleave(torch.arange(batch), lengths, output_size=values.shape[0])
    ends = torch.cumsum(lengths, 0)
    age = ends[row] - 1 - torch.arange(values.shape[0])
    out = values.new_zeros(batch, width, values.shape[1])
    out = out.index_put((row, age), values)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return out, mask


class SequenceModel(nn.Module):
    """Click logit from a history and a target item, both looked up in one item table.

    ``pooling="attention"``: the target attends over the history (scaled dot product through a
    learned ``D x D`` map, plus a learned bias per recency slot), ``"mean"``: the plain mean.
    The pooled history ``u`` and the target ``t`` go through an MLP over ``[u, t, u * t]``.
    """

    def __init__(self, ec: nn.Module, dim: int, hist_max: int, hidden: list[int], pooling: str) -> None:
        super().__init__()
        self.ec, self.hist_max, self.pooling = ec, hist_max, pooling
        self.query = nn.Linear(dim, dim, bias=False)
        self.recency = nn.Parameter(torch.zeros(hist_max))
        layers: list[nn.Module] = []
        width = 3 * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        emb = self.ec(kjt)
        hist, target = emb["history"], emb["target"].values()
        h, mask = padded_by_recency(hist.values(), hist.lengths(), self.hist_max)
        if self.pooling == "attention":
            score = torch.einsum("bld,bd->bl", h, self.query(target)) / math.sqrt(target.shape[1])
            score = (score + self.recency).masked_fill(~mask, float("-inf"))
            u = torch.einsum("bl,bld->bd", torch.softmax(score, dim=1), h)
        else:
            u = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.mlp(torch.cat([u, target, u * target], dim=1)).squeeze(1)

    def dense_parameters(self) -> list[nn.Parameter]:
        """What the dense optimizer trains (the table is trained in the backward)."""
        return [p for n, p in self.named_parameters() if not n.startswith("ec.")]


def build_model(args: argparse.Namespace, num_items: int, data=None) -> SequenceModel:
    """The model of the flags: its collection (:func:`build_collection`), then the dense part,
    initialised from ``--seed`` too."""
    ec = build_collection(args, num_items, data)
    torch.manual_seed(args.seed + 1)
    hidden = [int(v) for v in args.mlp.split(",") if v.strip()]
    return SequenceModel(ec, args.embedding_dim, args.hist_max, hidden, args.pooling)

"""``compress_``: replace the large tables of a trained model by MEC codes; ``finetune_codebooks``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_lowprec.compress.codebook_ebc import (
    CodebookEmbeddingBagCollection,
    CodebookTable,
    codebook_table,
)
from torchrec_lowprec.compress.config import MECConfig
from torchrec_lowprec.compress.pq import learn_pq
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.progress import progress

_IN_BACKWARD_TAGS = ("_optimizer_classes", "_optimizer_kwargs")


def _is_target(m: nn.Module) -> bool:
    return isinstance(m, LowPrecisionEmbeddingBagCollection) or type(m) is EmbeddingBagCollection


def _float_weight(ebc: nn.Module, name: str) -> torch.Tensor:
    if isinstance(ebc, LowPrecisionEmbeddingBagCollection):
        return ebc.dequantized_weight(name)
    return ebc.embedding_bags[name].weight.detach().float()


def _copy_tags(src: torch.Tensor, dst: torch.Tensor) -> None:
    for tag in _IN_BACKWARD_TAGS:
        if hasattr(src, tag):
            setattr(dst, tag, getattr(src, tag))


def _subset(ebc: nn.Module, names: list[str]) -> nn.Module | None:
    """A collection of the same kind holding only tables ``names``, with their current state."""
    tables = [t for t in ebc.embedding_bag_configs() if t.name in names]
    if not tables:
        return None
    if isinstance(ebc, LowPrecisionEmbeddingBagCollection):
        sub = LowPrecisionEmbeddingBagCollection(
            tables,
            per_table_configs={t.name: ebc.table_config(t.name) for t in tables},
            is_weighted=ebc.is_weighted(),
            device=ebc.device,
            init_weights=False,
        )
        with torch.no_grad():
            for t in tables:
                ebc._resolve_optimizers()
                sub.quantized_weight(t.name).copy_(ebc.quantized_weight(t.name))
                _copy_tags(ebc.tables[t.name].handle, sub.tables[t.name].handle)
                sub._resolve_optimizers()
                sub.tables[t.name].load_state_dict(ebc.tables[t.name].state_dict())
            sub.step.copy_(ebc.step)
    else:
        dev = next(iter(ebc.parameters())).device
        sub = EmbeddingBagCollection(tables, is_weighted=ebc.is_weighted(), device=dev)
        with torch.no_grad():
            for t in tables:
                src = ebc.embedding_bags[t.name].weight
                sub.embedding_bags[t.name].weight.copy_(src)
                _copy_tags(src, sub.embedding_bags[t.name].weight)
    sub.train(ebc.training)
    return sub


def _table_counts(
    table: EmbeddingBagConfig, frequencies: Mapping[str, torch.Tensor] | None
) -> torch.Tensor | None:
    """Access counts of a table's rows: the sum over the features it serves."""
    if frequencies is None:
        return None
    counts = torch.zeros(table.num_embeddings, dtype=torch.int64)
    for f in table.feature_names:
        if f not in frequencies:
            raise ValueError(
                f"frequencies has no entry for feature {f!r} of table {table.name!r}; count them with "
                "torchrec_lowprec.data.count_frequencies over the training data (or pass frequencies=None)"
            )
        c = frequencies[f].to(torch.int64).cpu()
        if c.numel() != table.num_embeddings:
            raise ValueError(
                f"frequencies[{f!r}] has {c.numel()} entries, table {table.name!r} has {table.num_embeddings} rows"
            )
        counts += c
    return counts


def compress_collection(
    ebc: nn.Module, frequencies: Mapping[str, torch.Tensor] | None, config: MECConfig
) -> nn.Module:
    """``ebc`` with every table of >= ``config.min_rows`` rows replaced by MEC codes, as a
    :class:`CodebookEmbeddingBagCollection`; ``ebc`` itself when no table is that large.

    Example::

        cebc = compress_collection(lp_ebc, counts, MECConfig(num_subspaces=4, min_rows=50_000))
    """
    tables = ebc.embedding_bag_configs()
    large = [t for t in tables if t.num_embeddings >= config.min_rows]
    for t in large:  # every check before any learning
        config.check_dim(t.name, t.embedding_dim)
    if not large:
        return ebc
    counts = {t.name: _table_counts(t, frequencies) for t in large}
    compressed: dict[str, CodebookTable] = {}
    report: dict[str, dict[str, Any]] = {}
    for t in progress(large, "MEC: learning codebooks", unit="table"):
        res = learn_pq(_float_weight(ebc, t.name), counts[t.name], config)
        dev = _float_weight(ebc, t.name).device
        compressed[t.name] = codebook_table(res.codes.to(dev), res.codebooks.to(dev))
        report[t.name] = {"weighted_mse": res.weighted_mse, "entropy_bits": res.entropy_bits}
    rest = _subset(ebc, [t.name for t in tables if t.name not in compressed])
    out = CodebookEmbeddingBagCollection(tables, compressed, rest, is_weighted=ebc.is_weighted())
    out.fit_report = report
    out.train(ebc.training)
    return out


def compress_(
    model: nn.Module, frequencies: Mapping[str, torch.Tensor] | None, config: MECConfig | None = None
) -> nn.Module:
    """Replace, in place and at any depth, every ``LowPrecisionEmbeddingBagCollection`` and
    ``torchrec.EmbeddingBagCollection`` of ``model`` by a :class:`CodebookEmbeddingBagCollection`
    whose large tables are MEC codes (learned from the tables' current values and
    ``frequencies``: feature name -> per-id counts on the training data, e.g. from
    ``torchrec_lowprec.data.count_frequencies``; ``None`` weighs every row equally).

    Returns ``model`` (or the new collection when ``model`` itself is one).

    Example::

        counts = count_frequencies(data.batches("train", 8192), data.vocab_sizes)
        compress_(model, counts, MECConfig(num_subspaces=4, codebook_size=256, min_rows=100_000))
    """
    config = config or MECConfig()
    if _is_target(model):
        return compress_collection(model, frequencies, config)
    targets = [(n, m) for n, m in model.named_modules() if _is_target(m)]
    if not targets:
        raise ValueError(
            f"compress_: {type(model).__name__} holds no EmbeddingBagCollection or "
            "LowPrecisionEmbeddingBagCollection to compress"
        )
    for _, mod in targets:
        for t in mod.embedding_bag_configs():
            if t.num_embeddings >= config.min_rows:
                config.check_dim(t.name, t.embedding_dim)
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, compress_collection(mod, frequencies, config))
    return model


def codebook_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every codebook of every :class:`CodebookEmbeddingBagCollection` in ``model``."""
    return [
        p
        for m in model.modules()
        if isinstance(m, CodebookEmbeddingBagCollection)
        for p in m.codebook_parameters()
    ]


def finetune_codebooks(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any], torch.Tensor],
    lr: float = 5e-5,
    max_steps: int | None = None,
) -> int:
    """Train only the codebooks of ``model`` (codes, dense layers and uncompressed tables frozen)
    with Adam on ``loss_fn(batch)``; returns the number of steps taken.

    The default ``lr`` is small on purpose: codewords of trained CTR tables are ~1e-2 and
    larger Adam steps lowered test AUC in benchmarks/compression.py (5e-4: -0.001).

    Example::

        finetune_codebooks(train_model, data.batches("train", 2048), lambda b: train_model(b)[0], max_steps=200)
    """
    books = codebook_parameters(model)
    if not books:
        raise ValueError(
            "finetune_codebooks: the model holds no CodebookEmbeddingBagCollection (run compress_ first)"
        )
    book_ids = {id(p) for p in books}
    frozen = [p for p in model.parameters() if id(p) not in book_ids and p.requires_grad]
    for p in frozen:  # an LP table's handle off = no fused update either
        p.requires_grad_(False)
    opt = torch.optim.Adam(books, lr=lr)
    was_training = model.training
    model.train()
    steps = 0
    try:
        for batch in batches:
            if max_steps is not None and steps >= max_steps:
                break
            loss = loss_fn(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return steps

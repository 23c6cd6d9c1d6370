"""``compress_``: replace the large tables of a trained model by MEC codes; ``finetune_codebooks``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_lowprec._deprecation import warn_deprecated
from torchrec_lowprec.compress.codebook_ebc import (
    CodebookEmbeddingBagCollection,
    CodebookTable,
    codebook_table,
)
from torchrec_lowprec.compress.pq import learn_pq
from torchrec_lowprec.configs import CodebookConfig
from torchrec_lowprec.modules.embedding_bag import LowPrecisionEmbeddingBagCollection
from torchrec_lowprec.progress import progress
from torchrec_lowprec.quant.groups import table_counts
from torchrec_lowprec.transform import convert, copy_in_backward_tags, register_transform


def _is_target(m: nn.Module) -> bool:
    return isinstance(m, (LowPrecisionEmbeddingBagCollection, EmbeddingBagCollection))


def _float_weight(ebc: nn.Module, name: str) -> torch.Tensor:
    if isinstance(ebc, LowPrecisionEmbeddingBagCollection):
        return ebc.dequantized_weight(name)
    return ebc.embedding_bags[name].weight.detach().float()


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
                copy_in_backward_tags(ebc.tables[t.name].handle, sub.tables[t.name].handle)
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
                copy_in_backward_tags(src, sub.embedding_bags[t.name].weight)
    sub.train(ebc.training)
    return sub


def compress_collection(
    ebc: nn.Module, frequencies: Mapping[str, torch.Tensor] | None, config: CodebookConfig
) -> nn.Module:
    """``ebc`` with every table of >= ``config.min_rows`` rows replaced by MEC codes, as a
    :class:`CodebookEmbeddingBagCollection`; ``ebc`` itself when no table is that large.

    Example::

        cebc = compress_collection(lp_ebc, counts, CodebookConfig(num_subspaces=4, min_rows=50_000))
    """
    tables = ebc.embedding_bag_configs()
    large = [t for t in tables if t.num_embeddings >= config.min_rows]
    for t in large:  # every check before any learning
        config.check_dim(t.name, t.embedding_dim)
        if config.codebook_size >= t.num_embeddings:
            raise ValueError(
                f"table {t.name!r}: codebook_size={config.codebook_size} is not smaller than its "
                f"{t.num_embeddings} rows, so the codebooks would outgrow the table; use a codebook_size "
                f"below {t.num_embeddings} or a min_rows above {t.num_embeddings} to leave it uncompressed"
            )
    if not large:
        return ebc
    counts = {
        t.name: None if frequencies is None else table_counts(t, frequencies, require_all=True) for t in large
    }
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


def _check_dims(targets: list[tuple[str, nn.Module]], config: CodebookConfig) -> None:
    """Every table MEC would compress can be split into its sub-spaces (checked before any learning)."""
    for _, mod in targets:
        for t in mod.embedding_bag_configs():
            if t.num_embeddings >= config.min_rows:
                config.check_dim(t.name, t.embedding_dim)


@register_transform(
    CodebookConfig,
    is_target=_is_target,
    targets="EmbeddingBagCollection or LowPrecisionEmbeddingBagCollection to compress",
    if_none="raise",
    precheck=_check_dims,
    inputs=("frequencies",),
)
def _to_codebooks(
    ebc: nn.Module, config: CodebookConfig, fqn: str, frequencies: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    return compress_collection(ebc, frequencies, config)


def compress_(
    model: nn.Module, frequencies: Mapping[str, torch.Tensor] | None, config: CodebookConfig | None = None
) -> nn.Module:
    """Deprecated (removed in 0.2): ``convert(model, config, frequencies=frequencies)``.

    Replaces, in place and at any
    depth, every ``LowPrecisionEmbeddingBagCollection`` and ``torchrec.EmbeddingBagCollection``
    of ``model`` by a :class:`CodebookEmbeddingBagCollection` whose large tables are MEC codes
    (learned from the tables' current values and ``frequencies``: feature name -> per-id counts
    on the training data, e.g. from ``torchrec_lowprec.data.count_frequencies``; ``None``
    weighs every row equally).

    Returns ``model`` (or the new collection when ``model`` itself is one).

    Example::

        counts = count_frequencies(data.batches("train", 8192), data.vocab_sizes)
        convert(model, CodebookConfig(num_subspaces=4, codebook_size=256, min_rows=100_000), frequencies=counts)
    """
    warn_deprecated(
        "compress_(model, frequencies, config)",
        "convert(model, CodebookConfig(...), frequencies=frequencies)",
    )
    return convert(model, config or CodebookConfig(), frequencies=frequencies)


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

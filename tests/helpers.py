"""Shared test helpers: small tables and random KJTs.

torchrec is imported inside the helpers that need it, so the kernel tests (which use only
:func:`call_update`) import on a machine with torch and Triton alone (the GPU check's
image: ``tests/scripts/test_gpu_check_hidden.py``).
"""

from __future__ import annotations

import torch


def make_tables(dims=(8, 16), rows=(60, 40), features=(("a", "b"), ("c",)), pooling=None):
    import torchrec

    out = []
    for i, (d, r, f) in enumerate(zip(dims, rows, features)):
        kw = {}
        if pooling is not None:
            kw["pooling"] = pooling[i]
        out.append(
            torchrec.EmbeddingBagConfig(
                name=f"t{i}", embedding_dim=d, num_embeddings=r, feature_names=list(f), **kw
            )
        )
    return out


def random_kjt(tables, batch=6, max_len=4, weighted=False, gen=None, empty_prob=0.2):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    gen = gen or torch.Generator().manual_seed(1)
    keys, lengths, values = [], [], []
    for t in tables:
        for f in t.feature_names:
            ln = torch.randint(0, max_len + 1, (batch,), generator=gen)
            ln[torch.rand(batch, generator=gen) < empty_prob] = 0
            keys.append(f)
            lengths.append(ln)
            values.append(torch.randint(0, t.num_embeddings, (int(ln.sum()),), generator=gen))
    lengths = torch.cat(lengths)
    values = torch.cat(values)
    weights = torch.rand(values.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=weights)


def call_update(fn, rows, step_size, state1, state2, ids, grad_offsets, occ_weights, grad, spec, *rest, **kw):
    """``fn(TableUpdate(...), grad, *rest, **kw)`` for a backend's ``fused_update``, from the
    kernel contract's tensors in their order (keeps the kernel tests short). The skipped-row
    count comes back as an int (the Triton update leaves it on the device as a 0-d tensor)."""
    from torchrec_lowprec.kernels.spec import TableUpdate

    update = TableUpdate(rows, step_size, state1, state2, ids, grad_offsets, occ_weights, spec)
    out = fn(update, grad, *rest, **kw)
    if isinstance(out, torch.Tensor):
        assert out.dim() == 0 and out.dtype == torch.int64 and out.device == rows.device, out
        return int(out)
    return out


def as_updates(items):
    """``TableUpdate``s from ``(rows, step_size, state1, state2, ids, grad_offsets,
    occ_weights, spec)`` tuples (the dataclass's field order)."""
    from torchrec_lowprec.kernels.spec import TableUpdate

    return [TableUpdate(*item) for item in items]

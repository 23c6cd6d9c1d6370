"""Product quantization of a trained embedding table, learned as in MEC (pure tensor math).

A table ``X [N, D]`` is cut into ``L`` column blocks of ``d = D / L``. Block ``l`` has a
codebook ``C_l [K, d]``; row ``n`` stores codes ``c_n [L]`` and is served as
``concat_l C_l[c_n[l]]``. During learning the codes come from an encoder ``z = x + x A_l``
(per block, a residual linear map starting at the identity) and the nearest codeword to ``z``;
with ``refit`` (default) the served codes are then re-chosen on the rows (Lloyd iterations).

Objective per batch of rows (``w`` = popularity weight, ``sg`` = stop-gradient)::

    recon       = sum_n w_n ||x_n - C[c_n]||^2 / sum w             (codebooks: what is served)
    encoder     = sum_n w_n ||x_n - (z_n + sg(C[c_n] - z_n))||^2 / sum w   (straight-through)
    commitment  = sum_n w_n ||z_n - sg(C[c_n])||^2 / sum w
    balance     = mean_l (log K - H(mean_n softmax(-||z_n,l - C_l||^2 / T_l)))
    contrastive = -log softmax([s(c_n), s(c_n^1), ..., s(c_n^M)])_0, s(c) = -||x - C[c]||^2 / T
                  where c_n^m is c_n with ONE random block re-coded to a different code

Every random draw comes from a generator seeded with ``CodebookConfig.seed``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from torchrec_lowprec.configs import CodebookConfig

_CHUNK = 4096  # rows per distance block: bounds the [L, rows, K] temporary (cache-sized)
_REFIT_ITERS = 2
_KMEANS_MAX_ROWS = 1 << 16  # k-means init sample: 64 rows per code, at most 65536 rows (K=4096: 16)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The learner's steps are many small ops: intra-op threads only add barrier waits (measured
    50x slower with 2 threads on a busy 2-core machine), so they run on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def popularity_weights(counts: torch.Tensor | None, num_rows: int, mode: str) -> torch.Tensor:
    """Per-row weights ``[N]`` fp32: ``1 + ln(1 + count)`` for ``"log"``, ``1 + count`` for
    ``"count"``, ones for ``"uniform"``.

    The paper repeats a row ``log2(count)`` times, which gives rows seen 0 or 1 times weight 0;
    the ``1 +`` keeps every row in the objective (unseen rows are still served).
    """
    if mode == "uniform" or counts is None:
        return torch.ones(num_rows, dtype=torch.float32)
    if counts.numel() != num_rows:
        raise ValueError(f"frequency vector has {counts.numel()} entries for a table of {num_rows} rows")
    c = counts.to(torch.float32).clamp(min=0)
    return 1.0 + (c if mode == "count" else torch.log1p(c))


def split_blocks(x: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """``[N, D]`` -> ``[N, L, D/L]``."""
    return x.reshape(x.shape[0], num_subspaces, x.shape[1] // num_subspaces)


def _sq_dist(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """``z [n, L, d]``, ``codebooks [L, K, d]`` -> squared distances ``[n, L, K]``."""
    zt = z.transpose(0, 1)  # [L, n, d]
    cross = torch.bmm(zt, codebooks.transpose(1, 2))  # [L, n, K]
    d = (zt * zt).sum(-1, keepdim=True) - 2 * cross + (codebooks * codebooks).sum(-1)[:, None, :]
    return d.clamp_min(0).transpose(0, 1)


def assign(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Nearest codeword per block: ``z [N, L, d]`` -> codes ``[N, L]`` int64 (chunked over rows).

    ``argmin ||z - c||^2 = argmin (||c||^2 - 2 z.c)``: one fused ``baddbmm`` per chunk.
    """
    out = torch.empty(z.shape[:2], dtype=torch.int64)
    with torch.no_grad():
        cb = codebooks.detach()
        cnorm = (cb * cb).sum(-1)[:, None, :]  # [L, 1, K]
        cbt = cb.transpose(1, 2)
        for s in range(0, z.shape[0], _CHUNK):
            zt = z[s : s + _CHUNK].transpose(0, 1)
            out[s : s + _CHUNK] = torch.baddbmm(cnorm, zt, cbt, alpha=-2.0).argmin(-1).t()
    return out


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, L]`` and codebooks ``[L, K, d]`` -> rows ``[N, L*d]`` (the served values)."""
    L, K, d = codebooks.shape
    flat = codes.to(torch.int64) + torch.arange(L, device=codes.device) * K
    return codebooks.reshape(L * K, d)[flat].reshape(codes.shape[0], L * d)


def code_entropy(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Entropy (bits) of each block's code usage over rows ``[L]``; ``log2 K`` = every code used equally."""
    counts = torch.stack(
        [torch.bincount(codes[:, j].to(torch.int64), minlength=codebook_size) for j in range(codes.shape[1])]
    ).to(torch.float64)
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log2(p.clamp_min(1e-300))).sum(1)


def _weighted_centroids(
    x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, k: int, old: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of each code's rows per block (``old`` where a code has no rows), and mass."""
    n, L, d = x.shape
    flat = (codes + torch.arange(L) * k).reshape(-1)
    sums = torch.zeros(L * k, d).index_add_(0, flat, (x * w[:, None, None]).reshape(-1, d))
    mass = torch.zeros(L * k).index_add_(0, flat, w.repeat_interleave(L))
    new = torch.where(mass[:, None] > 0, sums / mass.clamp_min(1e-30)[:, None], old.reshape(L * k, d))
    return new.reshape(L, k, d), mass.reshape(L, k)


def weighted_kmeans(
    x: torch.Tensor, w: torch.Tensor, k: int, iters: int, gen: torch.Generator
) -> torch.Tensor:
    """Popularity-weighted k-means per block: ``x [N, L, d]`` -> codebooks ``[L, K, d]``.

    Seeds are rows drawn with probability proportional to weight; a codeword left without rows
    is re-seeded on a row drawn the same way, so all K codes stay in use.
    """
    n, L, d = x.shape
    prob = w / w.sum()
    seeds = torch.multinomial(prob, k, replacement=n < k, generator=gen)
    cb = x[seeds].transpose(0, 1).contiguous()  # [L, K, d]
    for _ in range(iters):
        codes = assign(x, cb)
        cb, mass = _weighted_centroids(x, w, codes, k, cb)
        empty = mass <= 0
        if empty.any():
            for j in torch.nonzero(empty.any(1)).flatten().tolist():
                idx = torch.nonzero(empty[j]).flatten()
                cb[j, idx] = x[torch.multinomial(prob, idx.numel(), replacement=True, generator=gen), j]
    return cb


@dataclass
class PQResult:
    """Learned codes ``[N, L]`` (uint8 if K <= 256 else uint16), codebooks ``[L, K, d]`` fp32, and
    statistics of the fit (weighted MSE, per-block code entropy in bits).

    Example::

        res = learn_pq(table, counts, CodebookConfig())
        served = reconstruct(res.codes, res.codebooks)
    """

    codes: torch.Tensor
    codebooks: torch.Tensor
    weighted_mse: float
    entropy_bits: list[float]


def code_dtype(codebook_size: int) -> torch.dtype:
    """The narrowest dtype holding codes ``< codebook_size``."""
    return torch.uint8 if codebook_size <= 256 else torch.uint16


def learn_pq(weight: torch.Tensor, counts: torch.Tensor | None, cfg: CodebookConfig) -> PQResult:
    """Learn PQ codes and codebooks for table ``weight [N, D]`` with per-row access ``counts [N]``.

    Example::

        res = learn_pq(table_fp32, counts, CodebookConfig(num_subspaces=4, codebook_size=256))
        approx = reconstruct(res.codes, res.codebooks)
    """
    n, dim = weight.shape
    cfg.check_dim("<table>", dim)
    L, K = cfg.num_subspaces, cfg.codebook_size
    d = dim // L
    gen = torch.Generator().manual_seed(cfg.seed)
    x = split_blocks(weight.detach().to(torch.float32).cpu(), L).contiguous()
    w = popularity_weights(counts, n, cfg.popularity)

    # Per-block scale of squared distances, so that the temperature is scale-free.
    mean = (x * w[:, None, None]).sum(0) / w.sum()
    scale = (((x - mean) ** 2).sum(-1) * w[:, None]).sum(0) / w.sum()  # [L]
    scale = scale.clamp_min(1e-12)
    if cfg.init == "kmeans":
        # k-means on rows drawn in proportion to their weight (an unbiased sample of the weighted
        # objective; a uniform subsample would miss the few popular rows the weighting is about).
        sub = torch.multinomial(w, min(n, 64 * K, _KMEANS_MAX_ROWS), replacement=True, generator=gen)
        codebooks = weighted_kmeans(x[sub], torch.ones(sub.numel()), K, cfg.kmeans_iters, gen)
    else:
        codebooks = (torch.randn(L, K, d, generator=gen) * scale.sqrt()[:, None, None] / math.sqrt(d)) + 3 * (
            scale.sqrt()[:, None, None] / math.sqrt(d)
        )
    codebooks = torch.nn.Parameter(codebooks)
    encoder = torch.nn.Parameter(torch.zeros(L, d, d))
    opt = torch.optim.Adam([codebooks, encoder], lr=cfg.lr)
    with _one_thread():
        _optimise(x, w, codebooks, encoder, opt, scale, cfg, gen)

    with torch.no_grad():
        cb = codebooks.detach().clone()
        if cfg.refit:
            # What is served is the codewords, so finish with Lloyd iterations on the rows
            # themselves: nearest codeword to x, then each codeword the weighted mean of its rows.
            # Each iteration can only lower the weighted reconstruction error.
            for _ in range(_REFIT_ITERS):
                codes = assign(x, cb)
                cb, _ = _weighted_centroids(x, w, codes, K, cb)
            codes = assign(x, cb)
        else:
            codes = assign(x + torch.einsum("bld,lde->ble", x, encoder), cb)
        rec = reconstruct(codes, cb)
        mse = float((w * ((weight.detach().float().cpu() - rec) ** 2).sum(1)).sum() / w.sum())
    return PQResult(codes.to(code_dtype(K)), cb, mse, code_entropy(codes, K).tolist())


def _optimise(
    x: torch.Tensor,
    w: torch.Tensor,
    codebooks: torch.nn.Parameter,
    encoder: torch.nn.Parameter,
    opt: torch.optim.Optimizer,
    scale: torch.Tensor,
    cfg: CodebookConfig,
    gen: torch.Generator,
) -> None:
    """``cfg.steps`` Adam steps on the MEC objective (module docstring), on random row batches."""
    n, L, d = x.shape
    K = codebooks.shape[1]
    offs = torch.arange(L) * K
    for _ in range(cfg.steps):
        # Rows drawn in proportion to their weight, then weighted equally: the same expected
        # objective as weighting a uniform draw, with less variance on the popular rows.
        idx = torch.multinomial(w, cfg.batch_size, replacement=True, generator=gen)
        xb, wb = x[idx], torch.ones(idx.numel())
        wsum = wb.sum()
        z = xb + torch.einsum("bld,lde->ble", xb, encoder)
        dz = _sq_dist(z, codebooks)  # [B, L, K]
        code = dz.argmin(-1)
        sel = codebooks.reshape(L * K, d)[code + offs]  # [B, L, d]
        loss = (wb * ((xb - sel) ** 2).sum((1, 2))).sum() / wsum
        ste = z + (sel - z).detach()
        loss = loss + (wb * ((xb - ste) ** 2).sum((1, 2))).sum() / wsum
        if cfg.commitment_weight:
            commit = (wb * ((z - sel.detach()) ** 2).sum((1, 2))).sum() / wsum
            loss = loss + cfg.commitment_weight * commit
        if cfg.balance_weight:
            p = torch.softmax(-dz / (cfg.temperature * scale[None, :, None]), dim=-1)
            usage = p.mean(0)  # [L, K]
            ent = -(usage * torch.log(usage.clamp_min(1e-12))).sum(-1)
            loss = loss + cfg.balance_weight * (math.log(K) - ent).mean()
        if cfg.contrastive_weight:
            loss = loss + cfg.contrastive_weight * _contrastive(xb, wb, codebooks, code, scale, cfg, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _contrastive(
    xb: torch.Tensor,
    wb: torch.Tensor,
    codebooks: torch.Tensor,
    code: torch.Tensor,
    scale: torch.Tensor,
    cfg: CodebookConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """InfoNCE of each row's reconstruction against M reconstructions that differ from it in one
    block, re-coded to a code that is guaranteed different (the reference code's negatives
    collapse to one vector; these do not)."""
    B, L = code.shape
    K = codebooks.shape[1]
    M = cfg.num_negatives
    dx = _sq_dist(xb, codebooks)  # [B, L, K] distances of the true row to every codeword
    pos_blocks = dx.gather(2, code[:, :, None]).squeeze(2)  # [B, L]
    pos = pos_blocks.sum(1)  # [B]
    blk = torch.randint(0, L, (B, M), generator=gen)
    shift = torch.randint(1, K, (B, M), generator=gen)
    new_code = (code.gather(1, blk) + shift) % K
    neg = pos[:, None] - pos_blocks.gather(1, blk) + dx[torch.arange(B)[:, None], blk, new_code]
    t = cfg.temperature * scale.sum()
    logits = torch.cat([-pos[:, None], -neg], dim=1) / t
    nll = -torch.log_softmax(logits, dim=1)[:, 0]
    return (wb * nll).sum() / wb.sum()

"""``CodebookEmbeddingBagCollection``: a drop-in collection serving MEC product-quantized tables."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_lowprec.compress.pq import code_dtype
from torchrec_lowprec.modules.bounds import in_feature_order
from torchrec_lowprec.quant.pooling import bag_mean

STATE_FORMAT = 1


class CodebookTable(nn.Module):
    """One compressed table: codes ``[rows, L]`` (uint8/uint16 buffer) and codebooks ``[L, K, d]``
    (an fp32 parameter, so that it can be fine-tuned while the codes stay fixed).

    Example::

        t = CodebookTable(codes, codebooks)
        t.reconstruct()  # [rows, L*d]
    """

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes.contiguous())
        self.codebooks = nn.Parameter(codebooks.detach().to(torch.float32).contiguous())

    @property
    def num_subspaces(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]

    def reconstruct(self) -> torch.Tensor:
        """The served table ``[rows, L*d]`` (concatenated codewords)."""
        L, K, d = self.codebooks.shape
        flat = self.codes.to(torch.int64) + torch.arange(L, device=self.codes.device) * K
        return self.codebooks.reshape(L * K, d)[flat].reshape(self.codes.shape[0], L * d)

    def pooled(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Sum-pooled rows of ``nb`` bags (``offsets [nb+1]``) -> ``[nb, L*d]``, in ONE embedding_bag.

        Pooling is linear per column block, so block ``l`` of a pooled bag is the pooled bag of
        codewords ``C_l[codes[ids, l]]``: every (block, bag) pair becomes one bag over the
        flattened codebook ``[L*K, d]``.
        """
        L, K, d = self.codebooks.shape
        nb = offsets.numel() - 1
        n = ids.numel()
        idx = (self.codes[ids].to(torch.int64) + torch.arange(L, device=ids.device) * K).t().reshape(-1)
        starts = offsets[:-1].to(torch.int64)
        offs = (starts[None, :] + torch.arange(L, device=ids.device)[:, None] * n).reshape(-1)
        psw = weights.repeat(L) if weights is not None else None
        out = nn.functional.embedding_bag(
            idx, self.codebooks.reshape(L * K, d), offs, mode="sum", per_sample_weights=psw
        )
        return out.view(L, nb, d).permute(1, 0, 2).reshape(nb, L * d)

    def memory_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.codebooks.numel() * 4


def _module_bytes(m: nn.Module) -> int:
    if hasattr(m, "memory_bytes"):
        return int(m.memory_bytes())
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


class CodebookEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """A collection whose large tables are MEC product-quantization codes + codebooks; the other
    tables stay in their original collection (``uncompressed``). KJT in, ``KeyedTensor`` out, with
    the keys, order and shapes of the collection it replaces; SUM/MEAN pooling; KJT weights
    are per-sample weights when ``is_weighted``.

    Build it with :func:`torchrec_lowprec.compress.compress_` (or from learned codes directly).

    Args:
        tables: every table config of the replaced collection, in its order.
        compressed: table name -> :class:`CodebookTable`.
        uncompressed: a collection holding exactly the other tables (or ``None``).
        is_weighted: as TorchRec's ``is_weighted``.

    Example::

        cebc = CodebookEmbeddingBagCollection(tables, {"t_user": CodebookTable(codes, books)}, rest)
        pooled = cebc(kjt)          # KeyedTensor, same keys/order/shapes as before
        cebc.memory_bytes()         # codes + codebooks + the uncompressed tables
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        compressed: dict[str, CodebookTable],
        uncompressed: nn.Module | None = None,
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        names = [t.name for t in tables]
        if set(compressed) - set(names):
            raise ValueError(f"compressed tables {sorted(set(compressed) - set(names))} are not in {names}")
        rest = [t for t in tables if t.name not in compressed]
        held = [t.name for t in uncompressed.embedding_bag_configs()] if uncompressed is not None else []
        if sorted(held) != sorted(t.name for t in rest):
            raise ValueError(
                f"the uncompressed collection holds {sorted(held)} but tables {sorted(t.name for t in rest)} "
                "are not compressed"
            )
        for t in tables:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported (SUM or MEAN)")
            if t.name in compressed:
                ct = compressed[t.name]
                L, K, d = ct.codebooks.shape
                if ct.codes.shape != (t.num_embeddings, L) or L * d != t.embedding_dim:
                    raise ValueError(
                        f"table {t.name!r}: codes {tuple(ct.codes.shape)} / codebooks {(L, K, d)} do not fit "
                        f"{t.num_embeddings} rows of dim {t.embedding_dim}"
                    )
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        self.compressed = nn.ModuleDict(compressed)
        self.uncompressed = uncompressed
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        # Output keys as TorchRec names them (feature@table for a feature two tables read); the
        # uncompressed collection names its own outputs among its tables only: mapped here.
        by_table = get_embedding_names_by_table(tables)
        self._embedding_names = [n for names in by_table for n in names]
        self._slot_name = {
            (t.name, f): n for t, names in zip(tables, by_table) for f, n in zip(t.feature_names, names)
        }
        self._rest_name = {
            rn: self._slot_name[(t.name, f)]
            for t, names in zip(rest, get_embedding_names_by_table(rest))
            for f, rn in zip(t.feature_names, names)
        }
        comp_feats = [f for t in tables if t.name in compressed for f in t.feature_names]
        self._rest_feats = list(dict.fromkeys(f for t in rest for f in t.feature_names))
        self._lookup_order = comp_feats + self._rest_feats
        # Per compressed table, the learner's statistics (set by compress_; empty otherwise).
        self.fit_report: dict[str, dict[str, Any]] = {}

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kjt = in_feature_order(features, self._lookup_order, self._is_weighted)
        batch = kjt.stride()
        lengths = kjt.lengths()
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)  # checked against values
        values = kjt.values()
        weights = kjt.weights().float() if self._is_weighted else None
        pieces: dict[str, torch.Tensor] = {}
        f0 = 0
        for name, table in self.compressed.items():
            cfg = self._table_by_name(name)
            nf = len(cfg.feature_names)
            lo, hi = f0 * batch, (f0 + nf) * batch
            o = offsets[lo : hi + 1]
            v0, v1 = int(o[0]), int(o[-1])
            ids = values[v0:v1]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.num_embeddings):
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise IndexError(f"id {bad} outside [0, {cfg.num_embeddings}) in table {name!r}")
            out = table.pooled(ids, o - v0, weights[v0:v1] if weights is not None else None)
            if cfg.pooling == PoolingType.MEAN:
                out = bag_mean(out, lengths[lo:hi])
            for i, f in enumerate(cfg.feature_names):
                pieces[self._slot_name[(name, f)]] = out[i * batch : (i + 1) * batch]
            f0 += nf
        if self.uncompressed is not None:
            lo = f0 * batch
            v0 = int(offsets[lo])
            sub = KeyedJaggedTensor(
                keys=self._rest_feats,
                values=values[v0:],
                lengths=lengths[lo:],
                weights=kjt.weights()[v0:] if self._is_weighted else None,
                stride=batch,
            )
            for key, v in self.uncompressed(sub).to_dict().items():
                pieces[self._rest_name[key]] = v
        values_out = torch.cat([pieces[n] for n in self._embedding_names], dim=1)
        return KeyedTensor(keys=self._embedding_names, length_per_key=self._dims, values=values_out)

    def _table_by_name(self, name: str) -> EmbeddingBagConfig:
        for t in self._embedding_bag_configs:
            if t.name == name:
                return t
        raise KeyError(name)

    def codebook_parameters(self) -> list[nn.Parameter]:
        """The codebooks (what fine-tuning trains; codes are buffers and never change)."""
        return [t.codebooks for t in self.compressed.values()]

    def memory_bytes(self, per_table: bool = False) -> int | dict[str, dict[str, int]]:
        """Bytes held: codes + codebooks of each compressed table, plus the uncompressed collection
        (its own ``memory_bytes()`` when it has one, else its parameters and buffers).
        ``per_table=True``: name -> parts with a ``"total"`` (as every collection here reports)."""
        parts: dict[str, dict[str, int]] = {}
        for name, t in self.compressed.items():
            codes = t.codes.numel() * t.codes.element_size()
            parts[name] = {"codes": codes, "codebooks": t.memory_bytes() - codes, "total": t.memory_bytes()}
        if self.uncompressed is not None:
            parts["uncompressed"] = {"total": _module_bytes(self.uncompressed)}
        return parts if per_table else sum(p["total"] for p in parts.values())

    # ----- checkpoints -----
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "tables": {
                name: {"rows": int(t.codes.shape[0]), "num_subspaces": t.num_subspaces,
                       "codebook_size": t.codebook_size, "dim": int(t.codebooks.shape[0] * t.codebooks.shape[2]),
                       "code_dtype": str(t.codes.dtype)}
                for name, t in self.compressed.items()
            },
        }  # fmt: skip

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass  # validated in _load_from_state_dict, before anything is copied

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[override]
        # Checked before torch copies anything: a checkpoint of other tables, rows, L, K or code
        # dtype raises ValueError naming the table and the field, and nothing is loaded.
        mine = self.get_extra_state()
        theirs = state_dict.get(f"{prefix}_extra_state")
        if theirs is not None:
            if theirs.get("format") != STATE_FORMAT:
                raise ValueError(
                    f"codebook checkpoint format {theirs.get('format')!r}, expected {STATE_FORMAT}"
                )
            if sorted(theirs["tables"]) != sorted(mine["tables"]):
                raise ValueError(
                    f"checkpoint compresses tables {sorted(theirs['tables'])}, this collection "
                    f"{sorted(mine['tables'])}"
                )
            for name, meta in mine["tables"].items():
                for field, value in meta.items():
                    if theirs["tables"][name].get(field) != value:
                        raise ValueError(
                            f"table {name!r}: checkpoint has {field}={theirs['tables'][name].get(field)!r}, "
                            f"this collection {value!r}"
                        )
        for name, t in self.compressed.items():
            for key, ref in ((f"{prefix}compressed.{name}.codes", t.codes),
                             (f"{prefix}compressed.{name}.codebooks", t.codebooks)):  # fmt: skip
                got = state_dict.get(key)
                if got is not None and (got.shape != ref.shape or got.dtype != ref.dtype):
                    raise ValueError(
                        f"table {name!r}: {key.rsplit('.', 1)[1]} in checkpoint is {tuple(got.shape)} "
                        f"{got.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
                    )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def codebook_table(codes: torch.Tensor, codebooks: torch.Tensor) -> CodebookTable:
    """A :class:`CodebookTable` with codes stored in the narrowest dtype for ``K``."""
    return CodebookTable(codes.to(code_dtype(codebooks.shape[1])), codebooks)

"""Pooled lookup over FBGEMM's IntNBit row layout, over storage we own.

FBGEMM's ``int_nbit_split_embedding_codegen_lookup_function`` reads any mix of INT8/INT4/
INT2/FP16/FP32 tables from one flat uint8 buffer and pools them in one fused pass (CPU and
CUDA). We call it directly rather than through ``IntNBitTableBatchedEmbeddingBagsCodegen`` so
that the buffer is ours: the fused update writes rows in place and the next forward sees
them, with no copy.

On CPU the lookup runs the native kernel (``kernels/cpu/pooled_lookup.cpp``) when it is
built: the same bits as FBGEMM's op, but parallel over bags, where FBGEMM 1.8's CPU IntNBit
forward runs on one thread. ``TORCHREC_LOWPREC_LOOKUP=fbgemm`` forces FBGEMM's op (CUDA
always uses it).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode

from torchrec_lowprec.types import FORMATS
from torchrec_lowprec.types import row_alignment as _row_alignment

#: FBGEMM's ``SparseType`` code of each stored width (``types.FORMATS``), as its ops take it.
SPARSE_TYPE_OF_BITS = {b: SparseType[f.sparse_type].as_int() for b, f in FORMATS.items() if f.sparse_type}
TABLE_ALIGNMENT = 128


#: Buffers at least this large get transparent huge pages on CPU (one 2 MiB page).
HUGE_PAGE_BYTES = 2 << 20


def table_buffer(nbytes: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed flat ``uint8`` buffer of ``nbytes`` for the tables, on ``device``.

    On Linux CPU, a buffer of 2 MiB or more is an anonymous mapping advised
    ``MADV_HUGEPAGE``: where transparent huge pages are ``madvise``-only (the common default)
    torch's allocator would give 4 KiB pages, and a random row lookup then pays a page walk
    per row (``docs/benchmarks.md``, profile section). Set ``TORCHREC_LOWPREC_HUGE_PAGES=0``
    to use torch's allocator. Elsewhere: ``torch.zeros``. Example::

        flat = table_buffer(1 << 30, "cpu")  # 1 GiB of zeros, huge pages if the kernel allows
    """
    device = torch.device(device)
    if (
        device.type != "cpu"
        or nbytes < HUGE_PAGE_BYTES
        or not hasattr(mmap, "MADV_HUGEPAGE")
        or os.environ.get("TORCHREC_LOWPREC_HUGE_PAGES", "1") == "0"
    ):
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP disabled or not supported: plain pages, still a valid buffer
        pass
    # The tensor keeps the mapping alive (it holds a reference to ``buf``); pages are zero.
    return torch.frombuffer(buf, dtype=torch.uint8)


def row_alignment_for(device: torch.device | str) -> int:
    """FBGEMM's row alignment on ``device`` (``types.ROW_ALIGNMENT``: 16 bytes on CUDA, 1 on CPU)."""
    return _row_alignment(torch.device(device).type)


@dataclass(frozen=True)
class FeatureSlot:
    """One feature of a lookup: where its table starts in the flat buffer and how it is stored."""

    table_offset: int
    bits: int
    dim: int
    #: rows of the table (``-1``: unknown; the lookup then uses FBGEMM's op, which needs none)
    rows: int = -1


def lookup_backend(device: torch.device, slots: list[FeatureSlot]) -> str:
    """``"cpu_native"`` or ``"fbgemm"``: which kernel pools ``slots`` on ``device``."""
    if device.type != "cpu" or os.environ.get("TORCHREC_LOWPREC_LOOKUP", "") == "fbgemm":
        return "fbgemm"
    if any(s.rows < 0 for s in slots):
        return "fbgemm"
    from torchrec_lowprec.kernels.dispatch import backend_for

    return "cpu_native" if backend_for(device) == "cpu_native" else "fbgemm"


class FusedPooledLookup:
    """Metadata of one FBGEMM IntNBit lookup over several features (one pooling mode).

    ``PoolingMode.NONE`` is the sequence lookup of an ``EmbeddingCollection``: ``[N, dim]``, one
    row per id, every feature at the same dim (``total_D`` is then that dim, as FBGEMM wants).

    Example::

        lookup = FusedPooledLookup([FeatureSlot(0, 8, 64, rows=1000)], PoolingMode.SUM, row_alignment=1, device=dev)
        pooled = lookup(flat_weights, indices, offsets, per_sample_weights=None)  # [B, 64]
    """

    def __init__(
        self, slots: list[FeatureSlot], pooling_mode: PoolingMode, row_alignment: int, device: torch.device
    ) -> None:
        self.pooling_mode = PoolingMode(pooling_mode)
        self.row_alignment = row_alignment
        dims = [s.dim for s in slots]
        if self.pooling_mode == PoolingMode.NONE and len(set(dims)) != 1:
            raise ValueError(
                f"a sequence (PoolingMode.NONE) lookup needs one dim for every feature, got {dims}"
            )
        self.total_D = dims[0] if self.pooling_mode == PoolingMode.NONE else sum(dims)
        self.max_D = {b: max([s.dim for s in slots if s.bits == b], default=0) for b in SPARSE_TYPE_OF_BITS}
        self._device = device
        self._weights_offsets = torch.tensor([s.table_offset for s in slots], dtype=torch.int64)
        self._weights_tys = torch.tensor([SPARSE_TYPE_OF_BITS[s.bits] for s in slots], dtype=torch.uint8)
        d_offsets = [0]
        for d in dims:
            d_offsets.append(d_offsets[-1] + d)
        self._D_offsets = torch.tensor(d_offsets, dtype=torch.int32)
        self._native_args = (
            [s.table_offset for s in slots],
            [s.bits for s in slots],
            dims,
            [s.rows for s in slots],
        )
        self._slots = list(slots)
        self._to(device)

    def _to(self, device: torch.device) -> None:
        self._device = device
        place = (EmbeddingLocation.DEVICE if device.type == "cuda" else EmbeddingLocation.HOST).value
        n = self._weights_offsets.numel()
        self.weights_offsets = self._weights_offsets.to(device)
        self.weights_tys = self._weights_tys.to(device)
        self.D_offsets = self._D_offsets.to(device)
        self.weights_placements = torch.full((n,), place, dtype=torch.int32, device=device)
        self.empty_u8 = torch.empty(0, dtype=torch.uint8, device=device)
        self.empty_cache = torch.empty(0, 0, dtype=torch.uint8, device=device)
        self.empty_i32 = torch.empty(0, dtype=torch.int32, device=device)
        self.backend: str | None = None  # chosen on the first call (may build the native kernel)

    def __call__(
        self,
        weights: torch.Tensor,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: torch.Tensor | None,
    ) -> torch.Tensor:
        if weights.device != self._device:
            self._to(weights.device)
        if self.backend is None:
            self.backend = lookup_backend(self._device, self._slots)
        if self.backend == "cpu_native":
            from torchrec_lowprec.kernels import cpu_native

            if offsets.dtype != indices.dtype:
                offsets = offsets.to(indices.dtype)
            if self.pooling_mode == PoolingMode.NONE:
                return cpu_native.sequence_lookup(
                    weights, indices, offsets, *self._native_args, self.row_alignment
                )
            return cpu_native.pooled_lookup(
                weights,
                indices,
                offsets,
                *self._native_args,
                self.row_alignment,
                self.pooling_mode == PoolingMode.MEAN,
                per_sample_weights,
            )
        return torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
            dev_weights=weights,
            uvm_weights=self.empty_u8,
            weights_placements=self.weights_placements,
            weights_offsets=self.weights_offsets,
            weights_tys=self.weights_tys,
            D_offsets=self.D_offsets,
            total_D=self.total_D,
            max_int2_D=self.max_D[2],
            max_int4_D=self.max_D[4],
            max_int8_D=self.max_D[8],
            max_float16_D=self.max_D[16],
            max_float32_D=self.max_D[32],
            indices=indices,
            offsets=offsets,
            pooling_mode=self.pooling_mode.value,
            indice_weights=per_sample_weights,
            output_dtype=SparseType.FP32.as_int(),
            lxu_cache_weights=self.empty_cache,
            lxu_cache_locations=self.empty_i32,
            row_alignment=self.row_alignment,
            max_float8_D=0,
            fp8_exponent_bits=-1,
            fp8_exponent_bias=-1,
        )

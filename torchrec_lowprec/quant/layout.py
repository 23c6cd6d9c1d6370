"""FBGEMM's IntNBit fused row layout, with a symmetric signed grid.

A b-bit row (b in 8, 4, 2) of dimension D is ``[scale fp16][bias fp16][D*b/8 bytes of codes]``.
Codes are unsigned ``u`` in ``[0, 2**b)``, packed little-end first (element ``k*(8/b)+j``
sits in bits ``[j*b, (j+1)*b)`` of byte ``k``), and FBGEMM dequantizes ``scale*u + bias``.
We keep the grid symmetric and signed, ``q = u - 2**(b-1)`` in ``[-2**(b-1), 2**(b-1)-1]``,
by always writing ``bias = -2**(b-1) * scale``; multiplying an fp16 by a power of two is
exact, so FBGEMM's ``scale*u + bias`` equals ``scale * q`` exactly in fp32.
16- and 32-bit rows are plain fp16 / fp32 values with no scale or bias.

:class:`RowFormat` owns every byte count of a row: stored bytes, padded stride, the fp32
master step size (ALPT), optimizer state, and the largest step size the fp16 bias can hold.
Modules, the planner, export and ``memory_bytes()`` all ask it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torchrec_lowprec.types import FLOAT_BITS, INT_BITS, optimizer_kind

SCALE_BIAS_BYTES = 4
#: Largest finite fp16 value.
FP16_MAX = 65504.0


def optimizer_state_bytes(optimizer: str, dim: int) -> int:
    """Bytes of fp32 optimizer state per row of ``dim`` for ``optimizer`` (an ``OptimizerType``
    or its value)."""
    return 4 * optimizer_kind(optimizer).state_floats(dim)


@dataclass(frozen=True)
class RowFormat:
    """The bytes of one stored row of ``dim`` values at ``bits`` (8/4/2: IntNBit; 16/32: float).

    Example::

        fmt = RowFormat(bits=4, dim=128)
        fmt.row_bytes            # 68: 64 B of codes + fp16 scale and bias
        fmt.stride(16)           # 80: padded to CUDA's 16-byte rows
        fmt.bytes_per_row(16, "rowwise_adagrad", learn_step_size=True)  # 80 + 4 + 4
    """

    bits: int
    dim: int

    def __post_init__(self) -> None:
        if self.bits not in INT_BITS + FLOAT_BITS:
            raise ValueError(
                f"RowFormat: bits={self.bits} is not storable; allowed {list(INT_BITS + FLOAT_BITS)}"
            )
        if self.dim <= 0:
            raise ValueError(f"RowFormat: dim={self.dim} must be > 0")

    @property
    def is_integer(self) -> bool:
        return self.bits in INT_BITS

    @property
    def row_bytes(self) -> int:
        """Unpadded bytes of the row (FBGEMM's ``unpadded_row_size_in_bytes``): what export serves."""
        if self.bits == 32:
            return 4 * self.dim
        if self.bits == 16:
            return 2 * self.dim
        return self.dim * self.bits // 8 + SCALE_BIAS_BYTES

    def stride(self, row_alignment: int) -> int:
        """Bytes between rows in storage: ``row_bytes`` rounded up to ``row_alignment``."""
        return -(-self.row_bytes // row_alignment) * row_alignment

    def master_step_bytes(self, learn_step_size: bool) -> int:
        """The fp32 master step size ALPT keeps per integer row (0 otherwise)."""
        return 4 if learn_step_size and self.is_integer else 0

    def optimizer_bytes(self, optimizer: str) -> int:
        return optimizer_state_bytes(optimizer, self.dim)

    def bytes_per_row(self, row_alignment: int, optimizer: str, learn_step_size: bool) -> int:
        """Everything a trained row holds: padded row, master step size, optimizer state."""
        return (
            self.stride(row_alignment)
            + self.master_step_bytes(learn_step_size)
            + self.optimizer_bytes(optimizer)
        )

    @property
    def max_step_size(self) -> float | None:
        """:func:`max_step_size` of an integer row; ``None`` for float rows."""
        return max_step_size(self.bits) if self.is_integer else None


def code_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of the symmetric signed grid of ``bits`` bits."""
    half = 1 << (bits - 1)
    return -half, half - 1


def max_step_size(bits: int) -> float:
    """The largest step size a ``bits``-bit row can store: ``65504 / 2**(bits-1)``.

    The row stores ``bias = -2**(bits-1) * scale`` in fp16; a larger scale makes the bias
    ``-inf`` and FBGEMM's forward (``scale * u + bias``) reads ``-inf`` / NaN, while the scale
    itself is still finite. At the bound the bias is exactly ``-65504`` and every code
    dequantizes to a finite value (``tests/kernels/test_step_bound.py`` checks this against
    FBGEMM for each width, and that the next fp16 above the bound breaks FBGEMM's forward).
    The bound is itself an fp16 value (511.75, 8188, 32752 for 8, 4, 2 bits), so clamping the
    fp32 step to it and rounding to fp16 keeps it. 16/32-bit rows have no step: fp16's max.
    """
    if bits in FLOAT_BITS:
        return FP16_MAX
    if bits not in INT_BITS:
        raise ValueError(f"bits must be one of {INT_BITS + FLOAT_BITS}, got {bits}")
    return FP16_MAX / float(1 << (bits - 1))


def row_bytes(bits: int, dim: int) -> int:
    """Unpadded bytes of one stored row (FBGEMM's ``unpadded_row_size_in_bytes``); see :class:`RowFormat`."""
    return RowFormat(bits, dim).row_bytes


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[N, D]`` (any int dtype, values < 2**bits) into ``[N, D*bits/8]`` uint8."""
    per = 8 // bits
    u = u.to(torch.int32).reshape(u.shape[0], -1, per)
    packed = torch.zeros(u.shape[:2], dtype=torch.int32, device=u.device)
    for j in range(per):
        packed |= u[:, :, j] << (bits * j)
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[N, D*bits/8]`` uint8 -> ``[N, D]`` int32."""
    per = 8 // bits
    p = packed.to(torch.int32)
    mask = (1 << bits) - 1
    parts = [(p >> (bits * j)) & mask for j in range(per)]
    return torch.stack(parts, dim=2).reshape(packed.shape[0], -1)


def split_row(rows: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split fused b-bit rows ``[N, >=row_bytes]`` into fp32 scales ``[N]`` and codes ``[N, D]`` (signed)."""
    scale = rows[:, 0:2].contiguous().view(torch.float16).reshape(-1).to(torch.float32)
    u = unpack_codes(rows[:, SCALE_BIAS_BYTES : row_bytes(bits, dim)], bits)
    return scale, u - (1 << (bits - 1))


def dequantize_rows(rows: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Stored rows ``[N, >=row_bytes]`` uint8 -> fp32 values ``[N, D]`` (what FBGEMM's forward reads)."""
    if bits == 32:
        return rows[:, : 4 * dim].contiguous().view(torch.float32).clone()
    if bits == 16:
        return rows[:, : 2 * dim].contiguous().view(torch.float16).to(torch.float32)
    scale, q = split_row(rows, bits, dim)
    return scale[:, None] * q.to(torch.float32)


def encode_rows(q: torch.Tensor, scale16: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[N, D]`` and fp16 scales ``[N]`` -> fused rows ``[N, row_bytes]`` uint8."""
    half = 1 << (bits - 1)
    scale16 = scale16.to(torch.float16).reshape(-1, 1)
    bias16 = scale16 * -float(half)
    head = torch.cat([scale16, bias16], dim=1).view(torch.uint8)
    return torch.cat([head, pack_codes(q.to(torch.int32) + half, bits)], dim=1)


def encode_float_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 values ``[N, D]`` already representable in the target precision -> raw rows uint8."""
    dtype = torch.float32 if bits == 32 else torch.float16
    return x.to(dtype).contiguous().view(torch.uint8)


def quantize_rows(
    x: torch.Tensor, step_size: torch.Tensor, bits: int, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize fp32 rows ``[N, D]`` with per-row step sizes ``[N]`` into fused rows.

    The step size is first rounded to fp16 (what the row stores), and codes are computed
    against that stored value, so the row dequantizes to exactly ``scale16 * q``.
    ``noise`` (uniform [0,1), ``[N, D]``) selects stochastic rounding; ``None`` nearest.
    """
    from torchrec_lowprec.quant.rounding import round_to_grid

    if bits in FLOAT_BITS:
        return encode_float_rows(x, bits)
    qmin, qmax = code_range(bits)
    s16 = step_size.to(torch.float16).to(torch.float32)
    inv = 1.0 / s16
    q = round_to_grid(x * inv[:, None], qmin, qmax, noise)
    return encode_rows(q, s16, bits)

"""Pure tensor math for low-precision embedding rows (no torchrec import).

- :mod:`.layout`: the FBGEMM IntNBit fused row layout (fp16 scale and bias, packed codes).
- :mod:`.rounding`: counter-based random draws and stochastic / nearest rounding.
- :mod:`.lsq`: the LSQ step-size gradient used by ALPT, and step-size initialisation.
- :mod:`.fake_quant`: LSQ+ fake quantization (differentiable) for the MPE bit-width search.
"""

from torchrec_lowprec.quant.fake_quant import lsq_plus_fake_quant
from torchrec_lowprec.quant.layout import (
    SCALE_BIAS_BYTES,
    code_range,
    dequantize_rows,
    pack_codes,
    quantize_rows,
    row_bytes,
    unpack_codes,
)
from torchrec_lowprec.quant.lsq import init_step_size, lsq_step_size_grad
from torchrec_lowprec.quant.rounding import (
    hash_key,
    mix32,
    round_to_grid,
    table_hash,
    uniform_from_counter,
)

__all__ = [
    "SCALE_BIAS_BYTES",
    "code_range",
    "dequantize_rows",
    "hash_key",
    "init_step_size",
    "lsq_plus_fake_quant",
    "lsq_step_size_grad",
    "mix32",
    "pack_codes",
    "quantize_rows",
    "round_to_grid",
    "row_bytes",
    "table_hash",
    "uniform_from_counter",
    "unpack_codes",
]

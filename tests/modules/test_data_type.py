"""``EmbeddingBagConfig.data_type`` sets a table's width when no config is given (issue 11 item 3)."""

import pytest
import torch
import torchrec
from torchrec.modules.embedding_configs import DataType

import torchrec_lowprec as lp
from tests.helpers import random_kjt
from torchrec_lowprec.modules.convert import to_float

WIDTHS = [
    (DataType.INT8, 8),
    (DataType.INT4, 4),
    (DataType.INT2, 2),
    (DataType.FP16, 16),
    (DataType.FP32, 32),
]


def _tables(*data_types):
    return [
        torchrec.EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=16, num_embeddings=50, feature_names=[f"f{i}"], data_type=d
        )
        for i, d in enumerate(data_types)
    ]


@pytest.mark.parametrize("data_type,bits", WIDTHS)
def test_convert_takes_the_width_from_data_type(data_type, bits):
    torch.manual_seed(0)
    ebc = torchrec.EmbeddingBagCollection(_tables(data_type, DataType.INT4))
    lp_ebc = lp.convert(ebc)
    assert lp_ebc.table_config("t0").bits == bits and lp_ebc.table_config("t1").bits == 4
    # Stored bytes are those of the width (FBGEMM IntNBit rows: D*bits/8 + 4; float rows D*bits/8).
    want = 16 * bits // 8 + (4 if bits <= 8 else 0)
    assert lp_ebc.quantized_weight("t0").shape == (50, want)
    assert [t.data_type for t in lp_ebc.embedding_bag_configs()] == [data_type, DataType.INT4]
    # Exactly the tables an explicit config of that width gives.
    explicit = lp.convert(
        ebc, lp.PerTableConfig({"t1": lp.LowPrecisionConfig(bits=4)}, lp.LowPrecisionConfig(bits=bits))
    )
    kjt = random_kjt(_tables(data_type, DataType.INT4))
    assert torch.equal(lp_ebc.quantized_weight("t0"), explicit.quantized_weight("t0"))
    assert torch.equal(lp_ebc(kjt).values(), explicit(kjt).values())


def test_explicit_configs_win_over_data_type_and_are_reported():
    tables = _tables(DataType.INT4, DataType.INT2)
    ebc = lp.LowPrecisionEmbeddingBagCollection(
        tables, config=lp.LowPrecisionConfig(bits=8), per_table_configs={"t1": lp.LowPrecisionConfig(bits=16)}
    )
    assert [ebc.table_config(n).bits for n in ("t0", "t1")] == [8, 16]
    assert [t.data_type for t in ebc.embedding_bag_configs()] == [DataType.INT8, DataType.FP16]
    only_t1 = lp.LowPrecisionEmbeddingBagCollection(
        tables, per_table_configs={"t1": lp.LowPrecisionConfig(bits=8)}
    )
    assert [only_t1.table_config(n).bits for n in ("t0", "t1")] == [4, 8]
    # The caller's configs are not modified.
    assert [t.data_type for t in tables] == [DataType.INT4, DataType.INT2]


def test_unstorable_data_type_raises():
    with pytest.raises(ValueError, match="data_type .*BF16 cannot be stored"):
        lp.LowPrecisionEmbeddingBagCollection(_tables(DataType.BF16))


def test_to_float_of_a_data_typed_table_is_fp32():
    lp_ebc = lp.convert(torchrec.EmbeddingBagCollection(_tables(DataType.INT4)))
    back = to_float(lp_ebc)
    assert back.embedding_bags["t0"].weight.dtype == torch.float32
    assert torch.equal(back.embedding_bags["t0"].weight, lp_ebc.dequantized_weight("t0"))

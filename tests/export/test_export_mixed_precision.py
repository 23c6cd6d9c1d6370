"""Export of a mixed-precision collection (row groups at different widths, pruned groups)."""

import torch
import torchrec

import torchrec_lowprec as lp
from tests.helpers import make_tables, random_kjt
from torchrec_lowprec.configs import InferenceConfig
from torchrec_lowprec.modules import MixedPrecisionEmbeddingBagCollection
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision


def test_mixed_precision_collection_exports_bit_exactly():
    tables = make_tables(pooling=(torchrec.PoolingType.SUM, torchrec.PoolingType.MEAN))
    plan = PrecisionPlan(
        {
            "t0": TablePrecision(60, 8, (10, 30, 45, 60), (8, 4, 2, 0)),
            "t1": TablePrecision(40, 16, (8, 40), (16, 4)),
        }
    )
    model = torch.nn.Sequential()
    model.add_module(
        "ebc", MixedPrecisionEmbeddingBagCollection(tables, plan=plan, config=lp.LowPrecisionConfig())
    )
    for step in range(3):  # train a little so the rows are not the init
        kjt = random_kjt(tables, batch=8, gen=torch.Generator().manual_seed(step))
        (model.ebc(kjt).values() ** 2).sum().backward()
    kjt = random_kjt(tables, batch=16, gen=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model.ebc(kjt).values().clone()
    lp.convert(model, InferenceConfig())
    assert isinstance(model.ebc, MixedPrecisionEmbeddingBagCollection)  # the wrapper stays
    assert not isinstance(model.ebc.row_groups, lp.LowPrecisionEmbeddingBagCollection)
    with torch.no_grad():
        after = model.ebc(kjt).values()
    assert torch.equal(before, after)

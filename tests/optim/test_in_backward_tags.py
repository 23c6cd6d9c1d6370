def test_tags_rewritten_by_torchrec_sharding_keep_their_learning_rate():
    # TorchRec's sharders rewrite the tag in place: {"lr": x} -> {"optimizer": ..., "learning_rate": x}.
    import torch

    from torchrec_lowprec.configs import LowPrecisionConfig
    from torchrec_lowprec.optim.fused import optimizer_params_from_in_backward
    from torchrec_lowprec.types import OptimizerType

    p = torch.empty(0)
    p._optimizer_classes = [torch.optim.Adam]
    p._optimizer_kwargs = [{"optimizer": "ADAM", "learning_rate": 0.3, "beta1": 0.8, "beta2": 0.95}]
    o = optimizer_params_from_in_backward(p, LowPrecisionConfig(learning_rate=0.01))
    assert (o.kind, o.lr, o.beta1, o.beta2) == (OptimizerType.ADAM, 0.3, 0.8, 0.95)


# ----- apply_optimizer_in_backward before or after convert (issue 11 item 1) -----
import pytest  # noqa: E402
import torch  # noqa: E402
import torchrec  # noqa: E402
from torch.distributed.optim import _apply_optimizer_in_backward  # noqa: E402
from torchrec.optim import RowWiseAdagrad  # noqa: E402
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward  # noqa: E402

import torchrec_lowprec as lp  # noqa: E402
from tests.helpers import make_tables, random_kjt  # noqa: E402

# Each class with hyper-parameters away from every default, and the config that means the same.
CASES = [
    (RowWiseAdagrad, {"lr": 0.05, "eps": 1e-6, "weight_decay": 0.01},
     dict(optimizer="rowwise_adagrad", learning_rate=0.05, eps=1e-6, weight_decay=0.01)),
    (torch.optim.SGD, {"lr": 0.3, "weight_decay": 0.02},
     dict(optimizer="sgd", learning_rate=0.3, weight_decay=0.02)),
    (torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-5, "weight_decay": 0.02},
     dict(optimizer="adagrad", learning_rate=0.05, eps=1e-5, weight_decay=0.02)),
    (torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01},
     dict(optimizer="adam", learning_rate=0.02, eps=1e-6, weight_decay=0.01, beta1=0.8, beta2=0.95)),
]  # fmt: skip
BASE = dict(bits=8, rounding="stochastic", seed=3)


class _Model(torch.nn.Module):
    def __init__(self, tables):
        super().__init__()
        torch.manual_seed(0)
        self.sparse_arch = torch.nn.Module()
        self.sparse_arch.ebc = torchrec.EmbeddingBagCollection(tables)

    def forward(self, kjt):
        return self.sparse_arch.ebc(kjt).values().pow(2).sum()


def _trained(model, tables, steps=3):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        model(random_kjt(tables, gen=gen)).backward()
    ebc = model.sparse_arch.ebc
    return {
        t.name: (ebc.quantized_weight(t.name).clone(), ebc.tables[t.name].momentum1.clone()) for t in tables
    }


@pytest.mark.parametrize("apply", [apply_optimizer_in_backward, _apply_optimizer_in_backward])
@pytest.mark.parametrize("cls,kwargs,same", CASES, ids=[c[0].__name__ for c in CASES])
def test_tags_before_or_after_convert_give_the_configured_update(apply, cls, kwargs, same):
    tables = make_tables()
    before = _Model(tables)
    apply(cls, before.sparse_arch.parameters(), dict(kwargs))
    lp.convert(before, lp.LowPrecisionConfig(**BASE))
    after = lp.convert(_Model(tables), lp.LowPrecisionConfig(**BASE))
    apply(cls, after.sparse_arch.parameters(), dict(kwargs))  # IndexError in RowWiseAdagrad before the fix
    configured = lp.convert(_Model(tables), lp.LowPrecisionConfig(**BASE, **same))
    default = lp.convert(_Model(tables), lp.LowPrecisionConfig(**BASE))
    a, b, c, d = (_trained(m, tables) for m in (before, after, configured, default))
    for t in a:
        for i in range(2):
            assert torch.equal(a[t][i], b[t][i]) and torch.equal(a[t][i], c[t][i])
    assert not torch.equal(a["t0"][0], d["t0"][0])  # the tag's numbers changed the update


@pytest.mark.parametrize(
    "cls,kwargs,option",
    [
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1}, "lr_decay"),
        (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1}, "initial_accumulator_value"),
        (RowWiseAdagrad, {"lr": 0.1, "maximize": True}, "maximize"),
        (torch.optim.Adam, {"lr": 0.1, "amsgrad": True}, "amsgrad"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, "momentum"),
        (torch.optim.AdamW, {"lr": 0.1}, "AdamW"),
        (torch.optim.Adagrad, {"lr": 0.1, "eps": 0.0}, "eps"),
        (torch.optim.SGD, {"lr": float("inf")}, "learning rate"),
    ],
)
def test_unsupported_tag_options_raise_naming_them(cls, kwargs, option):
    tables = make_tables()
    model = lp.convert(_Model(tables), lp.LowPrecisionConfig(**BASE))
    _apply_optimizer_in_backward(cls, model.sparse_arch.parameters(), kwargs)
    with pytest.raises(ValueError, match=option):
        model(random_kjt(tables)).backward()


def test_irrelevant_switches_are_accepted():
    tables = make_tables()
    model = lp.convert(_Model(tables), lp.LowPrecisionConfig(**BASE))
    _apply_optimizer_in_backward(
        torch.optim.Adam, model.sparse_arch.parameters(), {"lr": 0.1, "foreach": False, "maximize": False}
    )
    model(random_kjt(tables)).backward()
    assert model.sparse_arch.ebc.tables["t0"].optimizer_kind == lp.OptimizerType.ADAM

"""Sharder fused_params on low-precision tables: honoured, refused or warned, never dropped."""

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType

import torchrec_lowprec as lp
from torchrec_lowprec.optim.fused import config_with_fused_params, resolve_optimizer


def test_fused_params_override_the_config_and_tags_override_them_key_by_key():
    cfg = config_with_fused_params(
        lp.LowPrecisionConfig(bits=4),
        {
            "optimizer": EmbOptimType.ADAM,
            "learning_rate": 0.3,
            "eps": 1e-4,
            "beta1": 0.5,
            "weight_decay": 0.1,
        },
    )
    assert (cfg.bits, cfg.optimizer, cfg.learning_rate, cfg.eps, cfg.beta1, cfg.weight_decay) == (
        4, lp.OptimizerType.ADAM, 0.3, 1e-4, 0.5, 0.1,
    )  # fmt: skip
    p = torch.empty(0, 8)
    p._optimizer_classes = [torch.optim.Adagrad]
    p._optimizer_kwargs = [{"lr": 0.02}]
    o = resolve_optimizer(p, cfg)
    assert (o.kind, o.lr, o.eps, o.weight_decay) == (lp.OptimizerType.ADAGRAD, 0.02, 1e-4, 0.1)


def test_sharders_refuse_math_changing_keys_and_warn_for_inapplicable_ones():
    with pytest.raises(ValueError, match="weight_decay_mode"):
        lp.sharders(fused_params={"weight_decay_mode": 2})
    with pytest.raises(ValueError, match="LAMB"):
        config_with_fused_params(lp.LowPrecisionConfig(), {"optimizer": EmbOptimType.LAMB})
    with pytest.raises(ValueError, match="eps"):
        config_with_fused_params(lp.LowPrecisionConfig(), {"eps": 0.0})
    with pytest.warns(UserWarning, match="stochastic_rounding"):
        lp.sharders(fused_params={"learning_rate": 0.1, "stochastic_rounding": True})

def test_tags_rewritten_by_torchrec_sharding_keep_their_learning_rate():
    # TorchRec's sharders rewrite the tag in place: {"lr": x} -> {"optimizer": ..., "learning_rate": x}.
    import torch

    from torchrec_lowprec.optim.fused import optimizer_params_from_in_backward
    from torchrec_lowprec.types import LowPrecisionConfig, OptimizerType

    p = torch.empty(0)
    p._optimizer_classes = [torch.optim.Adam]
    p._optimizer_kwargs = [{"optimizer": "ADAM", "learning_rate": 0.3, "beta1": 0.8, "beta2": 0.95}]
    o = optimizer_params_from_in_backward(p, LowPrecisionConfig(learning_rate=0.01))
    assert (o.kind, o.lr, o.beta1, o.beta2) == (OptimizerType.ADAM, 0.3, 0.8, 0.95)

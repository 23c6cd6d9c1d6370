"""End-to-end training: convert inside TorchRec's DLRM, and a learnable task where int8
reaches the float model's AUC."""

import pytest
import torch
import torchrec
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import torchrec_lowprec as lp

FIELDS, VOCAB, DIM = 4, 500, 16


def _planted_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    effects = torch.randn(FIELDS, VOCAB, generator=g) * 1.2
    dense_w = torch.randn(3, generator=g)

    def batch(n, gen):
        ids = (torch.rand(n, FIELDS, generator=gen) ** 2 * VOCAB).long()  # skewed popularity
        dense = torch.randn(n, 3, generator=gen)
        logit = effects[torch.arange(FIELDS), ids].sum(1) + dense @ dense_w - 0.5
        labels = (torch.rand(n, generator=gen) < torch.sigmoid(logit)).float()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(FIELDS)],
            values=ids.t().reshape(-1),
            lengths=torch.ones(FIELDS * n, dtype=torch.int64),
        )
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels)

    return batch


def _tables():
    return [
        torchrec.EmbeddingBagConfig(
            name=f"t{i}", embedding_dim=DIM, num_embeddings=VOCAB, feature_names=[f"f{i}"]
        )
        for i in range(FIELDS)
    ]


def _dlrm(ebc):
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=3,
            dense_arch_layer_sizes=[16, DIM],
            over_arch_layer_sizes=[16, 1],
        )
    )


def _auc(scores, labels):
    order = torch.argsort(scores)
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _fit(model, emb_lr_float=None, steps=300, seed=0):
    """Dense params with Adam; float tables with dense Adagrad (when emb_lr_float is set)."""
    task = _planted_task()
    torch.manual_seed(seed)
    emb = [p for n, p in model.named_parameters() if "embedding_bags" in n]
    dense = [p for n, p in model.named_parameters() if "embedding_bags" not in n and "tables." not in n]
    opts = [torch.optim.Adam(dense, lr=3e-3)]
    if emb_lr_float:
        opts.append(torch.optim.Adagrad(emb, lr=emb_lr_float))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        loss, _ = model(task(256, gen))
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    model.eval()
    test = task(20000, torch.Generator().manual_seed(99))
    with torch.no_grad():
        _, (_, logits, labels) = model(test)
    return _auc(logits.detach(), labels)


@pytest.mark.slow
def test_int8_reaches_float_auc_and_int2_trains():
    torch.manual_seed(0)
    float_auc = _fit(_dlrm(torchrec.EmbeddingBagCollection(_tables())), emb_lr_float=0.05)
    aucs = {}
    for bits in (8, 2):
        torch.manual_seed(0)
        model = _dlrm(torchrec.EmbeddingBagCollection(_tables()))
        lp.convert(model, lp.LowPrecisionConfig(bits=bits, learning_rate=0.05, optimizer="adagrad"))
        aucs[bits] = _fit(model)
    assert float_auc > 0.75, float_auc
    # What this task resolves (20k test rows, same init and batches for both models): int8 -
    # float measured -0.0004 to 0.0000 over init seeds 0-3 (step_size_lr 1e-2), while int4 gives
    # about -0.008 and int2 -0.03. 0.002 is 5x the worst int8 gap seen and fails a model that
    # loses a quarter of int4's gap. The accuracy claim itself is the benchmark's (3 seeds,
    # paired): docs/benchmarks.md, "accuracy" and "lowbit" sections.
    assert aucs[8] > float_auc - 0.002, (aucs, float_auc)
    assert aucs[2] > 0.7, aucs  # 2-bit tables still learn the planted effects


def test_convert_swaps_ebc_inside_dlrm_and_trains():
    from torch.distributed.optim import _apply_optimizer_in_backward

    torch.manual_seed(0)
    model = _dlrm(torchrec.EmbeddingBagCollection(_tables()))
    float_ebc = model.model.sparse_arch.embedding_bag_collection
    _apply_optimizer_in_backward(torchrec.optim.RowWiseAdagrad, float_ebc.parameters(), {"lr": 0.05})
    before = model.model.sparse_arch.embedding_bag_collection.embedding_bags["t0"].weight.detach().clone()
    lp.convert(model, lp.LowPrecisionConfig(bits=4))
    ebc = model.model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, lp.LowPrecisionEmbeddingBagCollection)
    # The current float weights were quantized, not re-initialised (int4 absolute error < step).
    err = (ebc.dequantized_weight("t0") - before).abs().max()
    assert err < before.abs().max() / 2
    # An ordinary loop: loss.backward(); dense_opt.step() trains the tables too.
    dense_opt = torch.optim.Adam([p for n, p in model.named_parameters() if "tables." not in n], lr=3e-3)
    task = _planted_task()
    gen = torch.Generator().manual_seed(1)
    q0 = ebc.quantized_weight("t0").clone()
    losses = []
    for _ in range(60):
        loss, _ = model(task(256, gen))
        dense_opt.zero_grad()
        loss.backward()
        dense_opt.step()
        losses.append(loss.item())
    assert not torch.equal(ebc.quantized_weight("t0"), q0)
    assert ebc.tables["t0"].optimizer_kind == lp.OptimizerType.ROWWISE_ADAGRAD
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.02

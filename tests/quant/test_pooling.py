"""MEAN pooling's one home: which columns divide, by which bag's length."""

import torch

from torchrec_lowprec.quant.pooling import MeanColumns, bag_mean


def test_mean_columns_divide_only_mean_features_by_their_bag_length():
    cols = MeanColumns.of([True, False, True], dims=[2, 1, 1], starts=[2, 0, 1])  # out of order
    x = torch.ones(2, 4)
    lengths = torch.tensor([2, 0, 5, 5, 4, 1])  # feature-major: f0 [2, 0], f1 [5, 5], f2 [4, 1]
    want = torch.tensor([[1.0, 1 / 4, 1 / 2, 1 / 2], [1.0, 1.0, 1.0, 1.0]])  # empty bag: / 1
    torch.testing.assert_close(cols.divide(x, lengths), want, rtol=0, atol=0)
    none = MeanColumns.of([False, False], dims=[2, 2])
    assert none.mean is None and none.divide(x, lengths[:4]) is x


def test_bag_mean_keeps_empty_bags_zero():
    s = torch.tensor([[2.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(bag_mean(s, torch.tensor([2, 0])), torch.tensor([[1.0, 2.0], [0.0, 0.0]]))

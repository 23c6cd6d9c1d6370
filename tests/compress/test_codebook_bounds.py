"""A codebook not smaller than its table is refused before anything is learned (issue 23)."""

import pytest
import torch
import torchrec

import torchrec_lowprec as lp


def test_codebook_as_large_as_the_table_is_refused():
    t = torchrec.EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=10, feature_names=["f"])
    model = torch.nn.Sequential(torchrec.EmbeddingBagCollection([t]))
    cfg = lp.CodebookConfig(num_subspaces=2, codebook_size=65_536, min_rows=1, steps=0)
    with pytest.raises(
        ValueError, match=r"table 'tiny': codebook_size=65536 is not smaller than its 10 rows"
    ):
        lp.convert(model, cfg)
    assert isinstance(model[0], torchrec.EmbeddingBagCollection)  # untouched
    ok = lp.convert(model, cfg.replace(codebook_size=4))
    assert ok[0].memory_bytes() < 10 * 8 * 4

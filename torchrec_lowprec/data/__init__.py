"""Data for training and evaluating recommendation models with low-precision tables.

* :mod:`.synthetic`: Criteo-shaped synthetic CTR data from a planted model (known Bayes AUC).
* :mod:`.tabular` / :mod:`.schema` / :mod:`.vocab`: streaming CSV/TSV reader driven by a schema.
* :mod:`.cache`: a binary (memory-mapped .npy) cache of a parsed file set, made once.
* :mod:`.criteo`: the Criteo Kaggle / 1TB logs as one schema of that reader.
* :mod:`.frequencies`: per-id access counts for the precision planner.

Every source yields ``torchrec.datasets.utils.Batch``.
"""

from .cache import CachedDataset, CacheError, CacheWarning, open_cached
from .common import SPLITS, RowBlock, atomic_write_bytes, embedding_bag_configs, rebatch
from .criteo import (
    CRITEO_NUM_CAT,
    CRITEO_NUM_INT,
    CriteoDataset,
    criteo_int_to_bucket,
    criteo_int_to_dense,
    criteo_schema,
)
from .frequencies import (
    count_frequencies,
    frequency_groups,
    frequency_rank,
    load_frequencies,
    remap_by_rank,
    save_frequencies,
)
from .lines import count_lines, random_split_codes
from .metrics import HistogramAUC, exact_auc, log_loss_terms
from .schema import TabularSchema, log1p_clamped, log_squared_bucket
from .synthetic import (
    CRITEO_LIKE_VOCAB_SIZES,
    GroundTruth,
    SyntheticCTR,
    SyntheticCTRConfig,
)
from .tabular import MalformedRowError, MalformedRowWarning, TabularDataset
from .vocab import OOV_ID, Vocabulary
from .zipf import power_law_pmf, power_law_ranks

__all__ = [
    "CRITEO_LIKE_VOCAB_SIZES",
    "CRITEO_NUM_CAT",
    "CRITEO_NUM_INT",
    "CacheError",
    "CacheWarning",
    "CachedDataset",
    "OOV_ID",
    "SPLITS",
    "CriteoDataset",
    "GroundTruth",
    "HistogramAUC",
    "MalformedRowError",
    "MalformedRowWarning",
    "RowBlock",
    "SyntheticCTR",
    "SyntheticCTRConfig",
    "TabularDataset",
    "TabularSchema",
    "Vocabulary",
    "atomic_write_bytes",
    "count_frequencies",
    "frequency_groups",
    "frequency_rank",
    "remap_by_rank",
    "count_lines",
    "criteo_int_to_bucket",
    "criteo_int_to_dense",
    "criteo_schema",
    "embedding_bag_configs",
    "exact_auc",
    "load_frequencies",
    "log1p_clamped",
    "log_loss_terms",
    "log_squared_bucket",
    "open_cached",
    "power_law_pmf",
    "power_law_ranks",
    "random_split_codes",
    "rebatch",
    "save_frequencies",
]

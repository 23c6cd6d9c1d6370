"""MPE (Li et al., "Mixed-Precision Embeddings for Large-Scale Recommendation Models"): learn,
per frequency group of rows, a distribution over candidate bit widths; select; retrain.

During the search every table is an fp32 weight; each looked-up row is replaced by its
*expected* quantized value ``sum_i p_gi * Q_bi(w)`` (``p_g = softmax(alpha_g / T)`` for the
row's group ``g``, ``Q_b`` LSQ+ fake quantization with a learnable step per bit width and an
offset per dimension), and :meth:`MPESearchEmbeddingBagCollection.regularization` adds
``lambda * sum_g sum_i p_gi * b_i / c_g`` (``c_g`` = the group's lookup mass relative to the
table's smallest group), which pushes rarely seen groups to fewer bits.

At a byte budget (``MPESearchConfig(target_bits=...)``: stored bits per value, metadata
included, as :func:`plan_bits` counts a plan) the regulariser is the budget's Lagrangian term
``lambda * E[stored bits per value]`` (each group priced by its rows x row bytes under ``p_g``),
and ``lambda`` is no longer fixed: each :meth:`~MPESearchTables.budget_step` takes one
dual-ascent step ``log lambda += budget_lr * (E[bits] - target) / target`` (tensor ops only: no
host sync, so it can run every training step). :meth:`~MPESearchTables.select` then applies the
paper's rule, monotone in frequency within a table, at the smallest threshold (1/(2m) or
another) whose plan fits the budget, so the plan never exceeds it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollection,
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_lowprec._deprecation import warn_deprecated
from torchrec_lowprec.configs import MPESearchConfig
from torchrec_lowprec.modules import input_check
from torchrec_lowprec.modules.bounds import describe_report, ids_checked_on_device, ordered_with_totals
from torchrec_lowprec.modules.input_check import DeferredInputErrors
from torchrec_lowprec.modules.mpe_budget import MPEBudget
from torchrec_lowprec.planner.schema import PrecisionPlan, TablePrecision
from torchrec_lowprec.quant.fake_quant import (
    float_fake_quant,
    lsq_grad_scale_for,
    lsq_plus_fake_quant,
    lsq_plus_init_step,
)
from torchrec_lowprec.quant.groups import frequency_groups, table_counts
from torchrec_lowprec.quant.pooling import bag_mean
from torchrec_lowprec.transform import convert
from torchrec_lowprec.types import storable_bits

#: Keeps c_g finite for groups never looked up (masses are fractions of a table's lookups).
MASS_FLOOR = 1e-6


def _slots(kjt: KeyedJaggedTensor, totals: list[int]) -> list[JaggedTensor]:
    """``kjt``'s entries in order as ``JaggedTensor`` s, a key repeated where it repeats (a
    feature two tables read: ``to_dict()`` would keep one); ``totals``: ids per entry."""
    lengths = kjt.lengths().view(len(totals), kjt.stride())
    weights = kjt.weights_or_none()
    split_weights = weights.split(totals) if weights is not None else [None] * len(totals)
    return [
        JaggedTensor(values=v, lengths=lengths[i], weights=w)
        for i, (v, w) in enumerate(zip(kjt.values().split(totals), split_weights))
    ]


class MPESearchTables(MPEBudget, nn.Module):
    """What both MPE search collections share (not used on its own): fp32 tables, per-group
    bit-width logits, LSQ+ step sizes and offsets, the regulariser, the expected quantized
    rows of looked-up ids and the selection. A collection calls :meth:`_init_search` and
    adds its forward (pooled: :class:`MPESearchEmbeddingBagCollection`; sequence:
    :class:`~torchrec_lowprec.modules.mpe_search_ec.MPESearchEmbeddingCollection`).

    Example::

        reg = search.regularization()        # lambda * sum_g sum_i p_gi * b_i / c_g
        plan = search.select()               # a PrecisionPlan for the mixed collections
    """

    def _init_search(
        self,
        tables: list[BaseEmbeddingConfig],
        config: MPESearchConfig | None,
        frequencies: Mapping[str, torch.Tensor] | None,
        device: torch.device | str | None,
    ) -> None:
        self.config = config or MPESearchConfig()
        self._tables = tables
        device = torch.device(device) if device is not None else torch.device("cpu")
        frequencies = dict(frequencies or {})
        bits = self.config.candidate_bits
        self._int_bits = [b for b in bits if 0 < b <= 8]
        self.weights = nn.ParameterDict()
        self.bit_logits = nn.ParameterDict()
        self.step_sizes = nn.ParameterDict()
        self.offsets = nn.ParameterDict()
        self._group_ends: dict[str, tuple[int, ...]] = {}
        self._group_mass: dict[str, tuple[float, ...]] = {}
        for t in tables:
            counts = table_counts(t, frequencies)
            ends, mass = frequency_groups(counts, self.config.num_groups, self.config.min_rows_per_group)
            self._group_ends[t.name], self._group_mass[t.name] = ends, mass
            w = torch.empty(t.num_embeddings, t.embedding_dim, device=device)
            w.uniform_(t.get_weight_init_min(), t.get_weight_init_max())
            self.weights[t.name] = nn.Parameter(w)
            self.bit_logits[t.name] = nn.Parameter(torch.zeros(len(ends), len(bits), device=device))
            steps = [lsq_plus_init_step(w, b) for b in self._int_bits]
            self.step_sizes[t.name] = nn.Parameter(torch.tensor(steps, device=device))
            self.offsets[t.name] = nn.Parameter(
                torch.zeros(len(self._int_bits), t.embedding_dim, device=device)
            )
            self.register_buffer(f"group_ends_{t.name}", torch.tensor(ends, dtype=torch.int64, device=device))
            rel = torch.tensor(mass, dtype=torch.float32) + MASS_FLOOR
            self.register_buffer(f"inv_rel_mass_{t.name}", (rel.min() / rel).to(device))
        self._features = [f for t in tables for f in t.feature_names]
        # output keys as TorchRec names them (feature@table for a feature two tables read)
        self._embedding_names = [n for names in get_embedding_names_by_table(tables) for n in names]
        self.register_buffer("_bits", torch.tensor(bits, dtype=torch.float32, device=device))
        self._input_errors = DeferredInputErrors()  # batches checked on the device (CUDA)
        self._forwards = 0  # names the batch of a deferred input error
        self.budget_bytes: int | None = None
        if self.config.target_bits is not None:
            self._init_budget(device)

    def _copy_float_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Start from these fp32 tables (name -> ``[rows, dim]``); step sizes re-initialised."""
        with torch.no_grad():
            for t in self._tables:
                w = weights[t.name]
                self.weights[t.name].copy_(w)
                steps = [lsq_plus_init_step(w, b) for b in self._int_bits]
                self.step_sizes[t.name].copy_(torch.tensor(steps))

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The bit-width logits (often trained with their own optimizer / learning rate)."""
        return list(self.bit_logits.values())

    def bit_probabilities(self) -> dict[str, torch.Tensor]:
        """Table -> ``[groups, candidates]`` softmax probabilities (candidates ascending)."""
        return {n: torch.softmax(a / self.config.temperature, dim=1) for n, a in self.bit_logits.items()}

    def regularization(self) -> torch.Tensor:
        """``lambda * sum_tables sum_g sum_i p_gi * b_i / c_g``; with ``target_bits`` the budget's
        Lagrangian term ``lambda * E[stored bits per value]`` (``lambda``: :meth:`current_lambda`)."""
        if self.budget_bytes is not None:
            # A group costs the budget its rows x row bytes; the paper's b_i / c_g (relative to
            # each table's own rarest group) would price a small table's one group, however
            # often it is read, like the rarest rows of the largest table and prune it.
            return self.current_lambda() * self._stored_bits()
        total = torch.zeros((), device=self._bits.device)
        for n, p in self.bit_probabilities().items():
            total = total + ((p @ self._bits) * getattr(self, f"inv_rel_mass_{n}")).sum()
        return self.current_lambda() * total

    def expected_bits(self) -> dict[str, torch.Tensor]:
        """Table -> expected bit width per group (a readable summary of the search state)."""
        return {n: (p @ self._bits).detach() for n, p in self.bit_probabilities().items()}

    def _checked_features(
        self, features: KeyedJaggedTensor, weighted: bool = False
    ) -> list[tuple[JaggedTensor, torch.Tensor | None]]:
        """Per lookup slot (each table's features in order), its ids as a ``JaggedTensor`` and,
        where the checks run on the device (``input_check.checks_on_device``, as the
        low-precision collections' ``bounds_check="raise"``), the mask of its in-range ids: a
        bad id reads row 0, its row is multiplied by 0 (no output, no gradient), and the report
        is raised by a later forward or :meth:`check_inputs`. ``None``: checked on the host, in
        :meth:`_lookup`."""
        device = self.weights[self._tables[0].name].device
        self._forwards += 1
        if not input_check.checks_on_device(device):
            kjt, totals = ordered_with_totals(features, self._features, weighted)
            return [(jt, None) for jt in _slots(kjt, totals)]
        self._input_errors.poll()
        rows = [t.num_embeddings for t in self._tables for _ in t.feature_names]
        kjt, totals, report, fed = ids_checked_on_device(features, self._features, rows, weighted)
        tables = [t.name for t in self._tables for _ in t.feature_names]
        describe = describe_report(features.keys(), self._features, tables, rows, device)
        self._input_errors.record(report, self._forwards, describe)
        # A bad id is never 0 (row 0 always exists), so it is exactly where the ids changed.
        return list(zip(_slots(kjt, totals), (kjt.values() == fed).split(totals)))

    def check_inputs(self) -> None:
        """Raise the error of any batch whose ids were checked on the device and found bad
        (see :meth:`_checked_features`); waits for the device. On CPU the forward raises at
        once and this does nothing."""
        self._input_errors.flush()

    def _lookup(
        self, t: BaseEmbeddingConfig, f: str, ids: torch.Tensor, p: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """The expected quantized rows ``[n, dim]`` of ``ids`` (feature ``f``) in table ``t``
        (``p``: the table's bit probabilities); ``keep``: the in-range mask of ids checked on the
        device (their bad ids read zeros), or ``None``: ``IndexError`` for an id outside the
        table (a host check)."""
        ids = ids.to(torch.int64)
        if keep is None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= t.num_embeddings):
            raise IndexError(f"feature {f!r} has an id outside [0, {t.num_embeddings}) of table {t.name!r}")
        rows = F.embedding(ids, self.weights[t.name], sparse=self.config.sparse_weights)
        out = self._expected_rows(t.name, ids, rows, p)
        return out if keep is None else out * keep.unsqueeze(1)

    def _expected_rows(
        self, name: str, ids: torch.Tensor, rows: torch.Tensor, p: torch.Tensor
    ) -> torch.Tensor:
        group = torch.searchsorted(getattr(self, f"group_ends_{name}"), ids, right=True)
        pg = p[group]  # [n, m]
        out = torch.zeros_like(rows)
        k = 0
        for i, b in enumerate(self.config.candidate_bits):
            if b == 0:
                continue  # a pruned row contributes nothing
            if b <= 8:
                scale = lsq_grad_scale_for(rows.numel(), b)
                q = lsq_plus_fake_quant(rows, self.step_sizes[name][k], self.offsets[name][k], b, scale)
                k += 1
            else:
                q = float_fake_quant(rows, b)
            out = out + pg[:, i : i + 1] * q
        return out

    def select(self) -> PrecisionPlan:
        """The paper's rule: per group, the highest width whose probability is >= 1/(2m);
        widths the storage lacks are rounded up (see ``types.storable_bits``).

        With ``target_bits``: the same rule, with no group given fewer bits than a rarer group
        of its table (groups are frequency-ranked: a noisy probability of one rare group must
        not outrank the frequent ones), at the smallest threshold whose plan fits
        :attr:`budget_bytes` (thresholds above every probability of a group give its most
        probable width), so the plan uses as much of the budget as the rule's steps allow and
        never more. If even the most probable widths overrun it, groups are lowered one
        candidate at a time where the planner's cost (lookup share x error growth per byte
        saved) is least."""
        probs = {n: p.detach().cpu().double() for n, p in self.bit_probabilities().items()}
        m = len(self.config.candidate_bits)
        if self.budget_bytes is None:
            idx = self._select_at(probs, 1.0 / (2 * m))
        else:
            idx = self._select_in_budget(probs)
        plan = {}
        for t in self._tables:
            plan[t.name] = TablePrecision(
                t.num_embeddings,
                t.embedding_dim,
                self._group_ends[t.name],
                tuple(storable_bits(self.config.candidate_bits[i]) for i in idx[t.name]),
                self._group_mass[t.name],
            )
        return PrecisionPlan(plan)


class MPESearchEmbeddingBagCollection(MPESearchTables, EmbeddingBagCollectionInterface):
    """Search-time collection: KJT -> KeyedTensor like ``torchrec.EmbeddingBagCollection``, with
    every looked-up row replaced by its expected quantized value under the group's learned
    bit-width distribution. Ids must be frequency-ranked (``data.remap_by_rank``).

    Parameters: ``weights`` (fp32 tables), ``bit_logits`` (``[G, m]`` per table),
    ``step_sizes`` (per table and integer width) and ``offsets`` (``[widths, D]`` per
    table). Train all with the model's loss plus :meth:`regularization`; then
    :meth:`select` gives the :class:`PrecisionPlan` to retrain with.

    Args:
        tables: TorchRec table configs (SUM or MEAN pooling).
        config: :class:`MPESearchConfig`.
        frequencies: feature name -> per-id lookup counts *indexed by frequency rank* or raw
            id (only the sorted counts are used). A table without counts gets equal groups
            and equal masses.
        is_weighted: use KJT weights as per-sample weights.

    Example::

        search = MPESearchEmbeddingBagCollection(tables, MPESearchConfig(), counts)
        loss = bce(model(batch)) + search.regularization()
        plan = search.select()   # then MixedPrecisionEmbeddingBagCollection(tables, plan=plan)
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        config: MPESearchConfig | None = None,
        frequencies: dict[str, torch.Tensor] | None = None,
        is_weighted: bool = False,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        for t in tables:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported (SUM or MEAN)")
        self._is_weighted = is_weighted
        self._init_search(tables, config, frequencies, device)
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]

    @classmethod
    def from_float(
        cls,
        ebc: EmbeddingBagCollection,
        config: MPESearchConfig | None = None,
        frequencies: Mapping[str, torch.Tensor] | None = None,
    ) -> MPESearchEmbeddingBagCollection:
        """A search collection starting from ``ebc``'s weights (step sizes re-initialised);
        TorchRec's ``from_float`` classmethod convention (``convert`` calls it)."""
        tables = ebc.embedding_bag_configs()
        dev = ebc.embedding_bags[tables[0].name].weight.device
        out = cls(tables, config, frequencies, ebc.is_weighted(), dev)
        out._copy_float_weights({t.name: ebc.embedding_bags[t.name].weight for t in tables})
        return out

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        slots = iter(self._checked_features(features, self._is_weighted))
        batch = features.stride()
        outs = []
        probs = self.bit_probabilities()
        for t in self._tables:
            w = self.weights[t.name]
            for f in t.feature_names:
                jt, keep = next(slots)
                ids = jt.values()
                emb = self._lookup(t, f, ids, probs[t.name], keep)
                if self._is_weighted:
                    emb = emb * jt.weights().float().unsqueeze(1)
                lengths = jt.lengths()
                bag = torch.repeat_interleave(
                    torch.arange(batch, device=ids.device), lengths, output_size=ids.numel()
                )
                pooled = torch.zeros(batch, t.embedding_dim, device=w.device, dtype=w.dtype).index_add(
                    0, bag, emb
                )
                if t.pooling == PoolingType.MEAN:
                    pooled = bag_mean(pooled, lengths)
                outs.append(pooled)
        return KeyedTensor(
            keys=self._embedding_names, length_per_key=self._dims, values=torch.cat(outs, dim=1)
        )


def mpe_search_(
    model: nn.Module,
    config: MPESearchConfig | None = None,
    frequencies: dict[str, torch.Tensor] | None = None,
) -> list[MPESearchTables]:
    """Deprecated (removed in 0.2): ``convert(model, MPESearchConfig(...), frequencies=counts)``,
    then :func:`search_collections` finds the new search collections.
    """
    warn_deprecated(
        "mpe_search_(model, config, frequencies)",
        "convert(model, MPESearchConfig(...), frequencies=frequencies) and search_collections(model)",
    )
    before = {id(m) for m in model.modules()}
    out = convert(model, config or MPESearchConfig(), frequencies=frequencies)
    return [m for m in out.modules() if isinstance(m, MPESearchTables) and id(m) not in before]


def search_collections(model: nn.Module) -> list[MPESearchTables]:
    """Every MPE search collection in ``model`` after ``convert`` (pooled and sequence:
    :class:`MPESearchEmbeddingBagCollection`, ``MPESearchEmbeddingCollection``).

    Example::

        convert(dlrm, MPESearchConfig(reg_lambda=3e-4), frequencies=counts)
        searches = search_collections(dlrm)
        ...  # train with loss + regularization(searches)
        plan = merge_plans([s.select() for s in searches])
    """
    return [m for m in model.modules() if isinstance(m, MPESearchTables)]


def merge_plans(plans: list[PrecisionPlan]) -> PrecisionPlan:
    """One plan holding the tables of several (e.g. one per collection of a model)."""
    out: dict[str, TablePrecision] = {}
    for p in plans:
        dup = set(out) & set(p.tables)
        if dup:
            raise ValueError(f"tables {sorted(dup)} appear in two plans")
        out.update(p.tables)
    return PrecisionPlan(out)


def regularization(searches: list[MPESearchTables]) -> torch.Tensor:
    """The summed bit regulariser of several search collections."""
    return sum((s.regularization() for s in searches), torch.zeros(()))


def budget_step(searches: list[MPESearchTables]) -> None:
    """One dual-ascent step of each search collection with a ``target_bits`` (no host sync)."""
    for s in searches:
        s.budget_step()

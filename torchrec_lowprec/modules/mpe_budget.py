"""MPE at a byte budget (``MPESearchConfig.target_bits``): the bytes a plan stores, the
budget's Lagrangian multiplier and its dual ascent, and the selection that fits the budget.

:class:`MPEBudget` is a mixin of :class:`~torchrec_lowprec.modules.mpe_search.MPESearchTables`
(it reads the search's tables, groups, probabilities and config)."""

from __future__ import annotations

import heapq
import math

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from torchrec_lowprec.planner.schema import PrecisionPlan
from torchrec_lowprec.quant.layout import RowFormat
from torchrec_lowprec.types import storable_bits

#: Bounds of ``log lambda`` under dual ascent (a budget the loss never pushes against would
#: otherwise drive it to -inf).
LOG_LAMBDA_RANGE = (-40.0, 10.0)


def row_bytes(bits: int, dim: int) -> int:
    """Served bytes of one row searched at ``bits`` (stored at ``storable_bits``; 0: pruned)."""
    return RowFormat(storable_bits(bits), dim).row_bytes if bits else 0


def uniform_bits(tables: list[BaseEmbeddingConfig], bits: int) -> float:
    """The ``MPESearchConfig.target_bits`` of storing every table at ``bits``: stored bits per
    value with the per-row metadata (``uniform_bits(tables, 4)`` = int4's bytes; 5.0 at dim 32)."""
    values = sum(t.num_embeddings * t.embedding_dim for t in tables)
    return 8 * sum(t.num_embeddings * row_bytes(bits, t.embedding_dim) for t in tables) / values


def plan_bits(plan: PrecisionPlan) -> float:
    """Stored bits per value of ``plan`` (``TablePrecision.serving_bytes``: codes, fp16 scale and
    bias per integer row, raw id maps when remapped; pruned rows 0): what ``target_bits`` bounds."""
    values = sum(tp.rows * tp.dim for tp in plan.tables.values())
    return 8 * sum(tp.serving_bytes() for tp in plan.tables.values()) / values


class MPEBudget:
    """The byte-budget half of an MPE search (see the module docstring); not used alone."""

    def _init_budget(self, device: torch.device) -> None:
        """Byte accounting of the budget; ``ValueError`` for a target no selection can meet."""
        cfg, bits = self.config, self.config.candidate_bits
        values = sum(t.num_embeddings * t.embedding_dim for t in self._tables)
        low, high = uniform_bits(self._tables, bits[0]), uniform_bits(self._tables, bits[-1])
        if cfg.target_bits < low:
            raise ValueError(
                f"MPESearchConfig.target_bits={cfg.target_bits!r} is below {low:.4f}, the stored bits per "
                f"value of every row at the narrowest candidate ({bits[0]} bits, with its per-row scale and "
                f"bias) for tables {[t.name for t in self._tables]}: no selection fits; add 0 (pruning) to "
                "candidate_bits or raise target_bits"
            )
        if cfg.target_bits > high:
            raise ValueError(
                f"MPESearchConfig.target_bits={cfg.target_bits!r} is above {high:.4f}, the stored bits per "
                f"value of every row at the widest candidate ({bits[-1]} bits): the budget constrains "
                "nothing; lower it, add a wider candidate, or drop target_bits"
            )
        # floor, not round: the plan must fit; the epsilon keeps uniform_bits' own bytes exact
        self.budget_bytes = math.floor(cfg.target_bits * values / 8 + 1e-6)
        self._values = values
        for t in self._tables:
            ends = self._group_ends[t.name]
            rows = [e - a for a, e in zip((0,) + ends[:-1], ends)]
            self.register_buffer(
                f"group_rows_{t.name}",
                torch.tensor(rows, dtype=torch.float32, device=device),
                persistent=False,
            )
            cand = [row_bytes(b, t.embedding_dim) for b in bits]
            self.register_buffer(
                f"cand_bytes_{t.name}",
                torch.tensor(cand, dtype=torch.float32, device=device),
                persistent=False,
            )
        self.register_buffer(
            "log_lambda", torch.tensor(math.log(cfg.reg_lambda), dtype=torch.float32, device=device)
        )

    def current_lambda(self) -> torch.Tensor | float:
        """``reg_lambda``, or with ``target_bits`` the dual-ascent value (a 0-d tensor)."""
        if self.budget_bytes is None:
            return self.config.reg_lambda
        return self.log_lambda.exp()

    def expected_serving_bits(self) -> torch.Tensor:
        """Stored bits per value (metadata included) expected under the current distributions:
        ``8 * sum_g rows_g * sum_i p_gi * bytes_i / values``, detached (needs ``target_bits``)."""
        if self.budget_bytes is None:
            raise ValueError("expected_serving_bits needs MPESearchConfig(target_bits=...)")
        with torch.no_grad():
            return self._stored_bits()

    def _stored_bits(self) -> torch.Tensor:
        """:meth:`expected_serving_bits` with its gradient (the budget's regulariser)."""
        total = torch.zeros((), device=self._bits.device)
        for n, p in self.bit_probabilities().items():
            total = total + (getattr(self, f"group_rows_{n}") * (p @ getattr(self, f"cand_bytes_{n}"))).sum()
        return 8 * total / self._values

    def budget_step(self) -> None:
        """One dual-ascent step toward ``target_bits``: ``log lambda += budget_lr * gap``, ``gap =
        (E[bits] - target) / target`` clipped to [-1, 1], ``log lambda`` clamped to
        ``LOG_LAMBDA_RANGE``. Tensor ops only (no host sync): call it every training step (or
        every N). A no-op without ``target_bits``."""
        if self.budget_bytes is None:
            return
        with torch.no_grad():
            target = self.config.target_bits
            gap = ((self.expected_serving_bits() - target) / target).clamp(-1.0, 1.0)
            self.log_lambda.add_(self.config.budget_lr * gap).clamp_(*LOG_LAMBDA_RANGE)

    @staticmethod
    def _select_at(
        probs: dict[str, torch.Tensor], tau: float, monotone: bool = False
    ) -> dict[str, list[int]]:
        """Per table and group, the index of the highest candidate with probability >= ``tau``
        (none: the most probable one); ``monotone``: then no group below a rarer one (the
        running maximum from the rarest group up)."""
        out = {}
        for n, p in probs.items():
            ok = p >= tau
            highest = p.shape[1] - 1 - ok.flip(1).to(torch.int64).argmax(1)
            idx = torch.where(ok.any(1), highest, p.argmax(1))
            if monotone:
                idx = idx.flip(0).cummax(0).values.flip(0)
            out[n] = idx.tolist()
        return out

    def _selected_bytes(self, idx: dict[str, list[int]]) -> int:
        total = 0
        for t in self._tables:
            ends = self._group_ends[t.name]
            for a, e, i in zip((0,) + ends[:-1], ends, idx[t.name]):
                total += (e - a) * row_bytes(self.config.candidate_bits[i], t.embedding_dim)
        return total

    def _select_in_budget(self, probs: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        # The plan's bytes fall as the threshold rises and change only at a probability:
        # binary search for the smallest such threshold whose plan fits.
        budget = self.budget_bytes
        taus = torch.unique(torch.cat([p.flatten() for p in probs.values()])).tolist() + [math.inf]
        lo, hi = 0, len(taus) - 1
        if self._selected_bytes(self._select_at(probs, taus[hi], True)) > budget:
            return self._lower_until(self._select_at(probs, math.inf, True), budget)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._selected_bytes(self._select_at(probs, taus[mid], True)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return self._select_at(probs, taus[lo], True)

    def _lower_until(self, idx: dict[str, list[int]], budget: int) -> dict[str, list[int]]:
        """Lower groups one candidate at a time, cheapest first (``planner.precision``'s cost),
        until the plan fits (it does at the narrowest candidates: checked at construction)."""
        from torchrec_lowprec.planner.precision import relative_error  # noqa: PLC0415 (heavy import)

        bits, dims = self.config.candidate_bits, {t.name: t.embedding_dim for t in self._tables}
        idx = {n: list(v) for n, v in idx.items()}
        rows = {n: [e - a for a, e in zip((0,) + ends[:-1], ends)] for n, ends in self._group_ends.items()}
        heap: list[tuple[float, str, int]] = []

        def push(n: str, g: int) -> None:
            i = idx[n][g]
            if i == 0:
                return
            b, nb = storable_bits(bits[i]), storable_bits(bits[i - 1])
            saved = rows[n][g] * (row_bytes(b, dims[n]) - row_bytes(nb, dims[n]))
            cost = self._group_mass[n][g] * (relative_error(nb) - relative_error(b)) / max(saved, 1)
            heapq.heappush(heap, (cost, n, g))

        for n in idx:
            for g in range(len(idx[n])):
                push(n, g)
        total = self._selected_bytes(idx)
        while total > budget and heap:
            _, n, g = heapq.heappop(heap)
            i = idx[n][g]
            total -= rows[n][g] * (row_bytes(bits[i], dims[n]) - row_bytes(bits[i - 1], dims[n]))
            idx[n][g] = i - 1
            push(n, g)
        return idx

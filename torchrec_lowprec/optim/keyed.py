"""The fused optimizer of low-precision tables as a TorchRec ``KeyedOptimizer``.

TorchRec exposes fused (in-backward) embedding optimizers as ``KeyedOptimizer``s
(``dmp.fused_optimizer``) so that LR schedules and checkpoints reach them. Ours does the same:

- one param group per table, ``{"params": [table_param], "lr": lr}``; the fused update reads
  the group's ``"lr"`` at every backward pass, so ``WarmupOptimizer``, ``torch.optim.lr_scheduler``
  or a plain assignment change the tables' learning rate from the next backward on;
- ``state`` is the tables' own optimizer buffers (``momentum1`` / ``momentum2``), read live:
  there is one copy, the one the model's ``state_dict()`` holds; ``load_state_dict`` copies into
  those buffers;
- ``step()`` and ``zero_grad()`` do nothing: the update already ran in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchrec.optim.keyed import KeyedOptimizer

StateFn = Callable[[], Mapping[torch.Tensor, dict[str, torch.Tensor]]]


class FusedTableOptimizer(KeyedOptimizer):
    """A ``KeyedOptimizer`` over low-precision tables whose update runs in the backward pass.

    Args:
        params: key -> the tensor standing for a table (its handle, or its sharded rows).
        param_groups: one ``{"params": [tensor], "lr": float}`` per table; the collections
            read ``"lr"`` from these very dicts.
        state_fn: returns ``{tensor: {"momentum1": buffer, ...}}`` from the live buffers.

    Example::

        opt = lp_ebc.fused_optimizer
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
        for batch in data:
            loss(lp_ebc(batch)).backward()   # fused update at the group's current lr
            opt.step(); sched.step()
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        param_groups: list[dict[str, Any]],
        state_fn: StateFn,
    ) -> None:
        self._state_fn = state_fn
        super().__init__(params, state_fn(), param_groups)

    @property  # type: ignore[override]
    def state(self) -> Mapping[torch.Tensor, dict[str, torch.Tensor]]:
        return self._state_fn()

    @state.setter
    def state(self, value: Any) -> None:
        # KeyedOptimizer.__init__ assigns it; the state lives in the tables' buffers.
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Nothing to do: the tables keep no gradients."""

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """Nothing to do: the fused update ran in the backward pass (at the groups' ``lr``)."""
        if closure is not None:
            closure()

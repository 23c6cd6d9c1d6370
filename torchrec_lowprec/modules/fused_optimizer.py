"""The fused optimizer of a low-precision collection as seen from outside: which optimizer a
table runs (in-backward tag > sharder ``fused_params`` > config) and its learning rate, which a
``KeyedOptimizer`` param group drives once :attr:`fused_optimizer` (or a sharded parent) made one."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from torchrec_lowprec.kernels.spec import OptimizerParams
from torchrec_lowprec.optim.fused import resolve_optimizer
from torchrec_lowprec.optim.keyed import FusedTableOptimizer


class FusedOptimizerMixin:
    """Learning-rate groups and the ``fused_optimizer`` of ``LowPrecisionEmbeddingBagCollection``.

    The host sets ``_lr_groups = {}``, ``_lr_base = {}``, ``_fused_optim = None`` and has
    ``tables`` (name -> ``TableState``), ``_configs`` and ``_layouts``.

    Example::

        opt = lp_ebc.fused_optimizer        # torchrec KeyedOptimizer
        opt.param_groups[0]["lr"] = 0.005   # the next backward pass updates at lr 0.005
    """

    def _table_optimizer(self, name: str) -> OptimizerParams:
        """The table's optimizer (tag > fused_params > config), at its param group's lr if the
        fused optimizer has one (an LR schedule drives it)."""
        opt = resolve_optimizer(self.tables[name].handle, self._configs[name])
        group = self._lr_groups.get(name)
        if group is None:
            return opt
        if opt.lr != self._lr_base[name]:
            # A tag set after the group was made: it restarts the group from its lr.
            self._lr_base[name] = opt.lr
            group["lr"] = opt.lr
            return opt
        lr = float(group["lr"])
        return opt if lr == opt.lr else dataclasses.replace(opt, lr=lr)

    def attach_lr_groups(self, groups: dict[str, dict[str, Any]]) -> None:
        """Let ``groups`` (table -> param-group dict with ``"lr"``) drive the tables' learning
        rates from now on (used by :attr:`fused_optimizer` and the sharded collection)."""
        for name, group in groups.items():
            self._lr_base[name] = resolve_optimizer(self.tables[name].handle, self._configs[name]).lr
            self._lr_groups[name] = group

    @property
    def fused_optimizer(self) -> FusedTableOptimizer:
        """The tables' fused optimizer as a TorchRec ``KeyedOptimizer`` (like a sharded
        collection's ``fused_optimizer``): one param group per table whose ``"lr"`` drives the
        fused update; its state is the tables' ``momentum1``/``momentum2`` buffers (the same
        tensors as in ``state_dict()``). Keys: ``tables.<name>``."""
        if self._fused_optim is None:
            self._resolve_optimizers()
            groups = {
                lay.name: {"params": [self.tables[lay.name].handle], "lr": self._table_optimizer(lay.name).lr}
                for lay in self._layouts
            }
            self.attach_lr_groups(groups)
            self._fused_optim = FusedTableOptimizer(
                {f"tables.{n}": self.tables[n].handle for n in groups},
                list(groups.values()),
                self._optimizer_state,
            )
        return self._fused_optim

    def _optimizer_state(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        self._resolve_optimizers()
        return {
            st.handle: {k: getattr(st, k) for k in ("momentum1", "momentum2") if getattr(st, k).numel()}
            for st in (self.tables[lay.name] for lay in self._layouts)
        }

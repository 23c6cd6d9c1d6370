"""Input checks that run on the device and report later, so that a training step never waits:
the report queue (the checks themselves are in ``modules/bounds.py``, beside their host forms).

On CPU the KJT check and the id bounds check read the host tensors in place and raise in the
step that fed the bad input (``modules/bounds.py``). On CUDA reading a verdict back is a host
synchronisation that stalls TorchRec's pipelined training, so there (for tables whose
``bounds_check`` is ``"raise"``, the default) the checks run on the device instead:

- a bad id is replaced by row 0 for the lookup (FBGEMM's ``bounds_check_indices`` does the same
  in its warning mode) and the whole batch's fused update is skipped on the device, so no table
  row, step size or optimizer state changes;
- a KJT whose lengths disagree with its ``length_per_key`` (or with its offsets) is looked up
  with lengths that are consistent with ``values`` (every key's ids in its first bag), so no
  kernel reads past ``values``, and its update is skipped the same way;
- a four-number report (kind, count, first bad id, its feature) is copied to pinned host memory
  behind a CUDA event. The collection's next forward raises the error once that event has
  passed (without waiting for it), naming the id, feature, table and the step that fed it;
  :func:`DeferredInputErrors.flush` (``check_inputs()``) waits for it.

What the user gives up: the exception arrives one step (or as many as the device lags) after
the batch that caused it, and that batch's forward output read row 0 for the bad ids (its dense
update happened). The tables are not touched by it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Report kinds (``report[0]``); ``report`` is int64 ``[kind, count, first id, feature index]``,
#: or for ``REPORT_BAD_ELSEWHERE`` (another rank of a sharded step fed the bad batch)
#: ``[kind, that rank's kind, that rank, 0]``.
REPORT_OK, REPORT_BAD_IDS, REPORT_BAD_KJT, REPORT_BAD_ELSEWHERE = 0, 1, 2, 3
#: Reports kept waiting for the device before the oldest is waited for (bounds host memory).
MAX_PENDING = 64


def checks_on_device(device: torch.device) -> bool:
    """Whether the input checks of a batch on ``device`` run on the device and report later
    (every accelerator), rather than on the host at once (CPU, where that costs no sync)."""
    return device.type != "cpu"


@dataclass
class _Pending:
    host: torch.Tensor  # the report, on the host (pinned on CUDA)
    ready: object | None  # torch.cuda.Event recorded after the copy; None: readable now
    step: int
    describe: Callable[[list[int], int], Exception]


class DeferredInputErrors:
    """The reports of batches whose inputs were checked on the device, raised as soon as the
    host can read them without waiting.

    Example::

        errors = DeferredInputErrors()
        errors.record(report, step, describe)  # in the step: a device tensor, no sync
        errors.poll()                          # the next step: raises if that batch was bad
        errors.flush()                         # waits for every report (outside the step)
    """

    def __init__(self) -> None:
        self._pending: collections.deque[_Pending] = collections.deque()

    def __len__(self) -> int:
        return len(self._pending)

    def record(
        self, report: torch.Tensor, step: int, describe: Callable[[list[int], int], Exception]
    ) -> None:
        """Queue ``report`` (int64 ``[4]`` on the device) of the batch of ``step``; ``describe``
        turns its four numbers and the step into the exception to raise when it is not
        ``REPORT_OK``."""
        if report.device.type == "cuda":
            host = torch.empty(report.shape, dtype=report.dtype, pin_memory=True)
            host.copy_(report, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(report.device))
        elif report.device.type == "cpu":
            host, ready = report, None
        else:  # an accelerator without CUDA events: read at once (a sync, documented)
            host, ready = report.to("cpu"), None
        self._pending.append(_Pending(host, ready, step, describe))
        if len(self._pending) > MAX_PENDING:
            self._settle(wait=True, limit=1)

    def poll(self) -> None:
        """Raise the error of the oldest finished bad report; never waits for the device."""
        self._settle(wait=False)

    def flush(self) -> None:
        """Wait for every queued report and raise the first bad one's error."""
        self._settle(wait=True)

    def _settle(self, wait: bool, limit: int | None = None) -> None:
        done = 0
        while self._pending and (limit is None or done < limit):
            p = self._pending[0]
            if p.ready is not None:
                if wait:
                    p.ready.synchronize()
                elif not p.ready.query():
                    return
            self._pending.popleft()
            done += 1
            # A host tensor (pinned, or CPU): numpy reads it in place, no device involved.
            numbers = [int(x) for x in p.host.numpy()]
            if numbers[0] != REPORT_OK:
                raise p.describe(numbers, p.step)


def combined(first: torch.Tensor | None, second: torch.Tensor) -> torch.Tensor:
    """One report of two checks of a batch: ``first``'s if it found something, else ``second``."""
    return second if first is None else torch.where(first[0] != REPORT_OK, first, second)

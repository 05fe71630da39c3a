"""Task ids per row for task-routed adapters (Poly, multitask prompt tuning).

deltatune does not wrap the model, so ``task_ids`` reaches the adapters through a forward
pre-hook on the model (PyTorch's public hook API): ``model(input_ids, task_ids=ids)`` works as
with PEFT's wrapper; the hook takes ``task_ids`` out of the call's keyword arguments (the
transformers model never sees it) and keeps it for that call. ``generate`` checks its keyword
arguments against the model's signature, so there the ids are set for a block instead:
``with use_task_ids(model, ids): model.generate(...)``; ``set_task_ids`` sets them until
changed (the training loop sets task 0 for every row). A call's own ``task_ids`` wins over the
set ones. An adapter with one task (``n_tasks``/``num_tasks`` 1) needs none; with more, a call
without them is an error that says what to pass.

Ids are one task index per row (a list, a 1-D integer tensor, or one int for every row). A
batch that is a whole multiple of the ids (beam search, several samples per prompt) repeats
each row's id, as ``generate`` repeats each prompt.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

TASKS_ATTR = "deltatune_task_ids"
TaskIdsLike = Union[int, Sequence[int], torch.Tensor, None]


def _as_tensor(ids: TaskIdsLike) -> Optional[torch.Tensor]:
    if ids is None:
        return None
    tensor = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.dim() > 1:
        raise ValueError(f"task_ids must be integer task indices, one per row (a list or a 1-D integer tensor) "
                         f"or one int for all rows; got {tensor.dtype} of shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError("task_ids is empty; give one task index per row")
    return tensor.long()


class TaskIds:
    """The task ids of the running call (given to the model's forward) and the set ones."""

    def __init__(self) -> None:
        self._call: Optional[torch.Tensor] = None
        self._fixed: Optional[torch.Tensor] = None
        self._handles: list = []
        # checked ids per (batch, device, task count): every layer of a call asks, and the range
        # check reads the values (a device sync on an accelerator), so it is done once a call
        self._checked: dict = {}

    @property
    def call(self) -> Optional[torch.Tensor]:
        return self._call

    @call.setter
    def call(self, ids: Optional[torch.Tensor]) -> None:
        self._call, self._checked = ids, {}

    @property
    def fixed(self) -> Optional[torch.Tensor]:
        return self._fixed

    @fixed.setter
    def fixed(self, ids: Optional[torch.Tensor]) -> None:
        self._fixed, self._checked = ids, {}

    def attach(self, model: nn.Module) -> None:
        # prepend: runs before the soft-prompt hook, which needs the ids for the prompts
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._after, always_call=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, model: nn.Module, args: tuple, kwargs: dict):
        if "task_ids" not in kwargs:
            self.call = None
            return None
        kwargs = dict(kwargs)
        self.call = _as_tensor(kwargs.pop("task_ids"))
        return args, kwargs

    def _after(self, model: nn.Module, args: tuple, output):
        self.call = None
        return None

    def for_batch(self, batch: int, device: torch.device, owner: str, n_tasks: int) -> torch.Tensor:
        """One task index per row of a ``batch``-row call, on ``device``; ``owner`` names the adapter
        in errors, ``n_tasks`` bounds the indices."""
        key = (batch, device, n_tasks)
        if key not in self._checked:
            self._checked[key] = self._check(batch, device, owner, n_tasks)
        return self._checked[key]

    def _check(self, batch: int, device: torch.device, owner: str, n_tasks: int) -> torch.Tensor:
        ids = self.call if self.call is not None else self.fixed
        if ids is None and n_tasks == 1:  # one task: nothing to choose
            return torch.zeros(batch, dtype=torch.long, device=device)
        if ids is None:
            raise ValueError(
                f"{owner} picks its weights by task: pass task_ids, one task index per row "
                f"(0..{n_tasks - 1}), e.g. model(input_ids, task_ids=torch.tensor([0, 1])); for generate, "
                "`with dt.use_task_ids(model, [0, 1]): model.generate(...)`, or dt.set_task_ids(model, 0) "
                "for every later call")
        if ids.dim() == 0:
            ids = ids.expand(batch)
        elif ids.shape[0] != batch:
            if batch % ids.shape[0] != 0:
                raise ValueError(f"task_ids has {ids.shape[0]} entries but the batch has {batch} rows")
            ids = ids.repeat_interleave(batch // ids.shape[0])
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= n_tasks:
            raise ValueError(f"{owner} has {n_tasks} task(s) (ids 0..{n_tasks - 1}); task_ids holds "
                             f"{low if low < 0 else high}")
        return ids.to(device)


def task_ids_of(model: nn.Module) -> TaskIds:
    """The model's ``TaskIds``, attached (with its hooks) on first use."""
    tasks = getattr(model, TASKS_ATTR, None)
    if tasks is None:
        tasks = TaskIds()
        tasks.attach(model)
        setattr(model, TASKS_ATTR, tasks)
    return tasks


def drop_task_ids(model: nn.Module) -> None:
    """Remove the hooks and state (when the last task-routed adapter goes)."""
    tasks = getattr(model, TASKS_ATTR, None)
    if tasks is not None:
        tasks.detach()
        delattr(model, TASKS_ATTR)


def _routed(model: nn.Module) -> TaskIds:
    tasks = getattr(model, TASKS_ATTR, None)
    if tasks is None:
        raise ValueError("this model has no task-routed adapter (PolyConfig, MultitaskPromptTuningConfig); "
                         "task_ids would change nothing")
    return tasks


def set_task_ids(model: nn.Module, ids: TaskIdsLike) -> None:
    """Use ``ids`` (one task per row, or one int for every row) for every later call that does not
    pass its own ``task_ids``; ``None`` clears them."""
    _routed(model).fixed = _as_tensor(ids)


@contextlib.contextmanager
def use_task_ids(model: nn.Module, ids: TaskIdsLike) -> Iterator[nn.Module]:
    """Within the block, calls without their own ``task_ids`` (``generate``'s steps) use ``ids``."""
    tasks = _routed(model)
    previous, tasks.fixed = tasks.fixed, _as_tensor(ids)
    try:
        yield model
    finally:
        tasks.fixed = previous


def release_task_ids(model: nn.Module) -> None:
    """Drop the hooks once no module holds a task-routed adapter any more (``task_routed``)."""
    if not any(getattr(m, "task_routed", False) for m in model.modules()):
        drop_task_ids(model)

"""Continuous batching over one base model and many adapters.

A background thread runs decoding steps. Between steps it admits waiting sequences (prefilled
together, then merged into the running batch's key/value cache), runs queued commands (adapter
loads and unloads), and drops finished or cancelled rows. Rows whose adapters can be routed per
row (every method but soft prompts) share one forward pass, whatever their adapters, through
``adapter_per_row``; a soft-prompt adapter's rows form a batch of their own. With ``mixed=False``
the engine serves one adapter at a time instead (the swapping a one-adapter server does), which
the load benchmark compares against.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import DynamicCache

from ..adapter_ops import adapter_per_row, set_adapter
from ..loss import cache_argument
from . import kv
from .adapters import Adapters
from .sampling import Choice, Sampling, generator_for, pick
from .text import TextStream


class QueueFull(Exception):
    """More sequences are waiting than the server accepts."""


@dataclass
class Sequence:
    """One choice of one request, from prompt to finish."""

    adapter: Optional[str]  # public name; None: the base model
    prompt: list[int]
    sampling: Sampling
    sink: Callable[[dict], None]  # receives {"text", "choice"} events and a final {"finish", ...}
    index: int = 0
    stream: Optional[TextStream] = None
    generator: Optional[torch.Generator] = None
    tokens: list[int] = field(default_factory=list)
    key: Optional[str] = None  # the adapter instance it runs on
    cancelled: bool = False
    finish: Optional[str] = None


@dataclass
class Group:
    """Rows that run through the same forward pass, with their cache."""

    soft_prompt: Optional[str]  # the soft-prompt instance key, or None for routable rows
    prefix: int = 0  # virtual-token columns in front of every row
    rows: list[Sequence] = field(default_factory=list)
    cache: Optional[DynamicCache] = None
    mask: Optional[torch.Tensor] = None  # (rows, cached columns after the prefix)
    positions: Optional[torch.Tensor] = None  # (rows,) position of each row's next token


class Engine:
    """Owns the model; ``submit`` sequences from any thread, ``call`` to change adapters."""

    def __init__(self, model, tokenizer, adapters: Adapters, max_batch: int = 16, max_queue: int = 256,
                 mixed: bool = True):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        model.eval()  # no dropout while serving
        self.max_batch, self.max_queue, self.mixed = max_batch, max_queue, mixed
        self.device = next(model.parameters()).device
        self.cache_name = cache_argument(model) or "past_key_values"
        self.eos = set(_eos_ids(model, tokenizer))
        self.waiting: deque[Sequence] = deque()
        self.groups: dict[Optional[str], Group] = {}
        self.commands: deque = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.started = time.time()
        self.thread = threading.Thread(target=self._run, name="deltatune-engine", daemon=True)

    # ----- any thread --------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue ``sequences`` (all of one request); ``QueueFull`` when the queue has no room."""
        with self.wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (at most {self.max_queue})")
            for s in sequences:
                s.stream = TextStream(self.tokenizer, s.sampling.stop)
                s.generator = None if s.sampling.greedy else generator_for(
                    None if s.sampling.seed is None else s.sampling.seed + s.index)
                self.waiting.append(s)
            self.wake.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop ``sequences`` (their client went away); their rows leave at the next step."""
        for s in sequences:
            s.cancelled = True
        with self.wake:
            self.wake.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine's thread between steps; its result or error in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.commands.append((fn, future))
            self.wake.notify()
        return future

    def busy(self) -> int:
        """Sequences waiting or running."""
        return len(self.waiting) + sum(len(g.rows) for g in self.groups.values())

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    # ----- the engine's thread -------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not (self.stopping or self.commands or self.waiting or self.groups):
                    self.wake.wait()
                if self.stopping:
                    break
                commands = list(self.commands)
                self.commands.clear()
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except BaseException as err:  # handed to the caller, never kills the engine
                    future.set_exception(err)
            try:
                self._admit()
                for key in list(self.groups):
                    self._decode(self.groups[key])
                self.steps += 1
            except Exception as err:  # a failed step ends its rows with an error, the server goes on
                for group in self.groups.values():
                    for s in group.rows:
                        self._end(s, "error", error=f"{type(err).__name__}: {err}")
                self.groups.clear()
        for group in self.groups.values():
            for s in group.rows:
                self._end(s, "abort")
        for s in self.waiting:
            self._end(s, "abort")

    def _admit(self) -> None:
        running = sum(len(g.rows) for g in self.groups.values())
        current = self._running_adapter()
        joining: dict[Optional[str], list[Sequence]] = {}
        kept: deque[Sequence] = deque()
        with self.wake:
            waiting, self.waiting = self.waiting, deque()  # submit() may add to the new one meanwhile
        blocked = False  # an earlier request waits for its adapter to fit: later adapters wait behind it
        for s in waiting:
            if s.cancelled:
                self._end(s, "cancelled")
                continue
            if running >= self.max_batch or not self._may_join(s, current) or (blocked and s.adapter is not None):
                kept.append(s)
                continue
            if s.adapter is not None:
                if s.adapter not in self.adapters.entries:
                    self._end(s, "error", error=f"adapter {s.adapter!r} was removed")
                    continue
                try:
                    s.key = self.adapters.acquire(s.adapter)
                except Exception as err:
                    self._end(s, "error", error=f"adapter {s.adapter!r} could not be loaded: {err}")
                    continue
                if s.key is None:  # no room (or its modules hold busy adapters of another method)
                    blocked = True
                    kept.append(s)
                    continue
            current = current if current is not None else (s.adapter or "")
            group_key = None if s.key is None or self.adapters.instances[s.key].entry.routable else s.key
            joining.setdefault(group_key, []).append(s)
            running += 1
        with self.wake:
            self.waiting.extendleft(reversed(kept))
        for group_key, sequences in joining.items():
            try:
                self._prefill(group_key, sequences)
            except Exception as err:  # these rows never joined their group: end them here
                for s in sequences:
                    self._end(s, "error", error=f"{type(err).__name__}: {err}")
                if group_key in self.groups and not self.groups[group_key].rows:
                    del self.groups[group_key]

    def _running_adapter(self) -> Optional[str]:
        """In swapping mode, the adapter the running batch serves ("" for the base)."""
        for group in self.groups.values():
            for s in group.rows:
                return s.adapter or ""
        return None

    def _may_join(self, s: Sequence, current: Optional[str]) -> bool:
        return self.mixed or current is None or (s.adapter or "") == current

    def _forward(self, rows: list[Sequence], soft_prompt: Optional[str], **inputs) -> torch.Tensor:
        """Last-position logits of ``rows``, each through its own adapter."""
        keys = [s.key for s in rows]
        if not self.adapters.instances:  # a model without adapters has nothing to route
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        if soft_prompt is not None or len(set(keys)) == 1:
            set_adapter(self.model, keys[0])
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        else:
            set_adapter(self.model, None)
            with adapter_per_row(self.model, keys):
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _prefill(self, group_key: Optional[str], sequences: list[Sequence]) -> None:
        width = max(len(s.prompt) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in sequences], device=self.device)
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in sequences],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(sequences, group_key, input_ids=ids, attention_mask=mask, position_ids=positions,
                               **{self.cache_name: cache})
        group = self.groups.get(group_key)
        if group is None:
            group = self.groups[group_key] = Group(group_key)
            group.prefix = kv.cache_length(cache) - width
        before = 0 if group.cache is None else kv.cache_length(group.cache) - group.prefix
        group.cache = kv.merged(group.cache, cache, group.prefix)
        group.mask = _merged_masks(group.mask, mask, before)
        joined = torch.tensor([len(s.prompt) for s in sequences], device=self.device)
        group.positions = joined if group.positions is None else torch.cat([group.positions, joined])
        group.rows.extend(sequences)
        self._take(group, logits, first=len(group.rows) - len(sequences))

    def _decode(self, group: Group) -> None:
        if not group.rows:
            del self.groups[group.soft_prompt]
            return
        last = torch.tensor([[s.tokens[-1]] for s in group.rows], device=self.device)
        mask = torch.cat([group.mask, group.mask.new_ones(len(group.rows), 1)], dim=1)
        logits = self._forward(group.rows, group.soft_prompt, input_ids=last, attention_mask=mask,
                               position_ids=group.positions[:, None], **{self.cache_name: group.cache})
        group.mask = mask
        group.positions = group.positions + 1
        self._take(group, logits, first=0)

    def _take(self, group: Group, logits: torch.Tensor, first: int) -> None:
        """Pick the next token of rows ``first:`` from their ``logits``, then drop ended rows."""
        rows = group.rows[first:]
        choices = pick(logits, [s.sampling for s in rows], [s.generator for s in rows])
        for s, choice in zip(rows, choices):
            if not s.cancelled:
                self._advance(s, choice)
        keep = [i for i, s in enumerate(group.rows) if s.finish is None and not s.cancelled]
        for s in group.rows:
            if s.cancelled and s.finish is None:
                self._end(s, "cancelled")
        if len(keep) == len(group.rows):
            return
        if not keep:
            del self.groups[group.soft_prompt]
            return
        index = torch.tensor(keep, device=self.device)
        kv.keep_rows(group.cache, index)
        group.rows = [group.rows[i] for i in keep]
        group.mask, group.positions = group.mask[index], group.positions[index]
        unused = int((group.mask.cumsum(-1) == 0).sum(-1).min())  # padding columns every row has
        kv.drop_front(group.cache, unused, group.prefix)
        group.mask = group.mask[:, unused:]

    def _advance(self, s: Sequence, choice: Choice) -> None:
        s.tokens.append(choice.token)
        if choice.token in self.eos:
            self._end(s, "stop", choice)
            return
        text = s.stream.push(choice.token)
        if s.stream.stopped:
            s.sink({"text": text, "choice": choice, "index": s.index})
            self._end(s, "stop")
        elif len(s.tokens) >= s.sampling.max_tokens:
            s.sink({"text": text + s.stream.finish(), "choice": choice, "index": s.index})
            self._end(s, "length")
        else:
            s.sink({"text": text, "choice": choice, "index": s.index})

    def _end(self, s: Sequence, reason: str, choice: Optional[Choice] = None, error: Optional[str] = None) -> None:
        if s.finish is not None:
            return
        s.finish = reason
        if s.key is not None:
            self.adapters.release(s.key)
        rest = s.stream.finish() if s.stream is not None and reason == "stop" and choice is not None else ""
        event = {"finish": reason, "index": s.index, "text": rest, "completion_tokens": len(s.tokens)}
        if choice is not None:
            event["choice"] = choice  # the EOS token's log-probability, when asked for
        if error is not None:
            event["error"] = error
        s.sink(event)


def _merged_masks(running: Optional[torch.Tensor], joining: torch.Tensor, before: int) -> torch.Tensor:
    """Both masks padded with zeros at the front to one width, ``running``'s rows first."""
    if running is None:
        return joining
    width = max(before, joining.shape[1])
    pad = lambda m: torch.cat([m.new_zeros(m.shape[0], width - m.shape[1]), m], dim=1)  # noqa: E731
    return torch.cat([pad(running), pad(joining)])


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids = ids if ids is not None else tokenizer.eos_token_id
    return [ids] if isinstance(ids, int) else list(ids or [])

"""ShadowPEFT at run time: the shadow backbones, the hooks that run them beside the decoder, and the
shadow key/value caches that follow the base's.

A forward pre-hook on the decoder stack runs each running adapter's backbone on its rows (all rows,
or the rows ``dt.adapter_per_row`` gives it) and keeps the first shadow state. Hooks on each targeted
block inject the state into the block's input and move it after the block. A call's states are a
list per row group indexed by the block's place among the adapter's blocks, so a block recomputed by
gradient checkpointing reads the same state again and does not move it twice.

A shadow cache is paired with the base cache object it runs beside; a later call that continues the
base cache continues the shadow one. Repeating every row of the base cache (a shared prefix run once
for several rows) is followed; other edits outside the model (beam search's reordering, columns
padded or dropped and rows added or removed by the server's batching) are noticed, since they
replace the cache's tensors, and refused with an error.
"""

from __future__ import annotations

import inspect
import weakref
from functools import partial
from typing import Iterator, Optional

import torch
from torch import nn

from ..base import AdapterContainer
from .shadow_parts import ShadowBlockAdapters

CACHE_NAMES = ("cache", "past_key_values")  # transformers 5.24 renamed the second to the first


class _Group:
    """Rows of the running call that one adapter steers (``rows`` None: all), and their shadow states
    (``states[k]`` enters the adapter's k-th block)."""

    def __init__(self, name: str, rows: Optional[torch.Tensor], seed: torch.Tensor):
        self.name, self.rows, self.states = name, rows, [seed]

    def pick(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor.index_select(0, self.rows)


def _first(holder, names=CACHE_NAMES):
    """The cache an output or a call's keywords carry, under either name."""
    get = holder.get if isinstance(holder, dict) else (lambda k: getattr(holder, k, None))
    return next((get(k) for k in names if get(k) is not None), None)


class ShadowNetworks(AdapterContainer):
    """Every shadow adapter's backbone (and projection to the base width), and the hooks that run them."""

    stands_for_base = False

    def __init__(self) -> None:
        super().__init__()
        self.shadow_backbone = nn.ModuleDict()
        self.shadow_projection = nn.ModuleDict()
        self.share: dict[str, bool] = {}
        self.blocks: dict[str, list[ShadowBlockAdapters]] = {}  # plain lists: the blocks own them
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan = None
        self.groups: list[_Group] = []  # the running (or last) call's
        self._handles: list = []
        self._stack: list[nn.Module] = []  # held in a list: the stack is the model's, not a child
        self._new_caches: dict = {}  # the running call's shadow caches, paired with the base's after it
        self._rows = 0  # the running call's batch
        self._caches: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.shadow_backbone.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for holder in (self.shadow_backbone, self.shadow_projection):
            if name in holder:
                yield from holder[name].parameters()

    def delete_adapter(self, name: str) -> None:
        for holder in (self.shadow_backbone, self.shadow_projection):
            if name in holder:
                del holder[name]
        self.share.pop(name, None)
        self.blocks.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def seed_of(self, name: str) -> Optional[torch.Tensor]:
        """The first shadow state of adapter ``name`` in the last call, when it steered every row."""
        return next((g.states[0] for g in self.groups if g.name == name and g.rows is None), None)

    # ----- hooks ---------------------------------------------------------------------------------
    def attach(self, stack: nn.Module) -> None:
        self._stack = [stack]
        self._handles = [stack.register_forward_pre_hook(self._before_stack, with_kwargs=True),
                         stack.register_forward_hook(self._after_stack, with_kwargs=True)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def attach_block(self, block: nn.Module, holder: ShadowBlockAdapters) -> None:
        # partials of bound methods, so a deep copy of the model gets hooks on its own copies
        holder.handles = [block.register_forward_pre_hook(partial(self._before_block, holder), with_kwargs=True),
                          block.register_forward_hook(partial(self._after_block, holder), with_kwargs=True)]

    def _steering(self, batch: int, device: torch.device) -> list[tuple[str, Optional[torch.Tensor]]]:
        """(adapter, rows) this call runs: the active shadow adapter on all rows, or the routed groups."""
        if self.disabled:
            return []
        if self.row_plan is not None:
            return [(n, rows) for n, rows in self.row_plan.groups(batch, device) if n in self.shadow_backbone]
        names = [n for n in self.active_adapters if n in self.shadow_backbone]
        if len(names) > 1:
            raise ValueError(f"only one ShadowPEFT adapter can be active at a time (as in PEFT); active: {names}")
        return [(names[0], None)] if names else []

    def _before_stack(self, stack: nn.Module, args: tuple, kwargs: dict):
        self.groups, self._new_caches = [], {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        steering = self._steering(batch, (ids if ids is not None else embeds).device)
        if not steering:
            return None
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # PEFT's rule: the model's default
            use_cache = bool(getattr(stack.config, "use_cache", False))
        paired = self._paired(_first(kwargs), batch)
        self._rows = batch
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")

        for name, rows in steering:
            def pick(t, rows=rows):  # a tensor's rows of this group; broadcast ones (batch 1) as they are
                whole = rows is None or t is None or t.dim() == 0 or t.shape[0] != batch
                return t if whole else t.index_select(0, rows)
            key = (name, None if rows is None else tuple(rows.tolist()))
            seed = self._seed(name, pick(ids), pick(embeds), pick(mask), pick(positions), paired.get(key),
                              use_cache, key)
            self.groups.append(_Group(name, rows, seed))
        return None

    def _paired(self, cache, batch: int) -> dict:
        """The shadow caches beside a base ``cache`` that already holds tokens; empty for a new one."""
        if cache is None or cache.get_seq_length() == 0:
            return {}
        paired = self._caches.get(cache)
        if paired is None:
            raise ValueError("this call continues a key/value cache the ShadowPEFT adapter did not see filled: the "
                             "shadow backbone needs its own cache of the same tokens; start from an empty cache")
        shadows, probe = paired
        for shadow, _ in shadows.values():
            if shadow.get_seq_length() != cache.get_seq_length():
                raise ValueError(f"the key/value cache holds {cache.get_seq_length()} positions but its ShadowPEFT "
                                 f"shadow cache {shadow.get_seq_length()}: the cache was edited outside the model "
                                 "(columns padded or dropped), which the shadow backbone's cache cannot follow")
        # the base cache's first-layer keys are the very tensor seen after the last call unless something
        # outside the model replaced them: beam search's reordering, the server's row edits, or a
        # repetition of every row (a shared prefix run once for its rows), the one change followed here
        now = _probe(cache)
        edited = probe is not None and now is not probe
        out = {}
        for key, (shadow, rows) in shadows.items():
            if edited:
                repeated = (key[1] is None and rows != batch and batch % rows == 0
                            and _repeated(cache, probe, batch // rows))
                if not repeated:
                    raise ValueError("the key/value cache was changed outside the model (rows reordered, added or "
                                     "removed: beam search, a server's batching), which the ShadowPEFT shadow "
                                     "cache cannot follow; use greedy or sampled generation")
                shadow.batch_repeat_interleave(batch // rows)
                shadows[key] = (shadow, batch)
            elif rows != batch:
                raise ValueError(f"the key/value cache has {batch} rows but its ShadowPEFT shadow cache {rows}")
            out[key] = shadow
        self._caches[cache] = (shadows, _probe(cache))
        return out

    def _seed(self, name: str, ids, embeds, mask, positions, cache, use_cache: bool, key) -> torch.Tensor:
        """The first shadow state: the backbone's last hidden state, projected to the base's width."""
        backbone = self.shadow_backbone[name]
        kwargs = {"attention_mask": mask, "use_cache": use_cache, "return_dict": True}
        if positions is not None:
            kwargs["position_ids"] = positions
        if cache is not None:
            kwargs[_cache_keyword(backbone)] = cache
        if self.share[name] and embeds is None:
            embeds = self._stack[0].get_input_embeddings()(ids)
        out = backbone(inputs_embeds=embeds, **kwargs) if embeds is not None else backbone(input_ids=ids, **kwargs)
        if use_cache and _first(out) is not None:
            self._new_caches[key] = (_first(out), self._rows)  # paired with the whole call's rows
        return self.shadow_projection[name](out.last_hidden_state)

    def _after_stack(self, stack: nn.Module, args: tuple, kwargs: dict, output):
        new, self._new_caches = self._new_caches, {}
        base = _first(output)
        if new and base is not None:
            self._caches[base] = (new, _probe(base))
        if not torch.is_grad_enabled():
            for group in self.groups:
                group.states = group.states[:1]  # inference: only the first state is read later
        return None

    def _before_block(self, holder: ShadowBlockAdapters, block: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.get("hidden_states")
        steered = hidden
        for group in self.groups:
            k = holder.index.get(group.name)
            if k is None:
                continue
            if k >= len(group.states):
                raise RuntimeError("ShadowPEFT: a targeted block ran before the one ahead of it")
            shadow, part = group.states[k], group.pick(steered)
            if part.shape[:-1] != shadow.shape[:-1]:
                raise ValueError(f"ShadowPEFT: the shadow state has shape {tuple(shadow.shape[:-1])} but the "
                                 f"block's input {tuple(part.shape[:-1])}")
            injected = holder.inject(group.name, part, shadow)
            steered = injected if group.rows is None else steered.index_copy(0, group.rows, injected)
        if steered is hidden:
            return None
        if args:
            return (steered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": steered}

    def _after_block(self, holder: ShadowBlockAdapters, block: nn.Module, args: tuple, kwargs: dict, output):
        out = output[0] if isinstance(output, tuple) else output
        for group in self.groups:
            k = holder.index.get(group.name)
            if k is not None and len(group.states) == k + 1:  # a recomputation keeps the first result
                group.states.append(holder.update(group.name, group.pick(out), group.states[k]))
        return None


def _probe(cache) -> Optional[torch.Tensor]:
    """The first layer's keys: what a later call checks a change of the cache's rows against."""
    layers = getattr(cache, "layers", None)
    return getattr(layers[0], "keys", None) if layers else None


def _repeated(cache, probe: Optional[torch.Tensor], times: int) -> bool:
    """Whether ``cache``'s rows are ``probe``'s, each repeated ``times`` (``batch_repeat_interleave``)."""
    now = _probe(cache)
    return probe is not None and now is not None and torch.equal(now, probe.repeat_interleave(times, dim=0))


def _cache_keyword(module: nn.Module) -> str:
    parameters = inspect.signature(module.forward).parameters
    return next((k for k in CACHE_NAMES if k in parameters), "past_key_values")

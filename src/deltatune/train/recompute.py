"""Saved activations rebuilt in backward instead of kept: norm outputs and the MLP's gates.

Without gradient checkpointing, autograd keeps every tensor a backward formula reads until
backward reaches it. In a LoRA step most of those are cheap to rebuild from others it keeps
anyway: a norm's output (its input is kept for the norm's own backward), an activation's output
``act(g)`` (``g`` is kept for the activation's backward) and the gated product ``act(g) * u`` that
feeds the MLP's down projection (``g`` and ``u`` are kept). On a Llama-style decoder these are
about a third of the saved bytes. ``cheap_recompute(model)`` stores such a tensor as a recipe
(the module and its inputs) through ``torch.autograd.graph.saved_tensors_hooks`` and runs it
again, without grad, when backward asks for the tensor. Only element-wise work is repeated, never
a matmul, and the rebuilt tensor has the same bits (the same ops on the same inputs), so training
is unchanged bit for bit; the tests check this.

Which tensors qualify is learned from forward hooks: a module is used only after its first call
showed that running it again reproduces its output exactly, so a norm or MLP of an unfamiliar
class is left alone rather than rebuilt wrongly.

The hooks cost Python time per saved tensor, whatever its size, while what they save grows with
the batch: the training loop uses them for micro-batches of at least ``MIN_TOKENS`` positions
(measured on the default model and a 2-core CPU: 5-7% slower steps at 480 positions, none at
2,000, where they save 0.9 GiB).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

MIN_TOKENS = 1024  # positions in a micro-batch (rows x padded length) from which the recipes pay


class _Recipe:
    """``fn(*inputs)`` under the autocast state of the forward that produced it, run once on demand."""

    __slots__ = ("fn", "inputs", "versions", "autocast", "result")

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: tuple, device_type: str):
        self.fn, self.inputs = fn, inputs
        self.versions = tuple(t._version for t in inputs)
        enabled = torch.is_autocast_enabled(device_type)
        self.autocast = (device_type, torch.get_autocast_dtype(device_type)) if enabled else None
        self.result: Optional[torch.Tensor] = None

    def value(self) -> torch.Tensor:
        if self.result is None:
            if tuple(t._version for t in self.inputs) != self.versions:
                raise RuntimeError("an input of a recomputed activation was modified in place after the forward "
                                   "pass; train with cheap_recompute off")
            amp = torch.autocast(*self.autocast) if self.autocast else contextlib.nullcontext()
            with torch.no_grad(), amp:
                self.result = self.fn(*self.inputs)
        return self.result


@dataclass
class _Packed:
    """A saved tensor stored as its recipe and its view of the recipe's output."""

    recipe: _Recipe
    size: torch.Size
    stride: tuple
    offset: int

    def unpack(self) -> torch.Tensor:
        return self.recipe.value().as_strided(self.size, self.stride, self.offset)


class _Kept:
    """A saved tensor kept as it is, with its version for autograd's in-place check."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int):
        self.tensor, self.version = tensor, version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError("a tensor saved for the backward pass was modified in place after the forward pass "
                               f"(version {self.tensor._version}, saved at {self.version}); train with cheap_recompute "
                               "off to see where")
        return self.tensor


@dataclass
class _Entry:
    output: "weakref.ref[torch.Tensor]"
    version: int
    recipe: _Recipe


@dataclass
class CheapRecompute:
    """The hooks that record recipes during forward and the registry they fill; see the module doc."""

    registry: dict = field(default_factory=dict)  # output storage address -> _Entry
    checked: dict = field(default_factory=dict)  # module -> whether rerunning it reproduces its output
    handles: list = field(default_factory=list)
    active: bool = False  # inside saving(): the forward hooks record recipes only then

    def record(self, output: torch.Tensor, fn: Callable[..., torch.Tensor], inputs: tuple) -> None:
        """Remember that ``output`` equals ``fn(*inputs)`` while ``output`` lives."""
        if not (self.active and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor) \
                or not output.is_contiguous():
            return
        address = output.untyped_storage().data_ptr()
        self.registry[address] = _Entry(weakref.ref(output), output._version,
                                        _Recipe(fn, inputs, output.device.type))
        weakref.finalize(output, self.registry.pop, address, None)

    def reproduces(self, key, output: torch.Tensor, rerun: Callable[[], torch.Tensor]) -> bool:
        """Whether ``rerun()`` gives ``output`` bit for bit; decided on the key's first call."""
        if key not in self.checked:
            with torch.no_grad():
                again = rerun()
            self.checked[key] = bool(again.shape == output.shape and again.stride() == output.stride()
                                     and torch.equal(again, output))
        return self.checked[key]

    def pack(self, t: torch.Tensor):
        if type(t) is not torch.Tensor:  # parameters and tensor subclasses are kept as they are
            return t
        entry = self.registry.get(t.untyped_storage().data_ptr())
        if entry is None or entry.output() is None or t._version != entry.version or t.dtype != entry.output().dtype:
            # autograd skips its in-place check for tensors that pass through hooks: keep it here
            return _Kept(t, t._version)
        return _Packed(entry.recipe, t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(saved):
        return saved.unpack() if isinstance(saved, (_Packed, _Kept)) else saved

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Forward passes inside store the recorded tensors as recipes."""
        self.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self.active = False
            self.registry.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.registry.clear()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module)
               for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def cheap_recompute(model: nn.Module) -> CheapRecompute:
    """Hooks on ``model``'s norms and gated MLPs; run forward and backward inside ``.saving()``."""
    state = CheapRecompute()

    def after_norm(module, args, output):
        if state.active and len(args) == 1 and state.reproduces(module, output, lambda: module.forward(args[0])):
            state.record(output, module.forward, (args[0],))

    for module in model.modules():
        if _is_norm(module):
            state.handles.append(module.register_forward_hook(after_norm))
        elif _is_gated_mlp(module):
            _hook_gated_mlp(module, state)
    return state


def _hook_gated_mlp(mlp: nn.Module, state: CheapRecompute) -> None:
    """Recipes for ``act(g)`` and for the down projection's input ``act(g) * u``."""
    seen: dict = {}
    act = mlp.act_fn

    def after_act(module, args, output):
        if not state.active:
            return
        seen["g"], seen["a"] = args[0], output
        if state.reproduces(("act", mlp), output, lambda: act.forward(args[0])):
            state.record(output, act.forward, (args[0],))

    def after_up(module, args, output):
        if state.active:
            seen["u"] = output

    def before_down(module, args):
        g, a, u = seen.pop("g", None), seen.pop("a", None), seen.pop("u", None)
        if g is None or u is None or len(args) != 1:
            return
        product = args[0]
        if a is not None and state.reproduces(("product", mlp), product, lambda: act.forward(g) * u):
            state.record(product, _gated_product(act), (g, u))

    state.handles += [act.register_forward_hook(after_act), mlp.up_proj.register_forward_hook(after_up),
                      mlp.down_proj.register_forward_pre_hook(before_down)]


def _gated_product(act: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda g, u: act.forward(g) * u

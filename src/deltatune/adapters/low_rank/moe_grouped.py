"""LoRA on fused expert weights computed per group of tokens, without forming ``W + ΔW``.

The full-weight path (``ExpertLoraLayer.adapted_weights``) builds the adapted 3-D weight of every
expert on each forward: an extra copy of all expert weights, and in training a gradient of that
size too, which a 30B-A3B model cannot afford. Here the token-expert pairs are sorted by expert and
each projection is computed group by group as

    y_g = x_g W_e (+ b_e)  +  Σ_adapters  s · (x_g A_eᵀ) B_eᵀ

with grouped matrix multiplications: the base matmul over the frozen 3-D weight and the two
low-rank factors, never a Python loop over experts. The expert math around the matmuls is the
module's own (transformers 5's ``@use_experts_implementation`` experts classes): its
``_apply_gate`` (Qwen3-MoE, Mixtral and OLMoE chunk gate|up and apply ``act_fn``; gpt-oss takes the
interleaved gate/up, clamps and applies its sigmoid-GLU) or ``act_fn`` where there is no gate, its
expert biases, its optional post-expert norm, then the routing weights and the sum over top-k as
transformers' own ``grouped_mm`` experts forward does. Nothing in transformers is patched: the
adapter layer calls this function instead of the wrapped module while an adapter is live.

A 4-bit expert weight (``quant.experts``) is decoded inside the base matmul's autograd function, in
the forward pass and again in backward, so no decoded copy lives from one pass to the other.

The grouped matmul backend:
- ``torch.nn.functional.grouped_mm`` (or ``torch._grouped_mm``) on CUDA devices of compute
  capability 8.0 or newer in bfloat16 (PyTorch documents bfloat16 there), and on CPU in float32,
  bfloat16 and float16 (torch 2.13 has a CPU kernel), when every row stride is a multiple of 16
  bytes (the kernels refuse others); a low rank that breaks the alignment is padded with zero
  rows/columns, which changes no value. Its backward also refuses expanded gradients, so the
  gradient reaching it is made contiguous;
- elsewhere (float64, other devices, unaligned model dimensions) a padded batched matmul: the
  sorted tokens are scattered into an (experts, largest group, features) tensor and one ``bmm``
  multiplies every group at once. It costs one host sync for the largest group and
  experts x largest-group x features of memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...quant.experts import packed_bytes, quantized_parameter

log = logging.getLogger(__name__)

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# full-weight path only while the extra weight copy stays this small (bytes, per parameter)
TINY_WEIGHT_BYTES = 4 << 20


@dataclass
class Routing:
    """The experts module's call: tokens (T, H), top-k expert ids (T, k) and their weights (T, k)."""
    hidden: torch.Tensor
    index: torch.Tensor
    weights: torch.Tensor


def parse_call(args: tuple, kwargs: dict) -> Optional[Routing]:
    """The routing of an experts call ``(hidden, top_k_index, top_k_weights)``, with transformers'
    keyword names (gpt-oss names them ``router_indices`` and ``routing_weights``); None otherwise."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    values = list(args[:3])
    for slot in names[len(values):]:
        values.append(next((kwargs[n] for n in slot if n in kwargs), None))
    known = {n for slot in names for n in slot}
    if len(args) > 3 or set(kwargs) - known or any(not isinstance(v, torch.Tensor) for v in values):
        return None
    hidden, index, weights = values
    if hidden.dim() != 2 or index.shape != weights.shape or index.dim() != 2 or index.shape[0] != hidden.shape[0]:
        return None
    return Routing(hidden, index, weights)


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot take the grouped path (None when it can): it must be one of
    transformers' decorated experts classes, on one device, without expert parallelism."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return f"{type(module).__name__} is not a transformers experts module (@use_experts_implementation)"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism shards the experts"
    impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
    if impl not in (None, "eager", "grouped_mm", "batched_mm"):
        return f"the model runs its experts with the {impl!r} kernel, kept as chosen"
    first = "gate_up_proj" if module.has_gate else "up_proj"
    for name in (first, "down_proj"):
        if quantized_parameter(module, name) is not None:
            continue  # 4-bit: decoded inside the grouped matmul (never read whole here)
        weight = getattr(module, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or not weight.dtype.is_floating_point \
                or type(weight) not in (torch.Tensor, nn.Parameter):
            return f"{name} is not a plain 3-D float tensor (quantized or missing)"
    return None


def pays(weight: torch.Tensor, pairs: int) -> bool:
    """Grouped compute pays unless the weight is tiny: forming ``W + ΔW`` costs E·out·in·r
    multiply-adds and a weight-sized copy, the grouped update pairs·(in + out)·r; the full-weight
    path is kept only where it costs fewer operations and its copy stays under TINY_WEIGHT_BYTES."""
    experts, d1, d2 = weight.shape
    full = experts * d1 * d2
    return not (full <= pairs * (d1 + d2) and full * weight.element_size() <= TINY_WEIGHT_BYTES)


# ----- the groups and the grouped matmul ------------------------------------------------------
class Groups:
    """Token-expert pairs sorted by expert: ``offsets`` (int32 cumulative counts) for grouped_mm,
    and, made on first use, each pair's slot in a padded (experts, largest, ·) layout."""

    def __init__(self, expert_ids: torch.Tensor, experts: int):
        self.expert_ids = expert_ids  # sorted
        self.experts = experts
        # histc, as transformers counts: unlike bincount it needs no host sync on CUDA (its CPU
        # kernel takes floats only); ids past the last expert (expert-parallel sentinels) fall out
        device = expert_ids.device.type
        counted = expert_ids.float() if device in ("cpu", "mps") else expert_ids.int()
        counts = torch.histc(counted, bins=experts, min=0, max=experts - 1).long()
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        self._slots = None

    def slots(self) -> tuple[torch.Tensor, int]:
        if self._slots is None:
            starts = self.offsets.long() - self.counts
            position = torch.arange(self.expert_ids.numel(), device=self.expert_ids.device) - starts[self.expert_ids]
            largest = int(self.counts.max().item()) if self.counts.numel() else 0  # the one host sync
            self._slots = (position, largest)
        return self._slots


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride())


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """PyTorch's grouped GEMM can multiply ``x`` (S, K) by ``w`` (E, K, N) here."""
    if _GROUPED_MM is None or x.dtype != w.dtype:
        return False
    if w.device.type == "cuda":
        if w.dtype != torch.bfloat16 or torch.cuda.get_device_capability(w.device) < (8, 0):
            return False
    elif w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    # both kernels read 16-byte aligned rows and one unit-stride dimension of each expert's matrix
    unit = [s for s in w.stride()[1:] if s == 1]
    return bool(unit) and _aligned(x) and _aligned(w) and (w.shape[2] * w.element_size()) % 16 == 0


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()  # the grouped GEMM's backward refuses expanded (stride 0) gradients


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, groups: Groups, backend: str = "auto") -> torch.Tensor:
    """``x`` (S, K), rows sorted by expert, times ``w[e]`` (K, N) of each row's expert: (S, N)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[2])
    if backend != "padded" and grouped_mm_usable(x.contiguous(), w):
        y = _GROUPED_MM(x.contiguous(), w, offs=groups.offsets)
        if y.requires_grad:
            y.register_hook(_contiguous_grad)
        return y
    if backend == "grouped_mm":
        raise RuntimeError(f"grouped_mm cannot multiply {tuple(x.shape)} {x.dtype} by {tuple(w.shape)} "
                           f"{w.dtype} on {w.device}")
    position, largest = groups.slots()
    padded = x.new_zeros(groups.experts, largest, x.shape[1]).index_put((groups.expert_ids, position), x)
    return torch.bmm(padded, w)[groups.expert_ids, position]


def _rank_multiple(t: torch.Tensor) -> int:
    return max(16 // t.element_size(), 1)


def low_rank_update(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, groups: Groups,
                    backend: str) -> torch.Tensor:
    """``scale · (x_g A_eᵀ) B_eᵀ`` per group: ``down`` (E, in, r) = A_eᵀ, ``up`` (E, r, out) = B_eᵀ.
    A rank the grouped GEMM cannot align is padded with zeros (no value changes)."""
    rank = down.shape[2]
    if backend != "padded" and rank % _rank_multiple(down):
        extra = -rank % _rank_multiple(down)
        down = F.pad(down, (0, extra))
        up = F.pad(up, (0, 0, 0, extra))
    inner = grouped_matmul(x, down.contiguous() if down.stride(1) != 1 else down, groups, backend)
    return grouped_matmul(inner, up.contiguous(), groups, backend) * scale


class _Grouped4bit(torch.autograd.Function):
    """``grouped_matmul`` by a 4-bit expert weight decoded in each pass: no decoded copy is kept
    between forward and backward (only the input's gradient is needed: the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, decode: nn.Module, transposed: bool, groups: Groups,
                backend: str) -> torch.Tensor:
        ctx.decode, ctx.transposed, ctx.groups, ctx.backend = decode, transposed, groups, backend
        ctx.save_for_backward(packed)
        weight = decode(packed)  # (E, in, out) when transposed, else (E, out, in)
        return grouped_matmul(x, weight if transposed else weight.transpose(1, 2), groups, backend)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (packed,) = ctx.saved_tensors
        weight = ctx.decode(packed)
        grad_x = grouped_matmul(grad.contiguous(), weight.transpose(1, 2) if ctx.transposed else weight,
                                ctx.groups, ctx.backend)
        return grad_x, None, None, None, None, None


def base_product(x: torch.Tensor, module: nn.Module, name: str, groups: Groups, backend: str) -> torch.Tensor:
    """``x`` times each row's expert weight ``module.<name>`` in its (in, out) reading."""
    decode = quantized_parameter(module, name)
    if decode is not None:
        return _Grouped4bit.apply(x, packed_bytes(module, name), decode, module.is_transposed, groups, backend)
    weight = getattr(module, name)
    # grouped GEMM reads (E, in, out): gpt-oss stores that; the others store (E, out, in)
    return grouped_matmul(x, weight if module.is_transposed else weight.transpose(1, 2), groups, backend)


def expert_dtype(module: nn.Module, name: str) -> torch.dtype:
    """The dtype ``module.<name>`` is read in (a 4-bit one: its compute dtype), without reading it."""
    decode = quantized_parameter(module, name)
    return decode.compute_dtype if decode is not None else getattr(module, name).dtype


# ----- the experts forward --------------------------------------------------------------------
def grouped_experts_forward(module: nn.Module, routing: Routing,
                            updates: dict[str, Sequence[tuple[torch.Tensor, torch.Tensor, float]]],
                            backend: str = "auto") -> torch.Tensor:
    """The experts module's output for ``routing`` with LoRA updates added per group.

    ``updates`` maps a parameter name to its (A (E, r, in), B (E, out, r), scale) triples, one per
    live adapter, in the (out, in) reading of the weight whatever its stored layout."""
    hidden, index, weights = routing.hidden, routing.index, routing.weights
    tokens, top_k = index.shape
    first = "gate_up_proj" if module.has_gate else "up_proj"
    dtype = expert_dtype(module, first)
    with torch.no_grad():
        expert_ids, perm = torch.sort(index.reshape(-1))
    groups = Groups(expert_ids, module.num_experts)
    state = hidden[perm // top_k].to(dtype)
    pair_weights = weights.reshape(-1)[perm]

    def project(x: torch.Tensor, name: str) -> torch.Tensor:
        y = base_product(x, module, name, groups, backend)
        if module.has_bias:
            y = y + getattr(module, f"{name}_bias")[expert_ids]
        for A, B, scale in updates.get(name, ()):
            y = y + low_rank_update(x, A.to(dtype).transpose(1, 2), B.to(dtype).transpose(1, 2), scale,
                                    groups, backend)
        return y

    out = project(state, first)
    out = module._apply_gate(out) if module.has_gate else module.act_fn(out)
    out = project(out, "down_proj")
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * pair_weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inverse].view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


_told: set[tuple[str, str]] = set()


def note_choice(module: nn.Module, path: str, reason: str) -> None:
    """Log the chosen path once per experts class and reason (INFO)."""
    key = (type(module).__name__, f"{path}: {reason}")
    if key not in _told:
        _told.add(key)
        log.info("LoRA on %s experts: %s path (%s)", key[0], path, reason)

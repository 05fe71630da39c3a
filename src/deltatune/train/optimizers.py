"""Optimizers for adapter training, including 8-bit and paged AdamW for QLoRA runs.

``AdamW8bit`` keeps Adam's two moment estimates as 8-bit blockwise-quantized tensors with
the dynamic code (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022):
each step dequantizes them, applies the ordinary AdamW update in float32 and quantizes them
again, so the states take 2 bytes per parameter instead of 8. With ``paged=True`` on CUDA
the quantized states live in pinned CPU memory and visit the GPU only during ``step``.
On CUDA, when bitsandbytes is installed, ``make_optimizer`` uses its fused optimizers.
``param_groups`` splits the trainable parameters into the groups training gives them (no weight
decay on biases and norms; LoRA+'s higher rate for B).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..quant.blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from ..quant.codes import dynamic_map

OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise moment estimates (small tensors keep float32 states).

    ``min_8bit_size``: tensors with fewer elements keep float32 states, where quantization
    would save little and cost accuracy. ``paged``: keep states in CPU memory (CUDA only).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, blocksize: int = 256, min_8bit_size: int = 4096,
                 paged: bool = False):
        if lr < 0 or eps < 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"invalid AdamW8bit settings: lr={lr}, betas={betas}, eps={eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        self.paged = paged

    def _home(self, p: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.paged and p.is_cuda else p.device

    def _init_state(self, p: torch.Tensor) -> dict:
        home = self._home(p)
        state: dict = {"step": 0}
        if p.numel() < self.min_8bit_size:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, device=home)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, device=home)
            return state
        blocks = -(-p.numel() // self.blocksize)
        pin = home.type == "cpu" and p.is_cuda
        for key in ("q_exp_avg", "q_exp_avg_sq"):
            state[key] = torch.zeros(p.shape, dtype=torch.uint8, device=home, pin_memory=pin)
        # All-zero blocks have absmax 0; they dequantize to zeros whatever their indices.
        state["absmax_exp_avg"] = torch.zeros(blocks, dtype=torch.float32, device=home, pin_memory=pin)
        state["absmax_exp_avg_sq"] = torch.zeros(blocks, dtype=torch.float32, device=home, pin_memory=pin)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                step = state["step"]
                grad = p.grad.float()
                exp_avg, exp_avg_sq = self._load(state, p)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                bias1 = 1 - beta1 ** step
                bias2 = 1 - beta2 ** step
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(group["eps"])
                update = exp_avg / denom * (group["lr"] / bias1)
                p.sub_(update.to(p.dtype))
                self._store(state, exp_avg, exp_avg_sq)
        return loss

    def _load(self, state: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "exp_avg" in state:
            return state["exp_avg"].to(p.device), state["exp_avg_sq"].to(p.device)
        signed, unsigned = dynamic_map(True).to(p.device), dynamic_map(False).to(p.device)
        m = dequantize_blockwise_8bit(state["q_exp_avg"].to(p.device, non_blocking=True),
                                      state["absmax_exp_avg"].to(p.device), signed, self.blocksize)
        v = dequantize_blockwise_8bit(state["q_exp_avg_sq"].to(p.device, non_blocking=True),
                                      state["absmax_exp_avg_sq"].to(p.device), unsigned, self.blocksize)
        return m, v

    def _store(self, state: dict, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        if "exp_avg" in state:
            state["exp_avg"].copy_(exp_avg)
            state["exp_avg_sq"].copy_(exp_avg_sq)
            return
        signed, unsigned = dynamic_map(True).to(exp_avg.device), dynamic_map(False).to(exp_avg.device)
        q, absmax = quantize_blockwise_8bit(exp_avg, self.blocksize, signed, exact=True)
        state["q_exp_avg"].copy_(q)
        state["absmax_exp_avg"].copy_(absmax)
        q, absmax = quantize_blockwise_8bit(exp_avg_sq, self.blocksize, unsigned, exact=True)
        state["q_exp_avg_sq"].copy_(q)
        state["absmax_exp_avg_sq"].copy_(absmax)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states (for memory reports)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))


def make_optimizer(params: Iterable, name: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (one of ``OPTIMIZERS``) for ``params``.

    8-bit and paged variants use bitsandbytes' fused CUDA optimizers when the parameters are
    on CUDA and bitsandbytes is installed; otherwise deltatune's ``AdamW8bit``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not supported; use one of {list(OPTIMIZERS)}")
    params = list(params)
    on_cuda = any(p.is_cuda for p in _tensors(params))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=on_cuda or None)
    if on_cuda:
        try:
            import bitsandbytes as bnb
        except ImportError:
            bnb = None
        if bnb is not None:
            cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                   "paged_adamw": bnb.optim.PagedAdamW}[name]
            return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "paged_adamw":  # 32-bit states paged: the same class with quantization switched off
        return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=2 ** 62, paged=True)
    return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, paged=name.startswith("paged"))


def _tensors(params: list) -> Iterable[torch.Tensor]:
    for item in params:
        if isinstance(item, dict):
            yield from item["params"]
        else:
            yield item


def param_groups(model, weight_decay: float, lr: float, lora_plus_ratio: float = 0.0) -> list[dict]:
    """Optimizer groups: no weight decay on biases and norms; with ``lora_plus_ratio`` (LoRA+) the
    B matrices get ``lr × ratio``, everything else ``lr``."""
    groups: dict[tuple[bool, bool], list] = {(True, False): []}  # the first group is always there
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or "norm" in name.lower() or name.endswith("bias"))
        is_b = bool(lora_plus_ratio) and (".lora_B." in name or ".lora_embedding_B." in name)
        groups.setdefault((decays, is_b), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr": lr * lora_plus_ratio if is_b else lr}
            for (decays, is_b), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))]

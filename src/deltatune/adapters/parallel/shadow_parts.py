"""ShadowPEFT's parts: the per-block injection and update networks, the decoder stack they sit on,
and the mirrored shadow backbone. ``shadow.py`` wires them together with hooks.

Names, shapes and dtypes follow PEFT 0.21.2's ``ShadowLayer`` and ``ShadowModel``, so file keys map by
a prefix: ``<block>.shadow_down.default.weight`` (r, d), ``shadow_up`` (d, r), ``shadow_update_transform``
and ``shadow_update_gate`` (each ``Linear(d, u)``, GELU, ``Linear(u, d)`` as ``.0``/``.2``), and the
backbone's own state dict under ``shadow_backbone.default.``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ...config.shadow import ShadowConfig
from ..base import AdapterContainer

PARTS = ("shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate")


class ShadowBlockAdapters(AdapterContainer):
    """The injection (``down``/``up``) and update (``T``/``G``) networks of one decoder block, per adapter.

    Kept as a child of the block; the block's hooks (registered by ``shadow.ShadowNetworks``) call
    ``inject`` before the block and ``update`` after it. ``index[name]`` is the block's place among
    adapter ``name``'s blocks, which is where it reads the shadow state of the running call.
    """

    stands_for_base = False

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.shadow_down = nn.ModuleDict()
        self.shadow_up = nn.ModuleDict()
        self.shadow_dropout = nn.ModuleDict()
        self.shadow_update_transform = nn.ModuleDict()
        self.shadow_update_gate = nn.ModuleDict()
        self.shadow_alpha: dict[str, float] = {}
        self.index: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_plan = None
        self.handles: list = []

    @property
    def adapter_names(self) -> list[str]:
        return list(self.shadow_down.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for part in PARTS:
            holder = getattr(self, part)
            if name in holder:
                yield from holder[name].parameters()

    def delete_adapter(self, name: str) -> None:
        for part in (*PARTS, "shadow_dropout"):
            holder = getattr(self, part)
            if name in holder:
                del holder[name]
        self.shadow_alpha.pop(name, None)
        self.index.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def add(self, name: str, config: ShadowConfig, index: int, device: torch.device) -> None:
        d, r = self.hidden_size, config.r
        width = config.update_hidden_size or r

        def mlp() -> nn.Sequential:  # PEFT's T and G: Linear, GELU, Linear (keys .0 and .2)
            return nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))

        # float32 whatever the base's dtype: PEFT creates these in float32 and its default
        # autocast_adapter_dtype keeps them there on a half-precision base
        self.shadow_down[name] = nn.Linear(d, r, bias=False).to(device)
        self.shadow_up[name] = nn.Linear(r, d, bias=False).to(device)
        if config.init_weights:  # the injection starts as a no-op (LoRA's B = 0)
            nn.init.zeros_(self.shadow_up[name].weight)
        self.shadow_dropout[name] = nn.Dropout(config.shadow_dropout) if config.shadow_dropout else nn.Identity()
        self.shadow_update_transform[name] = mlp().to(device)
        self.shadow_update_gate[name] = mlp().to(device)
        self.shadow_alpha[name] = config.shadow_alpha
        self.index[name] = index

    def inject(self, name: str, hidden: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        """The block's input ``h + alpha · up(dropout(down(h − s)))``, in ``h``'s dtype; the low-rank
        path runs in the adapter's dtype."""
        down = self.shadow_down[name]
        delta = self.shadow_dropout[name]((hidden - shadow).to(down.weight.dtype))
        correction = self.shadow_up[name](down(delta))
        return hidden + (self.shadow_alpha[name] * correction).to(hidden.dtype)

    def update(self, name: str, output: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        """The next shadow state ``(1 − g) s + g T(o)``, ``g = σ(G(o))``, in ``s``'s dtype."""
        transform = self.shadow_update_transform[name]
        o = output.to(transform[0].weight.dtype)
        gate = torch.sigmoid(self.shadow_update_gate[name](o))
        moved = (1.0 - gate) * shadow.to(o.dtype) + gate * transform(o)
        return moved.to(shadow.dtype)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Sub-key -> live tensor; PEFT writes the adapter name as ``default`` whatever it is."""
        out = {}
        for part in PARTS:
            for sub, tensor in getattr(self, part)[name].state_dict(keep_vars=True).items():
                out[f"{part}.default.{sub}"] = tensor
        return out


# ----- where the decoder blocks are ------------------------------------------------------------
_STACK_ATTRS = ("model", "transformer", "base_model", "decoder")
_LAYER_ATTRS = ("layers", "h")


def _layer_list(module: nn.Module) -> Optional[tuple[nn.ModuleList, str]]:
    for attr in _LAYER_ATTRS:
        layers = getattr(module, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers, attr
    return None


def decoder_stack(model: nn.Module) -> tuple[str, nn.Module, nn.ModuleList, str]:
    """(name, module, blocks, blocks' attribute) of the module that runs the decoder blocks: the
    ``LlamaModel`` inside ``LlamaForCausalLM``, GPT-2's ``transformer`` (PEFT's search order)."""
    for attr in _STACK_ATTRS:
        inner = getattr(model, attr, None)
        if not isinstance(inner, nn.Module) or inner is model:
            continue
        nested = getattr(inner, "decoder", None)  # OPT keeps them one level deeper
        if isinstance(nested, nn.Module) and _layer_list(nested) is not None:
            return f"{attr}.decoder", nested, *_layer_list(nested)
        if _layer_list(inner) is not None:
            return attr, inner, *_layer_list(inner)
        break
    if _layer_list(model) is not None:
        return "", model, *_layer_list(model)
    raise ValueError(f"ShadowConfig: found no list of decoder blocks (.layers or .h) in {type(model).__name__}; "
                     "ShadowPEFT rides the blocks of a decoder-only language model")


def hidden_size(config: Any) -> int:
    """The model config's hidden width, under whichever name its architecture uses."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    raise ValueError(f"ShadowConfig: cannot read the hidden size from {type(config).__name__}")


# ----- the mirrored shadow backbone ----------------------------------------------------------------
_SIZE_FIELDS = {  # ShadowConfig field -> the config attributes that may hold it, in PEFT's order
    "shadow_num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "shadow_hidden_size": ("hidden_size", "n_embd", "d_model"),
    "shadow_intermediate_size": ("intermediate_size", "ffn_dim", "n_inner"),
    "shadow_num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
}


def _set_size(model_config, field: str, value: int) -> None:
    for attr in _SIZE_FIELDS[field]:
        if hasattr(model_config, attr):
            setattr(model_config, attr, int(value))
            return
    raise ValueError(f"ShadowConfig.{field}: {type(model_config).__name__} has none of {_SIZE_FIELDS[field]}")


def _fit_layer_lists(model_config) -> None:
    """Per-layer fields sized for the base's depth (Qwen's ``layer_types``, ``max_window_layers``)
    follow the backbone's smaller depth, as PEFT cuts or pads them."""
    depth = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        return
    kinds = getattr(model_config, "layer_types", None)
    if kinds is not None:
        kinds = list(kinds) or ["full_attention"]
        model_config.layer_types = (kinds + [kinds[-1]] * depth)[:depth]
    window = getattr(model_config, "max_window_layers", None)
    if isinstance(window, int) and window > depth:
        model_config.max_window_layers = depth


def mirror_backbone(stack: nn.Module, config: ShadowConfig) -> nn.Module:
    """A fresh, randomly initialised copy of the base's decoder stack class: one layer unless
    ``shadow_num_hidden_layers`` says otherwise, with the optional smaller widths."""
    model_config = copy.deepcopy(stack.config)
    _set_size(model_config, "shadow_num_hidden_layers", config.shadow_num_hidden_layers or 1)
    for field in ("shadow_hidden_size", "shadow_intermediate_size", "shadow_num_attention_heads"):
        if getattr(config, field) is not None:
            _set_size(model_config, field, getattr(config, field))
    _fit_layer_lists(model_config)
    try:
        return type(stack)(model_config)
    except Exception as err:  # an inconsistent size (heads that do not divide the width, ...)
        raise ValueError(f"ShadowConfig: cannot build a {type(stack).__name__} shadow backbone with these sizes "
                         f"({type(err).__name__}: {err})") from None

"""ShadowPEFT (Li et al. 2026, arXiv:2604.19254) in PEFT 0.21.2's file format: a small shadow
network runs beside the frozen decoder and steers it block by block.

Nothing of transformers is replaced or patched; everything runs in PyTorch forward hooks:

- on the decoder stack (``LlamaModel``, GPT-2's ``transformer``), a pre-hook runs the active
  adapter's shadow backbone on the call's inputs (the base's own input embeddings with
  ``share_embeddings``) and keeps the first shadow state ``s`` for the call;
- on each targeted block, a pre-hook replaces the block's input ``h`` by
  ``h + alpha · up(dropout(down(h − s)))`` and a hook after it moves ``s`` towards the block's
  output ``o``: ``s ← (1 − g) s + g T(o)`` (``shadow_parts.ShadowBlockAdapters``).

PEFT carries ``(h, s)`` through its decoder loop in one object and wraps each block; here the
blocks stay the model's own and the states of a call live beside it (``shadow_networks.py``).
The block outputs are never changed, so the first block's input is the embeddings and the last
block's output goes on unchanged, as in PEFT. With a key/value cache the shadow backbone keeps a
cache of its own beside the base's (greedy and sampled ``generate`` work; beam search is refused).

Each row's result depends on that row alone, so ``dt.adapter_per_row`` routes rows to different
shadow adapters (each group of rows runs its own backbone); PEFT keeps one active adapter, and so
does ``set_adapter`` here. In training the loop adds ``auxiliary_loss``: the output head on the
first shadow state predicts the labels, weighted by ``auxiliary_loss_weight`` (PEFT adds the same
term to the model's loss when labels are passed). It cannot be merged: ``s`` depends on the input.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig
from ...config.shadow import MIRROR, ShadowConfig
from ...kernels import linear_cross_entropy
from ...targeting import expand_target_modules, is_target, modules_to_save_targets
from ..base import ModulesToSave
from ..method import FILE_PREFIX, Method, add_saved_copies, register_method
from .shadow_networks import ShadowNetworks
from .shadow_parts import ShadowBlockAdapters, decoder_stack, hidden_size, mirror_backbone

NETWORKS_ATTR = "deltatune_shadow"  # the model's ShadowNetworks
BLOCK_ATTR = "deltatune_shadow_block"  # each targeted block's ShadowBlockAdapters
FILE_MODEL_PREFIX = "base_model."  # PEFT keeps the backbone on its tuner, beside ``model``


def _supports_embeds(module: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _block_targets(model: nn.Module, config: ShadowConfig) -> list[tuple[str, int, nn.Module]]:
    """(name, index, block) of the targeted decoder blocks, in order; they must be contiguous."""
    stack_name, _, blocks, attr = decoder_stack(model)
    prefix = f"{stack_name}.{attr}" if stack_name else attr
    targets = config.target_modules
    found = []
    for i, block in enumerate(blocks):
        key = f"{prefix}.{i}"
        # PEFT takes a block named in full whatever layers_to_transform says; suffixes and
        # expressions go through the usual matching
        named = isinstance(targets, list) and key in targets
        if is_target(_without_layers(config) if named else config, key, targets):
            found.append((key, i, block))
    if not found:
        raise ValueError(f"ShadowConfig.target_modules={targets!r} matched no decoder block of {type(model).__name__} "
                         f"(blocks are named {prefix}.0 .. {prefix}.{len(blocks) - 1})")
    indices = [i for _, i, _ in found]
    if indices != list(range(indices[0], indices[-1] + 1)):
        raise ValueError(f"ShadowConfig.target_modules picks blocks {indices}: they must be contiguous, since the "
                         "shadow state rides the decoder from the first picked block to the last (PEFT's rule)")
    return found


def _without_layers(config: ShadowConfig) -> ShadowConfig:
    return dataclasses.replace(config, layers_to_transform=None, layers_pattern=None)


def _add_modules_to_save(model: nn.Module, config: ShadowConfig, name: str) -> None:
    """Trainable copies of ``modules_to_save`` (the output head, whose copy the shadow loss then uses)."""
    saved = modules_to_save_targets(model, config.modules_to_save or [])
    if config.modules_to_save and not saved:
        raise ValueError(f"ShadowConfig.modules_to_save={config.modules_to_save!r} matched no module")
    add_saved_copies(model, saved, name)


class ShadowMethod(Method):
    """ShadowPEFT: hooks on the decoder stack and the targeted blocks (see the module docstring)."""

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, ShadowConfig)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise NotImplementedError(f"ShadowConfig: ShadowPEFT rides a decoder-only model's blocks; "
                                      f"{type(model).__name__} is an encoder-decoder model")
        if config.task_type not in (None, "CAUSAL_LM"):
            raise NotImplementedError(f"ShadowConfig.task_type={config.task_type!r}: deltatune runs ShadowPEFT on "
                                      "causal language models (CAUSAL_LM, or None for no shadow loss)")
        if config.shadow_model != MIRROR:
            raise NotImplementedError(f"ShadowConfig.shadow_model={config.shadow_model!r}: deltatune builds the "
                                      "mirrored shadow backbone only ('mirror'); pretrained shadow checkpoints are "
                                      "not supported")
        stack_name, _, blocks, attr = decoder_stack(model)
        if config.target_modules is None:  # every block (PEFT's default), or those of layers_to_transform
            prefix = f"{stack_name}.{attr}" if stack_name else attr
            picked = config.layers_to_transform
            config.target_modules = [f"{prefix}.{i}" for i in range(len(blocks)) if picked is None or i in picked]
        else:
            config.target_modules = expand_target_modules(model, config)

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, ShadowConfig)
        targets = _block_targets(model, config)
        _, stack, _, _ = decoder_stack(model)
        networks = getattr(model, NETWORKS_ATTR, None)
        if networks is None:
            networks = ShadowNetworks()
            setattr(model, NETWORKS_ATTR, networks)
            networks.attach(stack)
        base = next(p for p in model.parameters() if p.is_floating_point())
        width = hidden_size(model.config)
        backbone = mirror_backbone(stack, config)
        shadow_width = hidden_size(backbone.config)
        projection = nn.Identity() if shadow_width == width else nn.Linear(shadow_width, width, bias=False)
        # the base's frozen embeddings feed the backbone where the widths allow it (PEFT's rule)
        share = config.share_embeddings and shadow_width == width and _supports_embeds(backbone)
        if share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens
        networks.shadow_backbone[name] = backbone.to(device=base.device, dtype=base.dtype)
        networks.shadow_projection[name] = projection.to(device=base.device, dtype=base.dtype)
        networks.share[name] = share
        networks.blocks[name] = []
        for k, (_, _, block) in enumerate(targets):
            holder = getattr(block, BLOCK_ATTR, None)
            if holder is None:
                holder = ShadowBlockAdapters(width)
                setattr(block, BLOCK_ATTR, holder)
                networks.attach_block(block, holder)
            holder.add(name, config, k, base.device)
            networks.blocks[name].append(holder)
        networks.train(model.training)
        for _, _, block in targets:
            getattr(block, BLOCK_ATTR).train(model.training)
        _add_modules_to_save(model, config, name)

    def remove(self, model: nn.Module, name: str) -> None:
        networks = getattr(model, NETWORKS_ATTR, None)
        for module in list(model.modules()):
            holder = getattr(module, BLOCK_ATTR, None)
            if isinstance(holder, ShadowBlockAdapters) and module is not model:
                holder.delete_adapter(name)
                if not holder.adapter_names:
                    for handle in holder.handles:
                        handle.remove()
                    delattr(module, BLOCK_ATTR)
        if networks is not None:
            networks.delete_adapter(name)
            if not networks.adapter_names:
                networks.detach()
                delattr(model, NETWORKS_ATTR)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        networks = getattr(model, NETWORKS_ATTR)
        out: dict[str, torch.Tensor] = {}
        holders = {id(h) for h in networks.blocks[name]}
        for key, module in model.named_modules():
            if isinstance(module, ShadowBlockAdapters) and id(module) in holders:
                block_key = key.removesuffix(f".{BLOCK_ATTR}")
                for sub, tensor in module.file_tensors(name).items():
                    out[f"{FILE_PREFIX}{block_key}.{sub}"] = tensor
            elif isinstance(module, ModulesToSave) and name in module.adapter_names:  # PEFT's layout for them
                for sub, tensor in module.modules_to_save[name].state_dict(keep_vars=True).items():
                    out[f"{FILE_PREFIX}{key}.{sub}"] = tensor
        for holder, part in ((networks.shadow_backbone, "shadow_backbone"),
                             (networks.shadow_projection, "shadow_projection")):
            for sub, tensor in holder[name].state_dict(keep_vars=True).items():
                out[f"{FILE_MODEL_PREFIX}{part}.default.{sub}"] = tensor
        return out

    def auxiliary_loss(self, model: nn.Module, name: str, config: AdapterConfig,
                       batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """``auxiliary_loss_weight`` × the cross-entropy of the output head on the first shadow state
        of the forward that just ran, against ``batch``'s labels (PEFT's shadow loss)."""
        assert isinstance(config, ShadowConfig)
        networks = getattr(model, NETWORKS_ATTR, None)
        labels = batch.get("labels")
        seed = None if networks is None else networks.seed_of(name)
        if not config.auxiliary_loss_weight or config.task_type != "CAUSAL_LM" or labels is None or seed is None:
            return None
        return config.auxiliary_loss_weight * shadow_loss(model, seed, labels)


def shadow_loss(model: nn.Module, seed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the output head on ``seed``, over the labelled positions."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    keep = targets != -100
    hidden, targets = seed[keep], targets[keep]
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:  # only the labelled positions are projected, never the full logits
        return linear_cross_entropy(hidden.to(head.weight.dtype), head.weight, head.bias, targets)
    return F.cross_entropy(head(hidden).float(), targets)


register_method("SHADOW", ShadowMethod())

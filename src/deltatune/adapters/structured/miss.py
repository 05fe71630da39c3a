"""MiSS layers (matrix shard sharing; the successor of Bone) around linear-like base layers.

The input features are cut into shards of ``r`` (the last one shorter when ``r`` does not divide
``in``) and one learned block is shared by every shard, so ``ΔW[o, j] = B[j mod r, o]`` and the
update costs a sum over shards plus an (r, out) matmul. Variants, from ``init_weights``:

* ``True`` / ``False``: ``miss_block`` is (r, out), zero (a no-op) or Kaiming-uniform;
* ``"mini"``: ``miss_block`` is (r, mini_r), repeated along the output to (r, out);
* ``"bat"``: Bone's block-affine form: ``miss_block`` is (out/r, r, r) and each (r, r) block
  ``W_ij`` of the weight gains ``W_ij B_i + B_i``, so the update depends on the weight itself.
  With several 'bat' adapters active on one layer each acts on the weight the ones before it
  produced (PEFT's order), which merging reproduces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import MissConfig
from ..linear_base import WeightDeltaLayer
from ..method import LayerMethod, register_method


def bat_delta(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Bone's update of an (out, in) ``weight``: block (i, j) is ``W_ij @ B_i + B_i`` for the
    (out/r, r, r) ``blocks``."""
    out_features, in_features = weight.shape
    r = blocks.shape[-1]
    tiles = weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)  # (i, j, r, r)
    update = tiles @ blocks.unsqueeze(1) + blocks.unsqueeze(1)
    return update.transpose(1, 2).reshape(out_features, in_features)


class MissLinear(WeightDeltaLayer):
    """MiSS around a linear-like layer."""

    adapter_dict_names = ("miss_block",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.miss_block = nn.ParameterDict()
        self.miss_dropout = nn.ModuleDict()
        self.variant: dict[str, str] = {}  # "shared" (init True/False), "mini" or "bat"

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.variant.pop(name, None)
        if name in self.miss_dropout:
            del self.miss_dropout[name]

    def add(self, name: str, config: MissConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        r, init = config.r, config.init_weights
        if r > in_features:
            raise ValueError(f"MissConfig.r ({r}) must not exceed the input size ({in_features}) of {key!r}")
        if init == "bat":
            if in_features % r or out_features % r:
                raise ValueError(f"MissConfig.r ({r}) must divide both sizes of {key!r} ({out_features}x{in_features}) "
                                 "for init_weights='bat' (the weight is cut into r x r blocks)")
            block = torch.zeros(out_features // r, r, r)
        elif init == "mini":
            if out_features % config.mini_r:
                raise ValueError(f"MissConfig.mini_r ({config.mini_r}) must divide the output size ({out_features}) "
                                 f"of {key!r} for init_weights='mini'")
            block = torch.zeros(r, config.mini_r)
        else:
            block = torch.zeros(r, out_features)
            if init is False and not from_file:
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.variant[name] = init if init in ("bat", "mini") else "shared"
        self.scaling[name] = 1.0
        self.miss_block[name] = nn.Parameter(block)
        self.miss_dropout[name] = nn.Dropout(config.miss_dropout) if config.miss_dropout > 0 else nn.Identity()
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"miss_block": self.miss_block[name]}

    def _shared_block(self, name: str) -> torch.Tensor:
        """The (r, out) block every input shard uses ('mini' repeats its columns along the output)."""
        block = self.miss_block[name]
        if self.variant[name] == "mini":
            _, out_features = self.in_out
            block = block.repeat(1, out_features // block.shape[1])
        return block

    def _delta_for(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``ΔW`` (out, in) of adapter ``name`` on top of ``weight`` (only 'bat' reads it)."""
        if self.variant[name] == "bat":
            blocks = self.miss_block[name]
            return bat_delta(weight.to(blocks.dtype), blocks)
        block = self._shared_block(name)
        r, in_features = block.shape[0], weight.shape[1]
        return block.T.repeat(1, -(-in_features // r))[:, :in_features]

    def delta_weight(self, name: str) -> torch.Tensor:
        return self._delta_for(name, self.canonical(self.base_weight()).detach())

    def _weight_before(self, name: str) -> torch.Tensor:
        """The weight adapter ``name`` acts on: the base (with merged adapters) and, in a plain
        forward, the updates of the active adapters listed before it."""
        weight = self.canonical(self.base_weight()).detach()
        if self.row_plan is not None:  # one adapter per row: nothing comes before it
            return weight
        for other in self.active_adapters:
            if other == name:
                break
            if self.has_adapter(other) and other not in self.merged_adapters:
                weight = weight + self._delta_for(other, weight).to(weight.dtype)
        return weight

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if self.variant[name] == "bat":  # no dropout: PEFT's 'bat' forward has none
            delta = bat_delta(self._weight_before(name).to(self.miss_block[name].dtype), self.miss_block[name])
            return result + nn.functional.linear(x.to(delta.dtype), delta)
        block = self._shared_block(name)
        r = block.shape[0]
        x = self.miss_dropout[name](x.to(block.dtype))
        short = -x.shape[-1] % r
        if short:  # the last shard is shorter: pad it with zeros
            x = nn.functional.pad(x, (0, short))
        shards = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)
        return result + shards @ block

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        current = self.canonical(weight)  # 'bat' acts on the weight as merged so far, as forward does
        return self.canonical(current + self._delta_for(name, current).to(weight.device, torch.float32))


register_method("MISS", LayerMethod(MissLinear, bias_only="MiSS_only"))

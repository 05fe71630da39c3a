"""What OFT, BOFT and HRA layers share: each adapter is a square map ``M`` on the layer's input
features (a rotation or a product of reflections), optionally followed by a per-output scale
``s`` (BOFT). The adapted layer computes ``s ⊙ (W (x M)ᵀ) + b``, i.e. its weight becomes
``diag(s) · W · Mᵀ`` with the bias unchanged, which is exactly what merging writes.

The forward pass maps the input and runs the base layer once (any base: dense, GPT-2's
``Conv1D``, deltatune's 4-bit and 8-bit linears), so the full ``M`` is never formed. Several
adapters act as successive changes of the layer, in the order they are listed: the first is
folded closest to the weight, so the last one maps the input first. Merging them in that order
gives the same function (PEFT's HRA and BOFT agree; PEFT's OFT rotates the input in the other
order while its merge follows this one, so with several OFT adapters PEFT disagrees with itself).
Rows of one batch may use different adapters (``dt.adapter_per_row``): each group of rows is
mapped by its own adapter before the one base call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..linear_base import LinearAdapterLayer


class InputMapLayer(LinearAdapterLayer):
    """An adapter layer whose adapters map the input features (and may scale the outputs)."""

    def __init__(self, base_layer: nn.Module):
        # Orientation comes from the module type (GPT-2's Conv1D is stored (in, out)); a
        # config's fan_in_fan_out cannot make an nn.Linear transposed (PEFT resets it too).
        super().__init__(base_layer, fan_in_fan_out=False)

    # ----- what each method defines ---------------------------------------------------------
    def map_input(self, name: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        """``x @ M`` for adapter ``name``, ``x`` (..., in) already in the adapter's dtype;
        ``training``: apply the method's training-time dropout."""
        raise NotImplementedError

    def output_scale(self, name: str) -> Optional[torch.Tensor]:
        """A per-output-feature scale (out,) applied after the base layer, or ``None``."""
        return None

    def adapter_dtype(self, name: str) -> torch.dtype:
        return next(self.adapter_parameters(name)).dtype

    # ----- forward ---------------------------------------------------------------------------
    def _mapped(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.map_input(name, x.to(self.adapter_dtype(name)), self.training).to(x.dtype)

    def _scaled(self, name: str, result: torch.Tensor) -> torch.Tensor:
        scale = self.output_scale(name)
        if scale is None:
            return result
        # s ⊙ (y - b) + b written as y + (s - 1) ⊙ (y - b): a new adapter (s = 1) returns y bit for bit
        bias = self.bias
        shifted = result if bias is None else result - bias
        return (result + (shifted.to(scale.dtype) * (scale - 1)).to(result.dtype)).to(result.dtype)

    def _live(self, name: str) -> bool:
        return self.has_adapter(name) and name not in self.merged_adapters

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.row_plan is not None:
            return self._forward_per_row(x, *args, **kwargs)
        names = [n for n in self.active_adapters if self._live(n)]
        for name in reversed(names):  # the last adapter maps the input first (see the module docstring)
            x = self._mapped(name, x)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            result = self._scaled(name, result)
        return result

    def _forward_per_row(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        groups = [(n, rows) for n, rows in self.row_plan.groups(x.shape[0], x.device) if self._live(n)]
        mapped = x
        for name, rows in groups:
            mapped = mapped.index_copy(0, rows, self._mapped(name, x.index_select(0, rows)))
        result = self.base_layer(mapped, *args, **kwargs)
        for name, rows in groups:
            if self.output_scale(name) is not None:
                result = result.index_copy(0, rows, self._scaled(name, result.index_select(0, rows)))
        return result

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} maps the layer's input, so it cannot be added to an "
                                  "output afterwards; its forward runs the base layer itself")

    # ----- merging ---------------------------------------------------------------------------
    def input_matrix(self, name: str) -> torch.Tensor:
        """``M`` of adapter ``name`` as an (in, in) float32 matrix (no dropout)."""
        in_features, _ = self.in_out
        weight = next(self.adapter_parameters(name))
        eye = torch.eye(in_features, device=weight.device, dtype=torch.float32)
        with torch.no_grad():
            return self.map_input(name, eye, training=False).float()

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        merged = self.canonical(weight) @ self.input_matrix(name).to(weight.device).T  # W Mᵀ
        scale = self.output_scale(name)
        if scale is not None:
            merged = merged * scale.detach().float().to(weight.device).unsqueeze(-1)
        return self.canonical(merged)

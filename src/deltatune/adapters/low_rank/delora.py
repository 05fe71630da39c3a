"""DeLoRA layers: a low-rank update whose rank-one terms are normalised, its size set by a
learned strength ``λ`` alone.

``ΔW = (λ / r) · B · diag(1 / (‖A_i‖ ‖B^i‖)) · A · diag(w)`` with ``A`` (r, in), ``B`` (out, r),
``A_i`` the rows of ``A``, ``B^i`` the columns of ``B`` (norms clamped below at 1e-4) and ``w``
the base weight's column norms (one per input feature), taken when the adapter is added and
kept fixed. Forward adds ``ΔW x`` computed from the factors (never forming ``ΔW``); the input
goes through ``module_dropout`` first, as PEFT applies it. Files hold ``delora_A``,
``delora_B``, ``delora_lambda`` (1,) and ``delora_w_norm`` (in,) per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config.low_rank import DeloraConfig
from ...targeting import pattern_value
from ..linear_base import LinearAdapterLayer, check_linear_like
from ..method import LayerMethod, register_method

_NORM_FLOOR = 1e-4  # keeps a zero row or column (B starts at zero) from dividing by zero


class AdapterBuffers(nn.Module):
    """Frozen per-adapter tensors, keyed by adapter name: buffers, so ``model.to`` moves them
    and ``requires_grad`` never touches them."""

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor)

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self):
        return self._buffers.keys()


class DeloraLinear(LinearAdapterLayer):
    adapter_dict_names = ("delora_A", "delora_B", "delora_lambda")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_w_norm = AdapterBuffers()
        self.delora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.r.pop(name, None)
        for holder in (self.delora_w_norm, self.delora_dropout):
            if name in holder:
                del holder[name]

    def _column_norms(self) -> torch.Tensor:
        """‖W‖ per input feature of the unmerged base weight."""
        weight = self._original_weight if self._original_weight is not None else self.base_weight()
        if weight.is_meta:  # nothing to measure; a file brings the values
            return torch.ones(self.in_out[0])
        return self.canonical(weight.detach()).float().norm(dim=0).cpu()

    def add(self, name: str, config: DeloraConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        r = pattern_value(config.rank_pattern, key, config.r)
        strength = pattern_value(config.lambda_pattern, key, config.delora_lambda)
        A, B = torch.empty(r, in_features), torch.zeros(out_features, r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's A init, as PEFT draws it
        if not config.init_weights:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.delora_A[name] = nn.Parameter(A)
        self.delora_B[name] = nn.Parameter(B)
        self.delora_lambda[name] = nn.Parameter(torch.full((1,), float(strength)))
        self.delora_w_norm[name] = self._column_norms()
        self.delora_dropout[name] = nn.Dropout(config.module_dropout) if config.module_dropout > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = 1.0
        self.match_device(name)

    def match_device(self, name: str) -> None:
        super().match_device(name)
        weight = self.base_weight()
        if not weight.is_meta:
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            self.delora_w_norm[name] = self.delora_w_norm[name].to(weight.device, dtype)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"delora_A": self.delora_A[name], "delora_B": self.delora_B[name],
                "delora_lambda": self.delora_lambda[name], "delora_w_norm": self.delora_w_norm[name]}

    def _term_scales(self, name: str) -> torch.Tensor:
        """(λ / r) / (‖A_i‖ ‖B^i‖) per rank-one term."""
        A, B = self.delora_A[name], self.delora_B[name]
        norms = A.norm(dim=1).clamp(min=_NORM_FLOOR) * B.norm(dim=0).clamp(min=_NORM_FLOOR)
        return self.delora_lambda[name] / self.r[name] / norms

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.delora_A[name], self.delora_B[name]
        x = self.delora_dropout[name](x.to(A.dtype))
        h = nn.functional.linear(x * self.delora_w_norm[name].to(A.dtype), A) * self._term_scales(name)
        return result + nn.functional.linear(h, B).to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` in (out, in) layout, float32."""
        A, B = self.delora_A[name].float(), self.delora_B[name].float()
        scales = self._term_scales(name).float()
        return (B * scales) @ A * self.delora_w_norm[name].float()

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).detach().to(weight.device)
        return self.canonical(self.canonical(weight) + delta)


class DeloraMethod(LayerMethod):
    def __init__(self) -> None:
        super().__init__(DeloraLinear, self._make, bias_only="delora_only")

    @staticmethod
    def _make(module: nn.Module, config: DeloraConfig, key: str) -> DeloraLinear:
        check_linear_like(module, "DeLoRA")
        return DeloraLinear(module)


register_method("DELORA", DeloraMethod())

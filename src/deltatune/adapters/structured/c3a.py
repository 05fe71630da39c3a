"""C3A layers: a block-circulant weight update applied with FFTs.

The (out, in) update is a grid of (b × b) blocks, ``b = block_size``; block (i, j) is the
circulant matrix of one learned vector ``w_ij`` (``c3a_kernel`` is (out/b, in/b, b)), with
``C(w)[t, k] = w[(k - t) mod b]``, and the whole update is divided by ``in``. Applied to an
input, block (i, j) is a circular cross-correlation of input block j with ``w_ij``, so the
forward pass costs FFTs of length b instead of an (out, in) matmul:
``y_i = irfft(Σ_j conj(rfft(w_ij)) · rfft(x_j)) / in``.

Several C3A adapters active on one layer add their updates (what merging them gives); PEFT's
forward instead feeds the first adapter's output to the second.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...config import C3AConfig
from ..linear_base import WeightDeltaLayer
from ..method import LayerMethod, register_method
from .common import size_for


def block_circulant_apply(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``x`` (..., in) times the block-circulant matrix of ``kernel`` (m, n, b), unscaled: (..., m·b)."""
    m, n, b = kernel.shape
    spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b))  # (..., n, b//2+1)
    mixed = torch.einsum("...nf,mnf->...mf", spectrum, torch.fft.rfft(kernel).conj())
    return torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], m * b)


def block_circulant_dense(kernel: torch.Tensor) -> torch.Tensor:
    """The (m·b, n·b) matrix whose block (i, j) is ``C(kernel[i, j])``, ``C(w)[t, k] = w[(k - t) mod b]``."""
    m, n, b = kernel.shape
    steps = torch.arange(b, device=kernel.device)
    shift = (steps.view(1, b) - steps.view(b, 1)) % b  # [t, k] -> (k - t) mod b
    blocks = kernel[:, :, shift]  # (m, n, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


class C3ALinear(WeightDeltaLayer):
    """C3A around a linear-like layer."""

    adapter_dict_names = ("c3a_kernel",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.c3a_kernel = nn.ParameterDict()

    def add(self, name: str, config: C3AConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        b = size_for(config.block_size_pattern, key, config.block_size)
        if in_features % b or out_features % b:
            raise ValueError(f"C3AConfig.block_size ({b}) must divide both sizes of {key!r} "
                             f"({out_features}x{in_features}); a common divisor of all targeted layers' sizes works")
        kernel = torch.zeros(out_features // b, in_features // b, b)
        init = config.init_weights
        if not from_file and init is not True:
            if init == "gaussian":
                nn.init.normal_(kernel)
            elif init == "kaiming_uniform":
                bound = math.sqrt(1.0 / in_features)
                nn.init.uniform_(kernel, -bound, bound)
            else:  # "xavier_uniform" or False: Glorot's bound for an (out, in) matrix
                bound = math.sqrt(3.0) * math.sqrt(2.0 / (in_features + out_features))
                nn.init.uniform_(kernel, -bound, bound)
        self.scaling[name] = 1.0 / in_features
        self.c3a_kernel[name] = nn.Parameter(kernel)
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"c3a_kernel": self.c3a_kernel[name]}

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # FFTs in float32: half precision FFTs are missing on CPUs and limited to powers of two on GPUs
        update = block_circulant_apply(x.float(), self.c3a_kernel[name].float()) * self.scaling[name]
        return result + update.to(result.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        kernel = self.c3a_kernel[name]
        return (block_circulant_dense(kernel.float()) * self.scaling[name]).to(kernel.dtype)


register_method("C3A", LayerMethod(C3ALinear, bias_only="c3a_only"))

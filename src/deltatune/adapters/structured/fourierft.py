"""FourierFT layers: a weight update learned as a few coefficients of its 2-D spectrum.

Each layer holds ``n`` learned coefficients (``fourierft_spectrum``) placed at fixed positions
of an (out, in) spectrum, all other entries zero; ``ΔW = Re(IDFT2(spectrum)) · scaling``. The
positions are the first ``n`` entries of a random permutation of the out·in positions drawn from
``random_loc_seed`` on a CPU generator, the draw PEFT makes, so files hold only the coefficients.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import FourierFTConfig
from ..linear_base import WeightDeltaLayer
from ..method import LayerMethod, register_method
from .common import size_for


def spectrum_positions(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """Flat (row-major) positions in the (out, in) spectrum of ``n`` coefficients for ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(out_features * in_features, generator=generator)[:n]


class FourierFTLinear(WeightDeltaLayer):
    """FourierFT around a linear-like layer; the update is formed densely, then applied as a matmul."""

    adapter_dict_names = ("fourierft_spectrum",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)  # GPT-2's Conv1D is recognised as transposed by its type
        self.fourierft_spectrum = nn.ParameterDict()
        self.positions: dict[str, torch.Tensor] = {}  # flat positions; rebuilt from the seed, never saved

    def _forget(self, name: str) -> None:
        super()._forget(name)
        self.positions.pop(name, None)

    def add(self, name: str, config: FourierFTConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        n = size_for(config.n_frequency_pattern, key, config.n_frequency)
        if n > in_features * out_features:
            raise ValueError(f"FourierFTConfig.n_frequency ({n}) exceeds the {out_features}x{in_features} "
                             f"= {in_features * out_features} spectrum entries of {key!r}")
        self.positions[name] = spectrum_positions(out_features, in_features, n, config.random_loc_seed)
        self.scaling[name] = float(config.scaling)
        # PEFT's default (init_weights=False) starts from N(0, 1) coefficients: not a no-op
        values = torch.zeros(n) if config.init_weights or from_file else torch.randn(n)
        self.fourierft_spectrum[name] = nn.Parameter(values)
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"fourierft_spectrum": self.fourierft_spectrum[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        spectrum = self.fourierft_spectrum[name]
        in_features, out_features = self.in_out
        positions = self.positions[name].to(spectrum.device)
        # the inverse FFT runs in float32: half precision FFTs are missing or limited on most devices
        dense = torch.zeros(out_features * in_features, device=spectrum.device)
        dense = dense.index_put((positions,), spectrum.float()).view(out_features, in_features)
        return (torch.fft.ifft2(dense).real * self.scaling[name]).to(spectrum.dtype)


register_method("FOURIERFT", LayerMethod(FourierFTLinear, bias_only="fourier_only"))

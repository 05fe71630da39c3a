"""WaveFT layers: a weight update learned as a few coefficients of its 2-D wavelet transform.

Each layer holds ``n`` learned coefficients (``waveft_spectrum``) at fixed positions of an
(out, in) grid: the first ``n`` entries of a permutation of the out·in positions drawn from
``random_loc_seed`` on a CPU generator (PEFT's draw, so files hold only the coefficients).
With ``use_idwt`` the grid is padded by the wavelet's size loss (``L - 2`` per axis, rounded up
to even; positions shifted by half the padding), read as the four quadrant bands
(approximation, horizontal, vertical, diagonal) of one DWT level, inverted, and the centre
(out, in) cut out; ``ΔW = that · scaling``. Without it the grid itself is ``ΔW / scaling``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...config import WaveFTConfig
from ...targeting import find_targets
from ..linear_base import WeightDeltaLayer
from ..method import LayerMethod, register_method
from ..shared import linear_in_out
from .common import size_for
from .fourierft import spectrum_positions
from .wavelets import inverse_dwt2


class WaveFTLinear(WeightDeltaLayer):
    """WaveFT around a linear-like layer; the update is formed densely, then applied as a matmul."""

    adapter_dict_names = ("waveft_spectrum",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)  # GPT-2's Conv1D is recognised as transposed by its type
        self.waveft_spectrum = nn.ParameterDict()
        self.positions: dict[str, torch.Tensor] = {}  # flat positions; rebuilt from the seed, never saved
        self.family: dict[str, str] = {}
        self.use_idwt: dict[str, bool] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for holder in (self.positions, self.family, self.use_idwt):
            holder.pop(name, None)

    def add(self, name: str, config: WaveFTConfig, key: str, from_file: bool = False) -> None:
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        n = size_for(config.n_frequency_pattern or {}, key, config.n_frequency)
        if n > in_features * out_features:
            raise ValueError(f"WaveFTConfig.n_frequency ({n}) exceeds the {out_features}x{in_features} "
                             f"= {in_features * out_features} weight entries of {key!r}")
        self.positions[name] = spectrum_positions(out_features, in_features, n, config.random_loc_seed)
        self.family[name] = config.wavelet_family
        self.use_idwt[name] = config.use_idwt
        self.scaling[name] = float(config.scaling)
        values = torch.zeros(n) if config.init_weights or from_file else torch.randn(n) * 0.01
        self.waveft_spectrum[name] = nn.Parameter(values)
        self.match_device(name)

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"waveft_spectrum": self.waveft_spectrum[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        spectrum = self.waveft_spectrum[name]
        in_features, out_features = self.in_out
        positions = self.positions[name].to(spectrum.device)
        rows, cols = positions // in_features, positions % in_features
        if not self.use_idwt[name]:
            dense = spectrum.new_zeros(out_features, in_features).index_put((rows, cols), spectrum)
            return dense * self.scaling[name]
        taps = 2 * int(self.family[name][2:])  # dbN has 2N taps; one level loses L - 2 rows and columns
        height, width = out_features + taps - 2, in_features + taps - 2
        height, width = height + height % 2, width + width % 2  # the bands need an even grid
        top, left = (height - out_features) // 2, (width - in_features) // 2
        grid = spectrum.new_zeros(height, width).index_put((rows + top, cols + left), spectrum)
        h, w = height // 2, width // 2
        full = inverse_dwt2(grid[:h, :w], grid[:h, w:], grid[h:, :w], grid[h:, w:], self.family[name])
        full = full * self.scaling[name]
        top, left = (full.shape[0] - out_features) // 2, (full.shape[1] - in_features) // 2
        return full[top:top + out_features, left:left + in_features]


class WaveFTMethod(LayerMethod):
    """WaveFT layers; ``proportional_parameters`` sizes each layer before they are made."""

    def __init__(self) -> None:
        super().__init__(WaveFTLinear, bias_only="waveft_only")

    def inject(self, model: nn.Module, config: WaveFTConfig, name: str, from_file: bool) -> None:
        if config.proportional_parameters:
            config = dataclasses.replace(config, n_frequency_pattern=proportional_sizes(model, config))
        super().inject(model, config, name, from_file)


def proportional_sizes(model: nn.Module, config: WaveFTConfig) -> dict[str, int]:
    """Full module name -> ``n_frequency``: the budget ``n_frequency`` × (number of targeted
    layers) shared in proportion to each layer's out·in, at least one each (PEFT's rule)."""
    sizes = []
    for key, module in find_targets(model, config):
        in_features, out_features = linear_in_out(getattr(module, "base_layer", module))
        sizes.append((key, in_features * out_features))
    if not sizes:
        raise ValueError(f"WaveFTConfig.proportional_parameters: target_modules={config.target_modules!r} matched "
                         "no linear layer")
    total, budget = sum(s for _, s in sizes), config.n_frequency * len(sizes)
    return {key: max(1, round(size / total * budget)) for key, size in sizes}


register_method("WAVEFT", WaveFTMethod())

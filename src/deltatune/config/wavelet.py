"""Config of WaveFT (wavelet fine-tuning): PEFT's class name, field names, defaults and ``peft_type``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (the fields' hints are resolved here)

from .base import TargetedConfig, check_positive_int, register_config
from .structured import GPT2_MLP_TARGETS, _check_bias, _check_layers, _check_pattern

# Daubechies orders deltatune derives filters for (db1 is the Haar wavelet), PEFT's names. PEFT
# also names Symlets and Coiflets (tabulated filters, not derived here): deltatune refuses them.
DAUBECHIES_ORDERS = range(1, 11)
WAVELET_FAMILIES = tuple(f"db{n}" for n in DAUBECHIES_ORDERS)


@register_config
@dataclass
class WaveFTConfig(TargetedConfig):
    """WaveFT: each layer learns ``n_frequency`` coefficients of its update's 2-D wavelet
    transform, at positions drawn from ``random_loc_seed``; ``ΔW = IDWT2(coefficients) · scaling``
    (one level, ``wavelet_family``), or with ``use_idwt=False`` the coefficients placed directly.

    ``n_frequency_pattern`` sets ``n_frequency`` per module; ``proportional_parameters`` shares
    ``n_frequency`` × (number of layers) among the layers in proportion to their sizes.
    ``init_weights``: True starts at zero (a no-op), False draws N(0, 0.01²). ``fan_in_fan_out``
    is kept for the file; the layer's type decides the layout (as in PEFT).
    """

    peft_type: ClassVar[str] = "WAVEFT"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = GPT2_MLP_TARGETS
    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: Optional[dict] = field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("WaveFTConfig", "n_frequency", self.n_frequency)
        if self.wavelet_family not in WAVELET_FAMILIES:
            raise ValueError(f"WaveFTConfig.wavelet_family {self.wavelet_family!r} is not supported by deltatune; "
                             f"supported: {', '.join(WAVELET_FAMILIES)} (Symlets and Coiflets are not)")
        _check_pattern("WaveFTConfig", "n_frequency_pattern", self.n_frequency_pattern or {})
        _check_bias("WaveFTConfig", self.bias, "waveft_only")
        _check_layers("WaveFTConfig", self)

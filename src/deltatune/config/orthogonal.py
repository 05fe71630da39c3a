"""Configs of the orthogonal family: OFT, BOFT, HRA and PSOFT, with PEFT's (0.21.2) class names, fields,
defaults and ``peft_type`` strings. OFT, BOFT and HRA multiply a layer's input by a learned
orthogonal (or nearly orthogonal) matrix, so a layer's weight ``W`` becomes ``W Mᵀ``; PSOFT
rotates within the span of the weight's top singular vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (Any: the base fields' hints resolve here)

from .base import TargetedConfig, check_positive_int, check_probability, register_config


def _check_common(owner: str, config: TargetedConfig, bias_only: str) -> None:
    if config.bias not in ("none", "all", bias_only):
        raise ValueError(f"{owner}.bias must be 'none', 'all' or {bias_only!r}, got {config.bias!r}")
    if not isinstance(config.init_weights, bool):
        raise ValueError(f"{owner}.init_weights must be true or false, got {config.init_weights!r}")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")


def _check_non_negative_int(owner: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{owner}.{name} must be a non-negative integer, got {value!r}")


def _check_one_of(owner: str, first: str, second: str, config) -> None:
    """PEFT's rule: exactly one of two sizes is given (non-zero); the layer's width gives the other."""
    a, b = getattr(config, first), getattr(config, second)
    _check_non_negative_int(owner, first, a)
    _check_non_negative_int(owner, second, b)
    if (a == 0) == (b == 0):
        raise ValueError(f"{owner}: set exactly one of {first} ({a}) and {second} ({b}) to a positive value and "
                         f"the other to 0 ({first} × {second} = the layer's input width)")


MAX_NEUMANN_TERMS = 1000


@register_config
@dataclass
class OFTConfig(TargetedConfig):
    """OFT (orthogonal fine-tuning): the input of each targeted layer is multiplied by a
    block-diagonal orthogonal matrix, ``r`` blocks of ``oft_block_size`` (give one of the two,
    the other 0). Each block is the Cayley map of a learned skew-symmetric matrix, exact or as a
    ``num_cayley_neumann_terms``-term Neumann series (``use_cayley_neumann``, the default).
    ``block_share``: one block for the whole layer. ``coft``: constrained OFT, each block's skew
    matrix kept within norm ``eps``. ``module_dropout``: during training that fraction of the
    blocks is set to the identity for a step (as PEFT documents it; PEFT 0.21.2 builds this dropout
    for linear layers but never calls it). A new adapter is the identity (no change)."""

    peft_type: ClassVar[str] = "OFT"
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        _check_one_of("OFTConfig", "r", "oft_block_size", self)
        check_probability("OFTConfig", "module_dropout", self.module_dropout)
        check_positive_int("OFTConfig", "num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        if self.num_cayley_neumann_terms > MAX_NEUMANN_TERMS:  # each term is a matrix product per step
            raise ValueError(f"OFTConfig.num_cayley_neumann_terms must be at most {MAX_NEUMANN_TERMS}, got "
                             f"{self.num_cayley_neumann_terms} (the series has long converged; use "
                             "use_cayley_neumann=false for the exact map)")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 <= self.eps < float("inf"):
            raise ValueError(f"OFTConfig.eps must be a non-negative number, got {self.eps!r}")
        _check_common("OFTConfig", self, "oft_only")


@register_config
@dataclass
class BOFTConfig(TargetedConfig):
    """BOFT (butterfly orthogonal fine-tuning): the input is multiplied by a product of
    ``boft_n_butterfly_factor`` block-diagonal orthogonal matrices, each conjugated by a
    butterfly permutation, so a few small blocks mix all features; the outputs are then
    scaled by a learned vector ``boft_s``. Give ``boft_block_size`` or ``boft_block_num`` (the
    other 0). Blocks are exact Cayley maps of learned matrices. ``boft_dropout``: during
    training that fraction of one factor's blocks is set to the identity for a step."""

    peft_type: ClassVar[str] = "BOFT"
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        _check_one_of("BOFTConfig", "boft_block_size", "boft_block_num", self)
        check_positive_int("BOFTConfig", "boft_n_butterfly_factor", self.boft_n_butterfly_factor)
        check_probability("BOFTConfig", "boft_dropout", self.boft_dropout)
        _check_common("BOFTConfig", self, "boft_only")


@register_config
@dataclass
class HRAConfig(TargetedConfig):
    """HRA (Householder reflection adaptation): the input is multiplied by the product of ``r``
    Householder reflections ``I - 2uuᵀ`` with learned vectors ``u`` (one (in, r) matrix per
    layer); ``apply_GS`` orthonormalises the vectors first (Gram-Schmidt), making the map one
    reflection ``I - 2UUᵀ``. With ``init_weights`` and an even ``r`` the vectors start in equal
    pairs, so a new adapter is the identity up to rounding."""

    peft_type: ClassVar[str] = "HRA"
    r: int = 8
    apply_GS: bool = False
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    bias: str = "none"

    def validate(self) -> None:
        check_positive_int("HRAConfig", "r", self.r)
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError("HRAConfig.layers_to_transform/layers_pattern cannot be used when target_modules is a "
                             "regular expression (PEFT's rule); put the layers into the expression")
        _check_common("HRAConfig", self, "hra_only")


@register_config
@dataclass
class PsoftConfig(TargetedConfig):
    """PSOFT (orthogonal fine-tuning in a principal subspace): each targeted linear layer keeps the
    rank-``r`` SVD of its weight as frozen factors ``A`` (r, in) and ``B`` (out, r), recomputed
    from the base weight (files hold neither), and trains an r×r matrix ``R`` between them:
    ``ΔW = (psoft_alpha / r) · B (R − I) A``. ``psoft_orth``: ``R`` is the Cayley map of a learned
    skew-symmetric matrix (exact, or a ``num_cayley_neumann_terms``-term Neumann series with
    ``use_cayley_neumann``, its generator optionally clipped to Frobenius norm
    ``cayley_neumann_eps``); otherwise ``R`` is a free matrix. ``psoft_mag_b``/``psoft_mag_a``:
    trained vectors scale ``R``'s rows/columns. ``ab_svd_init``: ``"psoft_init"`` (``A`` the top
    right singular vectors, ``B`` the left ones times the singular values over the scale) or
    ``"pissa_init"`` (the square roots of those on both sides). ``psoft_svd``: ``"full"`` or
    ``"lowrank"`` (a randomised SVD, ``psoft_svd_lowrank_niter`` power steps, seeded by
    ``random_seed``). A new adapter is a no-op (``R = I``)."""

    peft_type: ClassVar[str] = "PSOFT"
    r: int = 32
    psoft_alpha: int = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: Optional[float] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        owner = "PsoftConfig"
        check_positive_int(owner, "r", self.r)
        if not isinstance(self.psoft_alpha, (int, float)) or isinstance(self.psoft_alpha, bool) \
                or not math.isfinite(self.psoft_alpha) or self.psoft_alpha == 0:
            raise ValueError(f"{owner}.psoft_alpha must be a non-zero number (the scale is psoft_alpha / r, and the "
                             f"frozen B is divided by it), got {self.psoft_alpha!r}")
        check_probability(owner, "psoft_dropout", self.psoft_dropout)
        if self.ab_svd_init not in ("psoft_init", "pissa_init"):
            raise ValueError(f"{owner}.ab_svd_init must be 'psoft_init' or 'pissa_init', got {self.ab_svd_init!r}")
        if self.psoft_svd not in ("full", "lowrank"):
            raise ValueError(f"{owner}.psoft_svd must be 'full' or 'lowrank', got {self.psoft_svd!r}")
        check_positive_int(owner, "psoft_svd_lowrank_niter", self.psoft_svd_lowrank_niter)
        if not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool) \
                or not -2 ** 63 <= self.random_seed < 2 ** 64:  # torch.manual_seed's range
            raise ValueError(f"{owner}.random_seed must be an integer seed, got {self.random_seed!r}")
        for name in ("psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")
        check_positive_int(owner, "num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        if self.num_cayley_neumann_terms > MAX_NEUMANN_TERMS:  # each term is a matrix product per step
            raise ValueError(f"{owner}.num_cayley_neumann_terms must be at most {MAX_NEUMANN_TERMS}, got "
                             f"{self.num_cayley_neumann_terms} (use use_cayley_neumann=false for the exact map)")
        eps = self.cayley_neumann_eps
        if eps is not None and (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0.0 < eps < 1.0):
            raise ValueError(f"{owner}.cayley_neumann_eps must be None or in (0, 1), got {eps!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"{owner}.init_weights must be true or false, got {self.init_weights!r}")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(f"{owner}.layers_to_transform/layers_pattern cannot be used when target_modules is a "
                             "regular expression (PEFT's rule); put the layers into the expression")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")

"""Daubechies wavelet filters, derived rather than tabulated, and a one-level inverse 2-D DWT.

The order-N Daubechies low-pass filter is the minimum-phase spectral factor of
``|H(ω)|² ∝ cos²ᴺ(ω/2) · P(sin²(ω/2))`` with ``P(y) = Σ_{k<N} C(N-1+k, k) yᵏ``: its zeros are N at
``z = -1`` plus, for each root ``y`` of ``P``, the root inside the unit circle of
``z + 1/z = 2 - 4y``. The coefficients are formed in float64 and scaled to sum to √2 (the
normalisation and coefficient order PyWavelets uses, which PEFT's WaveFT follows).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def _poly_from_roots(roots: list[complex]) -> torch.Tensor:
    """Coefficients (constant term first) of ``Π (z - r)``, complex128."""
    coeffs = torch.ones(1, dtype=torch.complex128)
    for r in roots:
        shifted = torch.cat([torch.zeros(1, dtype=torch.complex128), coeffs])  # z · poly
        coeffs = shifted - r * torch.cat([coeffs, torch.zeros(1, dtype=torch.complex128)])
    return coeffs


def _poly_roots(coeffs: list[float]) -> list[complex]:
    """Roots of ``Σ coeffs[k] yᵏ`` (eigenvalues of the companion matrix)."""
    degree = len(coeffs) - 1
    if degree == 0:
        return []
    lead = coeffs[-1]
    companion = torch.zeros(degree, degree, dtype=torch.float64)
    companion[1:, :-1] = torch.eye(degree - 1, dtype=torch.float64)
    companion[:, -1] = -torch.tensor(coeffs[:-1], dtype=torch.float64) / lead
    return [complex(v) for v in torch.linalg.eigvals(companion)]


@lru_cache(maxsize=None)
def daubechies_lowpass(order: int) -> tuple[float, ...]:
    """The reconstruction low-pass filter (``rec_lo``) of ``db{order}``, 2·order taps."""
    if order < 1:
        raise ValueError(f"Daubechies order must be at least 1, got {order}")
    p = [float(math.comb(order - 1 + k, k)) for k in range(order)]
    zeros: list[complex] = [-1.0] * order
    for y in _poly_roots(p):
        b = 2 - 4 * y  # z² - b z + 1 = 0
        root = (b + (b * b - 4) ** 0.5) / 2
        zeros.append(root if abs(root) < 1 else 1 / root)
    coeffs = _poly_from_roots(zeros).real
    coeffs = coeffs * (math.sqrt(2) / coeffs.sum())
    # H(z) = Σ h_k z^-k: the polynomial in z lists h from the highest power down
    return tuple(float(c) for c in coeffs.flip(0))


def reconstruction_filters(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(low-pass, high-pass) reconstruction filters of ``family`` (``db1`` … ``db10``)."""
    if not family.startswith("db") or not family[2:].isdigit():
        raise ValueError(f"wavelet family {family!r}: only Daubechies wavelets (dbN) are derived here")
    low = daubechies_lowpass(int(family[2:]))
    # quadrature mirror: high[k] = (-1)^k · low[L-1-k]
    high = tuple(((-1) ** k) * low[len(low) - 1 - k] for k in range(len(low)))
    return low, high


def inverse_dwt2(approx: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor, diagonal: torch.Tensor,
                 family: str) -> torch.Tensor:
    """One level of the inverse 2-D DWT of four equal (h, w) bands; the result is
    (2h + L - 2 - 2p, 2w + L - 2 - 2p) with L taps and p = (2L - 3) // 2 cropped per side."""
    low, high = reconstruction_filters(family)
    lo = torch.tensor(low, dtype=approx.dtype, device=approx.device)
    hi = torch.tensor(high, dtype=approx.dtype, device=approx.device)
    # one 2-D kernel per band: rows filtered by the first factor, columns by the second
    kernels = torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)])
    bands = torch.stack([approx, horizontal, vertical, diagonal]).unsqueeze(0)  # (1, 4, h, w)
    out = torch.nn.functional.conv_transpose2d(bands, kernels.unsqueeze(1), stride=2)[0, 0]
    crop = (2 * len(low) - 3) // 2
    if crop > 0:
        out = out[crop:-crop, crop:-crop]
    return out

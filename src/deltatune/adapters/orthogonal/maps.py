"""The numeric pieces of the orthogonal family, in plain PyTorch: skew-symmetric matrices from
their packed upper triangles, the Cayley map (exact and as a truncated Neumann series),
block-diagonal rotations applied to the last dimension of an input without forming the full
matrix, block dropout, and products of Householder reflections.

Every map here acts on *row vectors*: ``x ↦ x @ M`` for the matrix ``M`` the function
describes, which is how the layers apply them to inputs of shape (..., features).
"""

from __future__ import annotations

from typing import Optional

import torch


def skew_from_upper(packed: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size·(size-1)/2) packed upper triangles (row-major, diagonal excluded) -> (n, size, size)
    skew-symmetric matrices ``U - Uᵀ``."""
    rows, cols = torch.triu_indices(size, size, 1, device=packed.device)
    upper = packed.new_zeros(packed.shape[0], size, size)
    upper[:, rows, cols] = packed
    return upper - upper.transpose(-2, -1)


def upper_from_skew(skew: torch.Tensor) -> torch.Tensor:
    """The inverse of ``skew_from_upper``: the packed strict upper triangles."""
    size = skew.shape[-1]
    rows, cols = torch.triu_indices(size, size, 1, device=skew.device)
    return skew[:, rows, cols]


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exact Cayley map of a batch of skew-symmetric matrices: ``(I - S)(I + S)⁻¹`` (orthogonal)."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """The Cayley map with its inverse replaced by a Neumann series, as PEFT (>= 0.18) defines it:
    ``I + 2S + 2S² + … + 2Sᵏ⁻¹ + Sᵏ`` with ``k = max(3, terms - 1)`` for ``terms > 2``;
    ``I + 2S`` for two terms and ``I`` for one. Only matrix products, so it is cheap and smooth;
    the result is orthogonal up to the truncation error."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    if terms <= 1:
        return eye.clone()
    result = eye + 2.0 * skew
    if terms == 2:
        return result
    last = max(3, terms - 1)
    power = skew
    for _ in range(2, last):
        power = power @ skew
        result = result + 2.0 * power
    return result + power @ skew


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ block_diag(*blocks)`` for ``x`` (..., n·b) and ``blocks`` (n, b, b), block by block
    (``n·b²`` multiply-adds per row instead of ``(n·b)²``). One block (n = 1) is shared by all
    groups of b features."""
    size = blocks.shape[-1]
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    if blocks.shape[0] == 1:
        rotated = grouped @ blocks[0]
    else:
        rotated = torch.einsum("...nk,nkc->...nc", grouped, blocks)
    return rotated.reshape(x.shape)


def identity_blocks(blocks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``blocks`` (n, b, b) with the blocks where ``keep`` (n,) is False replaced by the identity."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    mask = keep.to(blocks.dtype).view(-1, 1, 1)
    return mask * blocks + (1 - mask) * eye


def dropped_blocks_mask(count: int, p: float, device: torch.device) -> torch.Tensor:
    """Multiplicative dropout of OFT/BOFT: exactly ``int(p·count)`` of ``count`` blocks, chosen at
    random, become the identity for this step. Returns the blocks to keep (bool, (count,))."""
    dropped = int(p * count)
    keep = torch.ones(count, dtype=torch.bool, device=device)
    if dropped:
        keep[torch.randperm(count, device=device)[:dropped]] = False
    return keep


def clip_skew_norm(packed: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT's constraint: each block's skew matrix keeps Frobenius norm at most
    ``eps / sqrt(number of blocks)``; larger ones are scaled down to it. Packed in, packed out."""
    skew = skew_from_upper(packed, size)
    limit = eps / (packed.shape[0] ** 0.5)
    norm = torch.linalg.matrix_norm(skew).view(-1, 1, 1)
    clipped = torch.where(norm <= limit, skew, limit * skew / norm)
    return upper_from_skew(clipped)


def householder_product(x: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``x @ (H_{r-1} ⋯ H_1 H_0)`` with ``H_i = I - 2 u_i u_iᵀ`` for the unit columns ``u_i`` of
    ``vectors`` (features, r): reflections applied one by one, last column first
    (``2r`` multiply-adds per feature instead of a (features, features) matrix)."""
    for i in range(vectors.shape[1] - 1, -1, -1):
        u = vectors[:, i]
        x = x - 2.0 * (x @ u).unsqueeze(-1) * u
    return x


def gram_schmidt(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``vectors`` (features, r), column by column (modified
    Gram-Schmidt, in PEFT's order, so a file gives PEFT's reflection)."""
    basis: list[torch.Tensor] = []
    for i in range(vectors.shape[1]):
        u = vectors[:, i]
        for q in basis:
            u = u - (q @ u) * q
        basis.append(u / u.norm())
    return torch.stack(basis, dim=1)


def permute_features(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[..., index]`` (``None``: unchanged)."""
    return x if index is None else x.index_select(-1, index)

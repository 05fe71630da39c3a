"""FRoD's frozen parts, computed from the base weights: the basis ``V`` each module role shares,
the positions of the sparse ``S``, and each layer's ``U`` and starting ``λ``.

Everything here follows PEFT 0.21.2's calls, in its order and dtypes (float32 on the CPU for the
bases, float64 for ``U``/``λ``, one CPU generator drawn role after role in sorted order), so the
same base weights give PEFT's tensors bit for bit on the same machine.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def role_of(key: str) -> str:
    """The role a module plays in its block, from its dotted name: the last two parts joined by
    ``_`` (``model.layers.0.self_attn.q_proj`` -> ``self_attn_q_proj``, ``transformer.h.0.mlp.c_fc``
    -> ``mlp_c_fc``), the last part alone right after a number (``blocks.3.fc`` -> ``fc``), and
    BERT's ``attention.output.dense`` -> ``attention_output`` (apart from the MLP's
    ``output.dense``). Modules of one role share a basis."""
    parts = key.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    role = f"{parts[-2]}_{parts[-1]}"
    if role == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return role


def block_of(key: str, fallback: int) -> int:
    """The block a module sits in: the number after ``layers``, else the first number in the
    name, else ``fallback`` (the module's position among the targets)."""
    parts = key.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    for part in parts:
        if part.isdigit():
            return int(part)
    return fallback


def weights_by_role(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Role -> the (out, in) weights its basis is computed from, in block order.

    ``weights``: (module name, weight) of every target in module order. Two targets of one role
    in the same block (an encoder's and a decoder's block 0) keep the later one only, as PEFT's
    table does; the basis still serves both."""
    table: dict[int, dict[str, torch.Tensor]] = {}
    for position, (key, weight) in enumerate(weights):
        table.setdefault(block_of(key, position), {})[role_of(key)] = weight
    roles = sorted({role for row in table.values() for role in row})
    return {role: [row[role] for _, row in sorted(table.items()) if role in row] for role in roles}


def shared_basis(weights: Sequence[torch.Tensor], ridge: float) -> torch.Tensor:
    """The role's basis ``V`` (in, in), float32 on the CPU.

    The weights are stacked (rows: every layer's outputs). Wider than tall: the right singular
    vectors. Otherwise ``stacked = Q R``; each layer's slice ``Qᵢ`` of ``Q`` gives
    ``(QᵢᵀQᵢ + ridge·I)⁻¹``; their mean's eigenvectors ``E`` give ``V = Rᵀ E``."""
    matrices = [w.detach().to(torch.float32).cpu() for w in weights]
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        _, _, vh = torch.linalg.svd(stacked, full_matrices=True)
        return vh.T
    q, r = torch.linalg.qr(stacked)
    width = r.shape[1]
    mean_inverse = torch.zeros((width, width), dtype=r.dtype)
    start = 0
    for matrix in matrices:
        part = q[start:start + matrix.shape[0], :]
        start += matrix.shape[0]
        mean_inverse += torch.linalg.inv(part.T @ part + ridge * torch.eye(width, dtype=r.dtype))
    mean_inverse /= len(matrices)
    _, vectors = torch.linalg.eigh(mean_inverse)
    return r.T @ vectors


def sparse_count(width: int, sparse_rate: float) -> int:
    """How many of S's (width × width) entries train: ``sparse_rate`` of all of them, at most the
    off-diagonal ones, at least one when the rate is positive and there is one to take."""
    off_diagonal = width * width - width
    count = min(int(width * width * sparse_rate), off_diagonal)
    if sparse_rate > 0 and off_diagonal > 0:
        count = max(1, count)
    return count


def sparse_positions(width: int, sparse_rate: float, generator: torch.Generator) -> torch.Tensor:
    """S's trained positions, (2, count) int64 (rows, columns): a random draw (``generator``)
    among the off-diagonal entries, numbered row by row; the draw is PEFT's ``randperm``."""
    count = sparse_count(width, sparse_rate)
    if count == 0:
        return torch.empty(2, 0, dtype=torch.long)
    picked = torch.randperm(width * width - width, generator=generator)[:count]
    # the k-th off-diagonal entry of a row-major walk, without listing all width² pairs
    rows = torch.div(picked, width - 1, rounding_mode="floor")
    cols = picked - rows * (width - 1)
    cols = cols + (cols >= rows).long()
    return torch.stack([rows, cols]).contiguous()


def role_projections(weights: Iterable[tuple[str, torch.Tensor]], ridge: float, sparse_rate: float,
                     seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Role -> (V float32 (in, in), S's positions (2, count)) for the targets' (name, (out, in)
    weight) pairs; one generator seeded with ``seed`` draws the positions role after role in
    sorted order."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for role, matrices in weights_by_role(weights).items():
        basis = shared_basis(matrices, ridge)
        out[role] = (basis, sparse_positions(basis.shape[0], sparse_rate, generator))
    return out


def factor_weight(basis: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, in) float32, λ (in,) float32) with ``weight = U diag(λ) Vᵀ``: ``B = W V⁻ᵀ`` is
    solved in float64 on the CPU (a pseudo-inverse if ``V`` is singular); ``λ`` holds ``B``'s
    column norms and ``U`` its columns scaled to unit length (zero columns stay zero)."""
    w = weight.detach().to(torch.float64).cpu()
    v = basis.detach().to(torch.float64).cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:  # torch.linalg.LinAlgError: V is singular
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(b, dim=0)
    unit = torch.zeros_like(b)
    kept = norms > 1e-12
    unit[:, kept] = b[:, kept] / norms[kept]
    return unit.float(), norms.float()

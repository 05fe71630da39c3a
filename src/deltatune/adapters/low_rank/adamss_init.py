"""AdaMSS's start: a seeded low-rank SVD of the weight, k-means on its left singular vectors, and
each cluster's trained factors.

PEFT's AdaMSS files do not carry which output rows form which subspace: every load recomputes the
clustering from the base weight, so the clustering here must give PEFT's labels on the same weight.
PEFT runs scikit-learn's ``KMeans(init="random", n_init=1, max_iter=10, random_state=123456789)``
on float32 data; ``kmeans_labels`` is that algorithm (Lloyd's iterations, scikit-learn's random
start, tolerance, empty-cluster relocation and final relabelling) written with NumPy, which
deltatune already depends on, so scikit-learn stays out of deltatune's run-time dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

KMEANS_SEED = 123456789  # PEFT's fixed random_state
KMEANS_ITERATIONS = 10  # PEFT's max_iter
KMEANS_TOL = 1e-4  # scikit-learn's default tol


def _assign(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The nearest center of each row (scikit-learn's E-step: ‖c‖² − 2 x·c, the first of ties)."""
    center_norms = np.einsum("ij,ij->i", centers, centers)
    distances = center_norms[None, :] + np.float32(-2.0) * (X @ centers.T)
    return np.argmin(distances, axis=1).astype(np.int32)


def kmeans_labels(points: np.ndarray, clusters: int, max_iter: int = KMEANS_ITERATIONS,
                  seed: int = KMEANS_SEED) -> np.ndarray:
    """Cluster labels of ``points`` (n, d) with scikit-learn's ``KMeans(init="random", n_init=1)``
    algorithm in float32: the data centered on its mean, ``clusters`` distinct rows drawn as the
    first centers by ``RandomState(seed)``, Lloyd's steps until the labels stop changing or the
    centers move less than ``1e-4`` × the mean feature variance, and a last labelling against the
    final centers when the labels never settled."""
    X = np.array(points, dtype=np.float32, order="C", copy=True)
    n = X.shape[0]
    tol = np.mean(np.var(X, axis=0)) * KMEANS_TOL
    X -= X.mean(axis=0)
    weights = np.ones(n, dtype=np.float32)
    rng = np.random.RandomState(seed)
    centers = X[rng.choice(n, size=clusters, replace=False, p=weights / weights.sum())]
    labels_old = np.full(n, -1, dtype=np.int32)
    settled = False
    for _ in range(max_iter):
        labels = _assign(X, centers)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, X)  # row by row, in order
        counts = np.bincount(labels, minlength=clusters).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if empty.size:  # scikit-learn moves each empty cluster onto a point far from its center
            far = ((X - centers[labels]) ** 2).sum(axis=1)
            farthest = np.argpartition(far, -empty.size)[:-empty.size - 1:-1]
            for cluster, row in zip(empty, farthest):
                sums[labels[row]] -= X[row]
                sums[cluster] = X[row]
                counts[cluster] = 1.0
                counts[labels[row]] -= 1.0
        filled = counts > 0
        new_centers = sums.copy()
        new_centers[filled] *= (np.float32(1.0) / counts[filled])[:, None]
        shift = np.sqrt(((new_centers - centers) ** 2).sum(axis=1))
        centers = new_centers
        if np.array_equal(labels, labels_old):
            settled = True
            break
        if (shift ** 2).sum() <= tol:
            break
        labels_old = labels
    if not settled:
        labels = _assign(X, centers)
    return labels


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (m, rank), Vᵀ (rank, n)) of float32 ``matrix`` by ``torch.svd_lowrank`` (2 power steps),
    its random projection drawn from a generator forked and seeded with ``seed`` (PEFT's call, so
    the same weight gives PEFT's bits; the caller's random state is left as it was)."""
    fork = {"devices": []} if matrix.device.type == "cpu" else {"devices": [matrix.device],
                                                                 "device_type": matrix.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(matrix, q=rank, niter=2, M=None)
    return U[:, :rank], V[:, :rank].T


@dataclass
class Subspaces:
    """One layer's decomposition: ``projection`` (R, in [+1]) = Vᵀ, the float32 left vectors
    ``left`` (out, R), ``rows`` (the output rows of each cluster, in label order) and ``order``
    (those rows concatenated: where the subspaces' outputs go)."""

    projection: torch.Tensor
    left: torch.Tensor
    rows: list[torch.Tensor]

    @property
    def order(self) -> torch.Tensor:
        return torch.cat(self.rows).long()


def decompose(weight: torch.Tensor, bias: Optional[torch.Tensor], r: int, num_subspaces: int,
              seed: int, where: str) -> Subspaces:
    """SVD of ``[W | b]`` (the bias as one more input column) at rank ``min(r, out, in [+1])``
    and k-means on its left singular vectors into ``min(num_subspaces, out)`` clusters."""
    full = weight if bias is None else torch.cat((weight, bias.unsqueeze(1)), dim=1)
    full = full.detach().to(torch.float32)
    rank = min(r, *full.shape)
    left, projection = seeded_svd(full, rank, seed)
    clusters = min(num_subspaces, full.shape[0])
    labels = torch.from_numpy(kmeans_labels(left.cpu().numpy(), clusters)).long()
    if int(labels.max()) + 1 != clusters or len(set(labels.tolist())) != clusters:
        raise ValueError(f"AdaMSS at {where!r}: k-means found fewer than {clusters} distinct subspaces "
                         "(duplicate rows in the weight?); lower AdamssConfig.num_subspaces")
    rows = [torch.where(labels == i)[0].to(left.device) for i in range(clusters)]
    return Subspaces(projection, left, rows)


def subspace_rank(data: torch.Tensor, fixed_rank: int, dynamic: bool, threshold: float) -> int:
    """A subspace's trained rank: ``min(rows, subspace_rank)``, or with ``use_dynamic_rank`` the
    number of singular values of its Gram matrix above ``threshold`` × the largest (a randomised
    SVD on the global generator, as PEFT's), capped at ``subspace_rank``; at least 1."""
    if not dynamic:
        return max(1, min(data.shape[0], fixed_rank))
    gram = data @ data.T
    _, values, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)
    count = int((values > threshold * values[0]).sum().item())
    return max(1, min(count, fixed_rank, len(values)))


def start_factors(data: torch.Tensor, rank: int) -> torch.Tensor:
    """The start of a subspace's ``A`` (rank, R): the orthonormal basis (QR) of ``dataᵀ u``, ``u``
    the top ``rank`` left vectors of the Gram matrix ``data dataᵀ`` by a randomised SVD that draws
    from the global generator (PEFT's draw, unseeded by the config: equal to PEFT's under the same
    ``torch.manual_seed``)."""
    gram = data @ data.T
    U, _, _ = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)
    Q, _ = torch.linalg.qr(data.T @ U[:, :rank], mode="reduced")
    return Q.T.contiguous()

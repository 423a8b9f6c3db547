"""Comparing neuron rankings: attribution agreement and the edit's key-space directions.

Pure maths on tensors (no model).  Used to report

* how well a cheap attribution (gradient × activation) ranks neurons like the causal indirect
  effect does: Spearman's ρ, Pearson's r and the top-k overlap;
* whether the neurons that matter at the edit layer are the ones an edit writes through: the
  top-k overlap between the largest |indirect effects| at (edit layer, last subject token) and
  the largest |coordinates| of ``u = C⁻¹k*`` (ROME's update direction, Meng et al. 2022 eq. 2)
  and of the gender vector's key-space preimage.

**Key-space preimage of a value-space vector** ``g`` through the output projection
``W (d_model × d_mlp)``: the minimum-norm least-squares solution ``k_g = W⁺ g`` (``W k_g`` is the
projection of ``g`` on ``W``'s column space; when ``W`` has full row rank ``W k_g = g`` exactly).
It is the smallest change of the key that would write ``g`` into the value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RankAgreement", "key_preimage", "rank_agreement", "spearman", "top_k_overlap"]


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), float64."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average tied ranks
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    if not denom > 0:
        raise ValueError("a ranking is constant; correlation is undefined.")
    return float((a @ b) / denom)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equally sized tensors (flattened)."""
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"need two tensors of the same size ≥ 2, got {a.numel()} and "
                         f"{b.numel()}.")
    return _pearson(_ranks(a), _ranks(b))


def top_k_overlap(a: Tensor, b: Tensor, k: int) -> float:
    """``|top_k(a) ∩ top_k(b)| / k`` by value (pass ``.abs()`` to rank by magnitude)."""
    a, b = a.flatten(), b.flatten()
    if a.numel() != b.numel():
        raise ValueError(f"sizes differ: {a.numel()} vs {b.numel()}.")
    if not 1 <= k <= a.numel():
        raise ValueError(f"k must be between 1 and {a.numel()}, got {k}.")
    top_a = set(torch.topk(a.double(), k).indices.tolist())
    top_b = set(torch.topk(b.double(), k).indices.tolist())
    return len(top_a & top_b) / k


@dataclass(frozen=True)
class RankAgreement:
    """Agreement of two scores over the same cells; ``chance`` is the top-k overlap of two
    independent random rankings, ``k / n``."""

    n: int
    spearman: float
    pearson: float
    k: int
    top_k_overlap: float
    top_k_overlap_abs: float

    @property
    def chance(self) -> float:
        return self.k / self.n

    def to_json(self) -> dict:
        return {"n": self.n, "spearman": self.spearman, "pearson": self.pearson, "k": self.k,
                "top_k_overlap": self.top_k_overlap,
                "top_k_overlap_abs": self.top_k_overlap_abs, "chance": self.chance}


def rank_agreement(a: Tensor, b: Tensor, k: int) -> RankAgreement:
    """Spearman ρ, Pearson r, and the top-k overlap by signed value and by magnitude."""
    k = min(k, a.numel())
    return RankAgreement(a.numel(), spearman(a, b), _pearson(a, b), k,
                         top_k_overlap(a, b, k), top_k_overlap(a.abs(), b.abs(), k))


def key_preimage(w_out: Tensor, g: Tensor, rcond: float = 1e-8) -> Tensor:
    """``W⁺ g``: the minimum-norm key change whose value change is closest to ``g``.

    ``w_out`` is ``(d_model, d_mlp)`` (``v = W k``), ``g`` is ``(d_model,)``.
    """
    if w_out.dim() != 2 or g.shape != (w_out.shape[0],):
        raise ValueError(f"W must be (d_model, d_mlp) and g (d_model,); got "
                         f"{tuple(w_out.shape)} and {tuple(g.shape)}.")
    return torch.linalg.pinv(w_out.double(), rtol=rcond) @ g.double()

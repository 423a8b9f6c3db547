"""Statistics that stop when they are good enough: ``C`` accumulated until ``u = C⁻¹k`` settles.

ROME uses the second moment ``C = E[k kᵀ]`` only through the update direction ``u = C⁻¹k*``
(Meng et al. 2022, Eq. 2), and an edit's effect on another key ``k`` is ``Λ(uᵀk)`` up to
normalisation: what matters is the *direction* of ``C⁻¹k`` for the keys that will be edited,
not every entry of ``C``.  The reference nevertheless runs a fixed 100,000 documents (about 36
GPU-hours of statistics for MEMIT on GPT-J); FastMEMIT (arXiv 2506.04226) reports that well
under 1% of the samples suffice.

Rule used here (:class:`Stability`): at ``first_check`` documents and every doubling after it
(``n_t = first_check · 2^t``), solve ``u_j = C_{n_t}⁻¹ k_j`` for a probe set of keys
``k_1 .. k_p`` and compare with the previous check,

    cos_t = min_j  ⟨u_j(n_t), u_j(n_t / 2)⟩_C / (‖u_j(n_t)‖_C ‖u_j(n_t / 2)‖_C),

and stop once ``cos_t ≥ min_cosine`` (default 0.999) at ``patience`` consecutive checks
(default 1): doubling the data no longer moves any probe's edit direction.  Checks at doublings
make the rule scale-free; at fixed increments the change between checks shrinks like 1/n
whether or not ``u`` has converged.

The inner product (``measure``) is by default the keys' own, ``⟨a, b⟩_C = aᵀ C_{n_t} b``
(``"key-weighted"``): ``(aᵀk)(bᵀk)`` averaged over the corpus keys, so the cosine is the
correlation, over the keys the layer actually sees, of how strongly the two updates respond
(an edit ``Λuᵀ`` moves a key ``k``'s output by ``Λ·uᵀk``).  It is what the edits produce.
Directions of ``u`` that the keys hardly visit matter least to the edits; the plain Euclidean
cosine (``"euclidean"``) weights them fully.  A check where ``C`` is still singular
(fewer tokens than its width) counts as unstable.  The probes should be the keys that will be
edited (e.g. the subjects' keys at the edit layer); without them, :func:`sample_probe_keys`
takes keys of the corpus's first batch.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from rome_edit.stats.inverse import InverseSecondMoment, SingularSecondMomentError

__all__ = ["Stability", "StabilityCheck", "StabilityMonitor", "sample_probe_keys"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Stability:
    """When a streaming ``C`` is good enough (see the module docstring)."""

    probe_keys: torch.Tensor | None = None  # (p, d_mlp); None: keys of the first batch
    n_corpus_probes: int = 64  # how many, when they come from the first batch
    min_cosine: float = 0.999
    first_check: int = 1000  # documents at the first check; then at every doubling
    patience: int = 1  # consecutive checks at or above min_cosine
    measure: Literal["key-weighted", "euclidean"] = "key-weighted"

    def __post_init__(self) -> None:
        if self.probe_keys is None:
            if self.n_corpus_probes < 1:
                raise ValueError(f"n_corpus_probes must be >= 1, got {self.n_corpus_probes}.")
        elif self.probe_keys.dim() != 2 or self.probe_keys.shape[0] < 1:
            raise ValueError(f"probe keys must be (p, d_mlp) with p >= 1, got "
                             f"{tuple(self.probe_keys.shape)}.")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1], got {self.min_cosine}.")
        if self.measure not in ("key-weighted", "euclidean"):
            raise ValueError(f"measure must be 'key-weighted' or 'euclidean', got "
                             f"{self.measure!r}.")
        if self.first_check < 1 or self.patience < 1:
            raise ValueError(f"first_check ({self.first_check}) and patience ({self.patience}) "
                             "must be at least 1.")

    def key(self) -> str:
        """What determines where the pass stops, for cache keys and provenance."""
        if self.probe_keys is None:
            probes = f"corpus{self.n_corpus_probes}"
        else:
            data = self.probe_keys.float().cpu().contiguous().numpy().tobytes()
            probes = f"{self.probe_keys.shape[0]}-{hashlib.sha256(data).hexdigest()[:12]}"
        return (f"until-stable:{self.measure}:cos{self.min_cosine:g}:first{self.first_check}x2:"
                f"patience{self.patience}:probes{probes}")


@dataclass(frozen=True)
class StabilityCheck:
    n_documents: int
    n_tokens: int
    min_cosine: float | None  # None: the first check, or C was singular
    mean_cosine: float | None


@dataclass
class StabilityMonitor:
    """Applies a :class:`Stability` rule to a growing ``C`` (mutable; one per pass)."""

    rule: Stability
    checks: list[StabilityCheck] = field(default_factory=list)
    probes: torch.Tensor | None = None
    _previous: torch.Tensor | None = None
    _streak: int = 0

    def __post_init__(self) -> None:
        if self.probes is None and self.rule.probe_keys is not None:
            self.probes = self.rule.probe_keys.float()

    def observe(self, keys: torch.Tensor) -> None:
        """Keys of a batch (rows = tokens); the first batch's supply corpus probes if needed."""
        if self.probes is None:
            self.probes = sample_probe_keys(keys, self.rule.n_corpus_probes)

    @property
    def stopped_at(self) -> StabilityCheck | None:
        """The check that met the rule, if one did."""
        return self.checks[-1] if self.checks and self._streak >= self.rule.patience else None

    def due(self, n_documents: int) -> bool:
        """Whether ``n_documents`` read call for a check (the first, or twice the last)."""
        last = self.checks[-1].n_documents if self.checks else 0
        return n_documents >= (2 * last if last else self.rule.first_check)

    def stable(self, matrix: torch.Tensor, n_documents: int, n_tokens: int) -> bool:
        """Record a check of ``matrix`` (the current ``C``); True once the rule is met."""
        if self.probes is None:
            raise ValueError("no probe keys: observe a batch of keys before the first check.")
        if self.probes.shape[-1] != matrix.shape[0]:
            raise ValueError(f"probe keys are {self.probes.shape[-1]} wide but C is "
                             f"{matrix.shape[0]}; take them at the same layer of the same model.")
        c = matrix.double()
        try:
            u = InverseSecondMoment.from_matrix(c).solve(self.probes.to(c.device).double())
        except SingularSecondMomentError:
            u = None
        u = None if u is None or not torch.isfinite(u).all() else u
        low = mean = None
        if u is not None and self._previous is not None:
            cos = self._cosine(u, self._previous.to(u.device), c)
            low, mean = cos.min().item(), cos.mean().item()
        self._previous = u
        self.checks.append(StabilityCheck(n_documents, n_tokens, low, mean))
        self._streak = self._streak + 1 if low is not None and low >= self.rule.min_cosine else 0
        log.info("C after %d documents (%d tokens): min cos(u) with the last check %s",
                 n_documents, n_tokens, "—" if low is None else f"{low:.6f}")
        return self._streak >= self.rule.patience


    def _cosine(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine of ``a`` and ``b`` in the rule's inner product (``C`` or plain)."""
        if self.rule.measure == "euclidean":
            return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        ca, cb = a @ c, b @ c  # C is symmetric
        return (ca * b).sum(-1) / ((ca * a).sum(-1) * (cb * b).sum(-1)).sqrt()


def sample_probe_keys(keys: torch.Tensor, n: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` rows of ``keys`` (token keys of a batch), drawn without replacement, seeded."""
    flat = keys.reshape(-1, keys.shape[-1]).float().cpu()
    gen = torch.Generator().manual_seed(seed)
    return flat[torch.randperm(flat.shape[0], generator=gen)[:n]].clone()

"""Neighbour-protecting rank-one updates (docs/method.md, "Protected keys").

ROME's paper form (Meng et al. 2022, Eq. 2) is the minimiser of ``tr(ΔW C ΔWᵀ)`` subject to
``ΔW k* = r`` with ``r = v* − (W k* + b)``:  ``ΔW = r uᵀ``, ``u = C⁻¹k* / (k*ᵀC⁻¹k*)``.  Every
key ``k`` then moves by ``r (uᵀk)``, and keys of other subjects that resemble ``k*`` (names
sharing its last token) move with it — the measured spill-over of ``vectors/spillover.json``.

Protected keys ``K_p = [k_1 … k_m]`` (other subjects' keys at the edit layer) are keys whose
output must not move.  Every form below still writes ``ΔW = r uᵀ`` with ``uᵀk* = 1``, so ``k*``
maps to ``v*`` exactly and the recorded delta ``v* − v_orig`` does not depend on the form:

* ``hard`` — add the constraints ``ΔW K_p = 0``.  With ``K = [k*, K_p]``:
  ``u = C⁻¹K (KᵀC⁻¹K)⁻¹ e₁`` (so ``uᵀk* = 1``, ``uᵀk_j = 0``).  Exact while ``m ≪ d_mlp``;
  ill-conditioned when protected keys are nearly collinear with ``k*`` (then it is refused).
* ``soft`` — MEMIT/EMMET's preservation term: minimise ``tr(ΔW C ΔWᵀ) + λ Σ_j ‖ΔW k_j‖²``
  subject to ``ΔW k* = r``: ``u = A⁻¹k* / (k*ᵀA⁻¹k*)`` with ``A = C + λ K_p K_pᵀ``.  ``C`` is a
  *mean* over corpus tokens, so ``λ`` (``weight``) weighs each protected key against the whole
  corpus taken as one average token: with a thousand protected keys a small ``λ`` already
  dominates ``C``, and a large one buys little more protection for much more change at other
  tokens (``uᵀCu``; measured in docs/beyond-rome.md — hence the default 0.01).  Solved with
  Woodbury's identity from ``C⁻¹`` solves only:
  ``A⁻¹k = C⁻¹k − C⁻¹K_p (I/λ + K_pᵀC⁻¹K_p)⁻¹ K_pᵀC⁻¹k``.
* ``null-space`` — AlphaEdit (Fang et al., ICLR 2025): ``Q`` spans the eigenvectors of
  ``K_p K_pᵀ`` whose eigenvalue is below ``threshold`` × the largest (AlphaEdit: 1e-2), and ``u``
  is restricted to ``span(Q)``: ``u = Q(QᵀCQ)⁻¹Qᵀk* / (k*ᵀQ(QᵀCQ)⁻¹Qᵀk*)``, so
  ``ΔW k_j = r (uᵀk_j) ≈ 0`` for every protected key.  With ``threshold → 0`` this is ``hard``.
* ``auto`` — ``hard`` while ``m ≤ d_mlp / 4``, ``soft`` beyond (hard constraints stop being
  satisfiable as ``m → d_mlp``).

All arithmetic is float64; results are float32 like the rest of an :class:`EditRecord`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from rome_edit.errors import ParameterError
from rome_edit.rome.solver import Solver

ProtectForm = Literal["auto", "hard", "soft", "null-space"]
PROTECT_FORMS: tuple[str, ...] = ("auto", "hard", "soft", "null-space")
HARD_LIMIT_FRACTION = 0.25  # auto: hard constraints while m ≤ this × d_mlp
MAX_CONDITION = 1e12  # of the hard form's Gram matrix KᵀC⁻¹K, beyond which it is refused

__all__ = ["PROTECT_FORMS", "ProtectForm", "ProtectSettings", "ProtectedDirections",
           "protected_direction", "second_moment_matrix"]


@dataclass(frozen=True)
class ProtectSettings:
    """Which form protects the keys, and its parameter (``weight`` for soft, ``threshold`` for
    null-space)."""

    form: ProtectForm = "auto"
    weight: float = 0.01
    threshold: float = 1e-2

    def __post_init__(self) -> None:
        if self.form not in PROTECT_FORMS:
            raise ValueError(f"unknown protection form {self.form!r}; use one of "
                             f"{list(PROTECT_FORMS)}.")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"protection weight must be a positive number, got {self.weight}.")
        if not (0 <= self.threshold < 1):
            raise ValueError(f"null-space threshold must be in [0, 1), got {self.threshold}.")

    def resolve(self, m: int, d_mlp: int) -> str:
        """The concrete form for ``m`` protected keys of width ``d_mlp``."""
        if self.form != "auto":
            return self.form
        return "hard" if m <= HARD_LIMIT_FRACTION * d_mlp else "soft"

    def to_dict(self) -> dict:
        return asdict(self)


def _c_inv(solver: Solver | None, keys: torch.Tensor) -> torch.Tensor:
    """``C⁻¹`` applied to rows (identity without statistics), float64."""
    keys = keys.double()
    return keys if solver is None else solver.solve(keys).double()


def second_moment_matrix(solver: Solver | None, d: int) -> torch.Tensor:
    """``C`` (with the solver's ridge) rebuilt from its factorisation, float64 — the null-space
    form needs ``QᵀCQ``, not only ``C⁻¹`` solves.  Identity without statistics."""
    if solver is None:
        return torch.eye(d, dtype=torch.float64)
    factor = getattr(solver, "factor", None)
    method = getattr(solver, "method", None)
    if method == "cholesky":
        f = factor.double().cpu()
        return f @ f.T
    if method == "lu":
        p, lower, upper = torch.lu_unpack(factor.double().cpu(), solver.pivots.cpu())
        return p @ lower @ upper
    c_inv = solver.solve(torch.eye(d, dtype=torch.float64)).double()  # any other solver
    return torch.linalg.inv((c_inv + c_inv.T) / 2)


def _normalise(u: torch.Tensor, k_star: torch.Tensor) -> torch.Tensor:
    denom = torch.dot(u, k_star.double())
    if not torch.isfinite(denom) or denom.abs() < 1e-300:
        raise ParameterError("the protected update cannot reach k* (uᵀk* = 0): k* lies in the "
                             "span of the protected keys; protect fewer names or use "
                             "ProtectSettings(form='soft').", parameters=("ProtectSettings.form",))
    return u / denom


def hard_direction(z_star: torch.Tensor, k_star: torch.Tensor, keys: torch.Tensor,
                   z_keys: torch.Tensor) -> torch.Tensor:
    """``u = C⁻¹K (KᵀC⁻¹K)⁻¹ e₁`` with ``K = [k*, K_p]``; ``z = C⁻¹k`` rows given."""
    big_k = torch.cat([k_star.double()[None], keys.double()])
    big_z = torch.cat([z_star[None], z_keys])
    gram = big_k @ big_z.T
    gram = (gram + gram.T) / 2
    cond = torch.linalg.cond(gram).item()
    if not math.isfinite(cond) or cond > MAX_CONDITION:
        raise ParameterError(f"hard protection is ill-conditioned (cond {cond:.1e}): protected "
                             "keys are nearly collinear with k* or each other; use "
                             "ProtectSettings(form='soft').", parameters=("ProtectSettings.form",))
    e1 = torch.zeros(len(big_k), dtype=torch.float64)
    e1[0] = 1
    return big_z.T @ torch.linalg.solve(gram, e1)


def null_space_basis(keys: torch.Tensor, threshold: float, d: int) -> torch.Tensor:
    """Orthonormal ``Q`` (d × q): eigenvectors of ``K_p K_pᵀ`` with eigenvalue below
    ``threshold`` × the largest (the exact complement of the keys' span when 0)."""
    if len(keys) == 0:
        return torch.eye(d, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(keys.double().T @ keys.double())
    cut = max(threshold * evals[-1].item(), d * evals[-1].item() * 1e-15)
    return evecs[:, evals < cut]


def null_space_direction(k_star: torch.Tensor, c: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``u = Q(QᵀCQ)⁻¹Qᵀk*`` (to be normalised so that ``uᵀk* = 1``)."""
    if q.shape[1] == 0:
        raise ParameterError("the protected keys span the whole key space: no null space is "
                             "left; protect fewer names, raise ProtectSettings(threshold=...) or "
                             "use form='soft'.",
                             parameters=("ProtectSettings.threshold", "ProtectSettings.form"))
    cq = q.T @ c @ q
    return q @ torch.linalg.solve((cq + cq.T) / 2, q.T @ k_star.double())


def protected_direction(k_star: torch.Tensor, keys: torch.Tensor,
                        settings: ProtectSettings = ProtectSettings(),
                        solver: Solver | None = None, c: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """One edit's ``u`` (float32, ``uᵀk* = 1``) protecting the rows of ``keys`` (m × d_mlp).

    ``solver`` applies ``C⁻¹`` (``None``: ``C = I``); ``c`` is ``C`` itself (rebuilt from the
    solver when the null-space form needs it and it is not given).
    """
    d = k_star.shape[0]
    k_star = k_star.double()
    keys = keys.double().reshape(-1, d)
    z_star = _c_inv(solver, k_star[None])[0]
    form = settings.resolve(len(keys), d)
    if len(keys) == 0:
        u = z_star
    elif form == "hard":
        u = hard_direction(z_star, k_star, keys, _c_inv(solver, keys))
    elif form == "soft":
        z = _c_inv(solver, keys)
        inner = torch.eye(len(keys), dtype=torch.float64) / settings.weight + keys @ z.T
        u = z_star - z.T @ torch.linalg.solve((inner + inner.T) / 2, keys @ z_star)
    else:
        c = second_moment_matrix(solver, d) if c is None else c.double()
        u = null_space_direction(k_star, c, null_space_basis(keys, settings.threshold, d))
    return _normalise(u, k_star).float()


class ProtectedDirections:
    """``u`` for many edits against one bank of protected keys, each edit protecting a subset.

    ``C⁻¹`` is applied to the bank once (``Z``, ``G = K Zᵀ``).  Soft protection of almost the
    whole bank (e.g. every other name) reuses one inverse ``M = (I/λ + G)⁻¹`` and removes the
    few excluded keys with the Schur complement ``M_SS − M_SE M_EE⁻¹ M_ES``, so a 1,000-name
    sweep costs ``O(N²)`` per edit instead of ``O(N³)``.  When more keys are protected than
    the key width ``d`` (every token of a thousand prompts), the same is done in key space:
    ``H = (C + λ KᵀK)⁻¹`` once, and each edit's excluded rows ``E`` are taken out by
    Woodbury, ``A_S⁻¹k = Hk + H K_Eᵀ (I/λ − K_E H K_Eᵀ)⁻¹ K_E H k`` (``O(d²)`` per edit).
    """

    def __init__(self, bank: torch.Tensor, settings: ProtectSettings,
                 solver: Solver | None = None) -> None:
        self.bank = bank.double()
        self.settings, self.solver = settings, solver
        self.d = bank.shape[1]
        self._z: torch.Tensor | None = None
        self._m_full: torch.Tensor | None = None
        self._c: torch.Tensor | None = None
        self._h_full: torch.Tensor | None = None

    def _soft_in_key_space(self, k_star: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(C + λ K_SᵀK_S)⁻¹ k*`` for bank rows ``keep`` (more rows than ``d``)."""
        n, lam = len(self.bank), self.settings.weight
        drop = torch.ones(n, dtype=torch.bool)
        drop[keep] = False
        if self._c is None:
            self._c = second_moment_matrix(self.solver, self.d)
        if drop.sum() > self.d:  # most of the bank excluded: solve this subset directly
            kept = self.bank[keep]
            a = self._c + lam * (kept.T @ kept)
            return torch.linalg.solve((a + a.T) / 2, k_star)
        if self._h_full is None:
            a = self._c + lam * (self.bank.T @ self.bank)
            self._h_full = torch.linalg.inv((a + a.T) / 2)
        h, ke = self._h_full, self.bank[drop]
        hk = h @ k_star
        if len(ke) == 0:
            return hk
        hke = h @ ke.T
        inner = torch.eye(len(ke), dtype=torch.float64) / lam - ke @ hke
        return hk + hke @ torch.linalg.solve((inner + inner.T) / 2, ke @ hk)

    @property
    def z(self) -> torch.Tensor:
        if self._z is None:
            self._z = _c_inv(self.solver, self.bank)
        return self._z

    def _inner_inverse(self, keep: torch.Tensor) -> torch.Tensor:
        """``(I/λ + G_SS)⁻¹`` for the bank rows ``keep``."""
        n = len(self.bank)
        drop = torch.ones(n, dtype=torch.bool)
        drop[keep] = False
        if drop.sum() <= 64 and len(keep) > 64:
            if self._m_full is None:
                g = self.bank @ self.z.T
                inner = torch.eye(n, dtype=torch.float64) / self.settings.weight + (g + g.T) / 2
                self._m_full = torch.linalg.inv(inner)
            m, e = self._m_full, drop.nonzero().flatten()
            m_se = m[keep][:, e]
            return m[keep][:, keep] - m_se @ torch.linalg.solve(m[e][:, e], m_se.T)
        g = self.bank[keep] @ self.z[keep].T
        inner = torch.eye(len(keep), dtype=torch.float64) / self.settings.weight + (g + g.T) / 2
        return torch.linalg.inv(inner)

    def direction(self, k_star: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``u`` (float32, ``uᵀk* = 1``) protecting bank rows ``keep`` (indices)."""
        keep = torch.as_tensor(keep, dtype=torch.long).flatten()
        k_star = k_star.double()
        form = self.settings.resolve(len(keep), self.d)
        z_star = _c_inv(self.solver, k_star[None])[0]
        if len(keep) == 0:
            u = z_star
        elif form == "hard":
            u = hard_direction(z_star, k_star, self.bank[keep], self.z[keep])
        elif form == "soft" and len(keep) > self.d:
            u = self._soft_in_key_space(k_star, keep)
        elif form == "soft":
            u = z_star - self.z[keep].T @ (self._inner_inverse(keep) @ (self.bank[keep] @ z_star))
        else:
            if self._c is None:
                self._c = second_moment_matrix(self.solver, self.d)
            q = null_space_basis(self.bank[keep], self.settings.threshold, self.d)
            u = null_space_direction(k_star, self._c, q)
        return _normalise(u, k_star).float()

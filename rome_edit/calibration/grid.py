"""The candidates ``calibrate`` measures: layers around the traced one × clamps × step counts.

Hase et al. (2023, arXiv 2301.04213) found that the layer a causal trace points to does not
predict the layer where editing works best, so every layer in a band around the trace's
recommendation is measured, each with several ``clamp_norm_factor`` values (the bound
‖δ‖ ≤ c·‖v_init‖ of Meng et al. 2022, Eq. 4's optimisation, which decides whether the optimal δ
is reachable at all: on the bundled model it needs c ≈ 9 at layer 1) and step counts.  The loss
layer is a dimension too (``v_loss_layer``: where the rewriting NLL is read, through the final
norm and unembedding, the logit lens below the last layer); it is the last layer by default, as in
the reference (27 of GPT-J-6B's 28), since an earlier one only matters for deep models whose
edits should not have to survive the top layers.

The update form is the last dimension.  Every candidate above is ROME's plain rank-one update
(the reference); on the best ``protect_top`` of them per layer (by efficacy) each protected form
of ``protections`` is measured too (:mod:`rome_edit.forms.protect`: the update spares other
names' keys).  A protected update keeps ``k*``, ``v*`` and the delta of the plain one and only
changes the direction ``u`` of ``W += Λ uᵀ``, so these variants reuse the plain candidate's
optimised values and cost one evaluation each, not another optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rome_edit.forms.recipe import ProtectRecipe, with_recipe
from rome_edit.rome.hparams import ROMEHyperParams

__all__ = ["Candidate", "CalibrationGrid", "DEFAULT_CLAMPS", "DEFAULT_STEPS", "DEFAULT_BAND",
           "DEFAULT_PROTECTIONS", "DEFAULT_PROTECT_TOP", "DEFAULT_PROTECT_WEIGHTS",
           "protections_for"]

DEFAULT_BAND = 2
DEFAULT_CLAMPS = (4.0, 8.0, 12.0, 16.0)
DEFAULT_STEPS = (20, 40)
# Soft protection of every other name at three weights around the toolkit's default (0.01; a
# larger weight protects more and moves the edit itself more), and the names sharing the edited
# name's last token (few keys: auto picks hard constraints, which have no weight).
DEFAULT_PROTECT_WEIGHTS = (0.001, 0.01, 0.1)
DEFAULT_PROTECT_TOP = 2


def protections_for(weights: tuple[float, ...]) -> tuple[ProtectRecipe, ...]:
    """The default protected forms with ``weights`` for the soft one, then the hard
    same-last-token constraints and the null-space projection of the keys at every token of
    the other names' prompts (the form that keeps ≥ 99% of random names on SmolLM2, where the
    names' last tokens alone do not; docs/real-model.md)."""
    return (*(ProtectRecipe("other-names", "soft", float(w)) for w in weights),
            ProtectRecipe("same-last-token", "auto"),
            ProtectRecipe("other-names", "null-space", positions="all"))


DEFAULT_PROTECTIONS = protections_for(DEFAULT_PROTECT_WEIGHTS)


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: what it changes in the base hyperparameters."""

    layer: int
    clamp_norm_factor: float
    v_num_grad_steps: int
    v_loss_layer: int
    protect: ProtectRecipe | None = None  # None: ROME's plain update (the reference)

    def apply(self, base: ROMEHyperParams) -> ROMEHyperParams:
        """``base`` with this candidate's values; the protection (or its absence) in the
        ``"protect"`` key (:mod:`rome_edit.forms.recipe`)."""
        hp = replace(base, layers=(self.layer,), clamp_norm_factor=self.clamp_norm_factor,
                     v_num_grad_steps=self.v_num_grad_steps, v_loss_layer=self.v_loss_layer)
        return with_recipe(hp, self.protect)

    @property
    def plain(self) -> Candidate:
        """The same candidate with ROME's plain update (whose edits a protected one reuses)."""
        return replace(self, protect=None)

    def to_dict(self) -> dict:
        p = self.protect
        return {"layer": self.layer, "clamp_norm_factor": self.clamp_norm_factor,
                "v_num_grad_steps": self.v_num_grad_steps, "v_loss_layer": self.v_loss_layer,
                "protect_source": None if p is None else p.source,
                "protect_form": None if p is None else p.form,
                "protect_weight": None if p is None or p.form not in ("auto", "soft")
                else p.weight}


@dataclass(frozen=True)
class CalibrationGrid:
    """Which candidates to measure.

    ``layers`` (explicit) or the band ``recommended ± band`` (clipped to the model, without the
    layers the trace excludes, e.g. layer 0 of a parallel-block model); ``loss_layers`` may be
    negative (counted from the end: -1 is the last layer); a loss layer below the edit layer is
    skipped for that layer (the loss would be read before the edit acts).  ``protections`` are
    measured on the ``protect_top`` most effective plain candidates of each layer (0 or no
    protections: plain ROME only, the grid before 0.4).
    """

    band: int = DEFAULT_BAND
    clamps: tuple[float, ...] = DEFAULT_CLAMPS
    steps: tuple[int, ...] = DEFAULT_STEPS
    loss_layers: tuple[int, ...] = (-1,)
    layers: tuple[int, ...] | None = None
    protections: tuple[ProtectRecipe, ...] = DEFAULT_PROTECTIONS
    protect_top: int = DEFAULT_PROTECT_TOP

    def __post_init__(self) -> None:
        if self.protect_top < 0:
            raise ValueError(f"protect_top must be ≥ 0 (got {self.protect_top}); 0 measures "
                             "plain ROME only.")
        if self.band < 0:
            raise ValueError(f"band must be ≥ 0 (got {self.band}).")
        if not self.clamps or any(c <= 0 for c in self.clamps):
            raise ValueError(f"clamps must be positive numbers (got {list(self.clamps)}), "
                             "e.g. 4 8 12.")
        if not self.steps or any(s < 1 for s in self.steps):
            raise ValueError(f"steps must be whole numbers ≥ 1 (got {list(self.steps)}).")
        if not self.loss_layers:
            raise ValueError("loss_layers is empty; give at least one, e.g. -1 (the last).")
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; give at least one layer or leave it out to use "
                             "the band around the traced layer.")

    def layers_for(self, recommended: int, n_layers: int,
                   excluded: tuple[int, ...] = ()) -> list[int]:
        """The layers to measure, ascending."""
        if self.layers is not None:
            bad = [x for x in self.layers if not 0 <= x < n_layers]
            if bad:
                raise ValueError(f"layers {bad} are outside this model's 0..{n_layers - 1}.")
            return sorted(set(self.layers))
        low, high = max(0, recommended - self.band), min(n_layers - 1, recommended + self.band)
        chosen = [x for x in range(low, high + 1) if x not in excluded]
        return chosen or [recommended]

    def loss_layer_values(self, n_layers: int) -> list[int]:
        values = []
        for x in self.loss_layers:
            absolute = x + n_layers if x < 0 else x
            if not 0 <= absolute < n_layers:
                raise ValueError(f"loss layer {x} is outside this model's 0..{n_layers - 1} "
                                 "(negative values count from the end: -1 is the last).")
            values.append(absolute)
        return sorted(set(values))

    def candidates(self, layers: list[int], n_layers: int) -> list[Candidate]:
        """Every combination, grouped by layer (statistics are computed once per layer)."""
        loss = self.loss_layer_values(n_layers)
        return [Candidate(layer, float(c), int(s), ll)
                for layer in layers for ll in loss if ll >= layer
                for c in sorted(set(self.clamps)) for s in sorted(set(self.steps))]

    def protected(self, ranked: list[Candidate]) -> list[Candidate]:
        """Protected variants of the first ``protect_top`` of ``ranked`` (one layer's plain
        candidates, best first)."""
        return [replace(c, protect=p) for c in ranked[: self.protect_top]
                for p in dict.fromkeys(self.protections)]

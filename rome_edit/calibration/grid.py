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
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rome_edit.rome.hparams import ROMEHyperParams

__all__ = ["Candidate", "CalibrationGrid", "DEFAULT_CLAMPS", "DEFAULT_STEPS", "DEFAULT_BAND"]

DEFAULT_BAND = 2
DEFAULT_CLAMPS = (4.0, 8.0, 12.0, 16.0)
DEFAULT_STEPS = (20, 40)


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: what it changes in the base hyperparameters."""

    layer: int
    clamp_norm_factor: float
    v_num_grad_steps: int
    v_loss_layer: int

    def apply(self, base: ROMEHyperParams) -> ROMEHyperParams:
        return replace(base, layers=(self.layer,), clamp_norm_factor=self.clamp_norm_factor,
                       v_num_grad_steps=self.v_num_grad_steps, v_loss_layer=self.v_loss_layer)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "clamp_norm_factor": self.clamp_norm_factor,
                "v_num_grad_steps": self.v_num_grad_steps, "v_loss_layer": self.v_loss_layer}


@dataclass(frozen=True)
class CalibrationGrid:
    """Which candidates to measure.

    ``layers`` (explicit) or the band ``recommended ± band`` (clipped to the model, without the
    layers the trace excludes, e.g. layer 0 of a parallel-block model); ``loss_layers`` may be
    negative (counted from the end: -1 is the last layer); a loss layer below the edit layer is
    skipped for that layer (the loss would be read before the edit acts).
    """

    band: int = DEFAULT_BAND
    clamps: tuple[float, ...] = DEFAULT_CLAMPS
    steps: tuple[int, ...] = DEFAULT_STEPS
    loss_layers: tuple[int, ...] = (-1,)
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
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

"""What N edits write at one layer: each subject's key, target value and original value.

Built from recorded edits (:meth:`EditTargets.from_records`) or from a vector written for many
subjects (:func:`rome_edit.forms.many.vector_targets`); written by :mod:`rome_edit.forms.many`
and saved with the checkpoint by :mod:`rome_edit.weights.persist`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rome_edit.rome.record import EditRecord

__all__ = ["EditTargets"]


@dataclass(frozen=True, eq=False)
class EditTargets:
    """What N edits write at one layer: each subject's key ``k*``, target ``v*`` and
    original value ``v_orig`` (so ``delta = v* − v_orig``)."""

    layer: int
    prompt: str
    subjects: tuple[str, ...]
    k_star: torch.Tensor  # (n, d_mlp)
    v_star: torch.Tensor  # (n, d_model)
    v_orig: torch.Tensor  # (n, d_model)

    def __post_init__(self) -> None:
        n = len(self.subjects)
        if n == 0:
            raise ValueError("no edits to write: give at least one record or name.")
        if len(set(self.subjects)) != n:
            raise ValueError("a subject appears twice among the edits; give each name once.")
        if not (self.k_star.shape[0] == self.v_star.shape[0] == self.v_orig.shape[0] == n):
            raise ValueError("targets: k_star, v_star and v_orig need one row per subject.")

    @property
    def delta(self) -> torch.Tensor:
        return self.v_star - self.v_orig

    @classmethod
    def from_records(cls, records: Sequence[EditRecord]) -> EditTargets:
        if not records:
            raise ValueError("no records given.")
        layers = {r.layer for r in records}
        prompts = {r.request.prompt for r in records}
        if len(layers) != 1 or len(prompts) != 1:
            raise ValueError(f"records to write together must share one layer and prompt; got "
                             f"layers {sorted(layers)}, {len(prompts)} prompts.")
        return cls(records[0].layer, records[0].request.prompt,
                   tuple(r.request.subject for r in records),
                   torch.stack([r.k_star.float() for r in records]),
                   torch.stack([r.v_star.float() for r in records]),
                   torch.stack([r.v_orig.float() for r in records]))

    def subset(self, n: int) -> EditTargets:
        """The first ``n`` edits."""
        return EditTargets(self.layer, self.prompt, self.subjects[:n], self.k_star[:n],
                           self.v_star[:n], self.v_orig[:n])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k_star": self.k_star.float().contiguous(),
                "v_star": self.v_star.float().contiguous(),
                "v_orig": self.v_orig.float().contiguous(),
                "delta": self.delta.float().contiguous()}

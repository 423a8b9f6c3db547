"""What one edit did, saved as ``record.safetensors`` (tensors) + ``record.json`` (the rest)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rome_edit.errors import MissingFileError
from rome_edit.rome.request import EditRequest

TENSOR_NAMES = ("k_star", "v_orig", "v_star", "delta", "u", "lam")
FORM_TENSOR_NAMES = ("k_star", "v_orig", "v_star", "u", "lam")


@dataclass(frozen=True)
class FormWrite:
    """The part of an edit written at another surface form of its subject
    (:mod:`rome_edit.rome.context`): the form, the prompt it was optimised on, its key and values
    and its rank-one term ``lam ⊗ u`` (``u`` is zero at every other form's key)."""

    form: str
    prompt: str
    k_star: torch.Tensor
    v_orig: torch.Tensor
    v_star: torch.Tensor
    u: torch.Tensor
    lam: torch.Tensor


@dataclass(frozen=True)
class EditRecord:
    """A ROME edit: enough to re-apply it, revert it, and study ``delta = v* − v_orig``.

    The weight change is ``lam ⊗ u`` (``W ← W + Λ uᵀ``) at ``layer``'s MLP output projection,
    ``W`` as ``(d_model, d_mlp)`` (GPT-2's Conv1D stores its transpose).  Tensors (float32;
    saved as float32 on the CPU):

    * ``k_star``: ``(d_mlp,)`` the subject's key averaged over the context templates;
    * ``v_orig``, ``v_star``, ``delta``: ``(d_model,)`` the value before, the value written
      and their difference ``delta = v_star − v_orig``;
    * ``u``: ``(d_mlp,)`` and ``lam``: ``(d_model,)``, the rank-one update's two factors.

    With the hparams' ``subject_forms`` the update has one more term per form
    (:class:`FormWrite` in ``forms``; :meth:`terms` stacks them all); ``delta`` stays the
    edit's own.
    """

    request: EditRequest
    model_identity: str
    layer: int
    hparams: dict[str, Any]
    k_star: torch.Tensor
    v_orig: torch.Tensor
    v_star: torch.Tensor
    delta: torch.Tensor
    u: torch.Tensor
    lam: torch.Tensor
    update_form: str = "paper"
    stats: dict[str, Any] | None = None  # provenance of C (None: identity, no mom2 adjustment)
    losses: tuple[float, ...] = ()
    probs: dict[str, Any] = field(default_factory=dict)  # e.g. {"before": {...}, "after": {...}}
    timings: dict[str, Any] = field(default_factory=dict)
    context_templates: tuple[str, ...] = ()
    attn_implementation: str | None = None  # eager / sdpa; None in records of rome-edit 0.1.0
    # Protected keys (rome_edit.forms.protected_keys): source, form, parameters, which names;
    # None for an unprotected edit and in records written before protection existed.
    protection: dict[str, Any] | None = None
    # The other surface forms written with this edit (hparams ``subject_forms``); () for a
    # one-key edit and in records written before the option existed.
    forms: tuple[FormWrite, ...] = ()

    def terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as rank-one terms: ``U`` ``(T, d_mlp)`` and ``Λ`` ``(T, d_model)``, the edit's
        own first; ``ΔW = Σ_t Λ_t U_tᵀ``."""
        return (torch.stack([self.u, *(f.u for f in self.forms)]),
                torch.stack([self.lam, *(f.lam for f in self.forms)]))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The six tensors by name (``k_star`` … ``lam``), and each form's as ``form{i}.k_star``
        …, as detached float32 CPU copies."""
        out = {name: getattr(self, name).detach().float().cpu().clone()
               for name in TENSOR_NAMES}
        for i, f in enumerate(self.forms):
            out.update({f"form{i}.{name}": getattr(f, name).detach().float().cpu().clone()
                        for name in FORM_TENSOR_NAMES})
        return out

    def metadata(self) -> dict[str, Any]:
        return {
            "request": self.request.to_dict(), "model_identity": self.model_identity,
            "layer": self.layer, "hparams": self.hparams, "update_form": self.update_form,
            "stats": self.stats, "losses": list(self.losses), "probs": self.probs,
            "timings": self.timings, "context_templates": list(self.context_templates),
            "attn_implementation": self.attn_implementation, "protection": self.protection,
            **({"forms": [{"form": f.form, "prompt": f.prompt} for f in self.forms]}
               if self.forms else {}),
            "delta_norm": float(self.delta.norm()), "v_orig_norm": float(self.v_orig.norm()),
        }

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(directory / "record.safetensors"))
        (directory / "record.json").write_text(json.dumps(self.metadata(), indent=1) + "\n")
        return directory

    @classmethod
    def from_parts(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EditRecord:
        missing = [n for n in TENSOR_NAMES if n not in tensors]
        if missing:
            raise ValueError(f"record tensors {missing} are missing; the file is not an edit "
                             "record written by rome-edit.")
        return cls(
            request=EditRequest.from_dict(meta["request"]), model_identity=meta["model_identity"],
            layer=int(meta["layer"]), hparams=meta["hparams"],
            update_form=meta.get("update_form", "paper"), stats=meta.get("stats"),
            losses=tuple(meta.get("losses", ())), probs=meta.get("probs", {}),
            timings=meta.get("timings", {}),
            context_templates=tuple(meta.get("context_templates", ())),
            attn_implementation=meta.get("attn_implementation"),
            protection=meta.get("protection"),
            forms=tuple(_form_write(i, f, tensors) for i, f in enumerate(meta.get("forms", ()))),
            **{n: tensors[n] for n in TENSOR_NAMES},
        )

    @classmethod
    def load(cls, directory: str | Path) -> EditRecord:
        """Load a saved record (safetensors + JSON only; nothing is unpickled)."""
        directory = Path(directory)
        tensor_file, meta_file = directory / "record.safetensors", directory / "record.json"
        if not tensor_file.exists() or not meta_file.exists():
            raise MissingFileError(f"{directory} has no record.safetensors + record.json; pass "
                                   "a directory written by EditRecord.save.",
                                   parameters=("EditRecord.save",))
        try:
            tensors = load_file(str(tensor_file))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{tensor_file} is not a valid safetensors file ({err}).") from None
        return cls.from_parts(json.loads(meta_file.read_text()), tensors)


def _form_write(i: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FormWrite:
    missing = [f"form{i}.{n}" for n in FORM_TENSOR_NAMES if f"form{i}.{n}" not in tensors]
    if missing:
        raise ValueError(f"record tensors {missing} are missing; the file is not an edit record "
                         "written by rome-edit.")
    return FormWrite(meta["form"], meta["prompt"],
                     **{n: tensors[f"form{i}.{n}"] for n in FORM_TENSOR_NAMES})

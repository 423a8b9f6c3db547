"""ROME hyperparameters in the reference implementation's flat JSON format.

The reference keeps one flat JSON object per model (``hparams/ROME/gpt-j-6B.json``); researchers
have such files, so :class:`ROMEHyperParams` reads and writes exactly those keys.  Four
settings that the reference does not have are rome-edit options with documented names and
reference-faithful defaults: ``update_form``, ``mom2_ridge``, ``subject_forms`` and
``fit_phrasings``.

The reference file's module-path keys (``rewrite_module_tmp``, ``layer_module_tmp``,
``mlp_module_tmp``, ``attn_module_tmp``, ``ln_f_module``, ``lm_head_module``) are kept as read,
in :attr:`ROMEHyperParams.extra`, and written back, so files round-trip; rome-edit takes module
paths from the model's architecture (``rome_edit.models.architectures``, ``--module-template``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from rome_edit.rome.context import check_subject_forms
from rome_edit.rome.request import FitPhrasing

UpdateForm = Literal["paper", "rome-reference"]

MODULE_KEYS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
               "ln_f_module", "lm_head_module")


@dataclass(frozen=True)
class ROMEHyperParams:
    """One edit's settings (docs/method.md, "ROME: one rank-one edit", and the reference's file).

    ``update_form`` (rome-edit option): ``paper`` writes ``W += Λ uᵀ`` with ``u = C⁻¹k*`` and
    ``Λ = (v* − W k*)/(uᵀk*)`` (Meng et al. 2022, Eq. 2), so the edited layer maps ``k*`` to
    ``v*``; ``rome-reference`` reproduces the reference code (``u`` normalised, ``Λ`` solved at
    the bare prompt's key ``k(s)``).  ``mom2_ridge`` (rome-edit option, default 0) adds
    ``λ·mean(diag C)·I`` to ``C`` before solving, for ill-conditioned statistics.
    ``subject_forms`` (rome-edit option, default none): other spellings of the subject to write
    the edit at too — ``unspaced``, ``text-start`` (:mod:`rome_edit.rome.context`).
    ``fit_phrasings`` (rome-edit option, default none): other wordings ``v*`` is fitted to as
    well, each with its answer per edit target, joining the fits that read the subject at the
    same key (:class:`~rome_edit.rome.request.FitPhrasing`; in JSON
    ``[{"prompt": "{} is my", "answers": {" Male": " brother"}}]``).  The options
    are written to a file only when set, so reference files round-trip.
    """

    layers: tuple[int, ...] = (5,)
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = 27
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float32"
    update_form: UpdateForm = "paper"
    mom2_ridge: float = 0.0
    subject_forms: tuple[str, ...] = ()
    fit_phrasings: tuple[FitPhrasing, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"ROME edits one layer; 'layers' is {list(self.layers)}. "
                             "Give exactly one layer, e.g. [5].")
        if self.fact_token != "subject_last":
            raise ValueError(f"fact_token {self.fact_token!r} is not supported; rome_edit "
                             "implements 'subject_last' (the reference's setting for all "
                             "models).")
        if self.update_form not in ("paper", "rome-reference"):
            raise ValueError(f"update_form {self.update_form!r}: use 'paper' or "
                             "'rome-reference'.")
        if self.v_num_grad_steps < 1 or self.v_lr <= 0 or self.clamp_norm_factor <= 0:
            raise ValueError("v_num_grad_steps must be ≥ 1 and v_lr, clamp_norm_factor > 0.")
        if self.mom2_dtype not in ("float32", "float64"):
            raise ValueError(f"mom2_dtype {self.mom2_dtype!r}: use 'float32' or 'float64'.")
        object.__setattr__(self, "subject_forms", check_subject_forms(self.subject_forms))
        object.__setattr__(self, "fit_phrasings", tuple(
            p if isinstance(p, FitPhrasing) else FitPhrasing.from_dict(p)
            for p in self.fit_phrasings))
        if self.subject_forms and self.update_form != "paper":
            raise ValueError("subject_forms map every form's key to its value, which the paper "
                             "form does; set update_form to 'paper' or drop subject_forms.")

    @property
    def layer(self) -> int:
        return self.layers[0]

    @property
    def n_context_templates(self) -> int:
        return 1 + sum(n for _, n in self.context_template_length_params)

    def with_layer(self, layer: int) -> ROMEHyperParams:
        return replace(self, layers=(layer,))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        if self.subject_forms:
            data["subject_forms"] = list(self.subject_forms)
        else:
            data.pop("subject_forms")
        if self.fit_phrasings:
            data["fit_phrasings"] = [p.to_dict() for p in self.fit_phrasings]
        else:
            data.pop("fit_phrasings")
        data["layers"] = list(self.layers)
        data["context_template_length_params"] = [list(p) for p in
                                                  self.context_template_length_params]
        return {**data, **self.extra}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ROMEHyperParams:
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if "layers" in kwargs:
            kwargs["layers"] = tuple(int(x) for x in kwargs["layers"])
        if "context_template_length_params" in kwargs:
            kwargs["context_template_length_params"] = tuple(
                (int(a), int(b)) for a, b in kwargs["context_template_length_params"])
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as err:
            raise ValueError(f"bad hyperparameters: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> ROMEHyperParams:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"hyperparameter file {path} does not exist.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); expected the reference's "
                             "flat hparams object.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold one JSON object of hyperparameters.")
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str) -> ROMEHyperParams:
        """A shipped preset: ``gpt-j-6b`` (the reference values) or ``toy-gptj`` (bundled)."""
        presets = Path(str(resources.files("rome_edit").joinpath("hparams")))
        available = sorted(p.name.removesuffix(".json") for p in presets.glob("*.json"))
        if name not in available:
            raise ValueError(f"no preset {name!r}; available: {available}.")
        return cls.load(presets / f"{name}.json")

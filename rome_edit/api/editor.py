"""``rome_edit.Editor``: one model with its hyperparameters, context templates and ``C⁻¹``, and
everything the toolkit does to it — locate, calibrate, edit, sweep, apply concept vectors.

Every write goes through :class:`Applied`, a handle that restores the edited layers' exact
original bits on :meth:`Applied.revert` (or at the end of a ``with`` block).  Handles stack:
only the most recent live one can be reverted, so a revert never undoes a later edit silently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rome_edit.editing.apply import add_rank_one, check_record
from rome_edit.editing.evaluate import KeptFact
from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.protect import ProtectSettings, Solver
from rome_edit.editing.protected_keys import Protection, build_bank, protect_records
from rome_edit.editing.record import EditRecord
from rome_edit.editing.request import EditRequest
from rome_edit.editing.rome import SecondMomentInverse, compute_edits
from rome_edit.editing.session import context_templates_for, default_hparams, inverse_for
from rome_edit.editing.sweep import run_sweep
from rome_edit.editing.vector_edit import SubjectKeys
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.identity import check_same_model
from rome_edit.models.loading import LoadedModel, load_model
from rome_edit.models.scoring import generate, next_token_logprobs
from rome_edit.models.subject import fill
from rome_edit.tracing.average import LocateResult, locate

if TYPE_CHECKING:
    from rome_edit.analysis.concept_vector import ConceptVector
    from rome_edit.calibration.run import CalibrationResult
    from rome_edit.stats.stability import Stability

log = logging.getLogger(__name__)


# layer, mom2_adjustment, mom2_dataset, mom2_n_samples, mom2_dtype, mom2_ridge
_StatsKey = tuple[int, bool, str, int, str, float]


def _stats_key(hp: ROMEHyperParams) -> _StatsKey:
    """What ``C⁻¹`` depends on: a change of any of these recomputes (or re-reads) it."""
    return (hp.layer, hp.mom2_adjustment, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype,
            hp.mom2_ridge)


class Applied:
    """Weights written into an :class:`Editor`'s model, and the way back.

    ``records`` are the ROME edits it wrote (empty for a concept vector); ``active`` is False
    once reverted.  As a context manager it reverts on exit, also when the block raises.
    """

    def __init__(self, editor: Editor, layers: Sequence[int], description: str,
                 records: Sequence[EditRecord] = ()) -> None:
        self.editor, self.description = editor, description
        self.layers = tuple(sorted(set(layers)))
        self.records = tuple(records)
        self._saved = {layer: out_proj_weight(editor.lm.model, editor.lm.arch, layer)
                       .detach().clone() for layer in self.layers}
        self.active = False

    def _write(self, write: Callable[[], object]) -> Applied:
        try:
            write()
        except BaseException:
            self._restore()
            raise
        self.active = True
        self.editor._stack.append(self)
        return self

    def _restore(self) -> None:
        with torch.no_grad():
            for layer, original in self._saved.items():
                out_proj_weight(self.editor.lm.model, self.editor.lm.arch, layer).copy_(original)

    def revert(self) -> None:
        """Restore the edited layers' original bits.  Refused while a later edit is live."""
        if not self.active:
            raise ValueError(f"{self.description} was already reverted.")
        stack = self.editor._stack
        if stack[-1] is not self:
            raise ValueError(f"revert {stack[-1].description} first: it was written after "
                             f"{self.description}, and reverting out of order would undo it.")
        self._restore()
        stack.pop()
        self.active = False

    def __enter__(self) -> Applied:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"<Applied {self.description} at layers {list(self.layers)} ({state})>"


class Editor:
    """A loaded model ready for ROME: ``Editor.load()`` for the bundled toy GPT-J.

    ``hparams`` (the model's preset, a file, or calibrated), the context templates (sampled
    from the model with ``seed``, as the reference) and ``C⁻¹`` (the on-disk statistics cache,
    computed on first use) are the ones ``rome-edit edit``/``sweep`` would use.  ``stats`` is a
    statistics file, ``corpus`` the text to compute them on (see ``rome-edit stats --corpus``)
    and ``until_stable`` (:class:`rome_edit.stats.Stability`) stops that computation once ``C⁻¹``
    no longer moves instead of after ``mom2_n_samples`` documents.
    """

    def __init__(self, lm: LoadedModel, hparams: ROMEHyperParams,
                 context_templates: Sequence[str] | None = None, *,
                 stats: str | Path | None = None, corpus: str | None = None,
                 until_stable: Stability | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        self.lm, self.seed, self.progress = lm, seed, progress
        self._stats, self._corpus, self._until_stable = stats, corpus, until_stable
        self._templates = list(context_templates) if context_templates is not None else None
        self._inverse: SecondMomentInverse | None = None
        self._inverse_key: _StatsKey | None = None
        self._hparams = hparams
        self._stack: list[Applied] = []

    @classmethod
    def load(cls, model: str | Path | None = None, *, hparams: str | Path | ROMEHyperParams |
             None = None, layer: int | None = None, dtype: str = "float32",
             device: str | None = None, stats: str | Path | None = None,
             corpus: str | None = None, until_stable: Stability | None = None,
             context_templates: Sequence[str] | None = None, seed: int = 0,
             progress: bool = True, **load_options: Any) -> Editor:
        """Load ``model`` (``None``: the bundled toy GPT-J; a hub id or local directory) with
        its hyperparameters: ``hparams`` (a reference-format JSON file or an object), else the
        model's preset, else the no-preset defaults; ``layer`` overrides the edit layer.
        ``load_options`` go to :func:`rome_edit.models.loading.load_model`."""
        lm = load_model(None if model is None else str(model), dtype=dtype, device=device,
                        **load_options)
        if isinstance(hparams, ROMEHyperParams):
            hp = hparams.with_layer(layer) if layer is not None else hparams
        else:
            hp = default_hparams(lm, hparams, layer)
        return cls(lm, hp, context_templates, stats=stats, corpus=corpus,
                   until_stable=until_stable, seed=seed, progress=progress)

    @classmethod
    def from_sweep(cls, sweep_dir: str | Path, model: str | Path | None = None, *,
                   progress: bool = True, **load_options: Any) -> Editor:
        """An editor with exactly a sweep's settings (``sweep.json``: hyperparameters, context
        templates, the statistics file when it still exists), on ``model`` (default: the
        bundled one) — refused unless that is the model the sweep was recorded on."""
        manifest_path = Path(sweep_dir) / "sweep.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} does not exist; pass a sweep directory "
                                    "(written by Editor.sweep or `rome-edit sweep`).")
        manifest = json.loads(manifest_path.read_text())
        hp = ROMEHyperParams.from_dict(manifest["hparams"])
        stats = (manifest.get("stats") or {}).get("path")
        editor = cls.load(model, hparams=hp, context_templates=manifest["context_templates"],
                          stats=stats if stats and Path(stats).is_file() else None,
                          progress=progress, **load_options)
        check_same_model(editor.lm, manifest["model_identity"], f"the sweep {sweep_dir}",
                         "pass model= for the model the sweep was recorded on.")
        return editor

    # --- what the edits are made with -------------------------------------------------------

    @property
    def hparams(self) -> ROMEHyperParams:
        """The hyperparameters of the next edits (assign to change them)."""
        return self._hparams

    @hparams.setter
    def hparams(self, hp: ROMEHyperParams) -> None:
        self._hparams = hp

    @property
    def layer(self) -> int:
        """The edit layer."""
        return self._hparams.layer

    @property
    def context_templates(self) -> list[str]:
        """The context templates ``k*`` averages over (sampled once, then kept)."""
        if self._templates is None:
            self._templates = context_templates_for(self.lm, self._hparams, seed=self.seed)
        return self._templates

    @context_templates.setter
    def context_templates(self, templates: Sequence[str]) -> None:
        self._templates = list(templates)

    @property
    def inverse(self) -> SecondMomentInverse | None:
        """``C⁻¹`` at the edit layer (None when the hyperparameters turn it off); recomputed
        or read from the cache when the layer or statistics settings change."""
        hp = self._hparams
        if self._inverse_key != _stats_key(hp):
            self._inverse = inverse_for(self.lm, hp, self._stats, self._corpus,
                                        progress=self.progress, until_stable=self._until_stable)
            self._inverse_key = _stats_key(hp)
        return self._inverse

    # --- find where and how to edit ---------------------------------------------------------

    def locate(self, prompt: str, cases: Sequence[tuple[str, str]], *, use: bool = True,
               **options: Any) -> LocateResult:
        """Average causal traces of ``prompt`` over ``(subject, answer)`` cases and recommend
        the edit layer (:func:`rome_edit.tracing.average.locate`; ``options`` go to it).  With
        ``use`` the editor edits that layer from now on."""
        result = locate(self.lm, prompt, cases, progress=self.progress, **options)
        if use:
            self._hparams = self._hparams.with_layer(result.recommended_layer)
        return result

    def calibrate(self, requests: Sequence[EditRequest], *, use: bool = True,
                  **options: Any) -> CalibrationResult:
        """Measure a grid of layers × clamps × steps on ``requests`` and choose one by a
        documented rule (:func:`rome_edit.calibration.calibrate`; ``options`` such as
        ``neighbour_pool``, ``kept``, ``grid``, ``rule`` go to it).  With ``use`` the editor
        edits with the chosen hyperparameters from now on."""
        from rome_edit.calibration import calibrate

        options.setdefault("corpus", self._corpus)
        options.setdefault("until_stable", self._until_stable)
        options.setdefault("progress", self.progress)
        result = calibrate(self.lm, requests, **options)
        if use:
            self._hparams = result.hparams
        return result

    # --- edits -------------------------------------------------------------------------------

    def protection(self, prompt: str, names: Sequence[str] | str, *,
                   source: str = "other-names", positions: str = "last",
                   settings: ProtectSettings | None = None) -> Protection:
        """Keys to protect for edits on ``prompt`` (``rome-edit edit --protect``): ``source``
        ``other-names`` / ``same-last-token`` choose among ``names``; a file path in ``names``
        (a string) is read as ``--protect FILE``.  See docs/beyond-rome.md."""
        if isinstance(names, str):
            source, names = names, []
        bank = build_bank(self.lm, self.layer, prompt, list(names), self.context_templates,
                          source, positions)
        return Protection(bank, settings or ProtectSettings())

    def compute(self, requests: Sequence[EditRequest], protection: Protection | None = None
                ) -> list[EditRecord]:
        """The ROME edit of each request, each against the current weights; nothing written.
        With ``protection`` each update spares the protected keys (the deltas are the same)."""
        records = compute_edits(self.lm, list(requests), self._hparams, self.context_templates,
                                self.inverse, progress=self.progress)
        if protection is None:
            return records
        return protect_records(self.lm, records, protection, self._solver())

    def _solver(self) -> Solver | None:
        return self.inverse.solver if self.inverse is not None else None

    def edit(self, subject: str, prompt: str, target: str, target_true: str | None = None,
             *, protection: Protection | None = None) -> Applied:
        """Rewrite ``prompt.format(subject)`` → ``target`` now; returns the handle (``with``
        block or ``.revert()``; ``.records[0]`` is the edit's record)."""
        return self.edit_many([EditRequest(subject, prompt, target, target_true)],
                              protection=protection)

    def edit_many(self, requests: Sequence[EditRequest], *,
                  protection: Protection | None = None) -> Applied:
        """Compute every request's edit against the current weights, then write them all (the
        reference's sequential rank-one updates); one handle reverts them together."""
        records = self.compute(requests, protection)
        return self.apply_records(records, f"{len(records)} edit(s)")

    def apply_records(self, records: Sequence[EditRecord], description: str = "records"
                      ) -> Applied:
        """Write saved :class:`EditRecord` s (e.g. ``EditRecord.load(dir)``) into the model."""
        for record in records:  # a bad record refuses the lot and writes nothing
            check_record(self.lm, record)
        handle = Applied(self, [r.layer for r in records], description, records)

        def write() -> None:
            for r in records:
                add_rank_one(self.lm, r.layer, r.u, r.lam)

        return handle._write(write)

    def sweep(self, requests: Sequence[EditRequest], out: str | Path, *,
              labels: Sequence[int] | None = None, classes: tuple[str, str] = ("0", "1"),
              extra: Sequence[dict[str, Any]] | None = None,
              neighbour_pool: Sequence[str] | None = None, kept: Sequence[KeptFact] = (),
              batch_size: int = 64, protection: Protection | None = None) -> dict[str, Any]:
        """Edit every request alone, record its delta and scores into ``out`` (resumable;
        :func:`rome_edit.editing.sweep.run_sweep`); ``labels``/``classes`` are the binary
        concept ``rome_edit.DeltaSet.from_sweep(out)`` reads back."""
        return run_sweep(self.lm, requests, self._hparams, self.context_templates, out,
                         self.inverse, batch_size, labels=labels, classes=classes, extra=extra,
                         neighbour_pool=neighbour_pool, kept=kept, progress=self.progress,
                         protection=protection)

    # --- concept vectors ---------------------------------------------------------------------

    def apply_vector(self, vector: ConceptVector, subjects: str | Sequence[str],
                     scale: float = 1.0, *, prompt: str | None = None) -> Applied:
        """Write ``v_orig + s·g`` for each subject at the vector's layer (seed 001's rank-one
        edit, the reference form ``Λ = s·g/(uᵀk)``); ``s·g`` is ``vector.signed(scale)``.
        ``prompt`` (default: the one the deltas were recorded on) is where the subject's key
        and value are read.  Usually called as ``vector.applied(editor, subjects, scale)``.

        This stays the reference form on purpose: it is the in-memory test of a vector, one
        revertible handle, as in the paper.  For a model *saved* with the vector written for
        many names, :func:`rome_edit.study.persisted.persist_vector` (``form=None``) uses the
        default of ``rome-edit apply --persist``: the fitted form protecting other names, which
        kept 99.8% of other names' gender where sequential reference writes kept 72.4%
        (docs/beyond-rome.md)."""
        subjects = [subjects] if isinstance(subjects, str) else list(subjects)
        check_same_model(self.lm, vector.model_identity, "the vector",
                         "load the model the vector was learnt on.")
        prompt = prompt or vector.prompt
        if prompt is None:
            raise ValueError("the vector does not record its edit prompt; pass prompt=, e.g. "
                             "'Name: {}. Gender:'.")
        g = vector.signed(scale)
        keys = SubjectKeys(self.lm, vector.layer, subjects, prompt, self.context_templates,
                           self.inverse_at(vector.layer))
        handle = Applied(self, [vector.layer], f"vector ×{scale:g} on {subjects[:3]}"
                         + ("…" if len(subjects) > 3 else ""))
        return handle._write(lambda: keys.write(g))

    def inverse_at(self, layer: int) -> SecondMomentInverse | None:
        """``C⁻¹`` at ``layer`` with the editor's statistics settings."""
        if layer == self.layer:
            return self.inverse
        return inverse_for(self.lm, self._hparams.with_layer(layer), self._stats, self._corpus,
                           progress=self.progress, until_stable=self._until_stable)

    # --- reading the model -------------------------------------------------------------------

    def generate(self, text: str, max_new_tokens: int = 20) -> str:
        """Greedy completion of ``text`` (without the prompt) by the model as it is now."""
        return generate(self.lm.model, self.lm.tokenizer, text, max_new_tokens)

    def answer_probs(self, prompt: str, subject: str, answers: Sequence[str]
                     ) -> Mapping[str, float]:
        """Next-token probability of each answer's first token after ``prompt`` filled with
        ``subject``."""
        lp = next_token_logprobs(self.lm.model, self.lm.tokenizer, [fill(prompt, subject)])[0]
        ids = [self.lm.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in answers]
        return {a: float(lp[i].exp()) for a, i in zip(answers, ids)}

    def __repr__(self) -> str:
        return (f"<Editor {self.lm.name} layer {self.layer}, {len(self._stack)} live "
                "edit(s)>")

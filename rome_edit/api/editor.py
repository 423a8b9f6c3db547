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

from rome_edit.assembly.session import Session
from rome_edit.distributed import SINGLE, Workers
from rome_edit.errors import MissingFileError
from rome_edit.evaluation.evaluate import KeptFact
from rome_edit.evaluation.sweep import run_sweep
from rome_edit.evaluation.vectors import SubjectKeys
from rome_edit.forms.protect import ProtectSettings
from rome_edit.forms.protected_keys import Protection, build_bank, protect_records
from rome_edit.models.identity import check_same_model
from rome_edit.models.loading import LoadedModel, load_model, wrap_model
from rome_edit.models.scoring import generate, next_token_logprobs
from rome_edit.models.subject import fill
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams, UpdateForm
from rome_edit.rome.record import EditRecord
from rome_edit.rome.request import EditRequest
from rome_edit.tracing.average import LocateResult, locate
from rome_edit.weights.write import add_record, check_record, restore, snapshot

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rome_edit.analysis.concept_vector import ConceptVector
    from rome_edit.calibration.run import CalibrationResult
    from rome_edit.stats.corpus import TextCorpus
    from rome_edit.stats.stability import Stability

log = logging.getLogger(__name__)


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
        self._saved = snapshot(editor.lm, self.layers)  # what revert() writes back
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
        restore(self.editor.lm, self._saved)

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


class Editor(Session):
    """A loaded model ready for ROME: ``Editor.load()`` for the bundled toy GPT-J,
    ``Editor.from_model(model, tokenizer)`` for a model already in memory.

    ``hparams`` (the model's preset, a file, or calibrated), the context templates (sampled
    from the model with ``seed``, as the reference, or a list or JSON file) and ``C⁻¹`` (the
    on-disk statistics cache, computed on first use) are the ones ``rome-edit edit``/``sweep``
    use: the commands are built on the same :class:`rome_edit.assembly.session.Session`.
    ``stats`` is a statistics file, ``corpus`` the text to compute them on (see ``rome-edit
    stats --corpus``) and ``until_stable`` (:class:`rome_edit.stats.Stability`) stops that
    computation once ``C⁻¹`` no longer moves instead of after ``mom2_n_samples`` documents.
    ``hparams``, ``context_templates``, ``inverse``, ``inverse_at(layer)`` and ``solver`` are
    what the edits are made with.
    """

    def __init__(self, lm: LoadedModel, hparams: ROMEHyperParams,
                 context_templates: Sequence[str] | str | Path | None = None, *,
                 stats: str | Path | None = None, corpus: str | TextCorpus | None = None,
                 until_stable: Stability | None = None, seed: int = 0,
                 progress: bool = True, cache_dir: str | Path | None = None,
                 workers: Workers = SINGLE) -> None:
        super().__init__(lm, hparams, context_templates, stats=stats, corpus=corpus,
                         until_stable=until_stable, seed=seed, progress=progress,
                         cache_dir=cache_dir, workers=workers)
        self._stack: list[Applied] = []

    @classmethod
    def load(cls, model: str | Path | None = None, *, hparams: str | Path | ROMEHyperParams |
             None = None, layer: int | None = None, update_form: UpdateForm | None = None,
             prompt: str | None = None, subjects: Sequence[str] = (),
             dtype: str = "float32", device: str | None = None,
             stats: str | Path | None = None, corpus: str | TextCorpus | None = None,
             until_stable: Stability | None = None,
             context_templates: Sequence[str] | str | Path | None = None, seed: int = 0,
             progress: bool = True, cache_dir: str | Path | None = None,
             workers: Workers = SINGLE, **load_options: Any) -> Editor:
        """Load ``model`` (``None``: the bundled toy GPT-J; a hub id or local directory) with
        its hyperparameters: ``hparams`` (a reference-format JSON file or an object), else the
        model's preset, else the no-preset defaults, whose edit layer is traced on ``prompt``
        over ``subjects`` when given; ``layer`` and ``update_form`` override.  ``load_options``
        go to :func:`rome_edit.models.loading.load_model`."""
        lm = load_model(None if model is None else str(model), dtype=dtype, device=device,
                        **load_options)
        return cls.from_loaded(lm, hparams=hparams, layer=layer, update_form=update_form,
                               prompt=prompt, subjects=subjects,
                               context_templates=context_templates, stats=stats,
                               corpus=corpus, until_stable=until_stable, seed=seed,
                               progress=progress, cache_dir=cache_dir, workers=workers)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                   name: str | None = None, module_templates: dict[str, str] | None = None,
                   attn_implementation: str | None = None,
                   hparams: str | Path | ROMEHyperParams | None = None,
                   layer: int | None = None, update_form: UpdateForm | None = None,
                   prompt: str | None = None, subjects: Sequence[str] = (),
                   stats: str | Path | None = None, corpus: str | TextCorpus | None = None,
                   until_stable: Stability | None = None,
                   context_templates: Sequence[str] | str | Path | None = None, seed: int = 0,
                   progress: bool = True, cache_dir: str | Path | None = None,
                   workers: Workers = SINGLE) -> Editor:
        """An editor on a Hugging Face causal LM already in memory (e.g. built in a notebook),
        not reloaded (:func:`rome_edit.models.loading.wrap_model`).  ``name`` (default: the
        config's ``name_or_path``) names it in records and in the statistics cache;
        ``module_templates`` are ``--module-template`` parts for an architecture not detected;
        the other options are :meth:`load`'s."""
        label = name or getattr(getattr(model, "config", None), "name_or_path", "") or \
            type(model).__name__
        lm = wrap_model(model, tokenizer, label, module_templates, attn_implementation)
        return cls.from_loaded(lm, hparams=hparams, layer=layer, update_form=update_form,
                               prompt=prompt, subjects=subjects,
                               context_templates=context_templates, stats=stats,
                               corpus=corpus, until_stable=until_stable, seed=seed,
                               progress=progress, cache_dir=cache_dir, workers=workers)

    @classmethod
    def from_sweep(cls, sweep_dir: str | Path, model: str | Path | None = None, *,
                   progress: bool = True, corpus: str | TextCorpus | None = None,
                   **load_options: Any) -> Editor:
        """An editor with exactly a sweep's settings (``sweep.json``: hyperparameters, context
        templates, the statistics file when it still exists), on ``model`` (default: the
        bundled one) — refused unless that is the model the sweep was recorded on.
        ``corpus`` estimates ``C`` on other text instead (e.g. ``"debian-handbook"``)."""
        manifest_path = Path(sweep_dir) / "sweep.json"
        if not manifest_path.is_file():
            raise MissingFileError(f"{manifest_path} does not exist; pass a sweep directory "
                                   "(written by Editor.sweep).", parameters=("Editor.sweep",))
        manifest = json.loads(manifest_path.read_text())
        hp = ROMEHyperParams.from_dict(manifest["hparams"])
        stats = (manifest.get("stats") or {}).get("path")
        if corpus is not None:
            stats = None
        editor = cls.load(model, hparams=hp, context_templates=manifest["context_templates"],
                          stats=stats if stats and Path(stats).is_file() else None,
                          corpus=corpus, progress=progress, **load_options)
        check_same_model(editor.lm, manifest["model_identity"], f"the sweep {sweep_dir}",
                         "pass model= for the model the sweep was recorded on.")
        return editor

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
        edits with the chosen hyperparameters from now on; a chosen protected update is in
        ``result.hparams.extra["protect"]`` and is passed per call
        (``ProtectRecipe.from_hparams(...).build(...)`` → ``protection=``)."""
        from rome_edit.calibration import calibrate

        options.setdefault("corpus", self._corpus)
        options.setdefault("until_stable", self._until_stable)
        options.setdefault("progress", self.progress)
        result = calibrate(self.lm, requests, **options)
        if use:
            self._hparams = result.hparams
            if "protect" in result.hparams.extra:
                log.warning("calibrate chose a protected update (%s); the editor protects only "
                            "when given protection= (rome_edit.forms.recipe.ProtectRecipe"
                            ".from_hparams(editor.hparams).build(...)), as 'edit' and 'sweep' "
                            "do from the file.", result.hparams.extra["protect"])
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
                          source, positions, self._hparams.subject_forms)
        return Protection(bank, settings or ProtectSettings())

    def compute(self, requests: Sequence[EditRequest], protection: Protection | None = None
                ) -> list[EditRecord]:
        """The ROME edit of each request, each against the current weights; nothing written.
        With ``protection`` each update spares the protected keys (the deltas are the same)."""
        records = compute_edits(self.lm, list(requests), self._hparams, self.context_templates,
                                self.inverse, progress=self.progress)
        if protection is None:
            return records
        return protect_records(self.lm, records, protection, self.solver)

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
                add_record(self.lm, r)

        return handle._write(write)

    def sweep(self, requests: Sequence[EditRequest], out: str | Path, *,
              labels: Sequence[int] | None = None, classes: tuple[str, str] = ("0", "1"),
              extra: Sequence[dict[str, Any]] | None = None,
              neighbour_pool: Sequence[str] | None = None, kept: Sequence[KeptFact] = (),
              batch_size: int = 64, protection: Protection | None = None) -> dict[str, Any]:
        """Edit every request alone, record its delta and scores into ``out`` (resumable;
        :func:`rome_edit.evaluation.sweep.run_sweep`); ``labels``/``classes`` are the binary
        concept ``rome_edit.DeltaSet.from_sweep(out)`` reads back."""
        return run_sweep(self.lm, requests, self._hparams, self.context_templates, out,
                         self.inverse, batch_size, labels=labels, classes=classes, extra=extra,
                         neighbour_pool=neighbour_pool, kept=kept, progress=self.progress,
                         protection=protection)

    # --- concept vectors ---------------------------------------------------------------------

    def apply_vector(self, vector: ConceptVector, subjects: str | Sequence[str],
                     scale: float = 1.0, *, prompt: str | None = None) -> Applied:
        """Write ``v_orig + s·g`` for each subject at the vector's layer (Xodarap 2023's rank-one
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

"""Resolving an editing run's inputs: hyperparameters, context templates, statistics.

Shared by the CLI, the demo and scripts so they agree on defaults: a model with a shipped preset
(:data:`MODEL_PRESETS`: the bundled model's ``toy-gptj``, SmolLM2-135M's GGUF ``smollm2-135m``)
uses it.  A model without a preset (:func:`no_preset_hparams`) keeps the reference's
optimisation values (clamp, steps, learning rate, KL, context templates) with

* the edit layer from a causal trace of the requests' own prompt (:func:`default_layer`: the
  argmax of the averaged MLP effect at the last subject token, :mod:`rome_edit.tracing.average`),
  or, when no prompt is known or no traced case is informative, the reference's relative depth
  (GPT-J-6B edits layer 5 of 28);
* ``v_loss_layer`` the model's last layer (as the reference's 27 of 28);
* statistics on real English prose when a package has installed it: the Debian
  Administrator's Handbook (``mom2_dataset: "debian-handbook"``, :mod:`rome_edit.stats.handbook`,
  ``apt-get install debian-handbook``; all 485 of its documents, about 210,000 tokens), else on
  a corpus that is always there, text sampled from the model itself (``"sampled"``,
  :mod:`rome_edit.stats.sampled`, 2,000 texts), with a warning saying what that means and how
  to get the handbook.  On SmolLM2-135M the handbook's ``C`` at layer 3 takes minutes where
  sampling 2,000 texts takes tens of minutes (docs/statistics.md).  The choice is written into
  the hyperparameters, so a record says which corpus it used.  ``--corpus bundled``,
  ``--corpus DIR`` or ``--corpus FILE`` override it; ``hf:NAME`` (the optional ``datasets``
  package) is used only when asked for.

A logged warning says which defaults were taken and suggests ``rome-edit calibrate``, which
measures edits per layer, clamp and step count and writes a tuned hparams file.

:class:`Session` is the one place that turns (model, hyperparameters, templates, statistics)
into a ready editing run; :class:`rome_edit.Editor` is built on it, and every command, the
study, calibration, scripts and benchmarks go through one of the two.  The resolvers below
(:func:`default_hparams`, :func:`context_templates_for`, :func:`inverse_for`) are its parts and
are called from nowhere else (``tests/test_architecture.py`` checks this), so a change to how a
run is set up lands once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from rome_edit.distributed import SINGLE, Workers
from rome_edit.models.architectures import mlp_widths
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import next_token_logprobs
from rome_edit.models.subject import fill
from rome_edit.rome.context import load_context_templates, sample_context_templates
from rome_edit.rome.hparams import MODULE_KEYS, ROMEHyperParams, UpdateForm
from rome_edit.stats.cache import cached_second_moment
from rome_edit.stats.corpus import HANDBOOK, TextCorpus, resolve_corpus
from rome_edit.stats.handbook import HANDBOOK_ENV, handbook_installed
from rome_edit.stats.handbook import INSTALL as HANDBOOK_INSTALL
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.stats.second_moment import SecondMoment
from rome_edit.stats.stability import Stability
from rome_edit.tracing.average import locate

log = logging.getLogger(__name__)
BUNDLED_NAME = "bundled:toy-gptj"
# Shipped presets (rome_edit/hparams/NAME.json) by the model's name (``--model``) or, for a model
# read from a GGUF file, the file's name: values measured on that model (docs/real-model.md).
MODEL_PRESETS: dict[str, str] = {
    BUNDLED_NAME: "toy-gptj",
    "smollm2-135m-gguf": "smollm2-135m",
    "SmolLM2-135M-Instruct.Q4_1.gguf": "smollm2-135m",
}


# Defaults for a model without a preset (module docstring).
NO_PRESET_CORPUS = HANDBOOK  # real text, when the package is installed
NO_PRESET_FALLBACK_CORPUS = "sampled"  # always available
NO_PRESET_N_SAMPLES = 2000
REFERENCE_DEPTH = 5 / 28  # GPT-J-6B's edit layer over its depth
TRACE_SUBJECTS = 20  # subjects traced for the default layer


def relative_depth_layer(lm: LoadedModel) -> int:
    """The reference's relative edit depth on this model (never layer 0 of a parallel block,
    whose MLP sees only the current token; see :mod:`rome_edit.tracing.average`)."""
    layer = round(REFERENCE_DEPTH * lm.n_layers)
    return max(layer, 1 if lm.arch.parallel and lm.n_layers > 1 else 0)


def default_layer(lm: LoadedModel, prompt: str | None = None,
                  subjects: Sequence[str] = (), progress: bool = False) -> int:
    """The edit layer a causal trace of ``prompt`` over (up to 20 of) ``subjects`` recommends.

    The answer traced for each subject is the model's own top next token, so no labels are
    needed; without a prompt, or when no case is informative, the reference's relative depth.
    """
    if prompt is None or not subjects:
        layer = relative_depth_layer(lm)
        log.warning("no prompt to trace: edit layer %d, the reference's relative depth (5 of "
                    "28); pass layer= or trace with Editor.locate (command line: --layer, "
                    "'rome-edit locate').", layer)
        return layer
    picked = list(dict.fromkeys(subjects))[:TRACE_SUBJECTS]
    texts = [fill(prompt, s) for s in picked]
    top = next_token_logprobs(lm.model, lm.tokenizer, texts).argmax(-1).tolist()
    answers = [lm.tokenizer.decode([t]) for t in top]
    try:
        located = locate(lm, prompt, list(zip(picked, answers)),
                         candidates=tuple(dict.fromkeys(answers)), progress=progress)
    except ValueError as err:  # every case uninformative
        layer = relative_depth_layer(lm)
        log.warning("the causal trace gave no layer (%s); edit layer %d, the reference's "
                    "relative depth.", err, layer)
        return layer
    log.warning("edit layer %d from a causal trace of %r over %d subjects (MLP effect %.3f at "
                "the last subject token)", located.recommended_layer, prompt, located.n_cases,
                located.recommended_effect)
    return located.recommended_layer


def preset_name(lm: LoadedModel) -> str | None:
    """The shipped preset measured on ``lm`` (:data:`MODEL_PRESETS`), or ``None``."""
    if lm.name in MODEL_PRESETS:
        return MODEL_PRESETS[lm.name]
    return MODEL_PRESETS.get(lm.gguf_file.name) if lm.gguf_file is not None else None


def no_preset_corpus() -> str:
    """The handbook when it is installed, else text sampled from the model (module docstring)."""
    if handbook_installed():
        return NO_PRESET_CORPUS
    log.warning("no real text installed for the statistics: using text sampled from the model "
                "(slow on CPU); for real English prose run '%s' (or set %s), or pass --corpus "
                "DIR.", HANDBOOK_INSTALL, HANDBOOK_ENV)
    return NO_PRESET_FALLBACK_CORPUS


def no_preset_hparams(lm: LoadedModel, layer: int) -> ROMEHyperParams:
    """The reference's values with this model's module paths, ``layer``, its last layer as the
    loss layer and statistics on :func:`no_preset_corpus` (module docstring)."""
    arch, ref = lm.arch, ROMEHyperParams.preset("gpt-j-6b")
    # The module paths are not read (the architecture gives them); they are written so that
    # the file stays a complete reference-format file for this model.
    paths = dict(zip(MODULE_KEYS, (arch.out_proj, arch.block, arch.mlp, arch.attn,
                                   arch.final_norm, arch.lm_head), strict=True))
    return replace(ref, layers=(layer,), v_loss_layer=lm.n_layers - 1,
                   mom2_dataset=no_preset_corpus(), mom2_n_samples=NO_PRESET_N_SAMPLES,
                   extra={**ref.extra, **paths})


def default_hparams(lm: LoadedModel, hparams_file: str | Path | None = None,
                    layer: int | None = None, update_form: str | None = None, *,
                    prompt: str | None = None, subjects: Sequence[str] = ()
                    ) -> ROMEHyperParams:
    """The run's hyperparameters: a file, else the preset for the model, else the no-preset
    defaults (layer ``layer``, or traced on ``prompt`` over ``subjects``); then overrides."""
    if hparams_file is not None:
        hp = ROMEHyperParams.load(hparams_file)
    elif (preset := preset_name(lm)) is not None:
        hp = ROMEHyperParams.preset(preset)
        log.info("hyperparameter preset %s for %s", preset, lm.name)
    else:
        chosen = layer if layer is not None else default_layer(lm, prompt, subjects)
        hp = no_preset_hparams(lm, chosen)
        log.warning("no hyperparameter preset for %s: using the reference's values (clamp "
                    "%g, %d steps) at layer %d, loss layer %d, statistics on %r; for values "
                    "measured on this model use Editor.calibrate (command line: 'rome-edit "
                    "calibrate --model %s --out hparams.json', then --hparams hparams.json).",
                    lm.name, hp.clamp_norm_factor, hp.v_num_grad_steps, hp.layer,
                    hp.v_loss_layer, hp.mom2_dataset, lm.name)
    if layer is not None:
        hp = hp.with_layer(layer)
    if update_form is not None:
        hp = replace(hp, update_form=update_form)  # type: ignore[arg-type]
    return hp


def corpus_spec(hp: ROMEHyperParams) -> str:
    """The corpus an hparams file's ``mom2_dataset`` names: ``bundled``, ``debian-handbook``,
    ``sampled[:SEED]``, a local path or ``hf:NAME`` as given; any other name is a Hugging Face
    dataset (the reference's ``wikipedia``), which needs the optional ``datasets`` package."""
    name = hp.mom2_dataset
    if name in ("bundled", "sampled", HANDBOOK) or name.startswith(("sampled:", "hf:")):
        return name
    if Path(name).exists():
        return name
    return f"hf:{name}"


def context_templates_for(lm: LoadedModel, hp: ROMEHyperParams, path: str | Path | None = None,
                          seed: int = 0) -> list[str]:
    """Templates from a JSON file, else sampled from the model with ``seed``."""
    if path is not None:
        return load_context_templates(path)
    return sample_context_templates(lm, hp.context_template_length_params, seed=seed)


def inverse_for(
    lm: LoadedModel, hp: ROMEHyperParams, stats_file: str | Path | None = None,
    corpus: str | TextCorpus | None = None, cache_dir: str | Path | None = None,
    progress: bool = True, workers: Workers = SINGLE, until_stable: Stability | None = None,
) -> InverseSecondMoment | None:
    """``C⁻¹`` for the edit layer: a stats file, else the on-disk cache (computing on a miss).

    ``until_stable``: compute ``C`` only until ``u = C⁻¹k`` of its probe keys settles
    (:mod:`rome_edit.stats.stability`), reading at most ``mom2_n_samples`` documents.

    ``corpus``: a spec (``--corpus``) or an already resolved corpus (calibration resolves a
    sampled corpus once so that every layer reads the same sampled text); default: the
    hparams' ``mom2_dataset`` (:func:`corpus_spec`).
    """
    if not hp.mom2_adjustment:
        return None
    if stats_file is not None:
        _, d_mlp = mlp_widths(lm.model, lm.arch)
        stats = SecondMoment.load(stats_file, lm, hp.layer, d_mlp)
        path = Path(stats_file)
    else:
        text = corpus if isinstance(corpus, TextCorpus) else \
            resolve_corpus(corpus or corpus_spec(hp), lm=lm)
        cached = cached_second_moment(lm, hp.layer, text, hp.mom2_n_samples,
                                      hp.mom2_dtype, cache_dir=cache_dir, progress=progress,
                                      workers=workers, until_stable=until_stable)
        stats, path = cached.stats, cached.path
    provenance = {"model_identity": stats.model_identity, "layer": stats.layer,
                  "d_mlp": stats.d_mlp, "corpus_id": stats.corpus_id,
                  "n_documents": stats.n_documents, "n_tokens": stats.n_tokens,
                  "dtype": stats.dtype, "ridge": hp.mom2_ridge, "path": str(path)}
    return stats.inverse(hp.mom2_ridge).with_provenance(provenance)


# layer, mom2_adjustment, mom2_dataset, mom2_n_samples, mom2_dtype, mom2_ridge
_StatsKey = tuple[int, bool, str, int, str, float]


def _stats_key(hp: ROMEHyperParams) -> _StatsKey:
    """What ``C⁻¹`` depends on: a change of any of these recomputes (or re-reads) it."""
    return (hp.layer, hp.mom2_adjustment, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype,
            hp.mom2_ridge)


def resolve_hparams(lm: LoadedModel, hparams: str | Path | ROMEHyperParams | None = None,
                    layer: int | None = None,
                    update_form: UpdateForm | None = None, *,
                    prompt: str | None = None, subjects: Sequence[str] = ()
                    ) -> ROMEHyperParams:
    """An object as given (with ``layer``/``update_form`` overrides), else
    :func:`default_hparams` (a file, the preset, or the no-preset defaults)."""
    if not isinstance(hparams, ROMEHyperParams):
        return default_hparams(lm, hparams, layer, update_form, prompt=prompt, subjects=subjects)
    hp = hparams.with_layer(layer) if layer is not None else hparams
    return replace(hp, update_form=update_form) if update_form is not None else hp


_S = TypeVar("_S", bound="Session")


class Session:
    """A model with everything a ROME edit run needs: hyperparameters, context templates and
    ``C⁻¹`` — the toolkit's one assembly point (module docstring).

    ``context_templates``: a list, a JSON file of templates, or ``None`` to sample them from
    the model with ``seed`` on first use (the reference's way); with ``workers`` every
    data-parallel process takes the main process's.  ``stats`` is a statistics file; otherwise
    ``C⁻¹`` comes from the on-disk cache (``cache_dir``), computed on a miss on ``corpus`` (a
    spec such as ``--corpus``, or a resolved :class:`TextCorpus`; default: the hparams'
    ``mom2_dataset``), ``until_stable`` stopping that computation once ``C⁻¹`` settles.  A
    corpus spec is resolved once per session, so every layer reads the same text (a sampled
    corpus is sampled once).
    """

    def __init__(self, lm: LoadedModel, hparams: ROMEHyperParams,
                 context_templates: Sequence[str] | str | Path | None = None, *,
                 stats: str | Path | None = None, corpus: str | TextCorpus | None = None,
                 until_stable: Stability | None = None, seed: int = 0, progress: bool = True,
                 cache_dir: str | Path | None = None, workers: Workers = SINGLE) -> None:
        self.lm, self.seed, self.progress = lm, seed, progress
        self._stats, self._corpus, self._until_stable = stats, corpus, until_stable
        self._cache_dir, self._workers = cache_dir, workers
        self._templates_file: str | Path | None = None
        self._templates: list[str] | None = None
        if isinstance(context_templates, (str, Path)):
            self._templates_file = context_templates
        elif context_templates is not None:
            self._templates = list(context_templates)
        self._hparams = hparams
        self._inverse: InverseSecondMoment | None = None
        self._inverse_key: _StatsKey | None = None
        self._corpora: dict[str, TextCorpus] = {}

    @classmethod
    def from_loaded(cls: type[_S], lm: LoadedModel, *,
                    hparams: str | Path | ROMEHyperParams | None = None,
                    layer: int | None = None,
                    update_form: UpdateForm | None = None,
                    prompt: str | None = None, subjects: Sequence[str] = (),
                    context_templates: Sequence[str] | str | Path | None = None,
                    stats: str | Path | None = None, corpus: str | TextCorpus | None = None,
                    until_stable: Stability | None = None, seed: int = 0,
                    progress: bool = True, cache_dir: str | Path | None = None,
                    workers: Workers = SINGLE) -> _S:
        """A session on an already loaded model.  ``hparams``: an object, a reference-format
        JSON file, else the model's preset, else the no-preset defaults (edit layer traced on
        ``prompt`` over ``subjects`` when given); ``layer``/``update_form`` override."""
        hp = resolve_hparams(lm, hparams, layer, update_form, prompt=prompt, subjects=subjects)
        return cls(lm, hp, context_templates, stats=stats, corpus=corpus,
                   until_stable=until_stable, seed=seed, progress=progress,
                   cache_dir=cache_dir, workers=workers)

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
        """The context templates ``k*`` averages over (read or sampled once, then kept)."""
        if self._templates is None:
            # Sampled templates could differ between devices; every process uses the main one's.
            self._templates = self._workers.broadcast(context_templates_for(
                self.lm, self._hparams, self._templates_file, seed=self.seed))
        return self._templates

    @context_templates.setter
    def context_templates(self, templates: Sequence[str]) -> None:
        self._templates = list(templates)

    @property
    def inverse(self) -> InverseSecondMoment | None:
        """``C⁻¹`` at the edit layer (None when the hyperparameters turn it off); recomputed
        or read from the cache when the layer or statistics settings change."""
        hp = self._hparams
        if self._inverse_key != _stats_key(hp):
            self._inverse = None  # free the old one before computing the next
            self._inverse = self._inverse_of(hp)
            self._inverse_key = _stats_key(hp)
        return self._inverse

    @property
    def solver(self) -> InverseSecondMoment | None:
        """``C⁻¹`` at the edit layer, as what the editing forms take (the same object as
        :attr:`inverse`; None without statistics: plain least squares)."""
        return self.inverse

    def inverse_at(self, layer: int) -> InverseSecondMoment | None:
        """``C⁻¹`` at ``layer`` with the session's statistics settings (kept only for the
        edit layer: one inverse is ``d_mlp²`` numbers)."""
        if layer == self.layer:
            return self.inverse
        return self._inverse_of(self._hparams.with_layer(layer))

    def _inverse_of(self, hp: ROMEHyperParams) -> InverseSecondMoment | None:
        corpus = self._text_corpus(hp) if hp.mom2_adjustment and self._stats is None else None
        return inverse_for(self.lm, hp, self._stats, corpus, cache_dir=self._cache_dir,
                           progress=self.progress, workers=self._workers,
                           until_stable=self._until_stable)

    def _text_corpus(self, hp: ROMEHyperParams) -> TextCorpus:
        if isinstance(self._corpus, TextCorpus):
            return self._corpus
        spec = self._corpus or corpus_spec(hp)
        if spec not in self._corpora:  # one object per spec: a sampled corpus sampled once
            self._corpora[spec] = resolve_corpus(spec, lm=self.lm)
        return self._corpora[spec]

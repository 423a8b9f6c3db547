"""Resolving an editing run's inputs: hyperparameters, context templates, statistics.

Shared by the CLI, the demo and scripts so they agree on defaults: the bundled model uses the
``toy-gptj`` preset; any other model starts from the reference GPT-J-6B values with its own
module paths and last layer as ``v_loss_layer``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from rome_edit.distributed import SINGLE, Workers
from rome_edit.editing.context import load_context_templates, sample_context_templates
from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.rome import SecondMomentInverse
from rome_edit.models.architectures import mlp_widths
from rome_edit.models.loading import LoadedModel
from rome_edit.stats.cache import cached_second_moment
from rome_edit.stats.corpus import resolve_corpus
from rome_edit.stats.second_moment import SecondMoment

log = logging.getLogger(__name__)
BUNDLED_NAME = "bundled:toy-gptj"


def default_hparams(lm: LoadedModel, hparams_file: str | Path | None = None,
                    layer: int | None = None, update_form: str | None = None) -> ROMEHyperParams:
    """The run's hyperparameters: a file, else the preset for the model; then overrides."""
    if hparams_file is not None:
        hp = ROMEHyperParams.load(hparams_file)
    elif lm.name == BUNDLED_NAME:
        hp = ROMEHyperParams.preset("toy-gptj")
    else:
        arch = lm.arch
        hp = replace(ROMEHyperParams.preset("gpt-j-6b"), v_loss_layer=lm.n_layers - 1,
                     rewrite_module_tmp=arch.out_proj, layer_module_tmp=arch.block,
                     mlp_module_tmp=arch.mlp, attn_module_tmp=arch.attn,
                     ln_f_module=arch.final_norm, lm_head_module=arch.lm_head)
        log.info("using the GPT-J-6B reference values with this model's module paths")
    if layer is not None:
        hp = hp.with_layer(layer)
    if update_form is not None:
        hp = replace(hp, update_form=update_form)  # type: ignore[arg-type]
    return hp


def context_templates_for(lm: LoadedModel, hp: ROMEHyperParams, path: str | Path | None = None,
                          seed: int = 0) -> list[str]:
    """Templates from a JSON file, else sampled from the model with ``seed``."""
    if path is not None:
        return load_context_templates(path)
    return sample_context_templates(lm, hp.context_template_length_params, seed=seed)


def inverse_for(
    lm: LoadedModel, hp: ROMEHyperParams, stats_file: str | Path | None = None,
    corpus: str | None = None, cache_dir: str | Path | None = None, progress: bool = True,
    workers: Workers = SINGLE,
) -> SecondMomentInverse | None:
    """``C⁻¹`` for the edit layer: a stats file, else the on-disk cache (computing on a miss)."""
    if not hp.mom2_adjustment:
        return None
    if stats_file is not None:
        _, d_mlp = mlp_widths(lm.model, lm.arch)
        stats = SecondMoment.load(stats_file, lm, hp.layer, d_mlp)
        path = Path(stats_file)
    else:
        spec = corpus or ("bundled" if hp.mom2_dataset == "bundled" else f"hf:{hp.mom2_dataset}")
        cached = cached_second_moment(lm, hp.layer, resolve_corpus(spec), hp.mom2_n_samples,
                                      hp.mom2_dtype, cache_dir=cache_dir, progress=progress,
                                      workers=workers)
        stats, path = cached.stats, cached.path
    provenance = {"model_identity": stats.model_identity, "layer": stats.layer,
                  "d_mlp": stats.d_mlp, "corpus_id": stats.corpus_id,
                  "n_documents": stats.n_documents, "n_tokens": stats.n_tokens,
                  "dtype": stats.dtype, "ridge": hp.mom2_ridge, "path": str(path)}
    return SecondMomentInverse(stats.inverse(hp.mom2_ridge), provenance)

"""Saving an edited model as a standard checkpoint, with what was written into it.

``save_edited`` writes ``save_pretrained`` of the model (safetensors) and its tokenizer, so plain
``AutoModelForCausalLM.from_pretrained(DIR)`` loads the edited model, plus

* ``rome_edit_edits.json`` — format tag, the original model's identity, the edit layer, how the
  edits were written (form, statistics weight, protection), what they are (e.g. the vector file
  and scale), and one entry per edited subject (``subject``, ``delta_norm``);
* ``rome_edit_edits.safetensors`` — the targets, one row per subject in the JSON's order:
  ``k_star``, ``v_star``, ``v_orig``, ``delta`` (= v* − v_orig, the study's recorded delta).

Transformers reads only its own files in the folder, so the two extra files ride along.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from rome_edit.errors import MissingFileError, ParameterError
from rome_edit.models.identity import PERSISTED_EDITS, check_same_model
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.record import EditRecord
from rome_edit.storage import atomic_save_tensors, atomic_write_text
from rome_edit.weights.targets import EditTargets

FORMAT = "rome-edit/persisted-edits/1"
MANIFEST, TENSORS = PERSISTED_EDITS
log = logging.getLogger(__name__)

__all__ = ["FORMAT", "MANIFEST", "TENSORS", "load_persisted", "load_targets", "save_edited"]


def save_edited(lm: LoadedModel, out_dir: str | Path, targets: EditTargets, base_identity: str,
                written: dict, overwrite: bool = False) -> Path:
    """Write the (already edited) model, tokenizer and the edits' description to ``out_dir``.

    ``base_identity`` is the unedited model's identity; ``written`` describes how the edits were
    written (:meth:`~rome_edit.forms.many.ManyEditResult.to_dict` plus e.g. the vector).
    A non-empty ``out_dir`` is refused unless ``overwrite``.  A model read from a GGUF file is
    saved as an ordinary safetensors checkpoint of its dequantised weights; the JSON records
    the file (``base_model_gguf``).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ParameterError(f"{out} is not empty; give a new output directory (out_dir=) for "
                             "the checkpoint, or pass overwrite=True.",
                             parameters=("out", "overwrite"))
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    atomic_save_tensors(targets.tensors(), out / TENSORS)
    manifest = {
        "format": FORMAT, "base_model": lm.name, "base_model_identity": base_identity,
        **({"base_model_gguf": lm.gguf_file.name} if lm.gguf_file is not None else {}),
        "layer": targets.layer, "prompt": targets.prompt,
        "module": lm.arch.out_proj.format(targets.layer), **written,
        "edits": [{"subject": s, "delta_norm": float(d.norm())}
                  for s, d in zip(targets.subjects, targets.delta)],
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info("saved the edited model to %s as %s", out, lm.saved_as)
    return out


def load_targets(paths: Sequence[str | Path], lm: LoadedModel | None = None) -> EditTargets:
    """The edits of record folders (``rome-edit edit --out``) and/or sweep folders
    (``deltas.safetensors`` + ``records.jsonl``), as one :class:`EditTargets`; with ``lm``,
    each source must have been made on that model."""
    layers, prompts, subjects, rows = set(), set(), [], {"k_star": [], "v_star": [], "v_orig": []}
    for path in map(Path, paths):
        if (path / "record.json").exists():
            record = EditRecord.load(path)
            identity, layer, prompt = record.model_identity, record.layer, record.request.prompt
            names, tensors = [record.request.subject], {n: getattr(record, n)[None] for n in rows}
        elif (path / "deltas.safetensors").exists() and (path / "records.jsonl").exists():
            manifest = json.loads((path / "sweep.json").read_text())
            identity, layer, prompt = (manifest["model_identity"], int(manifest["layer"]),
                                       manifest.get("prompt"))
            names = [json.loads(line)["subject"]
                     for line in (path / "records.jsonl").read_text().splitlines() if line]
            tensors = load_file(str(path / "deltas.safetensors"))
        else:
            raise FileNotFoundError(f"{path} is neither a record folder (record.json) nor a "
                                    "sweep folder (deltas.safetensors + records.jsonl).")
        if prompt is None:
            raise ValueError(f"{path} mixes prompts; write one prompt's edits at a time.")
        if lm is not None:
            check_same_model(lm, identity, str(path), "load the model the edits were made on.")
        layers.add(layer)
        prompts.add(prompt)
        subjects += names
        for n in rows:
            rows[n].append(tensors[n].float())
    if len(layers) != 1 or len(prompts) != 1:
        raise ValueError(f"edits written together must share one layer and prompt; got layers "
                         f"{sorted(layers)} and {len(prompts)} prompts.")
    return EditTargets(layers.pop(), prompts.pop(), tuple(subjects),
                       *(torch.cat(rows[n]) for n in ("k_star", "v_star", "v_orig")))


def load_persisted(directory: str | Path) -> tuple[dict, EditTargets]:
    """The JSON and the targets of a checkpoint written by :func:`save_edited`."""
    directory = Path(directory)
    meta_file, tensor_file = directory / MANIFEST, directory / TENSORS
    if not meta_file.exists() or not tensor_file.exists():
        raise MissingFileError(f"{directory} has no {MANIFEST} + {TENSORS}; pass a folder "
                               "written by save_edited (e.g. through persist_vector).",
                               parameters=("save_edited",))
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}, expected {FORMAT!r}.")
    t = load_file(str(tensor_file))
    targets = EditTargets(int(meta["layer"]), meta["prompt"],
                          tuple(e["subject"] for e in meta["edits"]), t["k_star"], t["v_star"],
                          t["v_orig"])
    if not torch.allclose(targets.delta, t["delta"], atol=1e-5):
        raise ValueError(f"{tensor_file} is inconsistent (delta ≠ v_star − v_orig).")
    return meta, targets

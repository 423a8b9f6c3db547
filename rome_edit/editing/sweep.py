"""Batch recording: flip every name's gender, record each edit, survive interruption.

A sweep directory holds

* ``sweep.json`` — what the sweep is (model identity, layer, hyperparameters, context
  templates, statistics provenance).  Resuming with anything different is refused.
* ``shards/NNNNN.safetensors`` + ``shards/NNNNN.jsonl`` — one pair per finished batch, each file
  written to a temporary name and renamed, the JSONL last: a shard counts only once its JSONL
  exists, so a kill at any moment loses at most the batch in progress and never duplicates.
* after the last batch, the merged store: ``deltas.safetensors`` (tensor ``delta``, one row per
  name in the order of ``records.jsonl``, plus ``v_orig``, ``v_star``, ``k_star``, ``u``,
  ``lam``), ``records.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rome_edit.data.gender_task import ANSWERS, EDIT_PROMPT, other_gender
from rome_edit.data.names import NameEntry
from rome_edit.editing.evaluate import evaluate_edits, summarize
from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.record import TENSOR_NAMES
from rome_edit.editing.request import EditRequest
from rome_edit.editing.rome import SecondMomentInverse, compute_edits
from rome_edit.models.loading import LoadedModel
from rome_edit.storage import atomic_save_tensors, atomic_write_text

log = logging.getLogger(__name__)


def _manifest(lm: LoadedModel, hp: ROMEHyperParams, templates: Sequence[str],
              inverse: SecondMomentInverse | None, prompt: str) -> dict:
    return {"model_identity": lm.identity, "layer": hp.layer, "prompt": prompt,
            "hparams": hp.to_dict(), "context_templates": list(templates),
            "stats": inverse.provenance if inverse is not None else None}


def _done_rows(shard_dir: Path) -> list[dict]:
    rows = []
    for jsonl in sorted(shard_dir.glob("*.jsonl")):
        rows.extend(json.loads(line) for line in jsonl.read_text().splitlines() if line)
    return rows


def run_sweep(
    lm: LoadedModel,
    names: Sequence[NameEntry],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    out_dir: str | Path,
    inverse: SecondMomentInverse | None = None,
    batch_size: int = 64,
    neighbour_names: Sequence[NameEntry] | None = None,
    prompt: str = EDIT_PROMPT,
    progress: bool = True,
) -> dict:
    """Edit every name to the other gender, record ``delta = v* − v_orig``; resumable.

    Returns the summary (also written to ``summary.json``).
    """
    out = Path(out_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(lm, hp, context_templates, inverse, prompt)
    manifest_path = out / "sweep.json"
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        if existing != manifest:
            diff = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise ValueError(f"{out} holds a sweep with different {diff}; use another --out "
                             "directory (or delete it) instead of mixing sweeps.")
    else:
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    seen = [r["subject"] for r in _done_rows(shard_dir)]
    if len(seen) != len(set(seen)):
        raise ValueError(f"{shard_dir} records some names twice; the store is corrupt.")
    todo = [e for e in names if e.name not in set(seen)]
    neighbour_names = list(neighbour_names or names)
    next_shard = len(list(shard_dir.glob("*.jsonl")))
    t_start = time.perf_counter()
    bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="sweep", unit="edit",
               disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        t0 = time.perf_counter()
        requests = [EditRequest(e.name, prompt, ANSWERS[other_gender(e.gender)],
                                ANSWERS[e.gender]) for e in batch]
        records = compute_edits(lm, requests, hp, context_templates, inverse,
                                chunk_size=batch_size, progress=False)
        scores = evaluate_edits(lm, records, neighbour_names, progress=False)
        seconds = time.perf_counter() - t0
        stem = shard_dir / f"{next_shard:05d}"
        atomic_save_tensors({n: torch.stack([getattr(r, n).float() for r in records])
                             for n in TENSOR_NAMES}, stem.with_suffix(".safetensors"))
        lines = [json.dumps({"subject": e.name, "gender": e.gender,
                             "target": r.request.target_new, "delta_norm": float(r.delta.norm()),
                             "v_orig_norm": float(r.v_orig.norm()), "n_steps": len(r.losses),
                             "final_loss": r.losses[-1], "seconds": seconds / len(batch),
                             **{k: v for k, v in s.to_dict().items() if k not in ("subject",
                                                                                   "gender")}})
                 for e, r, s in zip(batch, records, scores)]
        atomic_write_text(stem.with_suffix(".jsonl"), "\n".join(lines) + "\n")
        next_shard += 1
        bar.update(len(batch))
    bar.close()
    return merge_sweep(out, wall_seconds=time.perf_counter() - t_start)


def merge_sweep(out_dir: str | Path, wall_seconds: float | None = None) -> dict:
    """Merge finished shards into ``deltas.safetensors``, ``records.jsonl``, ``summary.json``."""
    out = Path(out_dir)
    manifest = json.loads((out / "sweep.json").read_text())
    shard_dir = out / "shards"
    rows, tensors = [], {n: [] for n in TENSOR_NAMES}
    for jsonl in sorted(shard_dir.glob("*.jsonl")):
        part = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
        data = load_file(str(jsonl.with_suffix(".safetensors")))
        if data["delta"].shape[0] != len(part):
            raise ValueError(f"shard {jsonl.stem} is corrupt ({len(part)} rows, "
                             f"{data['delta'].shape[0]} deltas); delete both of its files.")
        rows.extend(part)
        for n in TENSOR_NAMES:
            tensors[n].append(data[n])
    if not rows:
        raise ValueError(f"{out} has no finished edits to merge.")
    merged = {n: torch.cat(v) for n, v in tensors.items()}
    meta = {"model_identity": manifest["model_identity"], "layer": str(manifest["layer"])}
    atomic_save_tensors(merged, out / "deltas.safetensors", metadata=meta)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    seconds = sum(r["seconds"] for r in rows)
    summary = {
        "n_edits": len(rows), "layer": manifest["layer"],
        "model_identity": manifest["model_identity"], "prompt": manifest["prompt"],
        **summarize(rows),
        "seconds": seconds, "seconds_per_edit": seconds / len(rows),
        "wall_seconds_this_run": wall_seconds,
        "mean_delta_norm": sum(r["delta_norm"] for r in rows) / len(rows),
        "mean_v_orig_norm": sum(r["v_orig_norm"] for r in rows) / len(rows),
        "hparams": manifest["hparams"], "stats": manifest["stats"],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary

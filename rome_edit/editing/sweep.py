"""Batch recording: flip every name's gender, record each edit, survive interruption.

A sweep directory holds

* ``sweep.json`` — what the sweep is (model identity, layer, hyperparameters, context
  templates, statistics provenance).  Resuming with anything different is refused.
* ``shards/NNNNN.safetensors`` + ``shards/NNNNN.jsonl`` — one pair per finished batch ``NNNNN``
  (a fixed slice of the names), each file written to a temporary name and renamed, the JSONL
  last: a shard counts only once its JSONL exists, so a kill at any moment loses at most the
  batches in progress and never duplicates.  Data-parallel processes write disjoint shards.
* after the last batch, the merged store: ``deltas.safetensors`` (tensor ``delta``, one row per
  name in the order of ``records.jsonl``, plus ``v_orig``, ``v_star``, ``k_star``, ``u``,
  ``lam``), ``records.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rome_edit.data.gender_task import ANSWERS, EDIT_PROMPT, other_gender
from rome_edit.data.names import NameEntry
from rome_edit.distributed import SINGLE, Workers
from rome_edit.editing.evaluate import edit_fluency, evaluate_edits, summarize
from rome_edit.editing.hparams import ROMEHyperParams
from rome_edit.editing.record import TENSOR_NAMES
from rome_edit.editing.request import EditRequest
from rome_edit.editing.rome import SecondMomentInverse, compute_edits
from rome_edit.models.loading import LoadedModel
from rome_edit.storage import atomic_save_tensors, atomic_write_text

log = logging.getLogger(__name__)
FLUENCY_TOKENS = 30


def _manifest(lm: LoadedModel, hp: ROMEHyperParams, templates: Sequence[str],
              inverse: SecondMomentInverse | None, prompt: str) -> dict:
    return {"model_identity": lm.identity, "attn_implementation": lm.attn_implementation,
            "layer": hp.layer, "prompt": prompt,
            "hparams": hp.to_dict(), "context_templates": list(templates),
            "stats": inverse.provenance if inverse is not None else None}


def _shard_rows(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line]


def _differences(existing: dict, manifest: dict, lm: LoadedModel) -> list[str]:
    """Keys in which a sweep folder's manifest and this run's differ.  Model identities (the
    sweep's and its statistics') are compared as models, so a sweep begun before the upgrade-
    proof identities (:mod:`rome_edit.models.identity`) resumes; such a sweep recorded no
    attention implementation, which then counts as this run's.  Where the statistics file lies
    is not compared (the cache names files by the model's fingerprint), what it holds is."""

    def normalised(m: dict) -> dict:
        m = {**m, "model_identity": lm.same_model(m["model_identity"])}
        m.setdefault("attn_implementation", manifest["attn_implementation"])
        if isinstance(m.get("stats"), dict):
            stats = {k: v for k, v in m["stats"].items() if k != "path"}
            if "model_identity" in stats:
                stats["model_identity"] = lm.same_model(stats["model_identity"])
            m["stats"] = stats
        return m

    old, new = normalised(existing), normalised(manifest)
    return sorted(k for k in new if old.get(k) != new[k])


def _check_manifest(out: Path, manifest: dict, workers: Workers, lm: LoadedModel) -> None:
    """Write ``sweep.json``, or refuse a directory that holds a different sweep."""
    path = out / "sweep.json"
    existed = path.exists()
    if workers.is_main:  # a kill -9 mid-write leaves its temporary file; nothing reads those
        for stale in out.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)
    workers.barrier()  # every process decides on the same state of the folder
    if existed:
        diff = _differences(json.loads(path.read_text()), manifest, lm)
        if diff:
            raise ValueError(f"{out} holds a sweep with different {diff}; use another --out "
                             "directory (or delete it) instead of mixing sweeps.")
    elif workers.is_main:
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    workers.barrier()


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
    workers: Workers = SINGLE,
    fluency_per_batch: int = 2,
) -> dict:
    """Edit every name to the other gender, record ``delta = v* − v_orig``; resumable.

    The names are cut into fixed batches of ``batch_size`` (batch ``b`` = names
    ``b·batch_size ..``), and batch ``b`` is stored as shard ``b``: a resumed run redoes exactly
    the batches that have no shard, with the same companions, so its deltas are bit-identical
    to an uninterrupted run's.  Data-parallel ``workers`` take every N-th batch; the main
    process merges.  The first ``fluency_per_batch`` names of each batch also get greedy
    generations before/after their edit and their n-gram entropy (fluency; generating costs
    more than scoring, so it is sampled).  Returns the summary (also in ``summary.json``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    out = Path(out_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    order = [[e.name, e.gender] for e in names]
    manifest = {**_manifest(lm, hp, context_templates, inverse, prompt),
                "batch_size": batch_size,
                "names_sha256": hashlib.sha256(json.dumps(order).encode()).hexdigest()}
    _check_manifest(out, manifest, workers, lm)
    batches = [list(names[i : i + batch_size]) for i in range(0, len(names), batch_size)]
    todo = [b for b in range(len(batches))
            if workers.owns(b) and not _shard(shard_dir, b).with_suffix(".jsonl").exists()]
    neighbour_names = list(neighbour_names or names)
    t_start = time.perf_counter()
    mine = sum(len(batches[b]) for b in range(len(batches)) if workers.owns(b))
    bar = tqdm(total=mine, initial=mine - sum(len(batches[b]) for b in todo), unit="edit",
               desc="sweep" if not workers.parallel else f"sweep [{workers.rank}]",
               disable=not progress)
    for b in todo:
        batch = batches[b]
        t0 = time.perf_counter()
        requests = [EditRequest(e.name, prompt, ANSWERS[other_gender(e.gender)],
                                ANSWERS[e.gender]) for e in batch]
        records = compute_edits(lm, requests, hp, context_templates, inverse,
                                chunk_size=batch_size, progress=False)
        scores = evaluate_edits(lm, records, neighbour_names, progress=False)
        texts = [edit_fluency(lm, r, FLUENCY_TOKENS) for r in records[:fluency_per_batch]]
        texts += [{}] * (len(records) - len(texts))
        seconds = time.perf_counter() - t0
        stem = _shard(shard_dir, b)
        atomic_save_tensors({n: torch.stack([getattr(r, n).float() for r in records])
                             for n in TENSOR_NAMES}, stem.with_suffix(".safetensors"))
        lines = [json.dumps({"subject": e.name, "gender": e.gender,
                             "target": r.request.target_new, "delta_norm": float(r.delta.norm()),
                             "v_orig_norm": float(r.v_orig.norm()), "n_steps": len(r.losses),
                             "final_loss": r.losses[-1], "seconds": seconds / len(batch),
                             **{k: v for k, v in s.to_dict().items() if k not in ("subject",
                                                                                   "gender")},
                             **text})
                 for e, r, s, text in zip(batch, records, scores, texts)]
        # The JSONL is written last: a shard counts only once it exists.
        atomic_write_text(stem.with_suffix(".jsonl"), "\n".join(lines) + "\n")
        bar.update(len(batch))
    bar.close()
    workers.barrier()
    summary = merge_sweep(out, time.perf_counter() - t_start) if workers.is_main else None
    workers.barrier()
    return summary if summary is not None else json.loads((out / "summary.json").read_text())


def _shard(shard_dir: Path, batch: int) -> Path:
    return shard_dir / f"{batch:05d}"


def merge_sweep(out_dir: str | Path, wall_seconds: float | None = None) -> dict:
    """Merge finished shards into ``deltas.safetensors``, ``records.jsonl``, ``summary.json``."""
    out = Path(out_dir)
    manifest = json.loads((out / "sweep.json").read_text())
    shard_dir = out / "shards"
    rows, tensors = [], {n: [] for n in TENSOR_NAMES}
    for jsonl in sorted(shard_dir.glob("*.jsonl")):
        fix = f"delete both files of shard {jsonl.stem} and run the sweep again to redo it"
        try:
            part = _shard_rows(jsonl)
            data = load_file(str(jsonl.with_suffix(".safetensors")))
        except (OSError, SafetensorError, json.JSONDecodeError) as err:
            raise ValueError(f"shard {jsonl.stem} of {out} is unreadable ({err}); {fix}.") \
                from None
        if any(n not in data for n in TENSOR_NAMES) or data["delta"].shape[0] != len(part):
            raise ValueError(f"shard {jsonl.stem} of {out} is corrupt ({len(part)} rows, "
                             f"tensors {sorted(data)}); {fix}.")
        rows.extend(part)
        for n in TENSOR_NAMES:
            tensors[n].append(data[n])
    if not rows:
        raise ValueError(f"{out} has no finished edits to merge.")
    subjects = [r["subject"] for r in rows]
    if len(subjects) != len(set(subjects)):
        twice = sorted({s for s in subjects if subjects.count(s) > 1})[:5]
        raise ValueError(f"{out} records {twice} more than once: the shards of two sweeps were "
                         "mixed; start again in an empty --out directory.")
    merged = {n: torch.cat(v) for n, v in tensors.items()}
    meta = {"model_identity": manifest["model_identity"], "layer": str(manifest["layer"])}
    atomic_save_tensors(merged, out / "deltas.safetensors", metadata=meta)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    seconds = sum(r["seconds"] for r in rows)
    summary = {
        "n_edits": len(rows), "layer": manifest["layer"],
        "model_identity": manifest["model_identity"], "prompt": manifest["prompt"],
        "attn_implementation": manifest.get("attn_implementation"),
        **summarize(rows),
        "seconds": seconds, "seconds_per_edit": seconds / len(rows),
        "wall_seconds_this_run": wall_seconds,
        "mean_delta_norm": sum(r["delta_norm"] for r in rows) / len(rows),
        "mean_v_orig_norm": sum(r["v_orig_norm"] for r in rows) / len(rows),
        "hparams": manifest["hparams"], "stats": manifest["stats"],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary

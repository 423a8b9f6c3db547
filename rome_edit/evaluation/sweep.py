"""Batch recording: make every requested edit, record each one, survive interruption.

A sweep takes generic :class:`~rome_edit.rome.request.EditRequest` s (subject, prompt, new
and true target, optional paraphrases/neighbours) and, optionally, one binary concept label per
request (``classes`` names label 0 and label 1) plus extra JSON fields per row; the gender study
(:mod:`rome_edit.study`) supplies name → other-gender requests labelled by the original gender.

A sweep directory holds

* ``sweep.json`` — what the sweep is (model identity, layer, hyperparameters, context
  templates, statistics provenance).  Resuming with anything different is refused.
* ``shards/NNNNN.safetensors`` + ``shards/NNNNN.jsonl`` — one pair per finished batch ``NNNNN``
  (a fixed slice of the requests), each file written to a temporary name and renamed, the JSONL
  last: a shard counts only once its JSONL exists, so a kill at any moment loses at most the
  batches in progress and never duplicates.  Data-parallel processes write disjoint shards.
* after the last batch, the merged store: ``deltas.safetensors`` (tensor ``delta``, one row per
  request in the order of ``records.jsonl``, plus ``v_orig``, ``v_star``, ``k_star``, ``u``,
  ``lam``), ``records.jsonl`` and ``summary.json``.  With the hparams' ``subject_forms``,
  ``u`` and ``lam`` are each edit's own term only (the forms' keys, values and terms are not
  stored; recompute them from ``sweep.json``'s hparams).
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

from rome_edit.distributed import SINGLE, Workers
from rome_edit.errors import ParameterError
from rome_edit.evaluation.evaluate import KeptFact, edit_fluency, evaluate_edits, summarize
from rome_edit.forms.protected_keys import Protection, protect_records
from rome_edit.models.loading import LoadedModel
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.record import TENSOR_NAMES
from rome_edit.rome.request import EditRequest
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.storage import atomic_save_tensors, atomic_write_text

log = logging.getLogger(__name__)
FLUENCY_TOKENS = 30


def _manifest(lm: LoadedModel, hp: ROMEHyperParams, templates: Sequence[str],
              inverse: InverseSecondMoment | None, requests: Sequence[EditRequest]) -> dict:
    prompts = {r.prompt for r in requests}
    return {"model_identity": lm.identity, "attn_implementation": lm.attn_implementation,
            "layer": hp.layer, "prompt": prompts.pop() if len(prompts) == 1 else None,
            "hparams": hp.to_dict(), "context_templates": list(templates),
            "stats": inverse.provenance if inverse is not None else None}


def _check_labels(requests: Sequence[EditRequest], labels: Sequence[int] | None,
                  extra: Sequence[dict] | None) -> None:
    if not requests:
        raise ValueError("no edit requests to sweep; give at least one.")
    subjects = [r.subject for r in requests]
    if len(set(subjects)) != len(subjects):
        twice = sorted({s for s in subjects if subjects.count(s) > 1})[:5]
        raise ParameterError(f"subjects {twice} are requested more than once; a sweep records "
                             "one edit per subject (sweep the others into another output "
                             "directory, out=).", parameters=("out",))
    for what, rows in (("labels", labels), ("extra", extra)):
        if rows is not None and len(rows) != len(requests):
            raise ValueError(f"{len(rows)} {what} for {len(requests)} requests; give one per "
                             "request, in request order.")
    if labels is not None and any(isinstance(y, bool) or y not in (0, 1) for y in labels):
        bad = sorted({repr(y) for y in labels if isinstance(y, bool) or y not in (0, 1)})[:5]
        raise ValueError(f"labels must be 0 or 1 (a binary concept per request), got {bad}.")
    reserved = {"subject", "label", "target", "target_true", "prompt"}
    clash = sorted({k for row in extra or () for k in row} & reserved)
    if clash:
        raise ValueError(f"extra fields {clash} would overwrite the sweep's own; rename them.")


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
    keys = set(new) | ({"protection"} & set(old))  # a protected sweep resumes only protected
    return sorted(k for k in keys if old.get(k) != new.get(k))


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
            raise ParameterError(f"{out} holds a sweep with different {diff}; give another "
                                 "output directory (out=), or delete it, instead of mixing "
                                 "sweeps.", parameters=("out",))
    elif workers.is_main:
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
    workers.barrier()


def run_sweep(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: ROMEHyperParams,
    context_templates: Sequence[str],
    out_dir: str | Path,
    inverse: InverseSecondMoment | None = None,
    batch_size: int = 64,
    *,
    labels: Sequence[int] | None = None,
    classes: tuple[str, str] = ("0", "1"),
    extra: Sequence[dict] | None = None,
    neighbour_pool: Sequence[str] | None = None,
    kept: Sequence[KeptFact] = (),
    progress: bool = True,
    workers: Workers = SINGLE,
    fluency_per_batch: int = 2,
    protection: Protection | None = None,
    selection: dict | None = None,
) -> dict:
    """Make every request's edit alone, record ``delta = v* − v_orig`` and its scores; resumable.

    ``labels`` (0/1, one per request) is the binary concept the deltas are later analysed by
    (:class:`~rome_edit.analysis.deltas.DeltaSet`), ``classes`` names label 0 and label 1;
    ``extra`` adds JSON fields to each request's record row.  Neighbours for specificity come
    from each request's own ``neighbours``, else from ``neighbour_pool`` (default: the requests'
    subjects); ``kept`` lists other facts of the subject that must not change
    (:class:`~rome_edit.evaluation.evaluate.KeptFact`).

    The requests are cut into fixed batches of ``batch_size`` (batch ``b`` = requests
    ``b·batch_size ..``), and batch ``b`` is stored as shard ``b``: a resumed run redoes exactly
    the batches that have no shard, with the same companions, so its deltas are bit-identical
    to an uninterrupted run's.  Data-parallel ``workers`` take every N-th batch; the main
    process merges.  The first ``fluency_per_batch`` requests of each batch also get greedy
    generations before/after their edit and their n-gram entropy (fluency; generating costs
    more than scoring, so it is sampled).  With ``protection`` every edit's update spares the
    protected keys (:mod:`~rome_edit.forms.protected_keys`); the recorded deltas are the same.
    ``selection`` (JSON) says how the requests were chosen (the study: only names the model
    knows, and on which prompt); it is kept in ``sweep.json`` and ``summary.json``.
    Returns the summary (also in ``summary.json``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if protection is not None and hp.update_form != "paper":
        raise ParameterError("protection builds on the paper update form (k* ↦ v*); set "
                             f"update_form='paper' (not {hp.update_form!r}) or drop protection.",
                             parameters=("update_form", "protection"))
    requests = list(requests)
    _check_labels(requests, labels, extra)
    out = Path(out_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    order = [[r.to_dict(), None if labels is None else int(labels[i])]
             for i, r in enumerate(requests)]
    manifest = {**_manifest(lm, hp, context_templates, inverse, requests),
                "batch_size": batch_size, "classes": list(classes),
                "kept": [[f.name, f.prompt, list(f.candidates)] for f in kept],
                "requests_sha256": hashlib.sha256(json.dumps(order).encode()).hexdigest()}
    if protection is not None:  # absent for unprotected sweeps, so older folders still resume
        manifest["protection"] = protection.manifest()
    if selection is not None:  # likewise absent unless given
        manifest["selection"] = selection
    _check_manifest(out, manifest, workers, lm)
    index = list(range(len(requests)))
    batches = [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    todo = [b for b in range(len(batches))
            if workers.owns(b) and not _shard(shard_dir, b).with_suffix(".jsonl").exists()]
    pool = list(neighbour_pool) if neighbour_pool is not None else [r.subject for r in requests]
    t_start = time.perf_counter()
    mine = sum(len(batches[b]) for b in range(len(batches)) if workers.owns(b))
    bar = tqdm(total=mine, initial=mine - sum(len(batches[b]) for b in todo), unit="edit",
               desc="sweep" if not workers.parallel else f"sweep [{workers.rank}]",
               disable=not progress)
    for b in todo:
        batch = batches[b]
        t0 = time.perf_counter()
        records = compute_edits(lm, [requests[i] for i in batch], hp, context_templates,
                                inverse, chunk_size=batch_size, progress=False)
        if protection is not None:
            records = protect_records(lm, records, protection,
                                      inverse)
        scores = evaluate_edits(lm, records, pool, kept, progress=False)
        texts = [edit_fluency(lm, r, FLUENCY_TOKENS) for r in records[:fluency_per_batch]]
        texts += [{}] * (len(records) - len(texts))
        seconds = time.perf_counter() - t0
        stem = _shard(shard_dir, b)
        atomic_save_tensors({n: torch.stack([getattr(r, n).float() for r in records])
                             for n in TENSOR_NAMES}, stem.with_suffix(".safetensors"))
        lines = [json.dumps({"subject": r.request.subject,
                             **({} if labels is None else {"label": int(labels[i])}),
                             **(extra[i] if extra is not None else {}),
                             "target": r.request.target_new, "target_true": r.request.target_true,
                             "delta_norm": float(r.delta.norm()),
                             "v_orig_norm": float(r.v_orig.norm()), "n_steps": len(r.losses),
                             "final_loss": r.losses[-1], "seconds": seconds / len(batch),
                             **({} if r.protection is None else
                                {"protect_form": r.protection["form"],
                                 "protected_keys": r.protection["n_keys"]}),
                             **{k: v for k, v in s.to_dict().items() if k != "subject"},
                             **text})
                 for i, r, s, text in zip(batch, records, scores, texts)]
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
    rows: list[dict] = []
    tensors: dict[str, list[torch.Tensor]] = {n: [] for n in TENSOR_NAMES}
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
        raise ParameterError(f"{out} records {twice} more than once: the shards of two sweeps "
                             "were mixed; start again in an empty output directory (out=).",
                             parameters=("out",))
    merged = {n: torch.cat(v) for n, v in tensors.items()}
    meta = {"model_identity": manifest["model_identity"], "layer": str(manifest["layer"])}
    atomic_save_tensors(merged, out / "deltas.safetensors", metadata=meta)
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    seconds = sum(r["seconds"] for r in rows)
    summary = {
        "n_edits": len(rows), "layer": manifest["layer"],
        "model_identity": manifest["model_identity"], "prompt": manifest["prompt"],
        "classes": manifest.get("classes"),
        "attn_implementation": manifest.get("attn_implementation"),
        **summarize(rows),
        "seconds": seconds, "seconds_per_edit": seconds / len(rows),
        "wall_seconds_this_run": wall_seconds,
        "mean_delta_norm": sum(r["delta_norm"] for r in rows) / len(rows),
        "mean_v_orig_norm": sum(r["v_orig_norm"] for r in rows) / len(rows),
        "hparams": manifest["hparams"], "stats": manifest["stats"],
        **({"protection": manifest["protection"]} if "protection" in manifest else {}),
        **({"selection": manifest["selection"]} if "selection" in manifest else {}),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary

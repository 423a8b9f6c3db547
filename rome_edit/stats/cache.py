"""On-disk cache of second moments: the same request never recomputes.

A request is keyed by everything that determines ``C``: the model (its weight fingerprint, so the
same weights loaded by hub id or from a local copy share entries), the layer, the corpus id (which
hashes the corpus text), the accumulation dtype, the requested number of documents and the
truncation length (the context length unless overridden). The batch size is not part of the key: it
changes nothing but float rounding. The file name carries a hash of that key. Entries written by
rome-edit 0.1.0 are keyed by that release's fingerprint (:mod:`rome_edit.models.identity`, scheme
1); on a miss they are looked up too, and a hit is copied under the current key, so an upgrade never
recomputes. The cache folder is, in order of precedence, the ``cache_dir`` argument, the
``ROME_EDIT_CACHE`` environment variable, or ``~/.cache/rome-edit/stats``. Files are written
atomically (see :meth:`SecondMoment.save`), so a run killed mid-write leaves the old state, never a
truncated file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rome_edit.distributed import SINGLE, Workers
from rome_edit.models.architectures import check_layer
from rome_edit.models.loading import LoadedModel
from rome_edit.stats.corpus import TextCorpus, bundled_corpus
from rome_edit.stats.second_moment import (
    SecondMoment,
    StatsFileError,
    compute_second_moment,
    context_length,
    stats_dtype,
)
from rome_edit.stats.stability import Stability, StabilityCheck, StabilityMonitor

log = logging.getLogger(__name__)

CACHE_ENV = "ROME_EDIT_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "rome-edit" / "stats"


@dataclass(frozen=True)
class StatsKey:
    """What determines a second moment."""

    model: str  # weight fingerprint
    layer: int
    corpus_id: str
    dtype: str
    n_samples: int
    max_length: int  # documents are truncated to this many tokens
    until_stable: str | None = None  # the stopping rule (stats.stability), if the pass may stop

    def filename(self) -> str:
        fields = asdict(self)
        if fields["until_stable"] is None:  # keys of fixed-count passes hash as they always did
            del fields["until_stable"]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"mom2-layer{self.layer}-{self.dtype}-{digest[:16]}.safetensors"


@dataclass(frozen=True)
class CachedStats:
    """A second moment, where it is stored, and whether this call computed it."""

    stats: SecondMoment
    path: Path
    cache_hit: bool
    seconds: float
    checks: tuple[StabilityCheck, ...] = ()  # the stability checks, when this call computed C


def cached_second_moment(
    lm: LoadedModel,
    layer: int,
    corpus: TextCorpus | None = None,
    n_samples: int = 100_000,
    dtype: str = "float32",
    batch_size: int = 64,
    max_length: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    workers: Workers = SINGLE,
    checkpoint_every: int = 25,
    until_stable: Stability | None = None,
) -> CachedStats:
    """Load ``C`` from the cache, or compute it (:func:`compute_second_moment`) and store it.

    With data-parallel ``workers`` all processes compute together and the main one writes.
    With ``until_stable`` the pass may stop before ``n_samples`` documents
    (:mod:`rome_edit.stats.stability`); the rule is part of the cache key.
    """
    start = time.perf_counter()
    check_layer(lm.model, lm.arch, layer)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
    stats_dtype(dtype)
    corpus = corpus if corpus is not None else bundled_corpus()
    max_length = max_length or context_length(lm)
    key = StatsKey(lm.fingerprint, layer, corpus.corpus_id, dtype, n_samples, max_length,
                   until_stable.key() if until_stable is not None else None)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / key.filename()
    stats = _cached(lm, key, path)
    if stats is None:  # an entry of rome-edit 0.1.0, keyed by its fingerprint of this model
        for old in sorted(lm.legacy_fingerprints):
            legacy = folder / replace(key, model=old).filename()
            if legacy.exists() and (stats := _cached(lm, key, legacy)) is not None:
                stats = replace(stats, model_identity=lm.identity)
                stats.save(path)
                log.info("copied the cache entry %s to %s (current identity)", legacy, path)
                break
    if stats is not None:
        return CachedStats(stats, path, True, time.perf_counter() - start)
    log.info("cache miss: computing %s", key)
    if corpus.prepare is not None:  # e.g. text sampled from the model: not inside the pass
        corpus.prepare(n_samples)
    # A killed run resumes from its partial sum (one checkpoint per process).
    partial = path.with_name(f".{path.stem}.b{batch_size}.r{workers.rank}of"
                             f"{workers.world_size}.partial.safetensors")
    monitor = StabilityMonitor(until_stable) if until_stable is not None else None
    stats = compute_second_moment(lm, layer, corpus, n_samples, dtype, batch_size, max_length,
                                  progress, workers, checkpoint=partial,
                                  checkpoint_every=checkpoint_every, until_stable=monitor)
    if workers.is_main:
        stats.save(path)
    workers.barrier()
    return CachedStats(stats, path, False, time.perf_counter() - start,
                       tuple(monitor.checks) if monitor else ())


def _cached(lm: LoadedModel, key: StatsKey, path: Path) -> SecondMoment | None:
    """The cache file at ``path`` if it exists and holds ``key``'s statistics of ``lm``."""
    if not path.exists():
        return None
    try:
        stats = SecondMoment.load(path, lm, key.layer)
    except StatsFileError as err:  # e.g. written by an incompatible version: recompute
        log.warning("ignoring unusable cache file %s: %s", path, err)
        return None
    if stats.corpus_id != key.corpus_id or stats.dtype != key.dtype:
        log.warning("cache file %s does not match its key %s; recomputing", path, key)
        return None
    log.info("cache hit: %s", path)
    return stats

"""Second-moment statistics ``C = E[k kᵀ]`` of MLP keys (ROME step 3): corpora, streaming
accumulation, safetensors files, an on-disk cache, and ``C⁻¹ k`` solves."""

from rome_edit.stats.cache import CachedStats, StatsKey, cached_second_moment, default_cache_dir
from rome_edit.stats.corpus import CorpusError, TextCorpus, resolve_corpus
from rome_edit.stats.inverse import InverseSecondMoment, SingularSecondMomentError, solve
from rome_edit.stats.second_moment import (
    SecondMoment,
    SecondMomentAccumulator,
    StatsFileError,
    StatsMismatchError,
    compute_second_moment,
)
from rome_edit.stats.stability import Stability, StabilityCheck, StabilityMonitor

__all__ = [
    "CachedStats", "CorpusError", "InverseSecondMoment", "SecondMoment",
    "SecondMomentAccumulator", "SingularSecondMomentError", "Stability", "StabilityCheck",
    "StabilityMonitor", "StatsFileError",
    "StatsKey", "StatsMismatchError", "TextCorpus", "cached_second_moment",
    "compute_second_moment", "default_cache_dir", "resolve_corpus", "solve",
]

"""ROME's second moment of keys, ``C = E[k kᵀ]``, and its safetensors file.

Step 3 of ROME (Meng et al., 2022, eq. 2 and Appendix): ``C`` is the *uncentred* second moment
of the keys ``k`` (the input of the MLP output projection ``W_out``) at the edit layer, estimated
over a text corpus, with every non-padding token position counting once.  The update solves
``C⁻¹ k*`` with it (see :mod:`rome_edit.stats.inverse`).

:class:`SecondMomentAccumulator` is the mutable, streaming part (``update(keys)`` per batch, a
float32 or float64 running sum, as the reference's ``mom2_dtype``); :class:`SecondMoment` is the
frozen result with its provenance.  Files hold one tensor, ``second_moment``, and the provenance
in the safetensors metadata header; loading never unpickles and checks what it reads.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rome_edit.distributed import SINGLE, Workers
from rome_edit.errors import MissingFileError, ParameterError
from rome_edit.models.architectures import check_layer, mlp_widths
from rome_edit.models.hooks import capture, run_until
from rome_edit.models.identity import Identified, same_model
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import pad_id, right_pad
from rome_edit.stats.checkpoint import (
    EMPTY,
    PartialSum,
    PassIdentity,
    load_checkpoint,
    save_checkpoint,
)
from rome_edit.stats.corpus import TextCorpus, bundled_corpus, tokenize_documents
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.stats.stability import Stability, StabilityMonitor
from rome_edit.storage import atomic_save_tensors, remove_partial_writes

log = logging.getLogger(__name__)

TENSOR_NAME = "second_moment"
FORMAT = "rome-edit/second-moment/v1"
STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class StatsFileError(ParameterError):
    """A statistics file that cannot be used (not safetensors, malformed, NaN/Inf)."""


class StatsMismatchError(ParameterError):
    """Statistics of another model, layer or width than the one being edited."""


def stats_dtype(name: str) -> torch.dtype:
    if name not in STATS_DTYPES:
        raise ValueError(f"unknown statistics dtype {name!r}; use one of {sorted(STATS_DTYPES)}.")
    return STATS_DTYPES[name]


class SecondMomentAccumulator:
    """Streaming ``Σ k kᵀ`` and token count; ``matrix`` is their ratio, ``E[k kᵀ]``."""

    def __init__(self, dim: int, dtype: str = "float32", device: torch.device | str | None = None):
        self.dim = dim
        self.dtype = dtype
        self._sum: torch.Tensor | None = None
        self._device = device
        self.n_tokens = 0

    def update(self, keys: torch.Tensor) -> None:
        """Add keys of shape ``(..., dim)``: every row is one token position."""
        if keys.shape[-1] != self.dim:
            raise ValueError(f"keys have width {keys.shape[-1]}, expected {self.dim}.")
        flat = keys.reshape(-1, self.dim).to(stats_dtype(self.dtype))
        if self._sum is None:
            device = self._device if self._device is not None else flat.device
            self._sum = torch.zeros(self.dim, self.dim, dtype=flat.dtype, device=device)
        flat = flat.to(self._sum.device)
        self._sum.addmm_(flat.T, flat)
        self.n_tokens += flat.shape[0]

    def snapshot(self, n_documents: int, next_batch: int) -> PartialSum:
        total = None if self._sum is None else self._sum.cpu()
        return PartialSum(total, self.n_tokens, n_documents, next_batch)

    def restore(self, partial: PartialSum) -> None:
        if partial.total is not None:
            self._sum = partial.total.to(stats_dtype(self.dtype))
            if self._device is not None:
                self._sum = self._sum.to(self._device)
        self.n_tokens = partial.n_tokens

    def all_reduce(self, workers: Workers) -> None:
        """Sum ``Σ k kᵀ`` and the token count over data-parallel processes (in place)."""
        if not workers.parallel:
            return
        if self._sum is None:  # this process got no batch: it contributes zeros
            self._sum = torch.zeros(self.dim, self.dim, dtype=stats_dtype(self.dtype),
                                    device=self._device)
        workers.sum_(self._sum)
        self.n_tokens = workers.sum_int(self.n_tokens)

    @property
    def matrix(self) -> torch.Tensor:
        return self.current().cpu()

    def current(self) -> torch.Tensor:
        """``E[k kᵀ]`` so far, on the device it is accumulated on."""
        if self._sum is None or self.n_tokens == 0:
            raise ValueError("no keys were accumulated: the corpus produced no tokens; give a "
                             "corpus with some text.")
        return self._sum / self.n_tokens

    def result(self, model_identity: str, layer: int, corpus_id: str,
               n_documents: int, stopping: str | None = None) -> SecondMoment:
        return SecondMoment(self.matrix, model_identity, layer, corpus_id, n_documents,
                            self.n_tokens, self.dtype, stopping)


@dataclass(frozen=True, eq=False)
class SecondMoment:
    """``C = E[k kᵀ]`` (``d_mlp × d_mlp``) of the keys at ``layer`` of a model, over a corpus."""

    matrix: torch.Tensor
    model_identity: str
    layer: int
    corpus_id: str
    n_documents: int
    n_tokens: int
    dtype: str
    # how the pass ended when it could stop early (stats.stability): the rule and where it
    # stopped, e.g. "until-stable:cos0.999:…; stable at 3000 documents"; None for a fixed count
    stopping: str | None = None
    _inverses: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def d_mlp(self) -> int:
        return self.matrix.shape[0]

    def inverse(self, ridge: float = 0.0) -> InverseSecondMoment:
        """The float64 factorisation of ``C + ridge·mean(diag C)·I``, computed once per ridge."""
        if ridge not in self._inverses:
            self._inverses[ridge] = InverseSecondMoment.from_matrix(self.matrix, ridge)
        return self._inverses[ridge]

    def eigenvalue_range(self) -> tuple[float, float]:
        """Smallest and largest eigenvalue (float64 ``eigvalsh``; ``C`` is symmetric)."""
        eig = torch.linalg.eigvalsh(self.matrix.double())
        return eig[0].item(), eig[-1].item()

    def condition_number(self) -> float:
        """``λmax / λmin``; ``inf`` when ``C`` is singular (then use a ridge)."""
        low, high = self.eigenvalue_range()
        return high / low if low > 0 else math.inf

    def check_matches(self, model: str | Identified | None = None, layer: int | None = None,
                      d_mlp: int | None = None, source: str = "these statistics") -> None:
        """Raise :class:`StatsMismatchError` unless these are stats of that model/layer/width.

        ``model`` is a loaded model (which also recognises its identities of rome-edit 0.1.0,
        :mod:`rome_edit.models.identity`) or an identity string; the fingerprint decides, the
        name (how it was loaded) does not."""
        wrong_model = model is not None and not same_model(model, self.model_identity)
        model_identity = model if isinstance(model, str) or model is None else model.identity
        wrong_layer = layer is not None and layer != self.layer
        if wrong_model or wrong_layer:
            raise StatsMismatchError(
                f"{source} are stats of model {self.model_identity} layer {self.layer} but "
                f"editing model {model_identity or self.model_identity} layer "
                f"{self.layer if layer is None else layer}: recompute them with "
                f"rome_edit.stats.compute_second_moment(lm, layer="
                f"{self.layer if layer is None else layer})"
                + (" on the model being edited" if wrong_model else "") + ".",
                parameters=("compute_second_moment",),
            )
        if d_mlp is not None and d_mlp != self.d_mlp:
            raise StatsMismatchError(
                f"{source} are {self.d_mlp}×{self.d_mlp} but the keys of this model are {d_mlp} "
                f"wide: recompute them on this model with "
                f"rome_edit.stats.compute_second_moment(lm, layer={self.layer}).",
                parameters=("compute_second_moment",),
            )

    def save(self, path: str | Path) -> Path:
        """Write atomically: a temp file in the same folder, then ``os.replace``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": FORMAT, "model_identity": self.model_identity, "layer": str(self.layer),
            "corpus_id": self.corpus_id, "n_documents": str(self.n_documents),
            "n_tokens": str(self.n_tokens), "dtype": self.dtype, "d_mlp": str(self.d_mlp),
        }
        if self.stopping is not None:
            metadata["stopping"] = self.stopping
        saved = atomic_save_tensors({TENSOR_NAME: self.matrix.contiguous()}, path, metadata)
        remove_partial_writes(saved)  # of earlier runs killed while saving
        return saved

    @classmethod
    def load(cls, path: str | Path, model: str | Identified | None = None,
             layer: int | None = None, d_mlp: int | None = None) -> SecondMoment:
        """Read a file written by :meth:`save`; with expectations given, check them too."""
        stats = _read(Path(path))
        stats.check_matches(model, layer, d_mlp, source=f"{path}")
        return stats


# What fixes a missing or unusable statistics file (the CLI names its own command for it).
_REDO = ("compute_second_moment", "stats")


def _read(path: Path) -> SecondMoment:
    if not path.is_file():
        raise MissingFileError(f"statistics file {path} does not exist; compute it with "
                               "rome_edit.stats.compute_second_moment(lm, layer=L) and "
                               "SecondMoment.save(path).", parameters=_REDO)
    redo = ("recompute it with rome_edit.stats.compute_second_moment(lm, layer=L) and "
            "SecondMoment.save(path)")
    try:
        tensors = load_file(path)  # safetensors only: never unpickles
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, ValueError, OSError) as err:
        raise StatsFileError(f"{path} is not a safetensors statistics file ({err}); rome_edit "
                             f"never unpickles (.pt/.pkl/.npz are refused): {redo}.",
                             parameters=_REDO) from None
    if TENSOR_NAME not in tensors or metadata.get("format") != FORMAT:
        raise StatsFileError(f"{path} holds no rome_edit second moment (tensors "
                             f"{sorted(tensors)}, format {metadata.get('format')!r}): {redo}.",
                             parameters=_REDO)
    matrix = tensors[TENSOR_NAME]
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise StatsFileError(f"{path}: the second moment has shape {tuple(matrix.shape)}, not "
                             f"square: {redo}.", parameters=_REDO)
    if str(matrix.shape[0]) != metadata.get("d_mlp"):
        raise StatsFileError(f"{path}: d_mlp {metadata.get('d_mlp')} in the header but the "
                             f"matrix is {matrix.shape[0]} wide: {redo}.", parameters=_REDO)
    if not torch.isfinite(matrix).all():
        bad = (~torch.isfinite(matrix)).sum().item()
        raise StatsFileError(f"{path}: the second moment has {bad} NaN/Inf entries: {redo} "
                             "(in float64 if it overflowed).", parameters=_REDO)
    try:
        return SecondMoment(matrix, metadata["model_identity"], int(metadata["layer"]),
                            metadata["corpus_id"], int(metadata["n_documents"]),
                            int(metadata["n_tokens"]), metadata["dtype"],
                            metadata.get("stopping"))
    except (KeyError, ValueError) as err:
        raise StatsFileError(f"{path}: malformed metadata ({err}): {redo}.",
                             parameters=_REDO) from None


def context_length(lm: LoadedModel) -> int:
    """The model's context length in tokens (``n_positions`` / ``max_position_embeddings``)."""
    config = lm.model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(lm.tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    raise ParameterError("the model config states no context length; pass max_length (tokens "
                         "per document).", parameters=("max_length",))


BATCH_WINDOW = 32  # batches whose documents are sorted by length together


def _batches(items: Iterable[list[int]], size: int, window: int = BATCH_WINDOW
             ) -> Iterator[list[list[int]]]:
    """Batches of ``size`` documents, grouped by length within windows of ``window`` batches.

    Grouping similar lengths cuts the padding the forward pass computes and discards (about
    half of the positions on the bundled corpus) while the result, a sum over tokens, is the
    same up to float rounding; the reference groups by length too.
    """
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size * window)):
        chunk.sort(key=len)
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


@torch.no_grad()
def compute_second_moment(
    lm: LoadedModel,
    layer: int,
    corpus: TextCorpus | None = None,
    n_samples: int = 100_000,
    dtype: str = "float32",
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = True,
    workers: Workers = SINGLE,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 25,
    until_stable: Stability | StabilityMonitor | None = None,
) -> SecondMoment:
    """``C`` at ``layer`` over the first ``n_samples`` documents of ``corpus``.

    Documents are truncated to ``max_length`` tokens (default: the context length, as in the
    reference), batched right-padded, and every non-padding position's key is accumulated.
    The forward pass stops right after ``W_out`` of ``layer``: later layers never run.
    With several data-parallel ``workers`` each takes every N-th batch and the sums are
    all-reduced, so every process returns the same ``C`` as one process would (up to the
    order of float additions).  With a ``checkpoint`` path the running sum is saved there
    (atomically) every ``checkpoint_every`` batches and a killed pass resumes from it
    (:mod:`rome_edit.stats.checkpoint`); the file is removed when the pass completes.
    With ``until_stable`` the pass stops as soon as ``u = C⁻¹k`` of its probe keys settles
    (:mod:`rome_edit.stats.stability`), ``n_samples`` being the most it reads; pass a
    :class:`StabilityMonitor` to read its checks afterwards.
    """
    if min(n_samples, batch_size, checkpoint_every) < 1:
        raise ValueError(f"n_samples ({n_samples}), batch_size ({batch_size}) and "
                         f"checkpoint_every ({checkpoint_every}) must be >= 1.")
    stats_dtype(dtype)
    check_layer(lm.model, lm.arch, layer)
    corpus = corpus if corpus is not None else bundled_corpus()
    name = lm.arch.out_proj.format(layer)
    _, d_mlp = mlp_widths(lm.model, lm.arch)
    tokenizer = lm.tokenizer
    pad = pad_id(tokenizer)
    max_length = max_length or context_length(lm)
    accumulator = SecondMomentAccumulator(d_mlp, dtype)
    documents = itertools.islice(tokenize_documents(corpus, tokenizer, max_length), n_samples)
    monitor = (StabilityMonitor(until_stable) if isinstance(until_stable, Stability)
               else until_stable)
    if monitor is not None and workers.parallel:
        raise ParameterError("until_stable decides after each check of the whole sum; run it in "
                             "one process, or give a fixed n_samples (until_stable=None) to split "
                             "the pass.", parameters=("until_stable", "n_samples"))
    identity = PassIdentity(
        f"{lm.fingerprint}|{layer}|{corpus.corpus_id}|{dtype}|{n_samples}|"
        f"{max_length}" + (f"|{monitor.rule.key()}" if monitor else ""), batch_size,
        workers.rank, workers.world_size)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    resumed = load_checkpoint(checkpoint, identity) if checkpoint else EMPTY
    accumulator.restore(resumed)
    n_documents = resumed.n_documents
    log.info("second moment of %s at %s over %s (up to %d documents, %s); the forward pass "
             "runs blocks 0..%d only", lm.identity, name, corpus.corpus_id, n_samples, dtype,
             layer)
    started = time.perf_counter()
    # The bar counts documents (its total is the cap: a corpus may hold fewer, and then the
    # pass ends early) and shows the tokens read so far, what the cost follows.
    with capture(lm.model, [name], inputs=True, outputs=False, stop_after=name) as record, \
            tqdm(total=n_samples, unit="doc", desc=f"C = E[kkᵀ] at layer {layer}",
                 disable=not progress or not workers.is_main) as bar:
        # Batches are sorted by length within windows; a pass that may stop checks only at a
        # window's end, so what it has read is always the first n_documents documents (the
        # same set a fixed count of n_documents reads), never the short half of a window.
        window = BATCH_WINDOW if monitor is None else -(-monitor.rule.first_check // batch_size)
        for index, batch in enumerate(_batches(documents, batch_size, window)):
            if not workers.owns(index) or index < resumed.next_batch:
                bar.update(len(batch))  # another process's batch, or already in the sum
                continue
            ids, mask = right_pad(batch, pad, lm.device)
            run_until(lm.model, input_ids=ids, attention_mask=mask)
            keys = record.inputs.pop(name, None)
            if keys is None:
                raise ParameterError(f"module {name} did not run in the forward pass; check the "
                                     "out_proj template (load_model(templates={'out_proj': "
                                     "...})).", parameters=("templates",))
            keys = keys[mask.to(keys.device).bool()]
            accumulator.update(keys)
            n_documents += len(batch)
            bar.set_postfix(tokens=accumulator.n_tokens, refresh=False)
            bar.update(len(batch))
            if monitor is not None:
                monitor.observe(keys)
                window_end = (index + 1) % window == 0
                if window_end and monitor.due(n_documents) and monitor.stable(
                        accumulator.current(), n_documents, accumulator.n_tokens):
                    break
            if checkpoint and (index // workers.world_size + 1) % checkpoint_every == 0:
                save_checkpoint(checkpoint, identity,
                                accumulator.snapshot(n_documents, index + 1))
    seconds = time.perf_counter() - started
    log.info("read %d documents, %d tokens at layer %d in %.1f s (%.0f tokens/s)",
             n_documents - resumed.n_documents, accumulator.n_tokens - resumed.n_tokens, layer,
             seconds, (accumulator.n_tokens - resumed.n_tokens) / max(seconds, 1e-9))
    accumulator.all_reduce(workers)
    n_documents = workers.sum_int(n_documents)
    stopping = None
    if monitor is not None:
        where = (f"stable at {n_documents} documents" if monitor.stopped_at
                 else f"not stable by {n_documents} documents (the cap)")
        stopping = f"{monitor.rule.key()}; {where}"
        if not monitor.stopped_at:
            log.warning("C did not meet the stability rule within %d documents; raise "
                        "n_samples or lower Stability.min_cosine (command line: --n-samples, "
                        "--min-cosine).", n_documents)
    result = accumulator.result(lm.identity, layer, corpus.corpus_id, n_documents, stopping)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        remove_partial_writes(checkpoint)  # a checkpoint write a kill interrupted
    return result

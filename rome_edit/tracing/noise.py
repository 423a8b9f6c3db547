"""The corruption of causal tracing: Gaussian noise on the subject's token embeddings.

Meng et al. (2022, "Locating and Editing Factual Associations in GPT", §2.1) corrupt a prompt by
adding ε ~ N(0, ν²) to the embedding-layer output of every subject token, with ν three times the
standard deviation of embeddings over subject tokens ("s3"), and average over 10 noised copies.
The reference draws the noise from a generator re-seeded on every call, so all calls (and every
restoration) see the same noise; :func:`subject_noise` keeps that property.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rome_edit.models.architectures import get_module
from rome_edit.models.hooks import edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.models.subject import locate_subject

DEFAULT_NOISE = "3x"
_MULTIPLE = re.compile(r"^\s*(?:s\s*([0-9.]+)|([0-9.]+)\s*[x×])\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class NoiseSpec:
    """A noise level: ``value`` × embedding std (``relative``) or an absolute std."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, spec: str | float | NoiseSpec) -> NoiseSpec:
        """``"3x"``/``"s3"`` → 3 × embedding std; ``"0.1"`` or ``0.1`` → absolute std 0.1."""
        if isinstance(spec, NoiseSpec):
            return spec
        if isinstance(spec, int | float):
            value, relative = float(spec), False
        else:
            match = _MULTIPLE.match(str(spec))
            try:
                if match:
                    value, relative = float(match.group(1) or match.group(2)), True
                else:
                    value, relative = float(spec), False
            except ValueError:
                value, relative = float("nan"), False
        if not value > 0 or value == float("inf"):
            raise ValueError(
                f"noise level {spec!r} is not a positive number; write a multiple of the "
                "embedding std such as '3x' (or 's3'), or an absolute std such as '0.05'."
            )
        return cls(value, relative)

    def __str__(self) -> str:
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"


@torch.no_grad()
def embedding_std(lm: LoadedModel, template: str, subjects: Sequence[str]) -> float:
    """Std of the embedding-layer output over every subject token of ``template`` filled in.

    As in the reference, one std over all elements (tokens × features) pooled across subjects.
    """
    if not subjects:
        raise ValueError("no subjects to estimate the embedding std from; pass at least one.")
    embed = get_module(lm.model, lm.arch.embed)
    rows = []
    for subject in subjects:
        span = locate_subject(lm.tokenizer, template, subject)
        ids = torch.tensor(span.input_ids[span.start : span.end], device=lm.device)
        rows.append(embed(ids).float())
    return torch.cat(rows).std().item()


def resolve_noise(
    lm: LoadedModel, spec: str | float | NoiseSpec, template: str, subjects: Sequence[str]
) -> float:
    """The absolute noise std for ``spec``; multiples are scaled by :func:`embedding_std`."""
    spec = NoiseSpec.parse(spec)
    if not spec.relative:
        return spec.value
    return spec.value * embedding_std(lm, template, subjects)


def subject_noise(
    n_copies: int, n_tokens: int, d_model: int, std: float, seed: int,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise of shape ``(n_copies, n_tokens, d_model)``: the same tensor for the same arguments.

    A fresh CPU generator per call (not the global RNG) makes the draw independent of anything
    else the process has sampled, and of the device.
    """
    if n_copies < 1:
        raise ValueError(f"the number of noised copies must be ≥ 1 (got {n_copies}).")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_copies, n_tokens, d_model), generator=generator) * std
    return noise.to(device=device, dtype=dtype)


@contextmanager
def corrupt_subject(
    lm: LoadedModel, start: int, end: int, noise: torch.Tensor
) -> Iterator[None]:
    """Add ``noise`` to the embedding output at token positions ``start:end``.

    Row ``r`` of a batch gets copy ``r % n_copies``, so a batch of several restorations, each
    laid out as ``n_copies`` consecutive rows, corrupts every group with the same noise.
    """
    n_copies = noise.shape[0]

    def add_noise(hidden: torch.Tensor, name: str) -> torch.Tensor:
        if hidden.shape[0] % n_copies:
            raise ValueError(f"batch of {hidden.shape[0]} rows is not a multiple of {n_copies}.")
        tiled = noise.to(hidden.dtype).repeat(hidden.shape[0] // n_copies, 1, 1)
        hidden = hidden.clone()
        hidden[:, start:end] += tiled
        return hidden

    with edit_output(lm.model, {lm.arch.embed: add_noise}):
        yield

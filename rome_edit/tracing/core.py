"""What both causal-tracing implementations share: the prompt, the window, the clean and
corrupted runs, and the hooks that copy clean states back into corrupted rows.

Meng et al. (2022, §2.1): a *clean* run gives p_clean = P(answer | prompt); *corrupted* runs
(noise on the subject's embeddings, :mod:`rome_edit.tracing.noise`) give p_corrupt, the mean
over the noised copies; a *restored* run copies the clean value of one state — at token ``t``
and layer ``l`` — back into the corrupted copies and gives p_restored.  The indirect effect of
that state is ``IE = p_restored − p_corrupt``; the total effect is ``p_clean − p_corrupt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from rome_edit.errors import ParameterError
from rome_edit.models.architectures import Architecture
from rome_edit.models.hooks import EditFn, capture
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import single_token_id
from rome_edit.models.subject import SubjectNotFoundError, locate_subject
from rome_edit.tracing.noise import corrupt_subject

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("hidden", "mlp", "attn")
# A restoration: which kind of state, at which token, centred on which layer.
Cell = tuple[Kind, int, int]


def default_window(n_layers: int) -> int:
    """The reference's window of 10 layers on 28-layer GPT-J, scaled to the model's depth."""
    return max(1, round(10 * n_layers / 28))


def check_window(window: int | None, n_layers: int) -> int:
    window = default_window(n_layers) if window is None else window
    if not 1 <= window <= n_layers:
        raise ParameterError(
            f"window {window} is not between 1 and the model's {n_layers} layers; pass a smaller "
            f"window= (default for this model: {default_window(n_layers)}).",
            parameters=("window",),
        )
    return window


def check_kinds(kinds: Sequence[str]) -> tuple[Kind, ...]:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown kinds {bad or kinds!r}; choose from {list(KINDS)}.")
    return tuple(dict.fromkeys(kinds))  # type: ignore[arg-type]


def restored_layers(kind: Kind, layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a cell: ``layer`` itself for hidden states; for MLP and attention
    the reference's window ``[layer − ⌊w/2⌋, layer + ⌈w/2⌉)`` clipped to the model."""
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2))


def module_name(arch: Architecture, kind: Kind, layer: int) -> str:
    """Hidden = the block's output (residual stream after block ``layer``)."""
    return {"hidden": arch.block, "mlp": arch.mlp, "attn": arch.attn}[kind].format(layer)


def as_template(prompt: str, subject: str) -> str:
    """A prompt with ``{}`` is a template already; otherwise the subject's first occurrence
    becomes the ``{}`` (other braces escaped)."""
    if "{}" in prompt:
        return prompt
    at = prompt.find(subject) if subject else -1
    if at < 0:
        raise SubjectNotFoundError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; put '{{}}' where the "
            "subject goes (e.g. 'Name: {}. Gender:') or fix the subject's spelling."
        )
    escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(prompt[:at]) + "{}" + escape(prompt[at + len(subject) :])


@dataclass(frozen=True)
class TracePrompt:
    """A tokenized prompt, its subject span ``[start, end)`` and the answer being traced."""

    template: str
    subject: str
    prompt: str
    input_ids: torch.Tensor  # (1, T)
    start: int
    end: int
    tokens: tuple[str, ...]
    answer: str
    answer_id: int

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[1]


@torch.no_grad()
def prepare_prompt(
    lm: LoadedModel, prompt: str, subject: str, answer: str | None = None
) -> TracePrompt:
    """Locate the subject and fix the answer: the given single-token text, or by default the
    model's top next-token prediction on the clean prompt (as the reference does)."""
    template = as_template(prompt, subject)
    span = locate_subject(lm.tokenizer, template, subject)
    ids = torch.tensor([span.input_ids], device=lm.device)
    if answer is None:
        answer_id = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        answer = lm.tokenizer.decode([answer_id])
    else:
        answer_id = single_token_id(lm.tokenizer, answer)
    tokens = tuple(lm.tokenizer.decode([i]) for i in span.input_ids)
    return TracePrompt(template, subject, span.prompt, ids, span.start, span.end, tokens,
                       answer, answer_id)


def answer_probability(logits: torch.Tensor, answer_id: int, n_copies: int) -> torch.Tensor:
    """Mean over each group of ``n_copies`` rows of softmax(last-position logits)[answer]."""
    probs = torch.softmax(logits[:, -1].float(), dim=-1)[:, answer_id]
    return probs.view(-1, n_copies).mean(dim=1)


def state_names(arch: Architecture, kinds: Sequence[Kind], n_layers: int) -> list[str]:
    return [module_name(arch, k, layer) for k in kinds for layer in range(n_layers)]


@torch.no_grad()
def clean_run(
    lm: LoadedModel, tp: TracePrompt, names: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clean next-token distribution (float32, CPU) and the clean output ``(T, d)`` of
    every named module."""
    with capture(lm.model, names) as rec:
        logits = lm.model(input_ids=tp.input_ids).logits
    probs = torch.softmax(logits[0, -1].float(), dim=-1).cpu()
    return probs, {name: out[0] for name, out in rec.outputs.items()}


@torch.no_grad()
def corrupted_run(lm: LoadedModel, tp: TracePrompt, noise: torch.Tensor) -> float:
    """p_corrupt: the answer's probability averaged over the noised copies."""
    batch = tp.input_ids.repeat(noise.shape[0], 1)
    with corrupt_subject(lm, tp.start, tp.end, noise):
        logits = lm.model(input_ids=batch).logits
    return answer_probability(logits, tp.answer_id, noise.shape[0]).item()


def restore_edits(
    plan: dict[str, list[tuple[int, int, torch.Tensor]]], n_copies: int
) -> dict[str, EditFn]:
    """Hooks that write clean states into corrupted rows.

    ``plan[module] = [(group, position, value), ...]``: in the ``n_copies`` rows of ``group``
    the module's output at batch ``position`` becomes ``value`` — one state ``(d,)`` for every
    copy, or one per copy ``(n_copies, d)``.
    """
    edits: dict[str, EditFn] = {}
    for name, entries in plan.items():
        groups = torch.tensor([g for g, _, _ in entries])
        rows = (groups[:, None] * n_copies + torch.arange(n_copies)).flatten()
        positions = torch.tensor([p for _, p, _ in entries]).repeat_interleave(n_copies)
        values = torch.cat([v.expand(n_copies, v.shape[-1]) for _, _, v in entries])

        def edit(hidden: torch.Tensor, _: str, rows=rows, positions=positions, values=values):
            index = (rows.to(hidden.device), positions.to(hidden.device))
            return hidden.index_put(index, values.to(hidden.device, hidden.dtype))

        edits[name] = edit
    return edits

"""Neuron importance: causal tracing per MLP neuron (Helm-Burger 2022, "Progress Report 4: logit
lens redux", LessWrong), and gradient attributions.

A *neuron* is one coordinate ``j`` of the MLP key ``k`` (the output projection's input, size
``d_mlp``) at layer ``l`` and token ``t``.  Its **indirect effect** is that of causal tracing
(Meng et al. 2022, §2.1) restricted to that one coordinate: in the corrupted copies, set
``k_j(l, t)`` back to its clean value and measure ``IE = p_restored − p_corrupt``.

The fast method (default) reuses the corrupted run as :mod:`rome_edit.tracing.fast` does: the
MLP output ``W_out k + b`` is linear in ``k`` and, in the families of
:data:`~rome_edit.tracing.reuse.RESIDUAL_FAMILIES`, reaches the block's output unchanged, so
restoring ``k_j`` changes block ``l``'s output at token ``t`` only, by
``W_out[:, j] · (k_j^clean − k_j^corrupt)`` (per noised copy).  Blocks ``≤ l`` are stubbed with
their cached corrupted outputs, positions ``< t`` come from the corrupted keys/values cache, and
every neuron of one ``(l, t)`` is a group of ``n_copies`` rows of one batched pass.  The plain
method overwrites the key coordinate with a hook on the output projection's input in a full
corrupted forward pass; the two agree to float rounding (tested).  Cells that cannot matter by
causality are exactly 0 and not run: tokens before the subject, and the last layer except at the
last token.

Two cheap attributions from one backward pass each:

* ``attribution`` — gradient × activation difference in the corrupted run (first-order Taylor
  estimate of the indirect effect, "attribution patching"):
  ``mean over copies of ∂p/∂k_j · (k_j^clean − k_j^corrupt)``;
* ``grad_x_act`` — plain gradient × activation of the clean run, ``k_j · ∂p_clean/∂k_j``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from rome_edit.models.architectures import get_module, mlp_widths, out_proj_weight
from rome_edit.models.compat import accepts_logits_to_keep, cache_kwargs
from rome_edit.models.hooks import capture, edit_output
from rome_edit.models.loading import LoadedModel
from rome_edit.tracing.core import TracePrompt, answer_probability, prepare_prompt
from rome_edit.tracing.fast import rows_per_chunk
from rome_edit.tracing.noise import corrupt_subject, subject_noise
from rome_edit.tracing.reuse import (
    RESIDUAL_FAMILIES,
    Corrupted,
    corrupted_pass,
    last_position_mlp,
    prefix_cache,
    skip_blocks,
)
from rome_edit.tracing.trace import DEFAULT_SAMPLES, DEFAULT_SEED

__all__ = ["NeuronTrace", "neuron_keys", "trace_neurons"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronTrace:
    """Per-neuron importance of one prompt; grids are ``(n_layers, n_tokens, d_mlp)``."""

    prompt: str
    subject: str
    tokens: tuple[str, ...]
    subject_start: int
    subject_end: int
    answer: str
    p_clean: float
    p_corrupt: float
    effects: torch.Tensor  # indirect effect p_restored − p_corrupt
    attribution: torch.Tensor  # ∂p/∂k · (k_clean − k_corrupt), corrupted run
    grad_x_act: torch.Tensor  # k · ∂p/∂k, clean run
    noise_std: float
    samples: int
    seed: int
    method: str

    @property
    def layer_means(self) -> torch.Tensor:
        """Helm-Burger's (2022) "mean layer importances": the mean effect over neurons,
        ``(L, T)``."""
        return self.effects.mean(dim=-1)

    def traced_mask(self) -> torch.Tensor:
        """``(L, T)`` True where restorations can matter (the cells that were run)."""
        n_layers, n_tokens, _ = self.effects.shape
        mask = torch.zeros(n_layers, n_tokens, dtype=torch.bool)
        mask[: n_layers - 1, self.subject_start :] = True
        mask[n_layers - 1, n_tokens - 1] = True
        return mask

    def summary(self) -> dict:
        return {"prompt": self.prompt, "subject": self.subject, "answer": self.answer,
                "tokens": list(self.tokens),
                "subject_tokens": [self.subject_start, self.subject_end],
                "p_clean": self.p_clean, "p_corrupt": self.p_corrupt,
                "noise_std": self.noise_std, "samples": self.samples, "seed": self.seed,
                "method": self.method, "shape": list(self.effects.shape),
                "layer_means": self.layer_means.tolist()}

    def save(self, directory: str | Path) -> Path:
        """``neurons.safetensors``: the three grids, float32 (``rome-edit neurons`` writes the
        summary, agreement and edit relation beside it as ``neurons.json``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"effects": self.effects.float().contiguous(),
                   "attribution": self.attribution.float().contiguous(),
                   "grad_x_act": self.grad_x_act.float().contiguous()},
                  str(directory / "neurons.safetensors"))
        return directory


def _weight_columns(lm: LoadedModel, layer: int) -> torch.Tensor:
    """``W_out`` as ``(d_model, d_mlp)`` whatever its storage (Conv1D stores the transpose)."""
    weight = out_proj_weight(lm.model, lm.arch, layer)
    return weight.T if lm.arch.out_proj_transposed else weight


@torch.no_grad()
def neuron_keys(lm: LoadedModel, tp: TracePrompt, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean keys ``(L, T, d_mlp)`` and corrupted keys ``(L, n_copies, T, d_mlp)``."""
    names = [lm.arch.out_proj.format(layer) for layer in range(lm.n_layers)]
    with capture(lm.model, names, inputs=True, outputs=False) as rec:
        lm.model(input_ids=tp.input_ids)
    clean = torch.stack([rec.inputs[n][0] for n in names])
    with capture(lm.model, names, inputs=True, outputs=False) as rec, \
            corrupt_subject(lm, tp.start, tp.end, noise):
        lm.model(input_ids=tp.input_ids.repeat(noise.shape[0], 1))
    corrupt = torch.stack([rec.inputs[n] for n in names])
    return clean, corrupt


@contextmanager
def _set_key_coordinates(lm: LoadedModel, layer: int, position: int, neurons: torch.Tensor,
                         values: torch.Tensor, n_copies: int) -> Iterator[None]:
    """Group ``g`` (rows ``g·n .. g·n+n−1``) gets key coordinate ``neurons[g]`` at
    ``position`` of ``layer`` set to ``values[g]``."""
    module = get_module(lm.model, lm.arch.out_proj.format(layer))
    rows = torch.arange(len(neurons) * n_copies)
    cols = neurons.repeat_interleave(n_copies)
    vals = values.repeat_interleave(n_copies)

    def hook(mod, args):
        key = args[0]
        dev = key.device
        key = key.index_put((rows.to(dev), torch.full_like(rows, position).to(dev),
                             cols.to(dev)), vals.to(dev, key.dtype))
        return (key, *args[1:])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _plain_pass(lm: LoadedModel, tp: TracePrompt, noise: torch.Tensor, layer: int, token: int,
                neurons: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    n = noise.shape[0]
    ids = tp.input_ids.repeat(len(neurons) * n, 1)
    with corrupt_subject(lm, tp.start, tp.end, noise), \
            _set_key_coordinates(lm, layer, token, neurons, clean[layer, token, neurons], n):
        logits = lm.model(input_ids=ids).logits
    return answer_probability(logits, tp.answer_id, n).double().cpu()


@torch.no_grad()
def _fast_pass(lm: LoadedModel, tp: TracePrompt, corrupted: Corrupted, layer: int, token: int,
               neurons: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor
               ) -> torch.Tensor:
    n = corrupt.shape[1]
    groups = len(neurons)
    offset = token if corrupted.kv is not None else 0
    # Block `layer`'s output moves by W_out[:, j]·(k_j^clean − k_j^corrupt) at `token`, in
    # float32 so that half-precision weights do not lose the small change.
    diff = clean[layer, token, neurons].float()[:, None] - \
        corrupt[layer, :, token, neurons].float().T  # (groups, n)
    columns = _weight_columns(lm, layer)[:, neurons.to(lm.device)].float().T.cpu()
    shift = (diff[..., None] * columns[:, None, :]).reshape(groups * n, -1)

    def add(hidden: torch.Tensor, _name: str) -> torch.Tensor:
        hidden = hidden.clone()
        at = token - offset
        hidden[:, at] = (hidden[:, at].float() + shift.to(hidden.device)).to(hidden.dtype)
        return hidden

    below = layer + 1
    ids = tp.input_ids[:, offset:].expand(groups * n, -1)
    kwargs: dict = {"input_ids": ids}
    if offset:
        kwargs |= cache_kwargs(lm.model, prefix_cache([corrupted] * groups, offset, below))
        kwargs["use_cache"] = True
    if accepts_logits_to_keep(lm.model):
        kwargs["logits_to_keep"] = 1
    stub = corrupted.blocks[layer][:, offset:].repeat(groups, 1, 1)
    with last_position_mlp(lm), skip_blocks(lm, below, stub, corrupted.block_rest), \
            edit_output(lm.model, {lm.arch.block.format(layer): add}):
        logits = lm.model(**kwargs).logits
    return answer_probability(logits, tp.answer_id, n).double().cpu()


def _gradients(lm: LoadedModel, tp: TracePrompt, noise: torch.Tensor | None) -> torch.Tensor:
    """``∂p/∂k`` at every layer, ``(L, rows, T, d_mlp)``: p = mean over rows of the answer's
    probability; a zero tensor added to each key carries the gradient (its derivative is
    the total derivative through all later layers)."""
    zeros: list[torch.Tensor] = []
    handles = []

    def hook(mod, args):
        z = torch.zeros_like(args[0], requires_grad=True)
        zeros.append(z)
        return (args[0] + z, *args[1:])

    rows = noise.shape[0] if noise is not None else 1
    ids = tp.input_ids.repeat(rows, 1)
    try:
        for layer in range(lm.n_layers):
            module = get_module(lm.model, lm.arch.out_proj.format(layer))
            handles.append(module.register_forward_pre_hook(hook))
        with torch.enable_grad():
            if noise is not None:
                with corrupt_subject(lm, tp.start, tp.end, noise):
                    logits = lm.model(input_ids=ids).logits
            else:
                logits = lm.model(input_ids=ids).logits
            p = answer_probability(logits, tp.answer_id, rows)[0]
            grads = torch.autograd.grad(p, zeros)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([g.detach().float() for g in grads])


def trace_neurons(
    lm: LoadedModel, prompt: str, subject: str, answer: str | None = None, *,
    noise_std: float, samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
    layers: Sequence[int] | None = None, method: str = "fast", max_batch: int | None = None,
    progress: bool = True,
) -> NeuronTrace:
    """Indirect effect of every neuron (``layers``: default all) at every token, and the two
    gradient attributions, for ``answer`` (default: the model's top prediction)."""
    if method not in ("fast", "plain"):
        raise ValueError(f"unknown method {method!r}; use 'fast' or 'plain'.")
    if not noise_std > 0:
        raise ValueError(f"noise_std must be positive (got {noise_std}).")
    if method == "fast" and lm.arch.family not in RESIDUAL_FAMILIES:
        log.info("family %s is not known to add the MLP output to the residual unchanged; "
                 "using the plain method", lm.arch.family)
        method = "plain"
    n_layers = lm.n_layers
    chosen = sorted(set(range(n_layers) if layers is None else layers))
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: this model has layers "
                         f"0..{n_layers - 1}.")
    tp = prepare_prompt(lm, prompt, subject, answer)
    d_model, d_mlp = mlp_widths(lm.model, lm.arch)
    dtype = next(lm.model.parameters()).dtype
    noise = subject_noise(samples, tp.end - tp.start, d_model, noise_std, seed, dtype, lm.device)
    clean, corrupt = neuron_keys(lm, tp, noise)
    corrupted = corrupted_pass(lm, tp, noise)
    with torch.no_grad():
        probs = torch.softmax(lm.model(input_ids=tp.input_ids).logits[0, -1].float(), -1)
    p_clean = probs[tp.answer_id].item()
    T = tp.n_tokens
    effects = torch.zeros(n_layers, T, d_mlp, dtype=torch.float64)
    cells = [(layer, t) for layer in chosen for t in range(tp.start, T)
             if layer < n_layers - 1 or t == T - 1]
    per_pass = max(1, rows_per_chunk(lm, T, max_batch) // samples)
    bar = tqdm(total=len(cells) * d_mlp, disable=not progress, desc="neurons", unit="neuron")
    for layer, t in cells:
        for lo in range(0, d_mlp, per_pass):
            neurons = torch.arange(lo, min(d_mlp, lo + per_pass))
            if method == "fast":
                p = _fast_pass(lm, tp, corrupted, layer, t, neurons, clean, corrupt)
            else:
                p = _plain_pass(lm, tp, noise, layer, t, neurons, clean)
            effects[layer, t, neurons] = p - corrupted.p_corrupt
            bar.update(len(neurons))
    bar.close()
    grad_corrupt = _gradients(lm, tp, noise)  # (L, n, T, d_mlp)
    attribution = (grad_corrupt * (clean[:, None].float() - corrupt.float())).mean(1)
    grad_clean = _gradients(lm, tp, None)[:, 0]
    grad_x_act = grad_clean * clean.float()
    keep = torch.zeros(n_layers, dtype=torch.bool)
    keep[chosen] = True
    attribution[~keep] = 0
    grad_x_act[~keep] = 0
    log.info("neuron trace of %r: p_clean %.3f, p_corrupt %.3f", tp.prompt, p_clean,
             corrupted.p_corrupt)
    return NeuronTrace(tp.prompt, tp.subject, tp.tokens, tp.start, tp.end, tp.answer, p_clean,
                       corrupted.p_corrupt, effects, attribution.double().cpu(),
                       grad_x_act.double().cpu(), noise_std, samples, seed, method)

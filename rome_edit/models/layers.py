"""Running a contiguous range of a model's blocks (and the logit lens above it).

ROME's value loss is read at ``v_loss_layer``; below the last layer that is the logit lens
(final norm + unembedding applied to that block's output, nostalgebraist 2020).  Truncating the
block list lets the model's own forward build masks and rotary positions for the kept blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rome_edit.models.architectures import get_module, get_weight
from rome_edit.models.loading import LoadedModel


@contextmanager
def only_blocks(lm: LoadedModel, start: int, stop: int) -> Iterator[None]:
    """Temporarily keep only blocks ``start .. stop-1``; always restores the full list."""
    parent_name, _, attr = lm.arch.layers.rpartition(".")
    parent = get_module(lm.model, parent_name) if parent_name else lm.model
    full = getattr(parent, attr)
    if start == 0 and stop == len(full):
        yield
        return
    setattr(parent, attr, nn.ModuleList(list(full)[start:stop]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def logits_at_layer(lm: LoadedModel, layer: int, **inputs: torch.Tensor) -> torch.Tensor:
    """Logits read out after block ``layer`` (the model's own logits for the last layer)."""
    with only_blocks(lm, 0, layer + 1):
        return lm.model(**inputs).logits


@contextmanager
def fused_activations(model: nn.Module) -> Iterator[None]:
    """Swap transformers' Python ``gelu_new`` for torch's fused tanh-GELU; restore on exit.

    ``NewGELUActivation`` computes ``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`` in five Python
    tensor ops; ``nn.GELU(approximate="tanh")`` is the same formula in one kernel (results agree
    to float rounding).  On small models it is a large share of each forward and backward.
    """
    from transformers.activations import NewGELUActivation

    swapped = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                swapped.append((parent, name, child))
                setattr(parent, name, nn.GELU(approximate="tanh"))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


@torch.no_grad()
def layer_output(lm: LoadedModel, layer: int, keys: torch.Tensor) -> torch.Tensor:
    """The edit layer's output projection (bias included) applied to rows of ``keys`` with the
    current weights, in float32 on the CPU: the value ``W k + b`` a key reads."""
    name = lm.arch.out_proj.format(layer)
    module, weight = get_module(lm.model, name), get_weight(lm.model, name)
    return module(keys.to(device=weight.device, dtype=weight.dtype)).float().cpu()

"""GPT-J's rotary position embedding as one autograd node, for the batched value step's kernel.

GPT-J rotates each attention head's first ``rotary_dim`` query and key features in pairs
(Su et al. 2021, RoFormer): ``x·cos + turn(x)·sin`` with ``turn`` mapping each pair
``(x₂ᵢ, x₂ᵢ₊₁)`` to ``(−x₂ᵢ₊₁, x₂ᵢ)`` (transformers' ``rotate_every_two``).  The kernel applies it
to every query and key of every step, forward and backward, so its cost matters.
"""

from __future__ import annotations

import torch


def _turn(x: torch.Tensor) -> torch.Tensor:
    """GPT-J's ``rotate_every_two``: each feature pair ``(x₂ᵢ, x₂ᵢ₊₁)`` → ``(−x₂ᵢ₊₁, x₂ᵢ)``."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class _Rotary(torch.autograd.Function):
    """``x·cos + turn(x)·sin`` with a one-pass backward: ``turn`` is a signed permutation with
    ``turnᵀ = −turn``, so ``∂/∂x = g·cos − turn(g·sin)``.  (Autograd through the strided slices
    of ``turn`` would build and fill zero tensors for each slice.)"""

    @staticmethod
    def forward(ctx, x, sin, cos):
        ctx.save_for_backward(sin, cos)
        # written into a contiguous tensor even when x is a transposed view: the attention's
        # many tiny batched products are several times slower on strided operands
        out = torch.mul(x, cos, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        return out.addcmul_(_turn(x), sin)

    @staticmethod
    def backward(ctx, grad):
        sin, cos = ctx.saved_tensors
        return grad * cos - _turn(grad * sin), None, None


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, rot: int) -> torch.Tensor:
    """GPT-J's rotary embedding of each head's first ``rot`` features (``apply_rotary_pos_emb``);
    x: (rows, heads, seq, head_dim), sin/cos: (rows, 1, seq, rot), already repeated per pair.
    The result is contiguous."""
    if rot == x.shape[-1]:
        return _Rotary.apply(x, sin, cos)
    return torch.cat([_Rotary.apply(x[..., :rot], sin, cos), x[..., rot:]], dim=-1)

"""The model side of the linearised edit-layer MLP (Belrose & Rigg 2025): the MLP's parts as
``W_out σ(W_in x + b_in) + b_out`` and its inputs, keys and values recorded over a corpus.  The
maths (:mod:`rome_edit.linearisation.polynomial`, :mod:`rome_edit.linearisation.fit`)
needs no model; :func:`rome_edit.linearisation.run.linearize_mlp` joins the two.

The approximated function is the MLP module itself, ``x ↦ k = σ(W_in x + b_in)`` and
``x ↦ v = W_out k + b_out`` with ``x`` the MLP's input (the normalised residual: ``ln_1(h)`` in
GPT-J's parallel block).  The LayerNorm before it is not part of the approximant — it is not of
the ``σ(Wx + b)`` form the closed form needs.  Inputs, keys and values are recorded from the
model's own modules over a corpus; documents are split into a fitting part (μ, Σ of the inputs)
and a held-out part (R²).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rome_edit.models.architectures import get_module
from rome_edit.models.hooks import capture, run_until
from rome_edit.models.loading import LoadedModel

__all__ = ["ACTIVATION_MODES", "MLPParts", "collect_mlp_io", "mlp_parts", "moments_activation"]

# The MLP's input projection and activation, by attribute name inside the MLP module.
IN_PROJ_NAMES = ("fc_in", "c_fc", "dense_h_to_4h")
GATED_NAMES = ("gate_proj", "w1", "gate_up_proj")
ACTIVATION_MODES = ("auto", "quadrature", "gelu_erf")


@dataclass(frozen=True)
class MLPParts:
    """``W_in (d_mlp, d_in)``, ``b_in``, the activation module, ``W_out (d_out, d_mlp)``,
    ``b_out``, and the activation's closed form if it has one."""

    w_in: Tensor
    b_in: Tensor | None
    activation: nn.Module | Callable[[Tensor], Tensor]
    w_out: Tensor
    b_out: Tensor | None
    closed_form: str | None  # "gelu_erf", "relu" or None
    activation_name: str


def _linear(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(W, b)`` with ``y = W x + b`` for ``nn.Linear`` and GPT-2's ``Conv1D`` (stored
    transposed)."""
    weight = module.weight.detach()
    bias = None if getattr(module, "bias", None) is None else module.bias.detach()
    return (weight, bias) if isinstance(module, nn.Linear) else (weight.T, bias)


def _closed_form(act: nn.Module) -> tuple[str | None, str]:
    name = type(act).__name__
    if isinstance(act, nn.ReLU) or name == "ReLU":
        return "relu", name
    if isinstance(act, nn.GELU):
        return (None, "GELU(tanh)") if act.approximate == "tanh" else ("gelu_erf", "GELU(erf)")
    if name == "GELUActivation" and not getattr(act, "use_gelu_python", False):
        return "gelu_erf", name  # transformers' exact GELU is torch's erf form
    return None, name


def mlp_parts(lm: LoadedModel, layer: int) -> MLPParts:
    """The edit-layer MLP as ``W_out σ(W_in x + b_in) + b_out``; gated MLPs are refused."""
    mlp = get_module(lm.model, lm.arch.mlp.format(layer))
    children = dict(mlp.named_children())
    if any(n in children for n in GATED_NAMES):
        raise ValueError(
            f"layer {layer}'s MLP is gated (a GLU: {sorted(children)}); the closed-form "
            "approximant needs W_out·σ(W_in·x + b) (GPT-J, GPT-2, GPT-Neo, GPT-NeoX).")
    in_name = next((n for n in IN_PROJ_NAMES if n in children), None)
    act = children.get("act")
    if in_name is None or act is None:
        raise ValueError(f"cannot find the input projection and activation of "
                         f"{lm.arch.mlp.format(layer)} (children {sorted(children)}).")
    w_in, b_in = _linear(children[in_name])
    w_out, b_out = _linear(get_module(lm.model, lm.arch.out_proj.format(layer)))
    closed, name = _closed_form(act)
    return MLPParts(w_in, b_in, act, w_out, b_out, closed, name)


@torch.no_grad()
def collect_mlp_io(lm: LoadedModel, layer: int, texts: Sequence[str], max_length: int = 128
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token MLP inputs ``x``, keys ``k``, values ``v`` (float32, CPU) over ``texts`` and
    each token's document index; the forward pass stops after the layer's MLP."""
    mlp_name = lm.arch.mlp.format(layer)
    proj = lm.arch.out_proj.format(layer)
    xs, ks, vs, docs = [], [], [], []
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        if not ids:
            continue
        with capture(lm.model, [mlp_name, proj], inputs=True, outputs=True,
                     stop_after=mlp_name) as rec:
            run_until(lm.model, input_ids=torch.tensor([ids], device=lm.device))
        xs.append(rec.inputs[mlp_name][0].float().cpu())
        ks.append(rec.inputs[proj][0].float().cpu())
        vs.append(rec.outputs[proj][0].float().cpu())
        docs.append(torch.full((len(ids),), i))
    if not xs:
        raise ValueError("no tokens to record MLP activations from; pass non-empty texts.")
    return torch.cat(xs), torch.cat(ks), torch.cat(vs), torch.cat(docs)


def moments_activation(parts: MLPParts, moments: str = "auto") -> str | Callable[[Tensor], Tensor]:
    """What :func:`~rome_edit.linearisation.polynomial.gaussian_moments` should use: ``auto`` —
    the closed form where the activation has one, else the model's own activation module
    (quadrature); ``quadrature`` — always the module; ``gelu_erf`` — the erf-GELU closed form
    (for tanh-GELU models an approximation of their activation)."""
    if moments not in ACTIVATION_MODES:
        raise ValueError(f"unknown moments {moments!r}; choose from {list(ACTIVATION_MODES)}.")
    if moments == "gelu_erf":
        return "gelu_erf"
    if moments == "auto" and parts.closed_form is not None:
        return parts.closed_form
    return parts.activation

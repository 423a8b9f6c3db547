"""Where each model family keeps the parts ROME touches.

One :class:`Architecture` per family names, as module-path templates with ``{}`` for the layer:
the blocks, the MLP, the MLP output projection (its *input* is ROME's key ``k``, its *output* the
value ``v``), the attention module, the token embeddings, the final norm and the unembedding.
A new family needs a table entry or user-supplied templates, never new code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from rome_edit.errors import ParameterError
from rome_edit.models.compat import output_embedding_name


class UnsupportedModelError(ParameterError):
    """The model family is not in the table and no templates were given."""


@dataclass(frozen=True)
class Architecture:
    family: str
    layers: str  # the ModuleList of blocks
    block: str  # one block, "{}" = layer index
    mlp: str
    out_proj: str  # W_out: key in, value out
    attn: str
    embed: str
    final_norm: str
    lm_head: str
    n_layers_attr: str = "num_hidden_layers"
    parallel: bool = False  # attention and MLP both read ln(h) of the same residual
    out_proj_transposed: bool = False  # GPT-2 Conv1D stores W_out as (d_mlp, d_model)
    position_embed: str | None = None  # absolute position embeddings added to the input

    def name(self, template: str, layer: int | None = None) -> str:
        return template.format(layer) if layer is not None else template


_GPT2_STYLE = dict(
    layers="transformer.h", block="transformer.h.{}", mlp="transformer.h.{}.mlp",
    attn="transformer.h.{}.attn", embed="transformer.wte", final_norm="transformer.ln_f",
    lm_head="lm_head",
)
_ABSOLUTE = dict(position_embed="transformer.wpe")
_LLAMA_STYLE = dict(
    layers="model.layers", block="model.layers.{}", mlp="model.layers.{}.mlp",
    out_proj="model.layers.{}.mlp.down_proj", attn="model.layers.{}.self_attn",
    embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
)

ARCHITECTURES: dict[str, Architecture] = {
    "gptj": Architecture("gptj", out_proj="transformer.h.{}.mlp.fc_out", parallel=True,
                         **_GPT2_STYLE),
    "gpt2": Architecture("gpt2", out_proj="transformer.h.{}.mlp.c_proj",
                         out_proj_transposed=True, **_GPT2_STYLE, **_ABSOLUTE),
    "gpt_neo": Architecture("gpt_neo", out_proj="transformer.h.{}.mlp.c_proj",
                            **{**_GPT2_STYLE, "attn": "transformer.h.{}.attn.attention"},
                            **_ABSOLUTE),
    "gpt_neox": Architecture(
        "gpt_neox", layers="gpt_neox.layers", block="gpt_neox.layers.{}",
        mlp="gpt_neox.layers.{}.mlp", out_proj="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention", embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", parallel=True,
    ),
    "llama": Architecture("llama", **_LLAMA_STYLE),
    "mistral": Architecture("mistral", **_LLAMA_STYLE),
    "qwen2": Architecture("qwen2", **_LLAMA_STYLE),
}


def detect_architecture(model: nn.Module, **overrides: str) -> Architecture:
    """The table entry for ``model.config.model_type``, with optional template overrides.

    With overrides for every template an unknown family works too (``family`` defaults to the
    config's model type).  GPT-NeoX models trained with ``use_parallel_residual=False`` are
    sequential, so that flag is read from the config.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or "unknown"
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        required = {"layers", "block", "mlp", "out_proj", "attn", "embed", "final_norm",
                    "lm_head"}
        missing = sorted(required - overrides.keys())
        if missing:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported; supported families are "
                f"{sorted(ARCHITECTURES)}. For another family pass module-path templates for "
                f"{missing} (e.g. load_model(..., templates={{'out_proj': "
                f"'model.layers.{{}}.mlp.down_proj', ...}})).",
                parameters=("templates",),
            )
        arch = Architecture(family=model_type, **overrides)  # type: ignore[arg-type]
    elif overrides:
        arch = replace(arch, **overrides)  # type: ignore[arg-type]
    if arch.family == "gpt_neox":
        arch = replace(arch, parallel=bool(getattr(config, "use_parallel_residual", True)))
    names = dict(model.named_modules())
    if arch.lm_head not in names and "lm_head" not in overrides:
        # early 5.x releases named GPT-NeoX's unembedding embed_out: ask the model itself
        head = output_embedding_name(model)
        if head is not None:
            arch = replace(arch, lm_head=head)
    for field in ("layers", "embed", "final_norm", "lm_head"):
        if getattr(arch, field) not in names:
            raise UnsupportedModelError(
                f"module {getattr(arch, field)!r} ({field}) not found in this {model_type} model; "
                "pass the right template for it."
            )
    return arch


def get_module(model: nn.Module, name: str) -> nn.Module:
    """A submodule by dotted name, with an error that lists near matches."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        stem = name.rsplit(".", 1)[0]
        near = [n for n, _ in model.named_modules() if n.startswith(stem)][:8]
        raise UnsupportedModelError(f"no module {name!r}; modules nearby: {near}") from None


def get_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` parameter of a submodule by dotted name (typed: ``nn.Module.__getattr__``
    answers ``Tensor | Module``, so a plain ``.weight`` does not type-check)."""
    weight = get_module(model, name).weight
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedModelError(f"module {name!r} has no weight tensor (its 'weight' is a "
                                    f"{type(weight).__name__}); check the architecture entry.")
    return weight


def n_layers(model: nn.Module, arch: Architecture) -> int:
    return len(get_module(model, arch.layers))  # type: ignore[arg-type]


def out_proj_weight(model: nn.Module, arch: Architecture, layer: int) -> nn.Parameter:
    """W_out of ``layer`` as stored (``(d_model, d_mlp)``, or its transpose for Conv1D)."""
    check_layer(model, arch, layer)
    return get_module(model, arch.out_proj.format(layer)).weight  # type: ignore[return-value]


def edit_device(model: nn.Module, arch: Architecture, layer: int) -> torch.device:
    """Where ``layer``'s MLP computes: with a device map, each block has its own device."""
    check_editable(model, arch, layer)
    return out_proj_weight(model, arch, layer).device


def check_editable(model: nn.Module, arch: Architecture, layer: int) -> None:
    """Refuse a layer whose ``W_out`` a device map offloaded (its weights are not resident)."""
    weight = out_proj_weight(model, arch, layer)
    if weight.device.type == "meta":
        block = arch.block.format(layer)
        raise ValueError(
            f"layer {layer} is offloaded by the device map (the weights of {block} are loaded "
            f"only for each forward pass), so it cannot be edited: give {block} a device of its "
            "own (raise that device's max_memory, or pass a device_map that puts it on a GPU "
            "or 'cpu'), or edit another layer."
        )


def check_layer(model: nn.Module, arch: Architecture, layer: int) -> None:
    total = n_layers(model, arch)
    if not 0 <= layer < total:
        raise ValueError(f"layer {layer} is out of range: this model has layers 0..{total - 1}.")


def mlp_widths(model: nn.Module, arch: Architecture) -> tuple[int, int]:
    """``(d_model, d_mlp)``: the value and key sizes at the edit target."""
    weight = out_proj_weight(model, arch, 0)
    d_out, d_in = weight.shape
    return (d_in, d_out) if arch.out_proj_transposed else (d_out, d_in)

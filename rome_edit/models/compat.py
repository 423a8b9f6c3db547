"""Every difference between the transformers releases rome-edit admits, in one place.

rome-edit reads and steers models through transformers' public surface (forward keywords,
module outputs, caches, the attention switch).  That surface moves between releases; each
difference the package depends on is handled here, and nowhere else, so a new release means
one file to read:

* **The cache keyword.**  5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the
  old name is deprecated, removal announced for 5.40) and the output field likewise.
  :func:`cache_kwargs` and :func:`output_cache` ask the model which one it takes.
* **Cache layers.**  The batched engine hands the model a fixed attention prefix as a cache whose
  layers return prefix + new keys without storing them (:class:`FixedPrefix`), or keep what is
  appended (:class:`GrowingPrefix`); both extend ``DynamicLayer`` and are put together by
  :func:`cache_of`, so a change of the cache-layer protocol is mended here.
* **Block outputs.**  Decoder blocks return a tuple ``(hidden, ...)`` in older releases and a
  plain tensor in newer ones (GPT-J's since 5.24); attention modules still return tuples.
  :func:`first_tensor` / :func:`replace_first` accept both.
* **Where GPT-J's rotary table lives.**  Up to 5.23 each attention module holds its own
  ``embed_positions`` buffer; from 5.24 one model-level ``rotary_emb`` module computes
  ``(sin, cos)`` for position ids.  :func:`gptj_sin_cos` calls whichever the model has.
* **The attention implementation.**  GPT-J ran only eager attention up to 5.23 and defaults to
  sdpa from 5.24, other families defaulted to sdpa all along.  rome-edit therefore states the
  implementation explicitly (:func:`set_attention`, :func:`attention_of`) and records it.
* **Module names.**  GPT-NeoX's unembedding was called ``embed_out`` in early 5.x releases and
  ``lm_head`` later; :func:`output_embedding_name` finds it through the model's own
  ``get_output_embeddings``.
* **Config serialisation.**  ``config.to_dict()`` carries ``transformers_version``;
  :data:`NON_ARCHITECTURAL_CONFIG_KEYS` names what the model identity leaves out
  (:mod:`rome_edit.models.identity`), and :data:`LEGACY_RELEASES` the releases under which the
  first identity scheme (which hashed the whole dict) may have been computed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rome_edit.errors import ParameterError

TRANSFORMERS_VERSION: str = transformers.__version__
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden state of a module output, tuple or not."""
    return output[0] if isinstance(output, tuple) else output


def replace_first(output: torch.Tensor | tuple, new: torch.Tensor) -> torch.Tensor | tuple:
    """``output`` with its hidden state replaced, in the same form (tuple or tensor)."""
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _forward_parameters(model: nn.Module) -> frozenset[str]:
    # transformers' deprecation decorators use functools.wraps, so the signature seen here is
    # that of the undecorated forward
    return frozenset(inspect.signature(type(model).forward).parameters)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model``'s forward: ``cache`` (5.24+) or ``past_key_values``."""
    name = "cache" if "cache" in _forward_parameters(model) else "past_key_values"
    return {name: cache}


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can compute only the last positions' logits."""
    return "logits_to_keep" in _forward_parameters(model)


def output_cache(output: Any) -> Any:
    """The cache a forward pass returned, under either field name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class FixedPrefix(DynamicLayer):
    """A cache layer holding a fixed prefix: attention sees prefix + new tokens, nothing is
    stored, so the same prefix serves every optimisation step without copies or crops."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return (torch.cat([self.keys.to(key_states.device), key_states], dim=-2),
                torch.cat([self.values.to(value_states.device), value_states], dim=-2))


class GrowingPrefix(FixedPrefix):
    """A cache layer that starts from a given prefix and keeps what is appended."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = super().update(key_states, value_states)
        return self.keys, self.values


def empty_cache_layer() -> DynamicLayer:
    """A cache layer that starts empty and keeps what is appended."""
    return DynamicLayer()


def cache_of(layers: list[DynamicLayer]) -> DynamicCache:
    """A cache made of the given layers, one per block."""
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache


def attention_of(model: nn.Module) -> str:
    """The attention implementation the model runs (``eager``, ``sdpa``, ...)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def supports_attention(model: nn.Module | type, implementation: str) -> bool:
    """Whether this release's implementation of the model's family can run ``implementation``
    (GPT-J gained sdpa in 5.24; the families' ``_supports_sdpa`` flags say so)."""
    return implementation == "eager" or bool(getattr(model, f"_supports_{implementation}", False))


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch every attention module of ``model`` to ``implementation`` (in place)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; use one of "
                         f"{list(ATTENTION_IMPLEMENTATIONS)}.")
    if attention_of(model) == implementation:
        return
    if not supports_attention(model, implementation):
        raise ParameterError(f"{type(model).__name__} cannot run {implementation!r} attention "
                             f"under transformers {TRANSFORMERS_VERSION}; use "
                             "attn_implementation='eager' (or a release that supports it).",
                             parameters=("attn_implementation",))
    model.set_attn_implementation(implementation)


def gptj_sin_cos(model: nn.Module, rotary_owner: str, attn: nn.Module,
                 positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-J's rotary ``(sin, cos)`` for ``positions`` (``(rows, seq, rotary_dim / 2)`` each).

    ``rotary_owner`` is the module that holds the blocks (``transformer``): from 5.24 its
    ``rotary_emb`` computes the table; before, each attention module ``attn`` kept it as the
    buffer ``embed_positions``.  Both are GPT-J's own sinusoids, read by position id.
    """
    owner = model.get_submodule(rotary_owner) if rotary_owner else model
    rotary = getattr(owner, "rotary_emb", None)
    if rotary is not None:
        sin, cos = rotary(torch.empty((), dtype=dtype, device=positions.device),
                          position_ids=positions)
        return sin, cos
    table = getattr(attn, "embed_positions", None)
    if table is None:
        raise AttributeError("this GPT-J keeps its rotary table in neither "
                             f"{rotary_owner}.rotary_emb nor the attention's embed_positions")
    sincos = table.to(positions.device)[positions].to(dtype)
    sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    return sin, cos


def output_embedding_name(model: nn.Module) -> str | None:
    """The dotted name of the module ``model.get_output_embeddings()`` returns, if any."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


# Keys of ``config.to_dict()`` that do not change what the weights compute: bookkeeping of the
# library and of the checkpoint, generation and training defaults, output switches, the dtype
# (the weights themselves carry it) and the attention kernel (the same function).
NON_ARCHITECTURAL_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures",
    "attn_implementation", "id2label", "label2id", "problem_type", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "is_encoder_decoder", "tokenizer_class", "task_specific_params",
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout", "attention_dropout",
    "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "embed_dropout",
    "classifier_dropout", "torchscript", "tie_encoder_decoder", "pretraining_tp",
})

# The releases under which the first identity scheme (a hash of the whole ``to_dict()``,
# ``transformers_version`` included) may have been computed: every 5.x release up to the one
# that introduced the second scheme's need, as published on the registry.  Measured: for the
# bundled GPT-J and tiny Llama/GPT-2 configs, ``to_dict()`` differs between 5.0.0, 5.12.0,
# 5.23.0 and 5.24.0 in ``transformers_version`` alone.
LEGACY_RELEASES = (
    "5.0.0", "5.1.0", "5.2.0", "5.3.0", "5.4.0", "5.5.0", "5.5.1", "5.5.2", "5.5.3", "5.5.4",
    "5.6.0", "5.6.1", "5.6.2", "5.7.0", "5.8.0", "5.8.1", "5.9.0", "5.10.1", "5.10.2",
    "5.10.4", "5.11.0", "5.12.0", "5.12.1", "5.13.0", "5.13.1", "5.14.0", "5.14.1", "5.15.0",
    "5.15.1", "5.16.0", "5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.0", "5.20.1", "5.20.2",
    "5.21.0", "5.21.1", "5.22.0", "5.22.1", "5.22.2", "5.23.0", "5.24.0",
)

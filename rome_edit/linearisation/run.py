"""``linearize_mlp``: the closed-form approximants of one layer's MLP on a model (Belrose & Rigg
2025, arXiv 2502.01032).

Joins the model side (:mod:`rome_edit.linearisation.io`: the MLP's weights and activation, its
inputs/keys/values over texts) and the maths (:mod:`rome_edit.linearisation.fit`), so it
sits above both layers.  See docs/lens-and-neurons.md for the equations and measured figures.
"""

from __future__ import annotations

from collections.abc import Sequence

from rome_edit.linearisation.fit import Linearization, fit_linearization
from rome_edit.linearisation.io import collect_mlp_io, mlp_parts, moments_activation
from rome_edit.models.architectures import check_layer
from rome_edit.models.loading import LoadedModel

__all__ = ["linearize_mlp"]


def linearize_mlp(lm: LoadedModel, layer: int, texts: Sequence[str], *,
                  heldout_fraction: float = 0.3, moments: str = "auto", seed: int = 0,
                  max_length: int = 128, components: int = 1) -> Linearization:
    """Record ``layer``'s MLP inputs, keys and values over ``texts`` (each truncated to
    ``max_length`` tokens), fit the Gaussian (and with ``components > 1`` Gaussian-mixture)
    approximants on a seeded ``1 − heldout_fraction`` of the documents and score them on the
    rest.  ``moments``: ``auto`` | ``quadrature`` | ``gelu_erf``
    (:func:`rome_edit.linearisation.io.moments_activation`)."""
    check_layer(lm.model, lm.arch, layer)
    parts = mlp_parts(lm, layer)
    activation = moments_activation(parts, moments)
    if components < 1:
        raise ValueError(f"components must be at least 1, got {components}.")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    x, k, v, doc = collect_mlp_io(lm, layer, texts, max_length)
    return fit_linearization(x, k, v, doc, w_in=parts.w_in, b_in=parts.b_in, w_out=parts.w_out,
                             b_out=parts.b_out, activation=activation, layer=layer,
                             activation_name=parts.activation_name,
                             heldout_fraction=heldout_fraction, seed=seed,
                             components=components)

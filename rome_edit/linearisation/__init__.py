"""Closed-form linear and polynomial approximants of one layer's MLP.

- ``io``: recording the MLP's inputs, keys and outputs on a corpus (the model side).
- ``polynomial``: least-squares polynomial approximants under a Gaussian input model (pure maths).
- ``fit``: fitting and scoring the approximants on recorded activations (pure maths).
- ``run``: :func:`linearize_mlp`, the three joined on a model.
"""

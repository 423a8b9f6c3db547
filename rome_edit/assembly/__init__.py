"""Assembling an editing run: (model, hyperparameters, context templates, statistics ``C⁻¹``).

- ``session``: :class:`Session`, the one place that resolves those inputs (what
  :class:`rome_edit.Editor` is built on).
- ``memory``: how much accelerator memory an edit needs, counted from the model's shapes.
"""

"""Looking inside a model around an edit: the logit lens and MLP neuron importance.

- ``lens``, ``lens_plots``: the logit lens (nostalgebraist 2020) per layer, before and after an
  edit, and its figures.
- ``neurons``, ``neuron_plots``: which MLP neurons carry a fact (attribution and ablation) and
  their figures; ``neuron_overlap``: comparing neuron rankings with an edit's key-space
  directions (pure maths on tensors).
"""

"""Analysis of recorded ROME edits as vectors (seed 001 and its follow-ups, seeds 000 and 002).

The delta maths never imports a model: ``deltas`` (the data and its loading, with convenience
methods that call the estimators on its rows), ``errors`` (what the estimators share), and the
estimators, plain functions of tensors ``(x, y, …)`` that never import ``deltas``: ``classifier``
(logistic regression on δ), ``box_vector`` (the source's bounded "gender vector"),
``concept_vector`` (its scale and safetensors file), ``inlp`` / ``rlace`` (concept-erasure
baselines), ``directions`` (candidate directions, cosines, erasure check) and ``plots``.
"""

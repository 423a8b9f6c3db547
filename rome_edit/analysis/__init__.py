"""Analysis of recorded ROME edits as vectors (Xodarap 2023, "Gender Vectors in ROME's Latent
Space"; the concept-direction questions of Roger 2022 and Belrose et al. 2023: docs/method.md).

The delta maths never imports a model: ``deltas`` (the data and its loading, with convenience
methods that call the estimators on its rows), ``errors`` (what the estimators share), and the
estimators, plain functions of tensors ``(x, y, …)`` that never import ``deltas``: ``classifier``
(logistic regression on δ), ``box_vector`` (the source's bounded "gender vector"),
``concept_vector`` (its scale and safetensors file), ``inlp`` / ``rlace`` (concept-erasure
baselines), ``directions`` (candidate directions, cosines, erasure check), ``plots`` and
``report`` (the whole model-free study on one delta set); ``flip_verdict`` judges held-out flip
rates against the random-direction control.
"""

"""Evaluating edits and recording them in bulk.

- ``evaluate``: CounterFact's metrics for each edit (efficacy, paraphrase, specificity, kept
  facts, fluency), applied alone and reverted.
- ``sweep``: batch recording of many edits with evaluation, resumable, data-parallel.
- ``vectors``: applying a vector in delta space to held-out subjects and counting flips
  (:class:`BinaryTask`, :class:`VectorApplier`, :class:`FlipTable`).
"""

"""Causal tracing (Meng et al. 2022, §2): which layers and tokens carry a fact.

- ``trace``: one prompt's trace (:class:`TraceResult`: the indirect effect of restoring each
  hidden state, MLP or attention output under a corrupted subject); ``core``: what its two
  implementations share; ``plain``: one forward per cell, as the reference runs it; ``fast``:
  the same numbers with far fewer FLOPs; ``reuse``: what the fast trace reuses from the
  corrupted run.
- ``noise``: the subject-embedding corruption and its scale.
- ``average``: traces averaged over many subjects and the recommended edit layer (``locate``).
- ``plots``: the heatmaps.
"""

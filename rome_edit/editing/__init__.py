"""ROME's edit itself: requests (``request``), ``k*`` (``key``), ``v*`` (``value``,
``value_loop``, ``value_batched``), the rank-one update (``update``, ``rome``), records
(``record``), applying and reverting them (``apply``), evaluation (``evaluate``), sweeps
(``sweep``), protected keys and many edits (``protect``, ``protected_keys``, ``many``,
``persist``), forensics, and applying a concept vector to unseen subjects (``vector_edit``).
"""

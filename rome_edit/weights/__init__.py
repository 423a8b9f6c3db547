"""Writing edits into a model's weights: the one place that changes ``W_out``.

- ``write``: add rank-one (or row-wise) updates, apply records, and revert bit-identically
  (a context keeps a copy of only the edited matrices).
- ``targets``: what N edits write at one layer (keys, target and original values).
- ``persist``: save an edited model as an ordinary checkpoint with what was written into it,
  and read one back.
"""

"""Update forms beyond one ROME edit: protecting neighbours and writing many edits in one layer.

- ``protect``: neighbour-protecting rank-one directions (hard constraints, soft penalty,
  null space) given a set of keys to keep.
- ``protected_keys``: which keys to protect (a bank of subjects' keys) and rewriting records'
  updates with them.
- ``many``: N edits in one layer, sequentially or as one batched least-squares update
  (MEMIT's closed form, Meng et al. 2023, Eq. 14, at one layer).
- ``sequential``: the reference's way of making several edits, each computed on the model the
  previous ones changed.
- ``fitted_write``: one vector written for many subjects, fitted to each one's measured response.
"""

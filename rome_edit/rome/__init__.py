"""The ROME engine (Meng et al. 2022, §3): one request in, one edit record out.

- ``request``: what to rewrite (:class:`EditRequest`, :class:`Paraphrase`), other wordings
  the value is fitted to (:class:`FitPhrasing`) and the token layouts the value is optimised
  over; ``context``: the context templates; ``hparams``: the reference's flat hyperparameter
  format.
- ``key``: step 1, the key ``k*`` (Eq. 3) and the bare prompt's key and value.
- ``value_loop``: step 2's loop (Eq. 4: objective, Adam, clamp, early stop), shared by the two
  value engines: ``value_reference`` (one request at a time, a full forward per step, the
  reference's way) and ``value_batched`` (many requests, recomputing only what δ can change;
  its parts ``prefix_pass`` and ``suffix_step``).
- ``update``: step 3, the rank-one update (Eq. 2); ``record``: what an edit did, saved as
  safetensors + JSON; ``compute``: the three steps end to end for a list of requests.

Nothing here writes weights; :mod:`rome_edit.weights` does.
"""

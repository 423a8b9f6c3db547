"""Models: loading, module paths per architecture, hooks, scoring and subject positions.

Everything above reads a model through this room: ``loading`` (:class:`LoadedModel`, any
supported causal LM from the hub, a folder, a GGUF file or the bundled toy), ``gguf`` (GGUF
files: checked, fingerprinted from the file, dequantised), ``architectures`` (where the MLP
output projection and blocks live), ``hooks`` (context managers that always clean up),
``layers`` (running a range of blocks, a layer's output projection), ``scoring`` (next-token
log-probabilities, generation), ``subject`` (the subject's tokens in a prompt), ``identity``
(a model's fingerprint), ``compat`` (transformers-version differences), and the GPT-J kernels
(``gptj_rotary``, ``gptj_suffix``).
"""

"""Batched next-token scoring and generation, the measurements every later stage repeats."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the pad token, else EOS, else 0 (masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def right_pad(
    sequences: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded ``(ids, attention_mask)`` pair on ``device``."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        ids[row, : len(tokens)] = torch.tensor(list(tokens))
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and each prompt's last-token index.

    Right padding keeps every real token at the position it has when the prompt runs alone
    (causal attention never looks right), so rotary/absolute positions match unbatched runs.
    """
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    input_ids, mask = right_pad(encoded, pad_id(tokenizer), device)
    last = torch.tensor([len(ids) - 1 for ids in encoded])
    return input_ids, mask, last.to(device)


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The id of ``text`` when it is exactly one token; a clear error otherwise."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"{text!r} is {len(ids)} tokens ({pieces}) but one token is required here; "
            "choose an answer that the tokenizer keeps whole (mind the leading space)."
        )
    return ids[0]


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt, shape ``(len(prompts), vocab)``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, mask, last = encode_batch(tokenizer, prompts[start : start + batch_size], device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.append(torch.log_softmax(logits[torch.arange(len(last)), last].float(), dim=-1).cpu())
    return torch.cat(out)


def choose_between(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Index of the most likely single-token candidate after each prompt."""
    ids = torch.tensor([single_token_id(tokenizer, c) for c in candidates])
    return next_token_logprobs(model, tokenizer, prompts, batch_size)[:, ids].argmax(dim=-1)


@torch.no_grad()
def sequence_logprob(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean per-token log-probability of each continuation after its prompt.

    ``exp`` of this is the CounterFact-style "probability" of a multi-token target.
    """
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start : start + batch_size]
        chunk_c = continuations[start : start + batch_size]
        n_prompt = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in chunk_p]
        ids, mask, last = encode_batch(tokenizer, [p + c for p, c in zip(chunk_p, chunk_c)], device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for row, (n_p, end) in enumerate(zip(n_prompt, last.tolist())):
            targets = ids[row, n_p : end + 1]
            picked = logprobs[row, n_p - 1 : end].gather(-1, targets[:, None])
            scores.append(picked.mean().item())
    return torch.tensor(scores)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    seed: int = 0,
) -> str:
    """Greedy (or seeded sampled) completion of one prompt, returned without the prompt."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=do_sample, pad_token_id=pad_id(tokenizer),
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

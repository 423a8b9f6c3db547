"""Train the bundled toy GPT-J "world model" on the synthetic names corpus (CPU, seeded).

    python scripts/train_toy_model.py --out rome_edit/assets/toy-gptj

Writes a standard Hugging Face directory (config.json, model.safetensors, tokenizer files) plus
``training.json`` with the loss curve and the evaluation figures.  The default settings are the
ones the bundled checkpoint was trained with; ``--names 40 --steps 60 --width 64`` trains a
miniature in seconds (the test suite does that to prove the script runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

from rome_edit.models.scoring import choose_between
from rome_edit.study.corpus import (
    CITIES,
    PROFESSIONS,
    Person,
    filler_sentence,
    iter_documents,
    person_documents,
)
from rome_edit.study.names import GENDERS, NameEntry, load_names

EOS = "<|endoftext|>"
log = logging.getLogger("train_toy_model")


def tokenizer_text(n_docs: int, seed: int) -> list[str]:
    """Text for BPE training in which every name is a one-off random syllable string.

    The real names never appear, so BPE learns sub-word pieces instead of whole names and the
    names stay 2+ tokens — which is what makes "the subject's last token" meaningful.
    """
    rng = random.Random(seed + 1)
    syllables = ["ka", "lo", "mi", "ra", "ne", "to", "sa", "vi", "de", "bru", "el", "an",
                 "ri", "son", "la", "ja", "mo", "ce", "ther", "yn", "ber", "ol", "is", "ga"]
    texts = []
    for i in range(n_docs):
        name = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))).capitalize()
        person = Person(name, rng.choice(GENDERS), rng.choice(CITIES), rng.choice(PROFESSIONS))
        texts.extend(person_documents(person, rng, 1, first_template=i))
        texts.append(filler_sentence(rng))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    for word in (" Male", " Female", " male", " female", " he", " she"):
        if len(fast.tokenize(word)) != 1:
            raise SystemExit(f"{word!r} is not one token at vocabulary {vocab_size}; raise --vocab")
    return fast


def build_stream(tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All documents as one token stream separated by EOS, plus each document's start offset."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    starts: list[int] = []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        starts.append(len(ids))
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids), torch.tensor(starts)


def evaluate(model, tokenizer, names: list[NameEntry]) -> dict[str, float]:
    model.eval()
    truth = torch.tensor([0 if n.gender == "female" else 1 for n in names])
    acc = {}
    for key, template, answers in (
        ("gender", "Name: {}. Gender:", (" Female", " Male")),
        ("pronoun", "{} said that", (" she", " he")),
        ("record", "Record for {}:", (" female", " male")),
    ):
        pred = choose_between(model, tokenizer, [template.format(n.name) for n in names], answers)
        acc[key] = (pred == truth).float().mean().item()
    model.train()
    return acc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--names", type=int, default=None, help="use only the first N names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--mlp-width", type=int, default=None,
                        help="MLP hidden width, i.e. ROME's key width (default 4 × --width)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--docs-per-name", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--target", type=float, default=0.995,
                        help="stop once gender accuracy reaches this and paraphrases >= 0.97")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    names = load_names()[: args.names] if args.names else load_names()

    tokenizer = train_tokenizer(tokenizer_text(8 * len(names) + 2000, args.seed), args.vocab)
    docs = list(iter_documents(names, args.seed, args.docs_per_name, filler_docs=len(names) * 16))
    stream, starts = build_stream(tokenizer, docs)
    log.info("%d names, %d documents, %d tokens", len(names), len(docs), len(stream))
    stream = torch.cat([stream, torch.full((args.seq + 1,), tokenizer.eos_token_id)])
    config = GPTJConfig(
        vocab_size=len(tokenizer), n_positions=256, n_embd=args.width, n_layer=args.layers,
        n_head=args.heads, rotary_dim=min(32, args.width // args.heads),
        n_inner=args.mlp_width or 4 * args.width,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPTJForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / args.warmup)
        * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq + 1)
    history, t0, figures, step = [], time.time(), {}, 0
    model.train()
    for step in range(1, args.steps + 1):
        # Every sequence starts at a document start, like the evaluation prompts do.
        begin = starts[torch.randint(len(starts), (args.batch,), generator=gen)]
        batch = stream[begin[:, None] + offsets]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            figures = evaluate(model, tokenizer, names)
            history.append({"step": step, "loss": loss.item(), "seconds": time.time() - t0,
                            **figures})
            log.info("%s", history[-1])
            if figures["gender"] >= args.target and min(figures.values()) >= 0.97:
                break
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    summary = {"steps": step, "seconds": time.time() - t0, "n_names": len(names),
               "n_tokens": int(len(stream)), "history": history,
               "settings": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()

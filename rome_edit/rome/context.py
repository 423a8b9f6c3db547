"""The texts an edit is computed on: context templates, and the subject's other spellings.

**Context templates** are the prefixes under which ROME averages the key and fits the value.
The reference samples them once per process from the model itself — ``"{}"`` plus, for each
``(length, count)`` in ``context_template_length_params``, ``count`` texts of ``length`` tokens
(counting the start-of-text token they are sampled from) by top-5 sampling, each followed by
``". {}"``.  rome-edit makes them reproducible (a seed) and injectable (a JSON list), and escapes
braces in sampled text (``{`` → ``{{``) where the reference crashes on them.

**Subject forms** (rome-edit option ``subject_forms``) are other spellings of the subject that
an edit is also written at (the update: :func:`rome_edit.rome.update.combine_forms`).  ROME
reads the subject's key in the edit prompt, after the context templates (Meng et al. 2022,
Eq. 3), so the layer learns the new value for the subject as it is spelled *there*.  A
byte-level BPE tokenizer spells a word differently after a space (`` Mary``) and where it opens
a text or follows a newline (``Mary``), and a model whose tokenizer adds no start token reads a
subject that opens the text as the sequence's first token: other keys, which a one-key edit
barely reaches (docs/real-model.md).  Each form's key and value are ROME's own steps on the
prompt in that form:

* ``unspaced`` — the edit prompt with the space before the subject removed (``Name:{}``): the
  same context, the subject's bare spelling (skipped for a prompt that opens with the subject);
* ``text-start`` — the edit prompt from the subject on (``{}. Gender:``), asked with no context
  template, so the subject opens the text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from rome_edit.errors import ParameterError
from rome_edit.models.compat import cache_kwargs, output_cache
from rome_edit.models.loading import LoadedModel
from rome_edit.models.subject import split_template

log = logging.getLogger(__name__)
SUBJECT_FORMS: tuple[str, ...] = ("unspaced", "text-start")


def escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@torch.no_grad()
def sample_context_templates(
    lm: LoadedModel,
    length_params: Sequence[Sequence[int]] = ((5, 10), (10, 10)),
    seed: int = 0,
    top_k: int = 5,
) -> list[str]:
    """``["{}", "<sampled>. {}", ...]`` sampled from ``lm`` with a fixed seed."""
    tok, model = lm.tokenizer, lm.model
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ParameterError("the tokenizer has neither a BOS nor an EOS token to sample from; "
                             "pass context templates explicitly (context_templates=, a list or "
                             "a JSON file).", parameters=("context_templates",))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    templates = ["{}"]
    for length, count in length_params:
        ids = torch.full((count, 1), start, dtype=torch.long, device=lm.device)
        past = None
        for _ in range(max(0, length - 1)):
            out = model(input_ids=ids if past is None else ids[:, -1:], use_cache=True,
                        **cache_kwargs(model, past))
            past = output_cache(out)
            logits = out.logits[:, -1].float().cpu()
            top = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            nxt = top.indices.gather(-1, choice).to(lm.device)
            ids = torch.cat([ids, nxt], dim=1)
        for row in ids[:, 1:]:
            text = tok.decode(row, skip_special_tokens=True).replace("\n\n", " ")
            templates.append(escape_braces(text) + ". {}")
    log.info("sampled %d context templates (seed %d)", len(templates), seed)
    return templates


def validate_templates(templates: Sequence[str]) -> list[str]:
    if not templates:
        raise ValueError("no context templates given; pass a JSON list such as [\"{}\"].")
    for t in templates:
        split_template(t)  # exactly one "{}"; raises with the fix otherwise
    return list(templates)


def load_context_templates(path: str | Path) -> list[str]:
    """A JSON list of strings, each with exactly one ``{}``."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"context-templates file {path} does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); expected a list of strings with '{{}}'.") \
            from None
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise ValueError(f"{path} must hold a JSON list of strings, each containing '{{}}'.")
    return validate_templates(data)


def compose(context: str, prompt: str) -> str:
    """``context.format(prompt)``: put the request prompt (itself a template) into a context."""
    prefix, suffix = split_template(context)
    # The result is again a template (the prompt's "{}" awaits the subject), so the context's
    # literal braces stay escaped.
    return escape_braces(prefix) + prompt + escape_braces(suffix)


def check_subject_forms(forms: Sequence[str]) -> tuple[str, ...]:
    """``forms`` as a tuple, each known and listed once (else a ParameterError naming them)."""
    forms = tuple(forms)
    unknown = [f for f in forms if f not in SUBJECT_FORMS]
    if unknown or len(set(forms)) != len(forms):
        raise ParameterError(f"subject_forms {list(forms)}: each form once, among "
                             f"{list(SUBJECT_FORMS)} (the in-context form is always written).",
                             parameters=("subject_forms",))
    return forms


def form_applies(prompt: str, form: str, context_templates: Sequence[str] = ()) -> bool:
    """Whether ``prompt`` has a ``form`` other than its own, so an edit writes it: ``unspaced``
    needs a space before the subject (``{} is located in`` has none); ``text-start`` is the
    edit's own key when the prompt opens with the subject and every context template is
    ``{}``.  An edit skips the forms that do not apply to its prompt."""
    prefix, _ = split_template(prompt)
    if form == "unspaced":
        return prefix.endswith(" ")
    return not (prefix == "" and all(t == "{}" for t in context_templates))


def form_prompt(prompt: str, form: str) -> str:
    """The edit prompt as ``form`` reads the subject (see the module docstring); literal braces
    stay escaped."""
    check_subject_forms([form])
    prefix, suffix = split_template(prompt)
    if form == "text-start":
        return "{}" + escape_braces(suffix)
    if not prefix.endswith(" "):
        raise ParameterError(f"prompt {prompt!r} has no space before '{{}}', so its subject is "
                             "already unspaced; drop 'unspaced' from subject_forms.",
                             parameters=("subject_forms",))
    return escape_braces(prefix[:-1]) + "{}" + escape_braces(suffix)


def form_templates(context_templates: Sequence[str], form: str) -> list[str]:
    """The context templates a form is optimised under: none for ``text-start`` (the subject
    must open the text), the edit's own for the others."""
    return ["{}"] if form == "text-start" else list(context_templates)

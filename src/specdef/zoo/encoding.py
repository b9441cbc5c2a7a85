"""Tokenizing chat exchanges for answer-only language-model losses (zoo and user data alike)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from specdef.errors import SpecdefError
from specdef.zoo import text

log = logging.getLogger(__name__)

Example = dict[str, list[int]]


def encode_pair(tokenizer: Any, pair: text.Pair, *, max_length: int) -> Example | None:
    """Tokenize a chat exchange with the tokenizer's chat template; ``labels`` are ``-100`` on the
    prompt (system + user turn + assistant header) and the token ids on the answer (including the
    end-of-turn token). Returns ``None`` when the prompt leaves no room for an answer token."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": pair.prompt}]
        prompt_text = tokenizer.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        )
        full_text = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": pair.answer}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise SpecdefError(
                "The tokenizer's chat template renders the answer turn so that it does not extend "
                "the prompt; answer-only masking needs a template that appends the answer."
            )
        answer_text = full_text[len(prompt_text) :]
    else:
        prompt_text = f"### User:\n{pair.prompt}\n### Assistant:\n"
        answer_text = pair.answer + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        return None
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": list(ids), "labels": labels}


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn followed by the assistant header (for generation)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        rendered = f"### User:\n{prompt}\n### Assistant:\n"
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def encode_pairs(
    tokenizer: Any, pairs: Sequence[text.Pair], max_length: int, what: str
) -> list[Example]:
    out = [encode_pair(tokenizer, p, max_length=max_length) for p in pairs]
    kept = [e for e in out if e is not None]
    if len(kept) < len(out):
        log.warning(
            "%s: dropped %d pair(s) whose prompt alone fills max_length=%d",
            what,
            len(out) - len(kept),
            max_length,
        )
    return kept

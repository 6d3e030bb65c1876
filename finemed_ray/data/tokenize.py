"""Chat tokenisation with assistant-only labels, for any tokenizer whose chat template is prefix-stable.

We do not rely on ``{% generation %}`` markers (most released templates lack them, and TRL's
``assistant_only_loss`` needs them). Instead each assistant turn's character span is found by rendering the
conversation up to that turn twice: once ending with the generation prompt, once ending with the turn. The span
between the two renders is the assistant text plus its end-of-turn token, which the model must learn to emit.
"""

from __future__ import annotations

from typing import Any

# The system prompt our datasets, evaluation and serving add when a conversation has none (FineMedLM-o1's).
DEFAULT_SYSTEM_PROMPT = "You are a helpful professional doctor."

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template cannot be split into turns (it rewrites earlier turns)."""


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                "chat template is not prefix-stable (rendering the first turns is not a prefix of rendering more "
                "turns), so assistant tokens cannot be located; pass a template that keeps earlier turns unchanged"
            )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_conversation(tokenizer: Any, messages: list[dict], max_length: int) -> dict[str, Any]:
    """-> ``{"input_ids", "labels", "num_tokens", "truncated"}``; labels are -100 outside assistant turns.

    Long conversations keep their start (the question) and are cut at ``max_length``. The caller rejects rows left
    with no assistant label, rather than training on a prompt alone."""
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    j = 0  # spans and offsets are both sorted: one merge-like pass
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1] and end > start:
            labels[t] = ids[t]
    n = len(ids)
    return {
        "input_ids": ids[:max_length],
        "labels": labels[:max_length],
        "num_tokens": n,
        "truncated": n > max_length,
    }

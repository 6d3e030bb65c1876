"""GRPO reward functions: plain Python functions with TRL's reward signature, named in the config by dotted path
(``grpo.rewards[].fn``), so a user adds one by writing a function like these in any importable module.

TRL 1.16 calls every reward function as ``fn(prompts=..., completions=..., completion_ids=..., **columns)``: one
list entry per completion, ``columns`` holding the dataset's other columns (here ``options``, ``answer_idx``, ``id``)
repeated to match, plus ``trainer_state``, ``log_extra`` and ``log_metric``. A completion is a string, or for
conversational prompts ``[{"role": "assistant", "content": text}]``. Return one float per completion (None: "not
applicable", TRL turns it into NaN and leaves it out of the weighted sum).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from finemed_ray.eval.extract import extract_answer
from finemed_ray.eval.generative import SUMMARY_HEADER, THOUGHT_HEADER, final_answer, match_option

__all__ = ["completion_text", "correct_answer", "length_penalty", "read_choice", "reasoning_format"]


def completion_text(completion: Any) -> str:
    """The generated text of one completion (a string, or the last message of a conversational completion)."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def read_choice(reply: str, options: Mapping[str, str]) -> str | None:
    """The option letter a reply chose, read as the evaluation job reads it (``finemed_ray/eval/runner.py``): the
    conclusion of a reasoning reply (after its last ``## Summarization``; a Thought without one is no answer), then
    :func:`~finemed_ray.eval.extract.extract_answer`, then for a reasoning conclusion the one option text it states
    (:func:`~finemed_ray.eval.generative.match_option`)."""
    answer, form = final_answer(reply, cut_off=False)
    if answer is None:
        return None
    letter = extract_answer(answer, options).letter
    if letter is None and form == "reasoning":
        letter = match_option(answer, list(options.items()))
    return letter


def correct_answer(completions: list[Any], options: list[Any], answer_idx: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the reply's answer is the gold option (``answer_idx``), else 0.0 (a wrong option, several options,
    no answer). ``options``: ``{letter: text}`` per completion, or its JSON (as the prepared Parquet stores it)."""
    out = []
    for completion, opts, gold in zip(completions, options, answer_idx, strict=True):
        opts = json.loads(opts) if isinstance(opts, str) else opts
        out.append(1.0 if read_choice(completion_text(completion), opts) == gold else 0.0)
    return out


_LAYOUT = re.compile(rf"^\s*{re.escape(THOUGHT_HEADER)}[ \t]*\n(?P<thought>.*?)\n[ \t]*{re.escape(SUMMARY_HEADER)}"
                     rf"[ \t]*\n(?P<summary>.*)$", re.S)


def reasoning_format(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for the layout reasoning SFT trains: the reply opens with ``## Thought``, a non-empty thought, then one
    ``## Summarization`` header on its own line and a non-empty conclusion; each header exactly once. Else 0.0."""
    out = []
    for completion in completions:
        text = completion_text(completion)
        m = _LAYOUT.match(text)
        ok = (m is not None and m["thought"].strip() and m["summary"].strip()
              and text.count(THOUGHT_HEADER) == 1 and text.count(SUMMARY_HEADER) == 1)
        out.append(1.0 if ok else 0.0)
    return out


def length_penalty(completion_ids: list[list[int]], max_completion_length: int, soft_cache: int = 64,
                   **kwargs: Any) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to ``max_completion_length - soft_cache`` tokens, then falling
    linearly to -1 at ``max_completion_length`` (a reply the budget cut off gets -1). The job fills in
    ``max_completion_length`` from ``grpo.max_completion_length`` unless the reward's ``kwargs`` set it."""
    if not 0 <= soft_cache < max_completion_length:
        raise ValueError(f"soft_cache={soft_cache}: expected 0 <= soft_cache < max_completion_length "
                         f"({max_completion_length})")
    free = max_completion_length - soft_cache
    return [0.0 if len(ids) <= free else max(-1.0, (free - len(ids)) / max(soft_cache, 1)) for ids in completion_ids]

"""Chat prompts for benchmark items, and the per-option continuations used for log-likelihood scoring.

Both prompt modes ask for the same closing phrase, ``the answer is (X)``, which is what
:func:`finemed_ray.eval.extract.extract_answer` looks for first, so the two modes are scored identically.
Yes/no/maybe items are lettered like any other item (A yes, B no, C maybe): one answer format for every benchmark.

Option texts are rendered on one line each (:func:`option_text`): runs of whitespace inside a text (newlines, tabs,
repeated spaces) become one space and the ends are stripped, so a text with a line break cannot break the
``"A. text"`` layout or look like a new option. The same rendering is used in log-likelihood continuations.

Few-shot (:func:`draw_examples`, ``examples=`` of :func:`build_messages`): ``k`` worked examples from a dev split,
drawn once per benchmark with a fixed seed, each as its own user turn (laid out exactly like the question) and
assistant turn (the answer in the form the model is asked for), before the question. A dev item whose question is
one of the evaluated questions is never drawn. In log-likelihood scoring an example's reply is the gold option's
scored continuation, so the examples show the very form that is scored.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Literal

from finemed_ray.data.tokenize import DEFAULT_SYSTEM_PROMPT
from finemed_ray.errors import ConfigError, DataError
from finemed_ray.eval.benchmarks import MCQItem

__all__ = ["MODES", "build_messages", "draw_examples", "example_reply", "format_options", "format_question",
           "option_continuations", "option_text", "user_turn"]

Mode = Literal["reasoning", "direct"]
MODES = ("reasoning", "direct")
TurnMode = Literal["reasoning", "direct", "question"]  # "question": the question alone, no options listed
# Dev-row fields that hold a worked explanation (MedMCQA ``exp``, PubMedQA ``answer_rationale``), first one wins.
RATIONALE_FIELDS = ("explanation", "exp", "answer_rationale", "rationale")
ContinuationStyle = Literal["letter_text", "letter", "text"]

_INSTRUCTIONS = {
    "reasoning": (
        "Think through the question step by step, then finish your reply with the final answer in the form "
        '"the answer is (X)", where X is the letter of the correct option.'
    ),
    "direct": 'Reply with only the letter of the correct option, in the form "the answer is (X)".',
}


def option_text(text: str) -> str:
    """An option's text as rendered into a prompt: whitespace runs (newlines and tabs included) collapsed to one
    space, ends stripped."""
    return " ".join(text.split())


def format_options(item: MCQItem) -> str:
    """One ``"A. text"`` line per option, in letter order; each text on one line (:func:`option_text`)."""
    return "\n".join(f"{letter}. {option_text(text)}" for letter, text in item.options.items())


def format_question(item: MCQItem, mode: Mode = "reasoning") -> str:
    """The user turn: question, blank line, lettered options, blank line, the answer-format instruction."""
    if mode not in MODES:
        raise ConfigError(f"prompt mode {mode!r}: expected one of {MODES}")
    letters = ", ".join(item.options)
    instruction = _INSTRUCTIONS[mode] + f" Choose one of {letters}."
    return f"{item.question}\n\n{format_options(item)}\n\n{instruction}"


def user_turn(item: MCQItem, mode: TurnMode = "reasoning") -> str:
    """The user turn of ``item``: :func:`format_question`, or the question alone in ``"question"`` mode."""
    return item.question if mode == "question" else format_question(item, mode)


def _rationale(item: MCQItem) -> str:
    for key in RATIONALE_FIELDS:
        value = item.extra.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def example_reply(item: MCQItem, mode: TurnMode = "reasoning", continuation: ContinuationStyle | None = None) -> str:
    """The assistant turn of a worked example: the gold answer in the form the model is asked to give.

    ``continuation`` set (log-likelihood scoring): the gold option's scored continuation. Otherwise
    ``"the answer is (X)"`` (``reasoning``: after the row's explanation when it has one), or in ``"question"``
    mode the gold option's text, which is how answers are read in that mode."""
    if continuation is not None:
        return dict(option_continuations(item, style=continuation))[item.answer]
    if mode == "question":
        return option_text(item.answer_text)
    answer = f"The answer is ({item.answer})."
    rationale = _rationale(item) if mode == "reasoning" else ""
    return f"{rationale}\n\n{answer}" if rationale else answer


def build_messages(
    item: MCQItem,
    *,
    mode: TurnMode = "reasoning",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    examples: Sequence[MCQItem] = (),
    continuation: ContinuationStyle | None = None,
) -> list[dict[str, str]]:
    """``[system, (user, assistant) per example, user]`` chat messages for ``item``; ``system_prompt=None`` leaves
    the system turn out, no ``examples`` is zero-shot. ``continuation``: see :func:`example_reply`."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for ex in examples:
        messages.append({"role": "user", "content": user_turn(ex, mode)})
        messages.append({"role": "assistant", "content": example_reply(ex, mode, continuation)})
    messages.append({"role": "user", "content": user_turn(item, mode)})
    return messages


def _question_key(text: str) -> str:
    """A question compared case- and spacing-blind: the same question reformatted is still the same question."""
    return " ".join(text.lower().split())


def draw_examples(pool: Sequence[MCQItem], k: int, seed: int, exclude: Iterable[MCQItem] = ()) -> list[MCQItem]:
    """``k`` items of the dev ``pool``, drawn with ``random.Random(seed)`` (same pool, k and seed: same examples,
    same order) after dropping every item whose question is one of ``exclude`` (the evaluated questions).
    DataError when fewer than ``k`` items are left."""
    if k < 0:
        raise DataError(f"few_shot.k={k}: must be >= 0")
    if k == 0:
        return []
    banned = {_question_key(item.question) for item in exclude}
    usable = [item for item in pool if _question_key(item.question) not in banned]
    if len(usable) < k:
        raise DataError(f"few_shot.k={k}, but the dev split has only {len(usable)} usable items "
                        f"({len(pool) - len(usable)} of {len(pool)} dropped as evaluated questions)")
    return random.Random(seed).sample(usable, k)


def option_continuations(item: MCQItem, *, style: ContinuationStyle = "letter_text") -> list[tuple[str, str]]:
    """``[(letter, assistant reply that picks it), ...]`` in option order, for log-likelihood scoring.

    ``"letter_text"`` (default): ``"The answer is (B) <option text>"``. The direct-mode answer phrase, followed
    by the option text: the letter alone is one token dominated by letter bias, the text alone ignores the listed
    options (the same reasoning as :func:`finemed_ray.eval.loglik.benchmark_continuations`). The shared prefix
    costs every option the same, so it cannot change a sum-normalised ranking.
    ``"letter"``: ``"The answer is (B)"`` only. ``"text"``: the option text only. Texts are rendered as in the
    prompt (:func:`option_text`: whitespace runs collapsed to one space)."""
    if style == "letter_text":
        return [(k, f"The answer is ({k}) {option_text(t)}") for k, t in item.options.items()]
    if style == "letter":
        return [(k, f"The answer is ({k})") for k in item.options]
    if style == "text":
        return [(k, option_text(t)) for k, t in item.options.items()]
    raise ConfigError(f"continuation style {style!r}: expected 'letter_text', 'letter' or 'text'")

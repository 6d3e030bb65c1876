"""Chat prompts for benchmark items, and the per-option continuations used for log-likelihood scoring.

Both prompt modes ask for the same closing phrase, ``the answer is (X)``, which is what
:func:`finemed_ray.eval.extract.extract_answer` looks for first, so the two modes are scored identically.
Yes/no/maybe items are lettered like any other item (A yes, B no, C maybe): one answer format for every benchmark.

Option texts are rendered on one line each (:func:`option_text`): runs of whitespace inside a text (newlines, tabs,
repeated spaces) become one space and the ends are stripped, so a text with a line break cannot break the
``"A. text"`` layout or look like a new option. The same rendering is used in log-likelihood continuations.
"""

from __future__ import annotations

from typing import Literal

from finemed_ray.data.sample import DEFAULT_SYSTEM_PROMPT
from finemed_ray.errors import ConfigError
from finemed_ray.eval.benchmarks import MCQItem

__all__ = ["MODES", "build_messages", "format_options", "format_question", "option_continuations", "option_text"]

Mode = Literal["reasoning", "direct"]
MODES = ("reasoning", "direct")
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


def build_messages(
    item: MCQItem, *, mode: Mode = "reasoning", system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> list[dict[str, str]]:
    """``[system, user]`` chat messages for ``item`` (``system_prompt=None`` leaves the system turn out)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": format_question(item, mode)})
    return messages


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

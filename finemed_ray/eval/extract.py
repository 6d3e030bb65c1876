"""Which option did a model's free-text reply choose? Rule-based answer extraction for multiple-choice items.

Replies are read in tiers, strongest signal first; the first tier that yields a letter among the item's options
wins, and ``Extraction.method`` names it so a report can show how answers were read:

1. ``bare_letter``  -- the whole reply is one letter: ``B``, ``(B)``, ``B.``, ``**B**``.
2. ``option_text``  -- the whole reply is exactly one option's text (normalised: case, spacing, markdown,
   trailing punctuation), e.g. ``Tell the attending ...`` or ``yes``. Texts shared by two options never match.
3. ``answer_phrase`` / ``answer_phrase_text`` / ``boxed`` -- explicit statements anywhere in the reply:
   ``the answer is (B)``, ``The answer is B``, ``Answer: B``, ``Final answer: **C**``, ``correct option is D``,
   ``Option B is correct``, ``\\boxed{B}``, or an answer phrase followed by an option's text
   (``the answer is yes``). The *last* valid statement wins, so a model that changes its mind
   ("The answer is (A). Wait, actually the answer is (C).") is scored on its final choice.
4. ``bold``  -- the last bold letter on its own, ``**C**``.
5. ``leading_label`` -- the reply opens with a label: ``B) text``, ``B. text``, ``(B) text``, ``B: text`` or a
   first line that is just the letter; skipped when several lines open with different labels (an enumeration
   of the options is not an answer).
6. ``trailing_letter`` -- the last line is just a letter (``B``, ``(B)``, ``B.``).
7. ``yes_no_maybe`` -- yes/no/maybe items only: a reply opening with ``Yes,`` / ``No.`` / ``Maybe`` followed by
   punctuation, or a last line that is one of the words.
8. ``option_text`` -- the last line is exactly one option's text.

Letters are upper case A-J; a letter not among the options is ignored. Lower-case letters count only inside
brackets after an answer phrase (``the answer is (b)``). Prose is never mistaken for an answer: the article in
"A 45-year-old man..." is not followed by a label mark, so it matches none of the tiers. Nothing found:
``Extraction(None, "none")``.

A reply that is a single letter is read as that letter even when another option's *text* is that letter (rare
MedQA items list options such as ``A: "B", B: "C"``); the letter reading is the one a model asked for a letter means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from finemed_ray.schemas import OPTION_LETTERS

__all__ = ["Extraction", "METHODS", "extract_answer", "normalize_text"]

METHODS = (
    "bare_letter", "option_text", "answer_phrase", "answer_phrase_text", "boxed", "bold", "leading_label",
    "trailing_letter", "yes_no_maybe", "none",
)


@dataclass(frozen=True)
class Extraction:
    """The chosen letter (None when nothing could be read) and the rule that found it (one of ``METHODS``)."""

    letter: str | None
    method: str


_MARKUP = re.compile(r"[*_`]+")
_EDGE_PUNCT = " \t\n.;:!,\"'“”‘’"
_BARE = re.compile(r"[\(\[]?\s*([A-J])\s*[\)\]]?\s*[.:)]?")
_PHRASE = re.compile(
    r"(?i:\b(?:answer|option|choice|decision)\b[\s*_]*(?:is\b|:|would\s+be\b|should\s+be\b|will\s+be\b|=))"
)
_AFTER_PHRASE = re.compile(r"[\s*_:]*(?:(?i:option|choice|letter)\s+)?[\s*_]*")
_PHRASE_LETTER = re.compile(
    r"\(\s*(?P<p>[A-Ja-j])\s*\)|\[\s*(?P<b>[A-Ja-j])\s*\]"
    r"|(?P<l>[A-J])(?![\w'’-])(?!\s+(?:think|believe|guess|would|am)\b)"  # "the answer is I think" is prose
)
_IS_CORRECT = re.compile(
    r"(?i:\b(?:option|choice|answer)\s+)[\(\[]?([A-J])[\)\]]?(?i:\s+is\s+(?:the\s+)?(?:correct|right|best)\b)"
)
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{\s*)?\(?([A-J])\)?\s*\}?\s*\}")
_BOLD = re.compile(r"\*\*\s*[\(\[]?\s*([A-J])\s*[\)\]]?\s*[.:)]?\s*\*\*")
_LABEL = re.compile(r"[\(\[]?([A-J])(?:[\)\]:]|\.(?=\s|$)|$)")
_YNM_START = re.compile(r"(?i)^\W*(yes|no|maybe)\b(?=\s*[,.;:!)\n-]|\s*$)")
_YNM = ("yes", "no", "maybe")


def normalize_text(text: str) -> str:
    """Lower case, markdown and edge punctuation removed, whitespace collapsed: how option texts are compared."""
    text = _MARKUP.sub("", text)
    return " ".join(text.split()).strip(_EDGE_PUNCT).lower()


def _strip_line(line: str) -> str:
    return _MARKUP.sub("", line).strip().lstrip(">#").strip()


def _text_index(options: Mapping[str, str]) -> dict[str, str | None]:
    """normalised option text -> letter; None for a text two options share (it identifies neither)."""
    index: dict[str, str | None] = {}
    for letter, text in options.items():
        key = normalize_text(text)
        if key:
            index[key] = None if key in index else letter
    return index


def _prefix_option(rest: str, index: Mapping[str, str | None]) -> tuple[str, int] | None:
    """The option whose text ``rest`` starts with (longest wins): (letter, text length); None if none/ambiguous."""
    norm = normalize_text(rest)
    best: tuple[str | None, int] | None = None
    for key, letter in index.items():
        if norm.startswith(key) and (len(norm) == len(key) or not norm[len(key)].isalnum()):
            if best is None or len(key) > best[1]:
                best = (letter, len(key))
    if best is None or best[0] is None:
        return None
    return best[0], best[1]


def _phrase_candidates(text: str, letters: set[str], index: Mapping[str, str | None]) -> list[tuple[int, str, str]]:
    """(position, letter, method) for every valid explicit answer statement."""
    found: list[tuple[int, str, str]] = []
    for m in _PHRASE.finditer(text):
        end = text.find("\n", m.end())
        rest = text[m.end(): end if end >= 0 else len(text)]
        rest = rest[_AFTER_PHRASE.match(rest).end():]  # type: ignore[union-attr]
        lm = _PHRASE_LETTER.match(rest)
        letter = (lm.group("p") or lm.group("b") or lm.group("l")).upper() if lm else None
        by_text = _prefix_option(rest, index)
        # An option's text wins over a leading letter only when it is more than that letter ("A smear." as text)
        # or the letter is no option; a bare "B" stays the letter B.
        if by_text and (by_text[1] > 1 or letter not in letters):
            found.append((m.start(), by_text[0], "answer_phrase_text"))
        elif letter in letters:
            found.append((m.start(), letter, "answer_phrase"))  # type: ignore[arg-type]
    for m in _IS_CORRECT.finditer(text):
        if m.group(1) in letters:
            found.append((m.start(), m.group(1), "answer_phrase"))
    for m in _BOXED.finditer(text):
        if m.group(1) in letters:
            found.append((m.start(), m.group(1), "boxed"))
    return found


def extract_answer(text: str | None, options: Mapping[str, str]) -> Extraction:
    """The option letter a free-text reply chose (see the module docstring for the rules, in order)."""
    if not text or not text.strip() or not options:
        return Extraction(None, "none")
    letters = {k.strip().upper() for k in options if k.strip().upper() in OPTION_LETTERS}
    index = _text_index(options)
    stripped = _strip_line(text.strip())

    # 1-2: the whole reply is a letter or an option's text
    bare = _BARE.fullmatch(stripped)
    if bare and bare.group(1) in letters:
        return Extraction(bare.group(1), "bare_letter")
    whole = index.get(normalize_text(text))
    if whole:
        return Extraction(whole, "option_text")

    # 3: explicit statements; the last one wins
    phrases = _phrase_candidates(text, letters, index)
    if phrases:
        _, letter, method = max(phrases, key=lambda c: c[0])
        return Extraction(letter, method)

    # 4: last bold letter
    bolds = [m.group(1) for m in _BOLD.finditer(text) if m.group(1) in letters]
    if bolds:
        return Extraction(bolds[-1], "bold")

    lines = [s for s in (_strip_line(line) for line in text.splitlines()) if s]
    # 5: an opening label, unless the reply enumerates options
    labels = {m.group(1) for m in (_LABEL.match(line) for line in lines) if m and m.group(1) in letters}
    first = _LABEL.match(lines[0]) if lines else None
    if first and first.group(1) in letters and len(labels) == 1:
        return Extraction(first.group(1), "leading_label")

    # 6: a last line that is only a letter
    last = _BARE.fullmatch(lines[-1]) if lines else None
    if last and last.group(1) in letters:
        return Extraction(last.group(1), "trailing_letter")

    # 7: yes/no/maybe words for yes/no/maybe items
    if lines and {k for k in index} >= set(_YNM) and all(index.get(w) for w in _YNM):
        start = _YNM_START.match(text.strip())
        word = start.group(1).lower() if start else None
        if word is None and normalize_text(lines[-1]) in _YNM:
            word = normalize_text(lines[-1])
        if word is not None:
            return Extraction(index[word], "yes_no_maybe")

    # 8: a last line that is exactly one option's text
    if lines:
        tail = index.get(normalize_text(lines[-1]))
        if tail:
            return Extraction(tail, "option_text")
    return Extraction(None, "none")

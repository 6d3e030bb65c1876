"""Parsers for teacher outputs and the paper's question-selection rules. Pure Python, no model calls.

Every parser returns a :class:`Parsed` ``(value, reason)`` pair - ``(value, None)`` on success, ``(None, reason)``
otherwise - and never raises on bad teacher output (the convention of :func:`finemed_ray.schemas.parse_jsonl_line`).
A reason starts with a short kind and a colon, so failures can be counted by kind (:func:`reason_kind`):

``bad_type``, ``bad_json``, ``missing_field``, ``bad_field``, ``not_integer``, ``out_of_range``, ``wrong_count``,
``empty_question``, ``too_short``, ``duplicate_question``, ``bad_choice``, ``missing_section``, ``duplicate_section``,
``section_order``, ``empty_section``, ``empty_answer``, ``truncated``, ``no_scored_questions``, ``source_specific``.

What the JSON parsers accept (and why):

- strict JSON only (``json`` module): an object, alone or inside a Markdown code fence (```` ```json ````) or with prose
  before/after it - the first complete JSON value found is used. Teachers often wrap JSON that way and the content
  is unambiguous.
- NOT accepted: single-quoted pseudo-JSON (``{'questions': ['...']}``), trailing commas, comments. Repairing them is
  guesswork once the strings contain apostrophes ("the patient's"), so such outputs are rejected as ``bad_json`` and
  left for the pipeline to retry or count.
- keys are matched case-insensitively, with spaces/hyphens equal to underscores (``"Mentions specific details"``).
- a leading ``<think>...</think>`` block (reasoning-model teachers) is removed before parsing, everywhere; an
  unterminated one gives ``truncated``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_BOOL_FIELDS",
    "DEFAULT_SCORE_RANGES",
    "Parsed",
    "extract_json",
    "format_reasoning",
    "parse_answer",
    "parse_judge",
    "parse_questions",
    "parse_reasoning",
    "parse_scores",
    "reason_kind",
    "select_question",
    "split_kind",
    "strip_think",
]


class Parsed(NamedTuple):
    """``(value, None)`` on success, ``(None, reason)`` on failure. Unpacks like a tuple."""

    value: Any
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _ok(value: Any) -> Parsed:
    return Parsed(value, None)


def _fail(reason: str) -> Parsed:
    return Parsed(None, reason)


def reason_kind(reason: str | None) -> str | None:
    """``"out_of_range: quality=11 ..."`` -> ``"out_of_range"`` (for counting failures by kind)."""
    if reason is None:
        return None
    return reason.split(":", 1)[0].strip()


def _short(s: str, limit: int = 80) -> str:
    s = " ".join(s.split())
    return repr(s if len(s) <= limit else s[: limit - 3] + "...")


# ------------------------------------------------------------------------------------------------- shared helpers
_THINK_OPEN = re.compile(r"^\s*<think>", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.IGNORECASE | re.DOTALL)


def strip_think(raw: str) -> Parsed:
    """Remove a leading ``<think>...</think>`` block; ``truncated`` if it never closes."""
    m = _THINK_BLOCK.match(raw)
    if m:
        return _ok(raw[m.end() :])
    if _THINK_OPEN.match(raw):
        return _fail("truncated: unterminated <think> block")
    return _ok(raw)


def _prepare(raw: Any) -> Parsed:
    if not isinstance(raw, str):
        return _fail(f"bad_type: expected a string, got {type(raw).__name__}")
    return strip_think(raw)


_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_MAX_SCAN = 200  # '{' / '[' positions tried when looking for embedded JSON


def extract_json(raw: Any, *, allow_list: bool = False) -> Parsed:
    """The first JSON object (or list, with ``allow_list``) in ``raw``: the whole string, else a code-fenced
    block, else the first ``{``/``[`` from which a complete JSON value decodes."""
    prepared = _prepare(raw)
    if not prepared.ok:
        return prepared
    text = prepared.value.strip()
    if not text:
        return _fail("bad_json: empty output")
    kinds: tuple[type, ...] = (dict, list) if allow_list else (dict,)

    candidates = [text] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for cand in candidates:
        try:
            value = json.loads(cand)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, kinds):
            return _ok(value)

    decoder = json.JSONDecoder()
    openers = "{[" if allow_list else "{"
    tried = 0
    for i, ch in enumerate(text):
        if ch not in openers:
            continue
        tried += 1
        if tried > _MAX_SCAN:
            break
        try:
            value, _ = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, kinds):
            return _ok(value)

    if re.search(r"[{\[]\s*'", text):
        return _fail("bad_json: single-quoted pseudo-JSON is not accepted")
    if "{" not in text:
        return _fail(f"bad_json: no JSON object in {_short(text)}")
    return _fail(f"bad_json: no complete JSON object could be decoded from {_short(text)}")


def _norm_key(k: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(k).strip().lower())


def _get_field(obj: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    if name in obj:
        return True, obj[name]
    want = _norm_key(name)
    for k, v in obj.items():
        if _norm_key(k) == want:
            return True, v
    return False, None


def _dedup_key(s: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", s.casefold()).split())


# ------------------------------------------------------------------------------------------------- questions
# "1. ", "2) ", "Q1: ", "Question 2. " - but not "5-year survival ..." or "1.5 mg ...".
_NUMBERING = re.compile(r"^\s*(?:\d{1,2}[.)]\s+|q(?:uestion)?\s*\d{0,2}\s*[:.)]\s*)", re.IGNORECASE)


def parse_questions(raw: Any, n: int = 2, *, min_chars: int = 10) -> Parsed:
    """``{"questions": [q1, ..., qn]}`` -> list of ``n`` stripped question strings.

    Also accepted: a bare JSON list of strings, and items given as ``{"question": "..."}``. A leading numbering
    (``"1. "``, ``"Q2:"``) is removed. Rejected: a count other than ``n`` (``wrong_count``; extra questions are not
    silently dropped), an empty or whitespace-only question (``empty_question``), one shorter than ``min_chars``
    (``too_short``), non-strings (``bad_field``) and two questions equal up to case/punctuation/whitespace
    (``duplicate_question``)."""
    got = extract_json(raw, allow_list=True)
    if not got.ok:
        return got
    obj = got.value
    if isinstance(obj, dict):
        found, items = _get_field(obj, "questions")
        if not found:
            return _fail(f"missing_field: questions (keys: {sorted(map(str, obj))})")
    else:
        items = obj
    if not isinstance(items, list):
        return _fail(f"bad_field: questions must be a list, got {type(items).__name__}")
    if len(items) != n:
        return _fail(f"wrong_count: expected {n} questions, got {len(items)}")
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if isinstance(item, dict):
            found, item = _get_field(item, "question")
            if not found:
                return _fail(f"missing_field: questions[{i}].question")
        if not isinstance(item, str):
            return _fail(f"bad_field: questions[{i}] must be a string, got {type(item).__name__}")
        q = _NUMBERING.sub("", item.strip(), count=1).strip()
        if not q:
            return _fail(f"empty_question: questions[{i}] is empty")
        if len(q) < min_chars:
            return _fail(f"too_short: questions[{i}] has {len(q)} chars (min {min_chars})")
        key = _dedup_key(q)
        if key in seen:
            return _fail(f"duplicate_question: questions[{i}] repeats questions[{seen[key]}]")
        seen[key] = i
        out.append(q)
    return _ok(out)


# ------------------------------------------------------------------------------------------------- scores
DEFAULT_SCORE_RANGES: dict[str, tuple[int, int]] = {"quality": (1, 10), "complexity": (1, 10), "relevance": (1, 6)}
DEFAULT_BOOL_FIELDS: tuple[str, ...] = ("mentions_specific_details",)
_TRUE = {"true", "yes", "y"}
_FALSE = {"false", "no", "n"}


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+(?:\.0+)?\s*", v):
        return int(float(v))
    return None


def _as_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        s = v.strip().strip(".").lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    return None


def parse_scores(
    raw: Any,
    ranges: Mapping[str, tuple[int, int]] | None = None,
    bool_fields: Sequence[str] = DEFAULT_BOOL_FIELDS,
) -> Parsed:
    """Score JSON -> ``{field: int, ..., bool_field: bool}`` with exactly the requested fields.

    ``ranges`` maps each integer field to its inclusive ``(low, high)`` (default :data:`DEFAULT_SCORE_RANGES`).
    Integers may be JSON ints, integral floats (``8.0``) or digit strings (``"8"``); ``7.5``, ``"high"`` or a JSON
    boolean give ``not_integer``. Booleans may be JSON ``true``/``false`` or the strings true/false/yes/no (any
    case); numbers are not accepted as booleans. Extra keys are ignored."""
    ranges = DEFAULT_SCORE_RANGES if ranges is None else ranges
    got = extract_json(raw)
    if not got.ok:
        return got
    obj = got.value
    out: dict[str, Any] = {}
    for name, (low, high) in ranges.items():
        found, v = _get_field(obj, name)
        if not found or v is None:
            return _fail(f"missing_field: {name}")
        iv = _as_int(v)
        if iv is None:
            return _fail(f"not_integer: {name}={v!r}")
        if not low <= iv <= high:
            return _fail(f"out_of_range: {name}={iv} (allowed {low}..{high})")
        out[name] = iv
    for name in bool_fields:
        found, v = _get_field(obj, name)
        if not found or v is None:
            return _fail(f"missing_field: {name}")
        bv = _as_bool(v)
        if bv is None:
            return _fail(f"bad_field: {name}={v!r} (expected true/false)")
        out[name] = bv
    return _ok(out)


# ------------------------------------------------------------------------------------------------- judge
_CHOICE = re.compile(r"^(?:(?:answer|choice|option)\s*[:\-]?\s*)?\(?([ab])\)?$", re.IGNORECASE)


def _choice(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    s = v.strip().strip("\"'`*").strip().rstrip(".").strip()
    m = _CHOICE.match(s)
    return m.group(1).upper() if m else None


def parse_judge(raw: Any) -> Parsed:
    """``{"choice": "A"|"B"}`` -> ``"A"`` or ``"B"``. The value may be lower case or ``"Answer B"``; a reply that
    is only the letter (``B``, ``**A**``, ``Answer: A``) without JSON is accepted too. Anything else (``"C"``,
    ``"both"``, ``"tie"``) is ``bad_choice``."""
    prepared = _prepare(raw)
    if not prepared.ok:
        return prepared
    bare = _choice(prepared.value)
    if bare is not None:
        return _ok(bare)
    got = extract_json(prepared.value)
    if not got.ok:
        return got
    found, v = _get_field(got.value, "choice")
    if not found:
        return _fail("missing_field: choice")
    c = _choice(v)
    if c is None:
        return _fail(f"bad_choice: {v!r} (expected 'A' or 'B')")
    return _ok(c)


# ------------------------------------------------------------------------------------------------- reasoning
def _heading(names: str) -> re.Pattern[str]:
    # "## Thought", "### thought:", "# **Thought**", "**Thought:**" - a heading or a bold line, alone on its line.
    return re.compile(
        rf"^[ \t]*(?:#{{1,6}}[ \t]*(?:\*\*|__)?[ \t]*(?:{names})[ \t]*:?[ \t]*(?:\*\*|__)?"
        rf"|(?:\*\*|__)[ \t]*(?:{names})[ \t]*:?[ \t]*(?:\*\*|__))[ \t]*:?[ \t]*$",
        re.IGNORECASE | re.MULTILINE,
    )


_THOUGHT = _heading("thoughts?")
_SUMMARY = _heading("summarization|summary")


def parse_reasoning(raw: Any) -> Parsed:
    """An o1-style answer -> ``(thought, summary)``, both stripped and non-empty.

    Headings: ``## Thought`` and ``## Summarization`` (any ``#`` level, any case, optional colon, optional bold;
    a bold line ``**Thought**`` also counts; ``Thoughts``/``Summary`` are accepted spellings). Each must appear
    exactly once, Thought first. Text before the Thought heading (e.g. "Sure, here is my answer:") is dropped."""
    prepared = _prepare(raw)
    if not prepared.ok:
        return prepared
    text = prepared.value
    thoughts = list(_THOUGHT.finditer(text))
    summaries = list(_SUMMARY.finditer(text))
    if not thoughts:
        return _fail("missing_section: ## Thought")
    if not summaries:
        return _fail("missing_section: ## Summarization")
    if len(thoughts) > 1:
        return _fail(f"duplicate_section: {len(thoughts)} Thought headings")
    if len(summaries) > 1:
        return _fail(f"duplicate_section: {len(summaries)} Summarization headings")
    t, s = thoughts[0], summaries[0]
    if s.start() < t.start():
        return _fail("section_order: Summarization comes before Thought")
    thought = text[t.end() : s.start()].strip()
    summary = text[s.end() :].strip()
    if not thought:
        return _fail("empty_section: thought")
    if not summary:
        return _fail("empty_section: summarization")
    return _ok((thought, summary))


def format_reasoning(thought: str, summary: str) -> str:
    """The canonical assistant text of a complex answer (what SFT rows store)."""
    return f"## Thought\n\n{thought.strip()}\n\n## Summarization\n\n{summary.strip()}"


# ------------------------------------------------------------------------------------------------- plain answers
_ROLE_PREFIX = re.compile(
    r"^\s*(?:\*\*)?(?:doctor|questioner|patient|clinician|answer|question)\s*(?::\s*(?:\*\*)?|(?:\*\*)\s*:)\s*",
    re.IGNORECASE,
)


def parse_answer(raw: Any, *, min_chars: int = 1) -> Parsed:
    """A plain-text answer (or follow-up question) -> the stripped text. A leading role label (``Doctor:``,
    ``Questioner:``, ``Patient:``, ``Answer:`` ...) is removed. Empty -> ``empty_answer``; shorter than
    ``min_chars`` -> ``too_short``."""
    prepared = _prepare(raw)
    if not prepared.ok:
        return prepared
    text = _ROLE_PREFIX.sub("", prepared.value.strip(), count=1).strip()
    if not text:
        return _fail("empty_answer: the output is empty")
    if len(text) < min_chars:
        return _fail(f"too_short: {len(text)} chars (min {min_chars})")
    return _ok(text)


# ------------------------------------------------------------------------------------------------- selection
def _scores_of(candidate: Any) -> Mapping[str, Any] | None:
    if not isinstance(candidate, Mapping):
        return None
    scores = candidate.get("scores", candidate)
    if not isinstance(scores, Mapping):
        return None
    needed = ("quality", "complexity", "relevance", "mentions_specific_details")
    if any(k not in scores for k in needed):
        return None
    return scores


def _seeded_index(rng_seed: int | str, key: str, k: int) -> int:
    digest = hashlib.sha256(f"{rng_seed}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).randrange(k)


def select_question(candidates: Sequence[Mapping[str, Any]], rng_seed: int | str, key: str) -> Parsed:
    """The paper's choice among the questions generated for one text -> the *index* of the kept candidate.

    Each candidate is a mapping with a ``"scores"`` mapping (as :func:`parse_scores` returns) or with the score
    fields at top level; a candidate whose scores are missing or ``None`` (scoring failed) is ignored.

    1. drop questions whose ``mentions_specific_details`` is true; if every scored question does, the text is
       dropped: ``source_specific: all questions mention source-specific details``;
    2. keep the highest ``quality + complexity + relevance``;
    3. ties: highest ``quality + complexity``, then highest ``quality``;
    4. still tied: a seeded random choice, deterministic for a given ``rng_seed`` and per-text ``key`` (e.g. the
       text id) and independent of process, platform and ``PYTHONHASHSEED``.
    """
    scored = [(i, s) for i, c in enumerate(candidates) if (s := _scores_of(c)) is not None]
    if not scored:
        return _fail(f"no_scored_questions: 0 of {len(candidates)} questions have scores")
    general = [(i, s) for i, s in scored if not s["mentions_specific_details"]]
    if not general:
        return _fail("source_specific: all questions mention source-specific details")
    levels = (
        lambda s: s["quality"] + s["complexity"] + s["relevance"],
        lambda s: s["quality"] + s["complexity"],
        lambda s: s["quality"],
    )
    tied = general
    for level in levels:
        best = max(level(s) for _, s in tied)
        tied = [(i, s) for i, s in tied if level(s) == best]
        if len(tied) == 1:
            return _ok(tied[0][0])
    return _ok(tied[_seeded_index(rng_seed, key, len(tied))][0])


def split_kind(scores: Mapping[str, Any], complex_threshold: int = 8) -> str:
    """``"complex"`` if ``scores["complexity"] > complex_threshold`` (strictly), else ``"common"``."""
    return "complex" if scores["complexity"] > complex_threshold else "common"

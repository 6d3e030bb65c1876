"""The one reader of multiple-choice benchmark rows: file text -> rows, and one row -> a normalised :class:`MCQItem`.

Evaluation (:mod:`finemed_ray.eval.benchmarks`), dataset validation (:func:`finemed_ray.schemas.normalize_mcq`, which
log-likelihood scoring and GRPO use too) and decontamination (:mod:`finemed_ray.synth.decontam`) all read benchmark
files and rows through this module, so a row means the same item (same id, options, gold letter) everywhere.
It imports nothing from the rest of the package, so ``schemas`` can use it without an import cycle.

:func:`read_rows`: a file's text is JSONL (one value a line, blank lines are not rows), a JSON array of rows, or a
JSON object mapping id -> row (the original PubMedQA ``ori_pqal.json``). Every entry comes back as a
:class:`RawRow`; an undecodable line or a value that is not an object carries the reason in ``error``.

:func:`parse_item`: MedQA-style ``{"question", "options": {"A": ..., "B": ...}, "answer_idx": "A", ...}``. Options:
2 to 10, lettered consecutively from ``A`` (``A``-``J``) in any order in the row, also as the Arrow form
``[{"key", "text"}]``; letters and ``answer_idx`` are upper-cased, texts stripped. PubMedQA-style items (options
yes / no / maybe) get ``kind="yes_no_maybe"``: detected per row with ``kind="auto"``, required with
``kind="yes_no_maybe"`` (which also accepts rows without ``options`` whose ``answer`` or ``final_decision`` is yes,
no or maybe: they get options A yes, B no, C maybe). A yes/no/maybe row whose ``answer`` contradicts its
``answer_idx`` is refused. Every refusal is a :class:`BadRow` (a ``ValueError``) whose message names the field.

Ids (:func:`row_id`): the configured ``id_field`` if any (then required), else the key of an id -> row object, else
the first non-empty ``realidx``, ``id``, ``idx`` or ``qid``, else the fallback (the row's line number in a file).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "ID_FIELDS",
    "KINDS",
    "OPTION_LETTERS",
    "YES_NO_MAYBE",
    "BadRow",
    "MCQItem",
    "RawRow",
    "parse_item",
    "read_rows",
    "row_id",
]

OPTION_LETTERS = "ABCDEFGHIJ"
Kind = Literal["auto", "mcq", "yes_no_maybe"]
ItemKind = Literal["mcq", "yes_no_maybe"]
KINDS = ("auto", "mcq", "yes_no_maybe")
YES_NO_MAYBE = ("yes", "no", "maybe")
ID_FIELDS = ("realidx", "id", "idx", "qid")
_CORE_FIELDS = ("question", "options", "answer_idx")


class BadRow(ValueError):
    """A row is unusable; the message says why, naming the field. ``item_id`` is the row's id when it has one."""

    def __init__(self, reason: str, item_id: str | None = None):
        super().__init__(reason)
        self.item_id = item_id


@dataclass(frozen=True)
class MCQItem:
    """One validated multiple-choice item. ``options`` is ordered A, B, C, ...; ``answer`` is the gold letter;
    ``extra`` holds the row's other fields (``subject``, ``meta_info``, ``answer``, ...). ``id`` is None only for a
    row parsed without a position that has no id field (:func:`finemed_ray.schemas.normalize_mcq`)."""

    id: str | None
    question: str
    options: dict[str, str]
    answer: str
    benchmark: str
    kind: ItemKind = "mcq"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def letters(self) -> list[str]:
        return list(self.options)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]


# ------------------------------------------------------------------------------------------------ file text -> rows
class RawRow(NamedTuple):
    """One entry of a benchmark file: ``number`` is the 1-based line (JSONL) or position (JSON array or object),
    ``key`` the id of an id -> row object entry, ``value`` the decoded JSON (None when undecodable) and ``error``
    why the entry is not a row object (None for a usable row)."""

    number: int
    key: str | None
    value: Any
    error: str | None
    unit: str = "line"  # "line" (JSONL) or "item" (JSON array / object): how messages point at the entry

    @property
    def where(self) -> str:
        return f"{self.unit} {self.number}"


def _not_object(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"not a JSON object ({type(value).__name__})"


def read_rows(text: str) -> list[RawRow]:
    """Benchmark file text -> one :class:`RawRow` per entry: JSONL (blank lines skipped, line numbers kept), a JSON
    array, or a JSON object mapping id -> row (every value an object, and no ``question``/``options`` key, which
    would make it a one-line JSONL file)."""
    stripped = text.lstrip()
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list) and stripped[0] == "[":
            return [RawRow(i, None, v, _not_object(v), "item") for i, v in enumerate(data, start=1)]
        if (isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values())
                and not set(data) & {"question", "options"}):
            return [RawRow(i, str(k), v, None, "item") for i, (k, v) in enumerate(data.items(), start=1)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(RawRow(number, None, None, f"invalid JSON: {exc.msg} at column {exc.colno}"))
            continue
        rows.append(RawRow(number, None, value, _not_object(value)))
    return rows


# ------------------------------------------------------------------------------------------------ ids
def _usable_id(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    return str(value).strip() or None


def _id_source(row: Mapping[str, Any], key: str | None, id_field: str | None) -> tuple[str | None, str | None]:
    """(field holding the id or None, the id or None)."""
    if id_field is not None:
        return id_field, _usable_id(row.get(id_field))
    if key is not None and key.strip():
        return None, key.strip()
    for name in ID_FIELDS:
        value = _usable_id(row.get(name))
        if value is not None:
            return name, value
    return None, None


def row_id(row: Mapping[str, Any], *, key: str | None = None, id_field: str | None = None,
           fallback: str | None = None) -> str | None:
    """The id of one row (see the module docstring); :class:`BadRow` when ``id_field`` is set and missing."""
    _, value = _id_source(row, key, id_field)
    if value is None and id_field is not None:
        raise BadRow(f"missing id field {id_field!r}")
    return fallback if value is None else value


# ------------------------------------------------------------------------------------------------ row -> item
def _is_yes_no_maybe(options: Mapping[str, str]) -> bool:
    return len(options) == 3 and {t.strip().lower().rstrip(".") for t in options.values()} == set(YES_NO_MAYBE)


def _parse_options(raw: Any) -> dict[str, str]:
    if isinstance(raw, list) and all(isinstance(o, dict) and {"key", "text"} <= set(o) for o in raw):
        raw = {o["key"]: o["text"] for o in raw}  # the Arrow form written by finemed_ray.schemas
    if not isinstance(raw, dict):
        raise BadRow(f"options: expected a {{letter: text}} mapping, got {type(raw).__name__}")
    if not raw:
        raise BadRow("options: empty")
    options: dict[str, str] = {}
    for key, text in raw.items():
        letter = str(key).strip().upper()
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise BadRow(f"option {letter!r}: text must be a string, got {type(text).__name__}")
        text = str(text).strip()
        if not text:
            raise BadRow(f"option {letter!r}: empty text")
        if letter in options:
            raise BadRow(f"option letter {letter!r} appears twice")
        options[letter] = text
    if len(options) > len(OPTION_LETTERS):
        raise BadRow(f"{len(options)} options; at most {len(OPTION_LETTERS)} (A-J) are supported")
    if len(options) < 2:
        raise BadRow(f"only {len(options)} option; need at least 2")
    letters = sorted(options)
    if letters != list(OPTION_LETTERS[: len(letters)]):
        raise BadRow(f"option letters {', '.join(letters)} are not consecutive from A")
    return {k: options[k] for k in letters}


def _yes_no_maybe_word(row: Mapping[str, Any]) -> str | None:
    for key in ("answer", "final_decision"):
        value = row.get(key)
        if isinstance(value, str) and value.strip().lower() in YES_NO_MAYBE:
            return value.strip().lower()
    return None


def parse_item(row: Any, *, benchmark: str = "", line_no: int | None = None, kind: Kind = "auto",
               id_field: str | None = None, key: str | None = None) -> MCQItem:
    """One row -> :class:`MCQItem`; :class:`BadRow` (a ``ValueError``, with ``item_id`` when known) naming the
    field when the row is unusable. ``line_no``: the row's position, its id when it has no id field; ``key``: its
    key in an id -> row object."""
    if not isinstance(row, dict):
        raise BadRow(_not_object(row) or "")
    item_id = row_id(row, key=key, id_field=id_field, fallback=None if line_no is None else str(line_no))
    try:
        return _parse_item(row, benchmark, kind, id_field, key, item_id)
    except BadRow as exc:
        exc.item_id = item_id
        raise


def _parse_item(row: dict, benchmark: str, kind: Kind, id_field: str | None, key: str | None,
                item_id: str | None) -> MCQItem:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRow("question: missing or empty")

    word = _yes_no_maybe_word(row)
    if row.get("options") is None and kind == "yes_no_maybe":
        if word is None:
            raise BadRow("no options, and answer/final_decision is not yes, no or maybe")
        options = dict(zip(OPTION_LETTERS, YES_NO_MAYBE))
    elif row.get("options") is None:
        raise BadRow("no options")
    else:
        options = _parse_options(row["options"])

    ynm = _is_yes_no_maybe(options)
    if kind == "yes_no_maybe" and not ynm:
        raise BadRow(f"kind 'yes_no_maybe' but options are {sorted(o.lower() for o in options.values())}")
    item_kind: ItemKind = "yes_no_maybe" if (kind == "yes_no_maybe" or (kind == "auto" and ynm)) else "mcq"

    span = f"A-{OPTION_LETTERS[len(options) - 1]}"
    gold_raw = row.get("answer_idx")
    if gold_raw is None:
        if item_kind != "yes_no_maybe" or word is None:
            raise BadRow("answer_idx: missing")
        by_text = {t.strip().lower().rstrip("."): k for k, t in options.items()}
        gold = by_text[word]
    else:
        if not isinstance(gold_raw, str) or not gold_raw.strip():
            raise BadRow(f"answer_idx {gold_raw!r} is not a letter among options {span}")
        gold = gold_raw.strip().upper()
        if gold not in options:
            raise BadRow(f"answer_idx {gold_raw.strip()!r} not among options {span}")
        if item_kind == "yes_no_maybe" and word is not None and options[gold].strip().lower().rstrip(".") != word:
            raise BadRow(f"answer_idx {gold!r} ({options[gold]!r}) contradicts answer {word!r}")

    used = set(_CORE_FIELDS) | {_id_source(row, key, id_field)[0]}
    extra = {k: v for k, v in row.items() if k not in used}
    return MCQItem(id=item_id, question=question.strip(), options=options, answer=gold, benchmark=benchmark,
                   kind=item_kind, extra=extra)

"""Medical multiple-choice benchmarks: MedQA-style JSONL read into validated :class:`MCQItem` objects.

One line per item: ``{"question", "options": {"A": ..., "B": ...}, "answer_idx": "A", ...}`` (MedQA, MedMCQA,
PubMedQA, MMLU and friends as published by MedAgentsBench). Files come from a local path or an ``s3://`` URI
(:func:`finemed_ray.storage.read_text`), so a Ray job reads the same sets as a laptop.

An evaluation is only as trustworthy as its item count, so a bad row never crashes the load and is never dropped
silently: it is skipped and listed in :attr:`BenchmarkSet.skipped` as ``(line number, id or None, reason)``.
``strict=True`` turns the first bad row into a :class:`~finemed_ray.errors.DataError` instead. A file with no
valid row is always a DataError. Whitespace-only lines are not rows and are ignored.

Options: 2 to 10, lettered consecutively from ``A`` (``A``-``J``); letters and ``answer_idx`` are upper-cased.
PubMedQA-style items (options yes / no / maybe) get ``kind="yes_no_maybe"``: detected per row with
``kind="auto"``, required with ``kind="yes_no_maybe"`` (which also accepts rows without ``options`` whose
``answer`` or ``final_decision`` is yes, no or maybe: they get options A yes, B no, C maybe).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from finemed_ray import storage
from finemed_ray.config import StrictModel
from finemed_ray.errors import DataError
from finemed_ray.schemas import OPTION_LETTERS

__all__ = [
    "DEFAULT_BENCHMARKS",
    "DEFAULT_BENCHMARK_ROOT",
    "BenchmarkSet",
    "BenchmarkSpec",
    "MCQItem",
    "default_benchmarks",
    "load_benchmark",
    "load_benchmarks",
    "parse_item",
]

log = logging.getLogger(__name__)

Kind = Literal["auto", "mcq", "yes_no_maybe"]
ItemKind = Literal["mcq", "yes_no_maybe"]
KINDS = ("auto", "mcq", "yes_no_maybe")
YES_NO_MAYBE = ("yes", "no", "maybe")
_CORE_FIELDS = ("question", "options", "answer_idx")


@dataclass(frozen=True)
class MCQItem:
    """One validated multiple-choice item. ``options`` is ordered A, B, C, ...; ``answer`` is the gold letter."""

    id: str
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


@dataclass
class BenchmarkSet:
    """The valid items of one benchmark file and every row that was skipped, with why."""

    name: str
    path: str
    items: list[MCQItem]
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)
    kind: Literal["mcq", "yes_no_maybe", "mixed"] = "mcq"
    total_rows: int = 0  # non-blank lines read (valid + skipped, before ``limit``)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[MCQItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> MCQItem:
        return self.items[index]

    def by_id(self) -> dict[str, MCQItem]:
        return {item.id: item for item in self.items}


# ------------------------------------------------------------------------------------------------ row parsing
class _Skip(Exception):
    """A row is unusable; the message is the reason recorded in ``BenchmarkSet.skipped``."""


def _is_yes_no_maybe(options: Mapping[str, str]) -> bool:
    return len(options) == 3 and {t.strip().lower().rstrip(".") for t in options.values()} == set(YES_NO_MAYBE)


def _row_id(row: dict, line_no: int, id_field: str | None) -> str:
    if id_field is not None:
        value = row.get(id_field)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise _Skip(f"missing id field {id_field!r}")
        return str(value).strip()
    for key in ("realidx", "id"):
        value = row.get(key)
        if value is not None and str(value).strip():
            return str(value).strip()
    return str(line_no)


def _parse_options(raw: Any) -> dict[str, str]:
    if isinstance(raw, list) and all(isinstance(o, dict) and {"key", "text"} <= set(o) for o in raw):
        raw = {o["key"]: o["text"] for o in raw}  # the Arrow form written by finemed_ray.schemas
    if not isinstance(raw, dict):
        raise _Skip(f"options: expected a {{letter: text}} mapping, got {type(raw).__name__}")
    if not raw:
        raise _Skip("options: empty")
    options: dict[str, str] = {}
    for key, text in raw.items():
        letter = str(key).strip().upper()
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise _Skip(f"option {letter!r}: text must be a string, got {type(text).__name__}")
        text = str(text).strip()
        if not text:
            raise _Skip(f"option {letter!r}: empty text")
        if letter in options:
            raise _Skip(f"option letter {letter!r} appears twice")
        options[letter] = text
    if len(options) > len(OPTION_LETTERS):
        raise _Skip(f"{len(options)} options; at most {len(OPTION_LETTERS)} (A-J) are supported")
    if len(options) < 2:
        raise _Skip(f"only {len(options)} option; need at least 2")
    letters = sorted(options)
    if letters != list(OPTION_LETTERS[: len(letters)]):
        raise _Skip(f"option letters {', '.join(letters)} are not consecutive from A")
    return {k: options[k] for k in letters}


def _yes_no_maybe_word(row: dict) -> str | None:
    for key in ("answer", "final_decision"):
        value = row.get(key)
        if isinstance(value, str) and value.strip().lower() in YES_NO_MAYBE:
            return value.strip().lower()
    return None


def parse_item(row: Any, *, benchmark: str, line_no: int, kind: Kind = "auto", id_field: str | None = None) -> MCQItem:
    """One JSON row -> :class:`MCQItem`; raises ``ValueError`` with the reason when the row is unusable."""
    try:
        return _parse_item(row, benchmark, line_no, kind, id_field)
    except _Skip as exc:
        raise ValueError(str(exc)) from None


def _parse_item(row: Any, benchmark: str, line_no: int, kind: Kind, id_field: str | None) -> MCQItem:
    if not isinstance(row, dict):
        raise _Skip(f"not a JSON object ({type(row).__name__})")
    item_id = _row_id(row, line_no, id_field)
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _Skip("question: missing or empty")

    word = _yes_no_maybe_word(row)
    if row.get("options") is None and kind == "yes_no_maybe":
        if word is None:
            raise _Skip("no options, and answer/final_decision is not yes, no or maybe")
        options = dict(zip(OPTION_LETTERS, YES_NO_MAYBE))
    elif row.get("options") is None:
        raise _Skip("no options")
    else:
        options = _parse_options(row["options"])

    ynm = _is_yes_no_maybe(options)
    if kind == "yes_no_maybe" and not ynm:
        raise _Skip(f"kind 'yes_no_maybe' but options are {sorted(o.lower() for o in options.values())}")
    item_kind: ItemKind = "yes_no_maybe" if (kind == "yes_no_maybe" or (kind == "auto" and ynm)) else "mcq"

    span = f"A-{OPTION_LETTERS[len(options) - 1]}"
    gold_raw = row.get("answer_idx")
    if gold_raw is None:
        if item_kind != "yes_no_maybe" or word is None:
            raise _Skip("answer_idx: missing")
        by_text = {t.strip().lower().rstrip("."): k for k, t in options.items()}
        gold = by_text[word]
    else:
        if not isinstance(gold_raw, str) or not gold_raw.strip():
            raise _Skip(f"answer_idx {gold_raw!r} is not a letter among options {span}")
        gold = gold_raw.strip().upper()
        if gold not in options:
            raise _Skip(f"answer_idx {gold_raw.strip()!r} not among options {span}")
        if item_kind == "yes_no_maybe" and word is not None and options[gold].strip().lower().rstrip(".") != word:
            raise _Skip(f"answer_idx {gold!r} ({options[gold]!r}) contradicts answer {word!r}")

    used = set(_CORE_FIELDS) | {id_field or ("realidx" if row.get("realidx") is not None else "id")}
    extra = {k: v for k, v in row.items() if k not in used}
    return MCQItem(id=item_id, question=question.strip(), options=options, answer=gold, benchmark=benchmark,
                   kind=item_kind, extra=extra)


# ------------------------------------------------------------------------------------------------ loading
def load_benchmark(
    name: str,
    path: str,
    *,
    kind: Kind = "auto",
    limit: int | None = None,
    id_field: str | None = None,
    strict: bool = False,
) -> BenchmarkSet:
    """Read one benchmark JSONL file (local path or ``s3://`` URI) into a :class:`BenchmarkSet`.

    Every row is validated (so ``skipped`` is complete), then the first ``limit`` valid items are kept. Duplicate
    ids keep the first occurrence. ``strict=True`` raises DataError at the first bad row; otherwise a load with no
    valid row at all raises DataError naming the first few reasons."""
    if kind not in KINDS:
        raise DataError(f"benchmark {name!r}: kind={kind!r}, expected one of {KINDS}")
    if limit is not None and limit < 1:
        raise DataError(f"benchmark {name!r}: limit={limit}, must be >= 1 or None")
    text = storage.read_text(path)
    items: list[MCQItem] = []
    skipped: list[tuple[int, str | None, str]] = []
    first_line: dict[str, int] = {}
    rows = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows += 1
        item_id: str | None = None
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _Skip(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
            if isinstance(row, dict):
                try:
                    item_id = _row_id(row, line_no, id_field)
                except _Skip:
                    item_id = None
            item = _parse_item(row, name, line_no, kind, id_field)
            if item.id in first_line:
                raise _Skip(f"duplicate id {item.id!r} (first at line {first_line[item.id]})")
        except _Skip as exc:
            if strict:
                raise DataError(f"{path}: line {line_no}: {exc}") from None
            skipped.append((line_no, item_id, str(exc)))
            continue
        first_line[item.id] = line_no
        items.append(item)

    if not items:
        if rows == 0:
            raise DataError(f"benchmark {name!r}: {path} is empty (no JSONL rows)")
        shown = "; ".join(f"line {n}: {r}" for n, _, r in skipped[:3])
        raise DataError(f"benchmark {name!r}: {path} has no valid rows ({len(skipped)} skipped; {shown})")
    if skipped:
        log.warning("benchmark %r: skipped %d of %d rows in %s (first: line %d: %s)",
                    name, len(skipped), rows, path, skipped[0][0], skipped[0][2])
    if limit is not None:
        items = items[:limit]
    kinds = {item.kind for item in items}
    set_kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return BenchmarkSet(name=name, path=path, items=items, skipped=skipped, kind=set_kind, total_rows=rows)


# ------------------------------------------------------------------------------------------------ registry
class BenchmarkSpec(StrictModel):
    """Where one benchmark lives and how to read it (a config section, so jobs can override any field)."""

    name: str = Field(..., min_length=1, description="Benchmark name used in reports (e.g. 'medqa').")
    path: str = Field(..., min_length=1, description="JSONL file: a local path or an s3:// URI.")
    kind: Kind = Field(
        "auto", description="'mcq', 'yes_no_maybe' (PubMedQA-style), or 'auto' to detect yes/no/maybe options per row."
    )
    limit: int | None = Field(None, ge=1, description="Keep only the first N valid items (None: all).")
    id_field: str | None = Field(
        None, description="Row field holding the item id (None: 'realidx', else 'id', else the line number)."
    )


DEFAULT_BENCHMARK_ROOT = "s3://finemed-benchmarks"
# name -> file under the root (the mmlu folder holds the six MMLU medical subjects)
_DEFAULT_FILES = {
    "medqa": ("medqa/test.jsonl", "mcq"),
    "medmcqa": ("medmcqa/test.jsonl", "mcq"),
    "pubmedqa": ("pubmedqa/test.jsonl", "yes_no_maybe"),
    "mmlu_medical": ("mmlu/test.jsonl", "mcq"),
    "mmlu_pro_health": ("mmlu_pro_health/test.jsonl", "mcq"),
    "medbullets": ("medbullets/test.jsonl", "mcq"),
}


def default_benchmarks(root: str = DEFAULT_BENCHMARK_ROOT) -> dict[str, BenchmarkSpec]:
    """The standard medical benchmark registry with every file under ``root`` (an s3:// prefix or local dir)."""
    return {
        name: BenchmarkSpec(name=name, path=storage.join(root, rel), kind=kind)  # type: ignore[arg-type]
        for name, (rel, kind) in _DEFAULT_FILES.items()
    }


# Placeholder bucket: deployments point it elsewhere with default_benchmarks(root) or per-spec overrides.
DEFAULT_BENCHMARKS: dict[str, BenchmarkSpec] = default_benchmarks()


def load_benchmarks(
    specs: Mapping[str, BenchmarkSpec | Mapping[str, Any]] | Iterable[BenchmarkSpec | Mapping[str, Any]],
    *,
    strict: bool = False,
) -> dict[str, BenchmarkSet]:
    """Load several benchmarks (specs as a name -> spec mapping or a list); returns name -> BenchmarkSet."""
    values = specs.values() if isinstance(specs, Mapping) else specs
    out: dict[str, BenchmarkSet] = {}
    for raw in values:
        spec = raw if isinstance(raw, BenchmarkSpec) else _validate_spec(raw)
        if spec.name in out:
            raise DataError(f"benchmark {spec.name!r} is listed twice")
        out[spec.name] = load_benchmark(spec.name, spec.path, kind=spec.kind, limit=spec.limit,
                                        id_field=spec.id_field, strict=strict)
    return out


def _validate_spec(raw: Mapping[str, Any]) -> BenchmarkSpec:
    from finemed_ray.config import validate

    return validate(BenchmarkSpec, dict(raw), source="benchmark spec")

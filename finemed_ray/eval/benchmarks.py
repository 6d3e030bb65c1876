"""Medical multiple-choice benchmarks: benchmark files read into validated :class:`MCQItem` objects.

Files are MedQA-style JSONL, one item a line: ``{"question", "options": {"A": ..., "B": ...}, "answer_idx": "A", ...}``
(MedQA, MedMCQA, PubMedQA, MMLU and friends as published by MedAgentsBench); a JSON array of such rows or a JSON
object mapping id -> row reads too. Files come from a local path or an ``s3://`` URI
(:func:`finemed_ray.storage.read_text`), so a Ray job reads the same sets as a laptop. Rows are read and normalised
by :mod:`finemed_ray.mcq`, the reader that dataset validation and decontamination share (options, gold letter,
ids and the yes/no/maybe rules are described there).

An evaluation is only as trustworthy as its item count, so a bad row never crashes the load and is never dropped
silently: it is skipped and listed in :attr:`BenchmarkSet.skipped` as ``(line number, id or None, reason)`` (the
1-based position in a JSON array or object). ``strict=True`` turns the first bad row into a
:class:`~finemed_ray.errors.DataError` instead. A file with no valid row is always a DataError. Whitespace-only
lines are not rows and are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from finemed_ray import storage
from finemed_ray.config import StrictModel
from finemed_ray.errors import DataError
from finemed_ray.mcq import KINDS, BadRow, Kind, MCQItem, parse_item, read_rows

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


@dataclass
class BenchmarkSet:
    """The valid items of one benchmark file and every row that was skipped, with why."""

    name: str
    path: str
    items: list[MCQItem]
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)
    kind: Literal["mcq", "yes_no_maybe", "mixed"] = "mcq"
    total_rows: int = 0  # rows read: non-blank lines or array/object entries (valid + skipped, before ``limit``)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[MCQItem]:
        return iter(self.items)

    def __getitem__(self, index: int) -> MCQItem:
        return self.items[index]

    def by_id(self) -> dict[str, MCQItem]:
        return {item.id: item for item in self.items}


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
    """Read one benchmark file (JSONL, JSON array or id -> row object; local path or ``s3://`` URI) into a
    :class:`BenchmarkSet`.

    Every row is validated (so ``skipped`` is complete), then the first ``limit`` valid items are kept. Duplicate
    ids keep the first occurrence. ``strict=True`` raises DataError at the first bad row; otherwise a load with no
    valid row at all raises DataError naming the first few reasons."""
    if kind not in KINDS:
        raise DataError(f"benchmark {name!r}: kind={kind!r}, expected one of {KINDS}")
    if limit is not None and limit < 1:
        raise DataError(f"benchmark {name!r}: limit={limit}, must be >= 1 or None")
    entries = read_rows(storage.read_text(path))
    items: list[MCQItem] = []
    skipped: list[tuple[int, str | None, str]] = []
    first_at: dict[str, str] = {}
    for entry in entries:
        try:
            if entry.error is not None:
                raise BadRow(entry.error)
            item = parse_item(entry.value, benchmark=name, line_no=entry.number, kind=kind, id_field=id_field,
                              key=entry.key)
            if item.id in first_at:
                raise BadRow(f"duplicate id {item.id!r} (first at {first_at[item.id]})", item.id)
        except BadRow as exc:
            if strict:
                raise DataError(f"{path}: {entry.where}: {exc}") from None
            skipped.append((entry.number, exc.item_id, str(exc)))
            continue
        first_at[item.id] = entry.where
        items.append(item)
    rows = len(entries)

    if not items:
        if rows == 0:
            raise DataError(f"benchmark {name!r}: {path} is empty (no rows)")
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
    path: str = Field(
        ..., min_length=1, description="JSONL file (or JSON array / id -> row object): a local path or an s3:// URI."
    )
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

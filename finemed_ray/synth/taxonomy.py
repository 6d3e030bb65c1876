"""The FineMedLM-o1 two-level department taxonomy and strict label matching for teacher outputs.

The paper (arXiv 2501.09213) sorts medical texts into 6 primary and 29 secondary departments. The primary labels are
the keys of :data:`DEFAULT_DEPARTMENTS` below (the toy data uses the same six); the secondary labels are standard
sub-specialties (the paper's "Otorhinolaryngology" department covers eyes and teeth too, hence Ophthalmology and
Dentistry under it).

The taxonomy is data (:class:`Taxonomy`), so the pipeline's YAML config can replace it::

    taxonomy:
      departments:
        Internal Medicine: [Cardiology, Endocrinology]
        Surgery: [General Surgery]

Matching is deliberately strict: a teacher answer is accepted only if it *is* one of the labels once both sides
went through :func:`normalize_label` (case, whitespace, punctuation, ``&`` vs ``and``, surrounding quotes, markdown
emphasis, trailing periods, a leading ``Department:``-style prefix, British spellings). Anything else - a label
plus an explanation, a synonym, a different specialty - gives ``None`` and the pipeline records the text as
unclassified together with the raw output.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

__all__ = [
    "DEFAULT_DEPARTMENTS",
    "DEFAULT_TAXONOMY",
    "Taxonomy",
    "match_primary",
    "match_secondary",
    "normalize_label",
]

DEFAULT_DEPARTMENTS: dict[str, tuple[str, ...]] = {
    "Internal Medicine": (
        "Cardiology",
        "Pulmonology",
        "Gastroenterology",
        "Nephrology",
        "Endocrinology",
        "Hematology",
        "Neurology",
        "Infectious Diseases",
    ),
    "Surgery": (
        "General Surgery",
        "Orthopedics",
        "Urology",
        "Neurosurgery",
        "Thoracic Surgery",
        "Cardiac Surgery",
        "Plastic Surgery",
        "Vascular Surgery",
        "Hepatobiliary Surgery",
        "Burn Surgery",
    ),
    "Obstetrics & Gynecology": ("Obstetrics", "Gynecology"),
    "Pediatrics": ("Neonatology", "General Pediatrics"),
    "Otorhinolaryngology": ("Otolaryngology", "Ophthalmology", "Dentistry"),
    "Other": ("Dermatology", "Rehabilitation", "Anesthesiology", "Traditional Chinese Medicine"),
}

# British -> American spellings, applied word by word (a spelling is normalisation, not a synonym).
_SPELLINGS = {
    "paediatrics": "pediatrics",
    "paediatric": "pediatric",
    "gynaecology": "gynecology",
    "gynaecological": "gynecological",
    "orthopaedics": "orthopedics",
    "orthopaedic": "orthopedic",
    "anaesthesiology": "anesthesiology",
    "anaesthesia": "anesthesia",
    "haematology": "hematology",
    "oesophageal": "esophageal",
}

# "Department:", "Primary department -", "Answer:", "Label =", "The secondary department is:" ... (needs a : = or -).
_PREFIX = re.compile(
    r"^(?:the\s+)?(?:"
    r"(?:(?:final|primary|secondary|main|medical)\s+)?"
    r"(?:department|dept|category|label|answer|classification|specialty|speciality|sub-?specialty|sub-?department)s?"
    r"|primary|secondary)"
    r"\s*(?:is\s*)?[:：=\-–—]\s*",
    re.IGNORECASE,
)
_WRAPPERS = "\"'“”‘’`*_#()[]<>{}「」 \t\r\n"
_TRAILING = ".。:;,!"


def _strip_wrappers(s: str) -> str:
    prev = None
    while prev != s:
        prev = s
        s = s.strip(_WRAPPERS).rstrip(_TRAILING)
    return s


def normalize_label(s: Any) -> str:
    """Canonical comparison form of a label: ``'**Department: "Obstetrics and Gynaecology".**'`` ->
    ``'obstetrics and gynecology'``. Non-strings give ``''`` (which matches nothing)."""
    if not isinstance(s, str):
        return ""
    s = unicodedata.normalize("NFKC", s).strip()
    for _ in range(3):  # "Answer: Department: X"
        s = _strip_wrappers(s)
        stripped = _PREFIX.sub("", s, count=1)
        if stripped == s:
            break
        s = stripped
    s = _strip_wrappers(s).lower().replace("&", " and ")
    words = re.sub(r"[^0-9a-z]+", " ", s).split()
    return " ".join(_SPELLINGS.get(w, w) for w in words)


class Taxonomy(BaseModel):
    """Primary department -> its secondary departments (order is kept: prompts list labels in this order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    departments: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_DEPARTMENTS),
        description="Ordered mapping of primary department label -> list of its secondary department labels.",
    )

    _primary_index: dict[str, str] = PrivateAttr(default_factory=dict)
    _secondary_index: dict[str, dict[str, str]] = PrivateAttr(default_factory=dict)

    @field_validator("departments")
    @classmethod
    def _check(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        if not v:
            raise ValueError("needs at least one primary department")
        seen: dict[str, str] = {}
        for primary, secondaries in v.items():
            key = normalize_label(primary)
            if not key:
                raise ValueError(f"primary label {primary!r} is empty after normalisation")
            if key in seen:
                raise ValueError(f"primary labels {seen[key]!r} and {primary!r} are the same after normalisation")
            seen[key] = primary
            if not secondaries:
                raise ValueError(f"{primary!r}: needs at least one secondary department")
            sec_seen: dict[str, str] = {}
            for s in secondaries:
                skey = normalize_label(s)
                if not skey:
                    raise ValueError(f"{primary!r}: secondary label {s!r} is empty after normalisation")
                if skey in sec_seen:
                    raise ValueError(f"{primary!r}: secondary labels {sec_seen[skey]!r} and {s!r} are the same")
                sec_seen[skey] = s
        return v

    @model_validator(mode="after")
    def _index(self) -> Taxonomy:
        self._primary_index = {normalize_label(p): p for p in self.departments}
        self._secondary_index = {p: {normalize_label(s): s for s in ss} for p, ss in self.departments.items()}
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Taxonomy:
        """``{"departments": {primary: [secondary, ...]}}`` or the bare ``{primary: [...]}`` mapping; ``None`` or
        ``{}`` gives the default taxonomy. Raises pydantic's ``ValidationError`` on a bad shape."""
        if not data:
            return cls()
        if set(data) == {"departments"}:
            return cls.model_validate(dict(data))
        return cls.model_validate({"departments": dict(data)})

    @property
    def primaries(self) -> tuple[str, ...]:
        return tuple(self.departments)

    def secondaries(self, primary: str) -> tuple[str, ...]:
        """Secondary labels of ``primary`` (canonical or normalisable); ``()`` for an unknown primary."""
        p = self.match_primary(primary)
        return tuple(self.departments[p]) if p is not None else ()

    @property
    def all_secondaries(self) -> tuple[tuple[str, str], ...]:
        """Every (primary, secondary) pair, in order."""
        return tuple((p, s) for p, ss in self.departments.items() for s in ss)

    def match_primary(self, raw: Any) -> str | None:
        """The canonical primary label ``raw`` names exactly (after normalisation), else ``None``."""
        return self._primary_index.get(normalize_label(raw))

    def match_secondary(self, raw: Any, primary: str) -> str | None:
        """The canonical secondary label under ``primary`` that ``raw`` names exactly, else ``None`` (also when
        ``primary`` is not a primary label, or ``raw`` is a secondary of another primary)."""
        p = self.match_primary(primary)
        if p is None:
            return None
        return self._secondary_index[p].get(normalize_label(raw))


DEFAULT_TAXONOMY = Taxonomy()


def match_primary(raw: Any, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> str | None:
    """Module-level shortcut for :meth:`Taxonomy.match_primary`."""
    return taxonomy.match_primary(raw)


def match_secondary(raw: Any, primary: str, taxonomy: Taxonomy = DEFAULT_TAXONOMY) -> str | None:
    """Module-level shortcut for :meth:`Taxonomy.match_secondary`."""
    return taxonomy.match_secondary(raw, primary)

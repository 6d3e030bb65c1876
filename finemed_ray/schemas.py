"""Arrow schemas of every dataset finemed-ray reads or writes, and row validation with quarantine.

The shapes follow TRL's dataset formats so ``datasets`` and TRL read our files unchanged:
- SFT: conversational language modelling, a ``messages`` list of ``{role, content}``;
- DPO: conversational preference, ``prompt`` (messages) + ``chosen``/``rejected`` (assistant messages);
- multiple-choice benchmark items as in MedQA-style JSONL (``options`` is a ``{letter: text}`` mapping, stored in
  Arrow as a list of ``{key, text}`` because struct fields must be fixed and sets have 2..10 options).

``validate_*`` return ``None`` for a good row or a short reason naming the field. Extra columns are allowed and ignored
(as TRL does). Bad rows are written to a quarantine dataset (``QUARANTINE_SCHEMA``) with that reason and the raw row, never silently dropped.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa

from finemed_ray.mcq import OPTION_LETTERS as OPTION_LETTERS  # re-exported: the letters live with the MCQ reader
from finemed_ray.mcq import parse_item

ROLES = ("system", "user", "assistant")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

SEED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("language", pa.string()),
        ("source", pa.string()),
    ]
)

SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),
        ("department", pa.string()),  # primary department (6 labels), null when unknown
        ("subdepartment", pa.string()),  # secondary department (29 labels), null when unknown
        ("source", pa.string()),
    ]
)

DPO_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("department", pa.string()),
        ("subdepartment", pa.string()),
        ("source", pa.string()),
    ]
)

MCQ_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.struct([("key", pa.string()), ("text", pa.string())]))),
        ("answer_idx", pa.string()),
        ("answer", pa.string()),
        ("subject", pa.string()),
    ]
)

# One quarantined row: which dataset it came from, why it was rejected, and the row exactly as read.
QUARANTINE_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


def _is_nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _optional_str(row: dict, key: str) -> str | None:
    v = row.get(key)
    if v is not None and not isinstance(v, str):
        return f"{key}: expected a string or null, got {type(v).__name__}"
    return None


def validate_messages(messages: Any, field: str = "messages", need_assistant: bool = True) -> str | None:
    if messages is None:
        return f"{field}: missing"
    if not isinstance(messages, list):
        return f"{field}: expected a list of {{role, content}}, got {type(messages).__name__}"
    if not messages:
        return f"{field}: empty conversation"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"{field}[{i}]: expected an object with role and content, got {type(m).__name__}"
        extra = set(m) - {"role", "content"}
        if extra:
            return f"{field}[{i}]: unknown keys {sorted(extra)}"
        role = m.get("role")
        if role not in ROLES:
            return f"{field}[{i}].role: {role!r} is not one of {list(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"{field}[{i}].content: expected a string, got {type(m.get('content')).__name__}"
        if role == "system" and i != 0:
            return f"{field}[{i}]: a system message may only come first"
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if need_assistant:
        if not turns or turns[0] != "user":
            return f"{field}: the first non-system message must be from the user"
        if "assistant" not in turns:
            return f"{field}: no assistant message to learn from"
        if any(a == b for a, b in zip(turns, turns[1:])):
            return f"{field}: user and assistant turns must alternate"
        if not any(_is_nonempty_str(m["content"]) for m in messages if m["role"] == "assistant"):
            return f"{field}: every assistant message is empty"
    return None


def validate_sft_row(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"row: expected a JSON object, got {type(row).__name__}"
    for key in ("id", "department", "subdepartment", "source"):
        if err := _optional_str(row, key):
            return err
    return validate_messages(row.get("messages"))


def validate_dpo_row(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"row: expected a JSON object, got {type(row).__name__}"
    for key in ("id", "department", "subdepartment", "source"):
        if err := _optional_str(row, key):
            return err
    if err := validate_messages(row.get("prompt"), "prompt", need_assistant=False):
        return err
    if row["prompt"][-1]["role"] != "user":
        return "prompt: the last message must be from the user"
    for key in ("chosen", "rejected"):
        if err := validate_messages(row.get(key), key, need_assistant=False):
            return err
        if any(m["role"] != "assistant" for m in row[key]):
            return f"{key}: must hold assistant messages only"
    if row["chosen"] == row["rejected"]:
        return "chosen and rejected are identical"
    return None


def validate_seed_row(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"row: expected a JSON object, got {type(row).__name__}"
    if not _is_nonempty_str(row.get("text")):
        return "text: missing or empty"
    for key in ("id", "language", "source"):
        if err := _optional_str(row, key):
            return err
    return None


def normalize_mcq(row: Any) -> dict:
    """A benchmark row (MedQA-style, read by :func:`finemed_ray.mcq.parse_item`: options as a ``{letter: text}``
    dict or ``[{key, text}]``, 2..10 letters from A, id from ``realidx``/``id``) -> a ``MCQ_SCHEMA`` row.
    Raises ``ValueError`` naming the field when the row does not fit."""
    if not isinstance(row, dict):
        raise ValueError(f"row: expected a JSON object, got {type(row).__name__}")
    item = parse_item(row)
    return {
        "id": item.id,
        "question": item.question,
        "options": [{"key": k, "text": v} for k, v in item.options.items()],
        "answer_idx": item.answer,
        "answer": row.get("answer") if isinstance(row.get("answer"), str) else None,
        "subject": row.get("subject") if isinstance(row.get("subject"), str) else None,
    }


def validate_mcq_row(row: Any) -> str | None:
    try:
        normalize_mcq(row)
    except ValueError as e:
        return str(e)
    return None


VALIDATORS: dict[str, Callable[[Any], str | None]] = {
    "seed": validate_seed_row,
    "sft": validate_sft_row,
    "dpo": validate_dpo_row,
    "mcq": validate_mcq_row,
}
SCHEMAS: dict[str, pa.Schema] = {"seed": SEED_SCHEMA, "sft": SFT_SCHEMA, "dpo": DPO_SCHEMA, "mcq": MCQ_SCHEMA}


def parse_jsonl_line(line: str) -> tuple[Any, str | None]:
    """(parsed, None) or (None, reason) for one JSONL line."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"


def split_valid(rows: list[Any], kind: str, dataset: str = "") -> tuple[list[dict], list[dict]]:
    """Validate ``rows`` against ``kind``; returns (good rows, quarantine rows with reason and raw)."""
    check = VALIDATORS[kind]
    good, bad = [], []
    for row in rows:
        reason = check(row)
        if reason is None:
            good.append(row)
        else:
            bad.append({"dataset": dataset, "reason": reason, "raw": to_raw(row)})
    return good, bad


def to_raw(row: Any) -> str:
    if isinstance(row, str):
        return row
    try:
        return json.dumps(row, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(row)


def to_table(rows: list[dict], kind: str) -> pa.Table:
    """Rows that passed validation -> an Arrow table with the canonical schema (missing optional keys = null)."""
    schema = SCHEMAS[kind]
    if kind == "mcq":
        rows = [normalize_mcq(r) for r in rows]
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)

"""Typed configs: a YAML file plus dotted ``key=value`` overrides, validated into pydantic models.

Every model forbids unknown keys, so a typo fails loudly with the dotted key in the message instead of being
ignored. Every field carries a ``description``; ``tests/test_config.py`` checks that none is missing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from finemed_ray.errors import ConfigError

T = TypeVar("T", bound="StrictModel")


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value). The value is parsed as YAML so ``3``, ``1e-5``, ``true``,
    ``null`` and ``[1, 2]`` get their natural types; pydantic then checks them against the schema.

    A segment that is a non-negative integer (``stages.3.overrides.train.epochs=8``, ``benchmarks.0.path=s3://x``)
    indexes into an existing list when :func:`apply_overrides` walks the path; segments stay strings here."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.learning_rate=1e-5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the literal string and let the schema judge it
    return key.split("."), value


def _is_index(part: str) -> bool:
    return part.isascii() and part.isdigit()


def _step(node: Any, part: str, item: str, path: list[str], depth: int) -> tuple[Any, Any]:
    """Resolve ``part`` in ``node``: (container, key) such that ``container[key]`` is the addressed slot.

    Lists take only an in-range integer index; an integer segment never creates anything (no list is made from
    nothing, nothing is appended); a named segment in a mapping may be new (it is created as a section)."""
    dotted = ".".join(path[: depth + 1])
    parent = ".".join(path[:depth]) or "<root>"
    if isinstance(node, list):
        valid = f"indices 0..{len(node) - 1}" if node else "it is empty"
        if not _is_index(part):
            raise ConfigError(f"override {item!r}: {parent!r} is a list; address an element by its index "
                              f"({valid}), not by {part!r}")
        index = int(part)
        if index >= len(node):
            raise ConfigError(f"override {item!r}: index {index} in {dotted!r} is out of range ({parent!r} has "
                              f"{len(node)} element{'' if len(node) == 1 else 's'}: {valid})")
        return node, index
    if isinstance(node, dict):
        if _is_index(part):
            # An integer segment addresses an existing entry only (a mapping keyed "0" or 0); it creates nothing.
            for key in (part, int(part)):
                if key in node:
                    return node, key
            raise ConfigError(
                f"override {item!r}: {parent!r} is a section, not a list; index {part} does not address anything "
                f"(integer segments only index existing lists)")
        return node, part
    raise ConfigError(f"override {item!r}: {parent!r} is a value, not a section or list")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with every ``key=value`` override applied, in order.

    Named segments walk (and, if missing, create) sections; integer segments index existing lists
    (``stages.1.overrides.train.epochs=8``). Errors name the override and the dotted key: an index out of range,
    a list addressed by name, a value addressed as a section, an index into a missing key."""
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = out
        for depth, part in enumerate(path[:-1]):
            container, key = _step(node, part, item, path, depth)
            child = container[key] if isinstance(container, list) else container.get(key)
            if child is None:
                if _is_index(path[depth + 1]):
                    dotted = ".".join(path[: depth + 1])
                    raise ConfigError(
                        f"override {item!r}: {dotted!r} is not set, so index {path[depth + 1]} addresses nothing "
                        f"(integer segments only index existing lists; set the whole list instead)")
                child = container[key] = {}
            elif not isinstance(child, (dict, list)):
                dotted = ".".join(path[: depth + 1])
                raise ConfigError(f"override {item!r}: {dotted!r} is a value, not a section or list")
            node = child
        container, key = _step(node, path[-1], item, path, len(path) - 1)
        container[key] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{got_txt}")
    return "\n".join(lines)


def validate(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (optional), apply ``overrides`` and validate into ``cls``; errors name the key."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return validate(cls, data, source=str(path) if path else "overrides")


def undocumented_fields(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of fields without a description (walks nested config models)."""
    missing = []
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        if not field.description:
            missing.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            missing.extend(undocumented_fields(ann, dotted + "."))
    return missing

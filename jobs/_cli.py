"""Shared entrypoint plumbing: ``--config FILE key=value ...`` -> typed config; FinemedError -> exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, TypeVar

from finemed_ray.config import load_config
from finemed_ray.errors import FinemedError

T = TypeVar("T")


def parse(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    ns = parser.parse_args(argv)
    return load_config(cls, ns.config, ns.overrides)


def main(body: Callable[[list[str] | None], dict], argv: list[str] | None = None) -> int:
    """Run a stage; print its summary as JSON. User errors print one clear message and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = body(argv)
    except FinemedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0

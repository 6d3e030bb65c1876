"""Shared pytest fixtures."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from finemed_ray.storage import EmbeddedS3


@pytest.fixture(scope="session")
def s3() -> Iterator[EmbeddedS3]:
    """A real S3 endpoint (moto server) with bucket ``finemed-test``; its env is applied for the whole session."""
    from finemed_ray.storage import EmbeddedS3, clear_fs_cache

    server = EmbeddedS3(buckets=("finemed-test",)).start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        # A developer's real AWS profile/token must not leak into requests to the test server.
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        clear_fs_cache()
        try:
            yield server
        finally:
            server.stop()
            clear_fs_cache()


@pytest.fixture
def s3_prefix(s3: EmbeddedS3, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh ``s3://finemed-test/<test-name>-<uuid8>`` prefix for one test."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:60]
    yield f"s3://finemed-test/{name}-{uuid.uuid4().hex[:8]}"

"""Helpers for the fast unit tests: fresh in-memory buckets, no servers."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def mem_bucket() -> str:
    """A fresh ``memory://`` bucket name (memory stores are shared by name within the process)."""
    return f"unit-{uuid.uuid4().hex[:12]}"

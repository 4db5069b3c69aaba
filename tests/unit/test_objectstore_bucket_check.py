"""The bucket check of writes: one listing under the written name, none after any listing answered.

A listing of the bucket's root returns a page of up to 1000 keys, which SeaweedFS spends real CPU
on; every write started before the first answer made one (docs/benchmarks.md, uploads, fourth round).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dicom_cloud.backends import objectstore
from dicom_cloud.backends.objectstore import ObjectStoreBackend
from dicom_cloud.store import Features


class _EmptyListing:
    async def __anext__(self) -> list[dict[str, Any]]:
        raise StopAsyncIteration


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    seen: list[tuple[str, str | None]] = []

    def fake_list(store: Any, prefix: str | None = None, **kwargs: Any) -> _EmptyListing:
        seen.append(("list", prefix))
        return _EmptyListing()

    async def fake_put(store: Any, key: str, data: Any, **kwargs: Any) -> dict[str, Any]:
        seen.append(("put", key))
        return {"e_tag": '"0"', "version": None}

    monkeypatch.setattr(objectstore.obstore, "list", fake_list)
    monkeypatch.setattr(objectstore.obstore, "put_async", fake_put)
    return seen


def _backend() -> ObjectStoreBackend:
    return ObjectStoreBackend(object(), "s3", "bkt", Features())  # type: ignore[arg-type]


def test_first_write_lists_under_its_own_name_then_never_again(calls: list[tuple[str, str | None]]) -> None:
    store = _backend()

    async def run() -> None:
        await store.put("study/a.dcm", b"x")
        await store.put("study/b.dcm", b"y")

    asyncio.run(run())
    assert calls == [("list", "study/a.dcm"), ("put", "study/a.dcm"), ("put", "study/b.dcm")]


def test_a_listing_that_answered_stands_for_the_bucket_check(calls: list[tuple[str, str | None]]) -> None:
    store = _backend()

    async def run() -> None:
        async for _ in store.list("study/"):
            pass
        await asyncio.gather(*(store.put(f"study/{n}.dcm", b"x") for n in range(32)))

    asyncio.run(run())
    assert [c for c in calls if c[0] == "list"] == [("list", "study")]
    assert len([c for c in calls if c[0] == "put"]) == 32

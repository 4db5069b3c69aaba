"""The service's one memory budget over request bodies: waits, then 503 with Retry-After."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dicom_cloud.service.app import create_app
from dicom_cloud.service.http_errors import ServiceBusyError
from dicom_cloud.service.memory import RequestMemory
from dicom_cloud.service.settings import load_settings
from dicom_cloud.service.stow import INGEST_COPIES, memory_share


def test_a_request_waits_for_memory_then_gets_it() -> None:
    async def main() -> list[str]:
        memory = RequestMemory(100, wait_seconds=5)
        order: list[str] = []

        async def first() -> None:
            async with memory.reserve(80):
                order.append("first holds")
                await asyncio.sleep(0.05)
            order.append("first done")

        async def second() -> None:
            await asyncio.sleep(0.01)
            async with memory.reserve(80):
                order.append("second holds")
                assert memory.used == 80

        await asyncio.gather(first(), second())
        assert memory.used == 0
        return order

    assert asyncio.run(main()) == ["first holds", "first done", "second holds"]


def test_a_request_that_waits_too_long_is_told_to_retry() -> None:
    async def main() -> None:
        memory = RequestMemory(100, wait_seconds=0.05)
        async with memory.reserve(100):
            with pytest.raises(ServiceBusyError) as caught:
                async with memory.reserve(1):
                    pass
            assert caught.value.http_status == 503 and caught.value.retry_after == 1
        assert memory.used == 0  # the refused request took nothing
        async with memory.reserve(100):
            pass

    asyncio.run(main())


def test_stow_share_is_one_held_part_and_its_copies() -> None:
    assert memory_share(16, None) == INGEST_COPIES * 16
    assert memory_share(16, "4") == INGEST_COPIES * 4
    assert memory_share(16, "junk") == INGEST_COPIES * 16


def test_busy_service_answers_503_with_retry_after(tmp_path: Path) -> None:
    tokens: list[str] = []
    settings = load_settings({"data_dir": tmp_path, "request_memory_wait_seconds": 0.05}, environ={})
    with TestClient(create_app(settings, announce_token=tokens.append)) as client:
        memory: RequestMemory = client.app.state.request_memory  # type: ignore[attr-defined]
        memory._budget._used = memory.limit  # every byte taken by requests in flight
        answer = client.post(
            "/studies",
            content=b"--B\r\n\r\nx\r\n--B--\r\n",
            headers={
                "Authorization": f"Bearer {tokens[0]}",
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=B',
            },
        )
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"] == "ServiceBusyError"
        memory._budget._used = 0

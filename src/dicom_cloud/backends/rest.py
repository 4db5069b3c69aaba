"""Plain HTTP for the protocol operations our client libraries do not offer (resumable uploads).

One ``requests.Session`` per caller, each call run in a worker thread (requests blocks), with
retries of what is transient (connection failures, timeouts, 408/429/5xx) under the request layer
of the retry policy (retry.py: the same waits as obstore's and GCS's, a server's Retry-After
honoured), and a fresh request built for every attempt (signatures carry a timestamp). Nothing
here logs a URL or a header: they may carry signatures or session capabilities.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from ..errors import (
    NetworkError,
)
from ..retry import TRANSIENT_STATUS, RequestRetries, parse_retry_after, status_exhausted
from ..store import ObjectInfo
from .tls import ca_bundle, untrusted_certificate

#: What OpenSSL says of a certificate it refused, and why (requests keeps no structured form).
_CERTIFICATE_REFUSED = re.compile(r"CERTIFICATE_VERIFY_FAILED\] certificate verify failed: ([^(']+)")
#: Requests in flight at once per client: the engine's default parallelism.
_THREADS = 32


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | memoryview = b""


class RestClient:
    """Sends requests built by ``build`` (called again on each retry), from worker threads."""

    def __init__(
        self, *, what: str, max_retries: int = 4, timeout: tuple[float, float] = (10.0, 300.0)
    ) -> None:
        self._what = what  # e.g. "S3 at http://127.0.0.1:8333": for messages, never a signed URL
        #: The request layer of the one retry policy (retry.py), Retry-After honoured.
        self._policy = RequestRetries(retries=max(0, max_retries), timeout=timeout[1])
        self._timeout = timeout
        self._session = requests.Session()
        #: The CAs the other HTTPS clients trust (tls.py); per request, where it wins over
        #: requests' environment variables (a session's ``verify`` does not).
        self._verify = ca_bundle()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=_THREADS)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Threads of its own: asyncio's default pool has only a few on small machines, and these
        # requests (whole small objects, on Azure) run as many at once as the engine's workers.
        self._threads = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="dicom-cloud-rest")

    async def send(
        self, build: Callable[[], Request], *, ok: Callable[[int], bool] = lambda s: s < 300
    ) -> requests.Response:
        """The first response whose status is ``ok`` or not transient; NetworkError after retries."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, self._send_blocking, build, ok)

    def _send_blocking(self, build: Callable[[], Request], ok: Callable[[int], bool]) -> requests.Response:
        policy = self._policy
        started = time.monotonic()
        retry = 0
        while True:
            request = build()
            retry_after: float | None = None
            try:
                response = self._session.request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    data=bytes(request.body) if isinstance(request.body, memoryview) else request.body,
                    timeout=self._timeout,
                    allow_redirects=False,
                    verify=self._verify,
                )
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                refused = (
                    _CERTIFICATE_REFUSED.search(str(exc))
                    if isinstance(exc, requests.exceptions.SSLError)
                    else None
                )
                if refused:  # asking again cannot help
                    raise untrusted_certificate(self._what, refused.group(1).strip()) from None
                if not policy.allows(retry, started):
                    raise NetworkError(f"cannot reach {self._what}: {type(exc).__name__}") from None
            else:
                status = response.status_code
                if ok(status) or status not in TRANSIENT_STATUS:
                    return response
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if not policy.allows(retry, started):
                    message = f"{self._what} answered HTTP {status} {_brief(response)}"
                    raise status_exhausted(message, status, retry_after)
            retry += 1
            time.sleep(policy.delay(retry, retry_after=retry_after))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._session.close()


def _brief(response: requests.Response) -> str:
    """The start of an error body, whitespace collapsed (providers' bodies hold no secrets)."""
    return " ".join(response.text[:300].split())


def info_from_headers(key: str, headers: Mapping[str, str], meta_prefix: str) -> ObjectInfo:
    """An object's info from a HEAD answer: size, ETag, content type, and the user metadata sent
    as headers named ``meta_prefix`` + name (``x-amz-meta-``, ``x-ms-meta-``)."""
    metadata = {
        name[len(meta_prefix) :]: value
        for name, value in headers.items()
        if name.lower().startswith(meta_prefix)
    }
    return ObjectInfo(
        key=key,
        size=int(headers.get("Content-Length", "0")),
        etag=headers.get("ETag", "").strip('"') or None,
        metadata=metadata,
        content_type=headers.get("Content-Type"),
    )

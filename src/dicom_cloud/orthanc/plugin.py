"""The glue between Orthanc's Python API (module ``orthanc``) and the storage area.

:func:`initialize` runs once, while Orthanc loads the entry script: it reads Orthanc's configuration,
opens the store, registers the storage area and the REST routes. A configuration error raises out of
the script, so Orthanc refuses to start, as with the C++ plugins.

Routes (all answer JSON):

- ``POST /move-storage`` (hybrid mode only): upstream's body; synchronous answers
  ``{"Resources": [...], "AttachmentsMoved": n, "AttachmentsSkipped": n}``, asynchronous answers
  ``{"ID": id, "Path": "/dicom-cloud/move-storage/jobs/<id>"}``.
- ``GET /dicom-cloud/move-storage/jobs`` and ``GET /dicom-cloud/move-storage/jobs/{id}``.
- ``GET /dicom-cloud/pending-removals``, ``POST /dicom-cloud/pending-removals/retry``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import orthanc

from ..errors import DicomCloudError, NotFoundError
from ..store import Store
from .config import PluginConfig, parse_configuration
from .move import JOBS_ROUTE, MoveJob, MoveWorker, parse_move_request, run_move
from .removals import PendingRemovals
from .storage import LoopThread, StorageArea, local_store

log = logging.getLogger("dicom_cloud.orthanc")


class _OrthancLogHandler(logging.Handler):
    """Our log records into Orthanc's log."""

    def emit(self, record: logging.LogRecord) -> None:
        message = f"dicom-cloud: {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            orthanc.LogError(message)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(message)
        else:
            orthanc.LogInfo(message)


class _RestApi:
    """Orthanc's REST API from inside the process (``OrthancApi`` for move.py)."""

    def get_json(self, uri: str) -> Any:
        try:
            answer = orthanc.RestApiGet(uri)
        except orthanc.OrthancException as exc:
            if "Unknown resource" in str(exc) or "InexistentItem" in str(exc) or "404" in str(exc):
                raise NotFoundError(f"Orthanc has no {uri}") from exc
            raise
        return json.loads(answer)


# The state the callbacks need: set once by initialize().
_area: StorageArea | None = None
_worker: MoveWorker | None = None
_api = _RestApi()


def initialize() -> None:
    """Read the configuration and register everything; raises on a configuration error."""
    global _area, _worker
    root = logging.getLogger("dicom_cloud")
    root.addHandler(_OrthancLogHandler())
    root.setLevel(logging.INFO)
    config = parse_configuration(json.loads(orthanc.GetConfiguration()))
    if config is None:
        log.warning(
            "no AwsS3Storage, AzureBlobStorage, GoogleCloudStorage or DicomCloudLocalStorage "
            "section: the plugin stays inactive and Orthanc uses its own storage"
        )
        return
    _area = open_storage_area(config)
    log.warning("storage area: %s", config.describe())
    for setting in config.not_applied:
        log.warning("setting not applied by this plugin: %s", setting)
    if config.provider == "s3":
        log.info("uploads carry x-amz-checksum-sha256 (checked by the server) instead of Content-MD5")
    orthanc.RegisterStorageArea(_create, _read, _remove)
    orthanc.RegisterRestCallback("/dicom-cloud/pending-removals", _pending_removals)
    orthanc.RegisterRestCallback("/dicom-cloud/pending-removals/retry", _retry_removals)
    if _area.file_system is not None:
        _worker = MoveWorker(_api, _area)
        orthanc.RegisterRestCallback("/move-storage", _move_storage)
        orthanc.RegisterRestCallback(JOBS_ROUTE, _jobs)
        orthanc.RegisterRestCallback(JOBS_ROUTE + "/(.+)", _job)
    if len(_area.removals):
        log.warning("%d object removals are pending from earlier failures; retrying", len(_area.removals))
    _start_removal_timer(_area, config.removal_retry_interval)


def open_storage_area(config: PluginConfig) -> StorageArea:
    """Open the stores named by ``config`` (credentials go to this process's environment first)."""
    from ..backends import open_store

    os.environ.update(config.environment)
    loop = LoopThread()
    if config.provider == "file":
        from pathlib import Path

        store = local_store(Path(config.bucket))
    else:
        store = open_store(f"{config.provider}://{config.bucket}", config.store_config)
        if config.create_container:
            _create_container(loop, store, config.bucket)
    file_system = local_store(config.storage_directory) if config.hybrid_mode.value != "Disabled" else None
    return StorageArea(
        config, store, PendingRemovals(config.pending_removals_file), file_system=file_system, loop=loop
    )


def _create_container(loop: LoopThread, store: Store, container: str) -> None:
    """CreateContainerIfNotExists: the container is created with the account key, when there is one."""
    from ..backends.azure_blocks import AzureResumableUploads

    uploads = store.resumable_uploads()
    if not isinstance(uploads, AzureResumableUploads):
        log.warning(
            "CreateContainerIfNotExists: cannot create azure://%s without the account key in the "
            "connection string (a SAS token cannot create containers); it must exist",
            container,
        )
        return
    if loop.run(uploads.create_container()):
        log.warning("created the Azure container %s (CreateContainerIfNotExists)", container)


def _start_removal_timer(area: StorageArea, interval: float) -> None:
    def tick() -> None:
        while not stop.wait(interval):
            if len(area.removals):
                try:
                    removed, left = area.retry_removals()
                except Exception:
                    log.exception("retrying pending removals failed")
                    continue
                if removed or left:
                    log.warning("pending removals: %d removed, %d still pending", removed, left)

    stop = threading.Event()
    threading.Thread(target=tick, name="dicom-cloud-removals", daemon=True).start()


# -- storage callbacks (Orthanc's threads) ---------------------------------------------------


def _require_area() -> StorageArea:
    assert _area is not None, "storage callbacks are registered only once the area is open"
    return _area


def _create(uuid: str, content_type: Any, data: bytes) -> None:
    try:
        _require_area().create(uuid, int(content_type), data)
    except DicomCloudError as exc:
        log.error("writing attachment %s failed: %s", uuid, exc)
        raise


def _read(uuid: str, content_type: Any) -> bytes:
    try:
        return _require_area().read(uuid, int(content_type))
    except DicomCloudError as exc:
        log.error("reading attachment %s failed: %s", uuid, exc)
        raise


def _remove(uuid: str, content_type: Any) -> None:
    _require_area().remove(uuid, int(content_type))


# -- REST routes ------------------------------------------------------------------------------


def _answer(output: Any, value: Any) -> None:
    output.AnswerBuffer(json.dumps(value, indent=2), "application/json")


def _fail(output: Any, exc: DicomCloudError) -> None:
    body = json.dumps({"HttpStatus": exc.http_status, "Message": exc.message, "Hint": exc.hint})
    # orthanc-python 4.0 takes the body as text plus its size in bytes.
    output.SendHttpStatus(exc.http_status, body, len(body.encode()))


def _move_storage(output: Any, uri: str, **request: Any) -> None:
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    assert _worker is not None
    try:
        move = parse_move_request(request.get("body", b""))
        if move.asynchronous:
            job = _worker.submit(move)
            _answer(output, {"ID": job.id, "Path": f"{JOBS_ROUTE}/{job.id}"})
            return
        job = MoveJob(move)
        run_move(job, _api, _require_area())
    except DicomCloudError as exc:
        _fail(output, exc)
        return
    if job.errors and not (job.moved or job.skipped):
        # Nothing could be moved: say why with the error of the first failure.
        unknown = any("unknown Orthanc resource" in e for e in job.errors)
        _fail(output, (NotFoundError if unknown else DicomCloudError)("; ".join(job.errors[:5])))
        return
    status = job.status()["Content"]
    _answer(output, status)


def _jobs(output: Any, uri: str, **request: Any) -> None:
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    assert _worker is not None
    _answer(output, [job.id for job in _worker.jobs()])


def _job(output: Any, uri: str, **request: Any) -> None:
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    assert _worker is not None
    try:
        _answer(output, _worker.get(request["groups"][0]).status())
    except DicomCloudError as exc:
        _fail(output, exc)


def _pending_removals(output: Any, uri: str, **request: Any) -> None:
    if request["method"] != "GET":
        output.SendMethodNotAllowed("GET")
        return
    entries = _require_area().removals.entries()
    _answer(output, [vars(e) for e in entries])


def _retry_removals(output: Any, uri: str, **request: Any) -> None:
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    removed, left = _require_area().retry_removals()
    _answer(output, {"Removed": removed, "Pending": left})

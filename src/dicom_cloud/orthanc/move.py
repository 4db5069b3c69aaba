"""``POST /move-storage``: move the attachments of Orthanc resources between the two sides of hybrid mode.

The request is upstream's (``{"Resources": [...], "TargetStorage": "file-system" | "object-storage",
"Asynchronous": bool, "Priority": int}``). Resources may be patients, studies, series or instances;
each is resolved through Orthanc's REST API to its instances, and each instance to its attachments
(uuid and content type). An attachment already on the target side is skipped.

Python plugins cannot create Orthanc jobs, so an asynchronous move is a :class:`MoveJob` run by one
worker thread of ours (highest ``Priority`` first, then first come), reported at
``GET /dicom-cloud/move-storage/jobs/{id}`` instead of ``/jobs/{id}``.
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import threading
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from ..errors import DicomCloudError, NotFoundError, UsageError
from .storage import FILE_SYSTEM, OBJECT_STORAGE, StorageArea, StorageName

log = logging.getLogger(__name__)

JOBS_ROUTE = "/dicom-cloud/move-storage/jobs"
_LEVELS = ("instances", "series", "studies", "patients")


class OrthancApi(Protocol):
    """The part of Orthanc's REST API a move needs (``orthanc.RestApiGet`` in the plugin)."""

    def get_json(self, uri: str) -> Any:
        """The JSON answer of a GET; NotFoundError when Orthanc answers 404."""


@dataclass(frozen=True)
class MoveRequest:
    resources: tuple[str, ...]
    target: StorageName
    asynchronous: bool = False
    priority: int = 0


def parse_move_request(body: bytes) -> MoveRequest:
    """Validate the body of ``POST /move-storage`` (UsageError, answered as 400, when it is wrong)."""
    try:
        request = json.loads(body or b"null")
    except ValueError:
        raise UsageError("the body of /move-storage is not JSON") from None
    if not isinstance(request, dict):
        raise UsageError("the body of /move-storage must be a JSON object")
    resources = request.get("Resources")
    if not isinstance(resources, list) or not all(isinstance(r, str) and r for r in resources):
        raise UsageError('"Resources" must be a list of Orthanc identifiers')
    target = request.get("TargetStorage")
    if target not in (FILE_SYSTEM, OBJECT_STORAGE):
        raise UsageError(f'"TargetStorage" must be "{FILE_SYSTEM}" or "{OBJECT_STORAGE}", not {target!r}')
    synchronous = request.get("Synchronous", True)
    asynchronous = request.get("Asynchronous", not synchronous)
    priority = request.get("Priority", 0)
    if not isinstance(asynchronous, bool) or not isinstance(synchronous, bool):
        raise UsageError('"Synchronous" and "Asynchronous" must be true or false')
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise UsageError('"Priority" must be an integer')
    return MoveRequest(tuple(resources), target, asynchronous, priority)


def instances_of(api: OrthancApi, resource: str) -> list[str]:
    """The instance ids of a resource of any level; NotFoundError for an unknown id."""
    for level in _LEVELS:
        try:
            found = api.get_json(f"/{level}/{resource}")
        except NotFoundError:
            continue
        if level == "instances":
            return [str(found["ID"])]
        return [str(i["ID"]) for i in api.get_json(f"/{level}/{resource}/instances")]
    raise NotFoundError(f"unknown Orthanc resource {resource!r}")


def attachments_of(api: OrthancApi, instance: str) -> list[tuple[str, int]]:
    """(uuid, content type) of each attachment of an instance."""
    names = api.get_json(f"/instances/{instance}/attachments?full")
    out = []
    for name in sorted(names):
        info = api.get_json(f"/instances/{instance}/attachments/{name}/info")
        out.append((str(info["Uuid"]), int(info["ContentType"])))
    return out


@dataclass
class MoveJob:
    """One move; its ``status()`` is what the status route answers."""

    request: MoveRequest
    id: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    state: str = "Pending"
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    instances: int = 0
    done: int = 0
    moved: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    finished: threading.Event = field(default_factory=threading.Event)

    def status(self) -> dict[str, Any]:
        progress = (
            100
            if self.state in ("Success", "Failure")
            else (int(100 * self.done / self.instances) if self.instances else 0)
        )
        return {
            "ID": self.id,
            "Type": "MoveStorage",
            "State": self.state,
            "Progress": progress,
            "CreationTime": self.created,
            "Priority": self.request.priority,
            "Content": {
                "Resources": list(self.request.resources),
                "TargetStorage": self.request.target,
                "Instances": self.instances,
                "InstancesDone": self.done,
                "AttachmentsMoved": self.moved,
                "AttachmentsSkipped": self.skipped,
                "Errors": self.errors[:100],
            },
        }


def run_move(job: MoveJob, api: OrthancApi, area: StorageArea) -> None:
    """Do the job now, in this thread; errors end up in the job (state Failure), not raised."""
    job.state = "Running"
    try:
        instances = [i for r in job.request.resources for i in instances_of(api, r)]
        job.instances = len(instances)
        for instance in instances:
            for attachment_uuid, content_type in attachments_of(api, instance):
                try:
                    if area.move(attachment_uuid, content_type, job.request.target):
                        job.moved += 1
                    else:
                        job.skipped += 1
                except DicomCloudError as exc:
                    job.errors.append(f"instance {instance}, attachment {attachment_uuid}: {exc}")
            job.done += 1
    except DicomCloudError as exc:
        job.errors.append(str(exc))
    job.state = "Failure" if job.errors else "Success"
    job.finished.set()


class MoveWorker:
    """The thread that runs asynchronous moves, highest priority first, and remembers their status."""

    #: Finished jobs kept for the status route.
    KEEP = 1000

    def __init__(self, api: OrthancApi, area: StorageArea, run: Callable[..., None] = run_move) -> None:
        self._api = api
        self._area = area
        self._run = run
        self._queue: queue.PriorityQueue[tuple[int, int, MoveJob | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._jobs: dict[str, MoveJob] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="dicom-cloud-move-storage", daemon=True)
        self._thread.start()

    def submit(self, request: MoveRequest) -> MoveJob:
        job = MoveJob(request)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.KEEP:
                oldest = next(iter(self._jobs))
                if not self._jobs[oldest].finished.is_set():
                    break
                del self._jobs[oldest]
        # Higher Priority first (upstream negates it by mistake; not copied), then submission order.
        self._queue.put((-request.priority, next(self._order), job))
        return job

    def get(self, job_id: str) -> MoveJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"unknown move-storage job {job_id!r}")
        return job

    def jobs(self) -> list[MoveJob]:
        with self._lock:
            return list(self._jobs.values())

    def stop(self) -> None:
        self._queue.put((-(2**62), -1, None))
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job, self._api, self._area)
            except Exception as exc:  # a bug must not kill the worker and every later job
                log.exception("move-storage job %s failed", job.id)
                job.errors.append(f"internal error: {exc!r}")
                job.state = "Failure"
                job.finished.set()

"""Study labels: tags and a description users attach to a study (searchable with QIDO ``label=``)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ...archive import StudyLabels
from ..deps import ArchiveDep, Reader, Writer
from ..http_errors import MalformedRequestError
from .dicomweb import Uid

router = APIRouter(tags=["labels"])


class LabelsIn(BaseModel):
    """Fields left out are kept; ``description: ""`` clears the description."""

    tags: list[str] | None = Field(None, max_length=100, description="replaces the study's tags")
    description: str | None = Field(None, max_length=10_000)


class LabelsOut(BaseModel):
    study_instance_uid: str
    tags: list[str]
    description: str | None


def _out(labels: StudyLabels) -> LabelsOut:
    return LabelsOut(
        study_instance_uid=labels.study_instance_uid, tags=list(labels.tags), description=labels.description
    )


@router.get("/studies/{study}/labels", summary="Get a study's labels")
async def get_labels(study: Uid, principal: Reader, archive: ArchiveDep) -> LabelsOut:
    principal.require_study(study)
    return _out(await archive.get_labels(principal.tenant, study))


@router.put("/studies/{study}/labels", summary="Set a study's labels")
async def put_labels(study: Uid, labels: LabelsIn, principal: Writer, archive: ArchiveDep) -> LabelsOut:
    for tag in labels.tags or ():
        if not tag or len(tag) > 64:
            raise MalformedRequestError("each tag must be 1 to 64 characters")
    return _out(
        await archive.set_labels(principal.tenant, study, tags=labels.tags, description=labels.description)
    )

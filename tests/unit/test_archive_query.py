"""QIDO-RS searches: every matching type, includefield, limit/offset, tenants, bad parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from archive_helpers import (
    QIDO_EXTRA_TAGS,
    STUDY_MATCHING_CASES,
    A,
    B,
    C,
    Run,
    X,
    load_qido_corpus,
    make_instance,
    opened,
    random_queries,
)
from dicom_cloud.archive import Archive, ArchiveSettings
from dicom_cloud.errors import NotFoundError, UsageError


@pytest.fixture(scope="module")
def archive() -> Iterator[tuple[Archive, Run]]:
    settings = ArchiveSettings("memory://qido-tests", "sqlite://", extra_query_tags=QIDO_EXTRA_TAGS)
    with opened(settings) as (a, run):
        load_qido_corpus(a, run)
        yield a, run


def studies(archive: tuple[Archive, Run], tenant: str = "acme", **params: Any) -> list[str]:
    a, run = archive
    return [r["0020000D"]["Value"][0] for r in run(a.search_studies(tenant, params))]


@pytest.mark.parametrize(("params", "expected"), STUDY_MATCHING_CASES)
def test_study_matching(archive: tuple[Archive, Run], params: dict[str, Any], expected: list[str]) -> None:
    assert studies(archive, **params) == expected


def test_study_results_carry_the_required_attributes(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    [study] = run(a.search_studies("acme", {"PatientID": "P1"}, base_url="https://h/dicomweb"))
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert study["00080061"] == {"vr": "CS", "Value": ["CT", "SR"]}  # ModalitiesInStudy
    assert study["00201206"] == {"vr": "IS", "Value": [2]}  # NumberOfStudyRelatedSeries
    assert study["00201208"] == {"vr": "IS", "Value": [3]}  # NumberOfStudyRelatedInstances
    assert study["00080020"] == {"vr": "DA", "Value": ["20200115"]}
    assert study["00080030"] == {"vr": "TM", "Value": ["093000"]}
    assert study["00080050"] == {"vr": "SH", "Value": ["ACC1"]}
    assert study["00081190"] == {"vr": "UR", "Value": [f"https://h/dicomweb/studies/{A}"]}
    assert study["00080005"] == {"vr": "CS", "Value": ["ISO_IR 192"]}
    assert study["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
    assert "00081030" not in study  # StudyDescription only with includefield
    [b] = run(a.search_studies("acme", {"PatientID": "P2"}))
    assert b["00100030"] == {"vr": "DA"}  # absent birth date: present, empty


def test_a_page_of_studies_carries_each_study_s_own_counts(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    page = run(a.search_studies("acme", {}))
    assert len(page) > 1
    for study in page:  # the page's counts, from one query, against each study searched alone
        uid = study["0020000D"]["Value"][0]
        [alone] = run(a.search_studies("acme", {"StudyInstanceUID": uid}))
        for tag in ("00080061", "00201206", "00201208"):
            assert study[tag] == alone[tag]
    [p1] = [s for s in page if s["0020000D"]["Value"] == [A]]
    assert (p1["00201206"], p1["00201208"]) == ({"vr": "IS", "Value": [2]}, {"vr": "IS", "Value": [3]})


def test_includefield(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    [s] = run(a.search_studies("acme", {"PatientID": "P2", "includefield": "StudyDescription,00080080"}))
    assert s["00081030"]["Value"] == ["MR Brain"]
    assert s["00080080"]["Value"] == ["General Hospital"]
    [s] = run(a.search_studies("acme", {"PatientID": "P2", "includefield": ["00081030"]}))
    assert s["00081030"]["Value"] == ["MR Brain"]
    [s] = run(a.search_studies("acme", {"PatientID": "P2", "includefield": "all"}))
    assert {"00081030", "00080080", "00080090", "00200010"} <= set(s)
    # Known attributes the index does not keep are left out, not an error.
    [s] = run(a.search_studies("acme", {"PatientID": "P2", "includefield": "PatientWeight"}))
    assert "00101030" not in s


def test_limit_and_offset(archive: tuple[Archive, Run]) -> None:
    assert studies(archive, limit="2") == [A, B]
    assert studies(archive, limit="2", offset="2") == [C]
    assert studies(archive, offset="5") == []
    assert studies(archive, limit="0") == []


def test_limit_is_capped(mem_bucket: str) -> None:
    settings = ArchiveSettings(
        f"memory://{mem_bucket}", "sqlite://", default_query_limit=2, max_query_limit=3
    )
    with opened(settings) as (a, run):
        for i in range(5):
            run(a.store_instance("acme", make_instance(f"1.9.{i}", f"1.9.{i}.1", f"1.9.{i}.1.1")))
        assert len(run(a.search_studies("acme", {}))) == 2
        assert len(run(a.search_studies("acme", {"limit": "100"}))) == 3


def test_series_search(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    found = run(a.search_series("acme", {}, study_instance_uid=A))
    assert [s["0020000E"]["Value"][0] for s in found] == [f"{A}.1", f"{A}.2"]
    assert found[0]["00201209"] == {"vr": "IS", "Value": [2]}  # NumberOfSeriesRelatedInstances
    assert found[0]["0008103E"] == {"vr": "LO", "Value": ["axial"]}
    assert found[0]["0020000D"]["Value"] == [A]
    assert "00100010" not in found[0]  # within a study: no study attributes
    everything = run(a.search_series("acme", {"Modality": "CT"}))
    assert everything[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]  # all series: they come along
    assert everything[0]["00080020"]["Value"] == ["20200115"]
    assert [s["0020000E"]["Value"][0] for s in everything] == [f"{A}.1", f"{C}.1"]
    assert run(a.search_series("acme", {"SeriesNumber": "3"}))[0]["0020000D"]["Value"] == [C]
    assert run(a.search_series("acme", {"PatientName": "roe*"}))[0]["0020000D"]["Value"] == [C]
    assert run(a.search_series("acme", {}, study_instance_uid=X)) == []


def test_instance_search(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    found = run(a.search_instances("acme", {}, study_instance_uid=C, series_instance_uid=f"{C}.1"))
    assert [i["00200013"]["Value"][0] for i in found] == [1, 2, 3]
    assert found[0]["00280010"] == {"vr": "US", "Value": [8]}
    assert found[0]["00080016"]["Value"] == ["1.2.840.10008.5.1.4.1.1.2"]
    assert {"0020000D", "0020000E", "00080018"} <= set(found[0])
    assert "00080060" not in found[0] and "00100010" not in found[0]  # within a series
    [anywhere] = run(a.search_instances("acme", {"SOPInstanceUID": f"{B}.1.1"}))
    assert anywhere["00080060"]["Value"] == ["MR"] and anywhere["00080050"]["Value"] == ["ACC2"]
    assert len(run(a.search_instances("acme", {"InstanceNumber": "2"}))) == 2
    assert len(run(a.search_instances("acme", {"SOPInstanceUID": f"{A}.1.1,{C}.1.3"}))) == 2
    assert len(run(a.search_instances("acme", {"limit": "2", "offset": "6"}))) == 1
    assert len(run(a.search_instances("acme", {"InstitutionName": "General Hospital"}))) == 1
    [one] = run(
        a.search_instances("acme", {"InstanceNumber": "1"}, study_instance_uid=B, base_url="http://h")
    )
    assert one["00081190"]["Value"] == [f"http://h/studies/{B}/series/{B}.1/instances/{B}.1.1"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"StudyDate": "2020"}, "not a date"),
        ({"StudyDate": "20200101-2021"}, "not a date"),
        ({"StudyDate": "-"}, "not a date"),
        ({"StudyTime": "25xx"}, "not a time"),
        ({"StudyInstanceUID": "1.2.*"}, "wildcards"),
        ({"limit": "-1"}, "non-negative"),
        ({"offset": "x"}, "non-negative"),
        ({"limit": ["1", "2"]}, "more than once"),
        ({"SOPInstanceUID": "1.2"}, "not an attribute of the study level"),
        ({"fuzzymatching": "maybe"}, "true or false"),
        ({"includefield": "NotAThing"}, "not a DICOM keyword"),
        ({"Limit": "3"}, "lower case"),
        ({"PatientID": ["a", "b"]}, "more than once"),
    ],
)
def test_bad_parameters_are_usage_errors(
    archive: tuple[Archive, Run], params: dict[str, Any], message: str
) -> None:
    a, run = archive
    with pytest.raises(UsageError, match=message) as exc:
        run(a.search_studies("acme", params))
    assert exc.value.http_status == 400


def test_ignored_parameters_are_reported_as_warnings(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    warnings: list[str] = []
    params = {"_": "1", "NoSuchKeyword": "x", "PatientWeight": "70", "includefield": "PatientAge,PatientID"}
    assert len(run(a.search_studies("acme", params, warnings=warnings))) == 3
    assert warnings == [
        "'_' is not a DICOM keyword, an 8-hex tag or a query parameter: ignored",
        "'NoSuchKeyword' is not a DICOM keyword, an 8-hex tag or a query parameter: ignored",
        "'PatientWeight' is not an attribute this archive can search on: ignored",
        "includefield 'PatientAge' is not held by the index: left out",
    ]
    warnings.clear()
    run(a.search_studies("acme", {"PatientID": "P1"}, warnings=warnings))
    assert warnings == []


def test_bad_integer_at_series_level(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    with pytest.raises(UsageError, match="integer"):
        run(a.search_series("acme", {"SeriesNumber": "one"}))


def test_tenants_never_see_each_other(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    assert studies(archive, "other") == [X]
    assert studies(archive, "other", PatientID="P1") == [X]
    assert studies(archive, "nobody") == []
    assert run(a.search_instances("other", {}, study_instance_uid=A)) == []
    for call in (
        a.instances("other", A),
        a.metadata("other", A),
        a.frames("other", A, f"{A}.1", f"{A}.1.1", [1]),
        a.rendered("other", A, f"{A}.1", f"{A}.1.1"),
        a.get_labels("other", A),
        a.delete("other", A),
        a.create_share("other", A, timedelta(hours=1)),
    ):
        with pytest.raises(NotFoundError):
            run(call)
    assert studies(archive) == [A, B, C]  # the failed delete touched nothing


def test_labels(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    labels = run(a.get_labels("acme", A))
    assert labels.tags == ("lung", "teaching") and labels.description == "Nice nodule case"
    assert run(a.get_labels("acme", B)).tags == ()
    with pytest.raises(UsageError):
        run(a.set_labels("acme", B, tags=["a,b"]))
    with pytest.raises(UsageError):
        run(a.set_labels("acme", B, tags="single-string"))
    updated = run(a.set_labels("acme", B, tags=["  x ", "x", "y"]))
    assert updated.tags == ("x", "y")
    assert studies(archive, label="x") == [B]
    run(a.set_labels("acme", B, tags=[], description=""))
    assert run(a.get_labels("acme", B)) == type(labels)(B, (), None)
    assert studies(archive, label="x") == []


def test_extra_tags_added_later_are_reindexed_from_sidecars(mem_bucket: str) -> None:
    first = ArchiveSettings(f"memory://{mem_bucket}", "sqlite://")
    data = make_instance("5.5", "5.5.1", "5.5.1.1", InstitutionName="Clinic", BodyPartExamined="CHEST")
    with opened(first) as (a, run):
        run(a.store_instance("acme", data))
        warnings: list[str] = []
        # Not configured: ignored, with a warning (every study found).
        assert len(run(a.search_studies("acme", {"BodyPartExamined": "NONE"}, warnings=warnings))) == 1
        assert warnings == ["'BodyPartExamined' is not an attribute this archive can search on: ignored"]
        # The same store and index, now with two extra tags configured.
        later = ArchiveSettings(
            f"memory://{mem_bucket}", "sqlite://", extra_query_tags=["InstitutionName", "00180015"]
        )
        b = Archive(later, a._opener, a._opener.open(f"memory://{mem_bucket}"), a._db)
        assert run(b.search_studies("acme", {"BodyPartExamined": "CHEST"})) == []  # configured, not filled
        assert run(b.reindex_extra_tags(batch=1)) == 1
        [study] = run(
            b.search_studies("acme", {"BodyPartExamined": "CH*", "includefield": "InstitutionName"})
        )
        assert study["00080080"]["Value"] == ["Clinic"]
        assert run(b.reindex_extra_tags()) == 1  # repeatable
        assert len(run(b.search_instances("acme", {"00180015": "CHEST"}))) == 1


def test_random_queries_get_results_or_usage_errors(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    for i, params in enumerate(random_queries(seed=1, count=400)):
        search = (a.search_studies, a.search_series, a.search_instances)[i % 3]
        with contextlib.suppress(UsageError):
            run(search("acme", params))


def test_control_characters_and_non_uids_are_usage_errors(archive: tuple[Archive, Run]) -> None:
    a, run = archive
    for params in (
        {"PatientID": "a\x00b"},
        {"Patient\x00ID": "x"},
        {"label": "x\ny"},
        {"PatientName": "x" * 70000},
    ):
        with pytest.raises(UsageError):
            run(a.search_studies("acme", params))
    for uid in ("1.2\x00", "abc", "1" * 65, "", "1.2.3/../4"):
        with pytest.raises(UsageError):
            run(a.instances("acme", uid))
        with pytest.raises(UsageError):
            run(a.search_series("acme", {}, study_instance_uid=uid))
    with pytest.raises(UsageError):
        run(a.set_labels("acme", A, description="bad\x00text"))
    with pytest.raises(UsageError):
        run(a.create_token("acme", "name\x00", ["read"]))
    assert run(a.authenticate("dcat_\x00")) is None

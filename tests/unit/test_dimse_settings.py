"""The DIMSE face's configuration (peers, AE titles, limits) and the mapping of C-FIND
identifiers onto QIDO parameters: no network."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicom_cloud.dimse.config import DimseSettings, is_loopback, parse_peer, peers_from
from dicom_cloud.dimse.find import identifier_query
from dicom_cloud.errors import UsageError
from dicom_cloud.service.settings import load_settings


def test_peer_flag_forms() -> None:
    peer = parse_peer("CT1@10.0.0.5:104,tenant=radiology,ops=store+echo")
    assert (peer.ae_title, peer.host, peer.port, peer.tenant) == ("CT1", "10.0.0.5", 104, "radiology")
    assert peer.operations == {"store", "echo"}
    assert parse_peer("PACS@[::1]:11112").host == "::1"
    everything = parse_peer("WS@127.0.0.1")
    assert everything.port is None and everything.allows("get")


@pytest.mark.parametrize(
    "text",
    [
        "CT1",
        "CT1@",
        "@host",
        "THIS-TITLE-IS-TOO-LONG@h",
        "CT1@h:0",
        "CT1@h:x",
        "CT1@h,ops=delete",
        "CT1@h,who=x",
    ],
)
def test_bad_peers_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_peer(text)


def test_flags_replace_tables_of_the_same_title() -> None:
    peers = peers_from(
        ["CT1@10.0.0.6"], [{"ae_title": "CT1", "host": "10.0.0.5"}, {"ae_title": "MR", "host": "h"}]
    )
    assert {p.ae_title: p.host for p in peers} == {"CT1": "10.0.0.6", "MR": "h"}


def test_production_needs_peers_and_tls_needs_both_files() -> None:
    with pytest.raises(UsageError, match="peers"):
        DimseSettings(environment="production").check()
    with pytest.raises(UsageError, match="certificate"):
        DimseSettings(tls_cert="cert.pem").check()
    checked = DimseSettings(peers=(parse_peer("CT1@127.0.0.1"),)).check()
    assert "127.0.0.1" in checked.peers[0].addresses
    assert not checked.open_to_loopback and DimseSettings().open_to_loopback


def test_tenants_by_peer_then_called_title() -> None:
    settings = DimseSettings(called_tenants={"CARDIO": "cardiology"}, default_tenant="main")
    peer = parse_peer("CT1@h,tenant=radiology")
    assert settings.tenant_for(peer, "DICOMCLOUD") == "radiology"
    assert settings.tenant_for(None, "CARDIO") == "cardiology"
    assert settings.tenant_for(None, "DICOMCLOUD") == "main"
    assert settings.answers_to("CARDIO") and not settings.answers_to("OTHER")


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("not an address")


def test_toml_peers_in_service_settings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "service.toml"
    config.write_text(
        'dicom_port = 11112\nae_title = "ARCHIVE"\n'
        '[[dicom_peers]]\nae_title = "CT1"\nhost = "10.0.0.5"\nport = 104\n'
        'tenant = "a"\noperations = ["store"]\n'
    )
    settings = load_settings({}, environ={}, config_file=config)
    assert settings.dicom_port == 11112 and settings.ae_title == "ARCHIVE"
    assert settings.dicom_peers == (
        {"ae_title": "CT1", "host": "10.0.0.5", "port": 104, "tenant": "a", "operations": ["store"]},
    )
    from_env = load_settings({}, environ={"DICOM_CLOUD_SERVICE_DICOM_PEERS": "CT1@h;MR@h2,ops=find"})
    assert from_env.dicom_peers == ("CT1@h", "MR@h2,ops=find")


def _identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_identifier_to_qido_parameters() -> None:
    query = identifier_query(
        _identifier(
            "STUDY",
            PatientName="Doe^J*",
            StudyDate="20240101-20240131",
            StudyInstanceUID="",
            InstitutionName="",
            SOPInstanceUID="1.2",
        ),
        [],
    )
    assert query.level == "study"
    assert query.params == {"00100010": "Doe^J*", "00080020": "20240101-20240131", "includefield": "0020000D"}
    uids = identifier_query(_identifier("IMAGE", SOPInstanceUID=["1.2", "1.3"]), [])
    assert uids.level == "instance" and uids.params == {"00080018": "1.2\\1.3"}
    patients = identifier_query(_identifier("PATIENT", PatientID="P1", StudyDate="20240101"), [])
    assert patients.params == {"00100020": "P1"}
    with pytest.raises(UsageError):
        identifier_query(_identifier("FRAME"), [])

"""Which CA file the signed requests (requests) are given: the one the other HTTPS clients read."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_cloud.backends.tls import ca_bundle


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


def test_ssl_cert_file_is_given_even_beside_requests_own_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "site-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    assert ca_bundle() == str(ca)


def test_a_directory_when_no_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert ca_bundle() == str(tmp_path)


def test_names_that_do_not_exist_are_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    assert ca_bundle() is True  # requests' own default, not an error at every request
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert ca_bundle() == str(tmp_path)

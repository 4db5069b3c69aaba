"""Service settings: flags > environment > config file > defaults; unsafe production settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_cloud.errors import UsageError
from dicom_cloud.service.settings import load_settings

SECRET = "s" * 40


def test_defaults_are_an_embedded_development_service(tmp_path: Path) -> None:
    settings = load_settings(environ={}, flags={"data_dir": tmp_path})
    assert settings.environment == "development"
    assert settings.storage_url == (tmp_path / "objects").as_uri()
    assert settings.database_url.startswith("sqlite:///")
    assert settings.base_url == "http://127.0.0.1:8042"


def test_precedence_flags_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "service.toml"
    config.write_text('[service]\nport = 1000\nhost = "::1"\nquery_tags = ["PatientSex"]\n')
    environ = {"DICOM_CLOUD_SERVICE_PORT": "2000", "DICOM_CLOUD_SERVICE_CORS_ORIGINS": "https://a, https://b"}
    settings = load_settings({"port": 3000, "host": None}, environ=environ, config_file=config)
    assert settings.port == 3000
    assert settings.host == "::1"
    assert settings.query_tags == ("PatientSex",)
    assert settings.cors_origins == ("https://a", "https://b")
    assert load_settings(environ=environ, config_file=config).port == 2000
    assert load_settings(environ={"DICOM_CLOUD_SERVICE_CONFIG": str(config)}).port == 1000


def test_production_refuses_unsafe_defaults() -> None:
    with pytest.raises(UsageError) as caught:
        load_settings({"environment": "production", "cors_origins": "*"}, environ={})
    message = str(caught.value)
    assert "signing_secret" in message and "public_url" in message and "cors_origins" in message
    ok = load_settings(
        {"environment": "production", "signing_secret": SECRET, "public_url": "https://pacs.example/"},
        environ={},
    )
    assert ok.public_url == "https://pacs.example"


def test_errors_name_fields_never_secret_values() -> None:
    with pytest.raises(UsageError) as caught:
        load_settings({"environment": "production", "signing_secret": "short-secret-value"}, environ={})
    assert "short-secret-value" not in str(caught.value)
    assert SECRET not in repr(load_settings({"signing_secret": SECRET}, environ={}))


@pytest.mark.parametrize(
    ("flags", "word"),
    [({"port": "x"}, "port"), ({"nonsense": 1}, "nonsense"), ({"public_url": "ftp://x"}, "public_url")],
)
def test_bad_values_are_usage_errors(flags: dict[str, object], word: str) -> None:
    with pytest.raises(UsageError, match=word):
        load_settings(flags, environ={})


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_settings(environ={}, config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [")
    with pytest.raises(UsageError, match="TOML"):
        load_settings(environ={}, config_file=bad)


def test_workers_from_flag_environment_file_or_the_cores(tmp_path: Path) -> None:
    import os

    config = tmp_path / "service.toml"
    config.write_text("[service]\nworkers = 3\n")
    assert load_settings(environ={}, config_file=config).worker_count == 3
    assert load_settings(environ={"DICOM_CLOUD_SERVICE_WORKERS": "5"}, config_file=config).worker_count == 5
    assert load_settings({"workers": 2}, environ={}, config_file=config).worker_count == 2
    assert load_settings(environ={}).worker_count == len(os.sched_getaffinity(0))
    with pytest.raises(UsageError, match="workers"):
        load_settings({"workers": 0}, environ={})


def test_worker_processes_get_the_resolved_settings_with_one_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_cloud.service import observability
    from dicom_cloud.service.app import SETTINGS_ENV, app_from_environment

    monkeypatch.setattr(observability, "setup_json_logging", lambda level: None)  # keep pytest's logging
    settings = load_settings({"data_dir": tmp_path, "signing_secret": SECRET, "port": 9000}, environ={})
    monkeypatch.setenv(SETTINGS_ENV, settings.model_dump_json())
    app = app_from_environment()
    assert app.state.settings == settings
    assert app.state.settings.secret_bytes() == SECRET.encode()


def test_relative_data_dir_is_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={}, flags={"data_dir": "rel"})
    assert settings.data_dir == tmp_path / "rel"
    assert settings.storage_url == (tmp_path / "rel" / "objects").as_uri()
    assert settings.database_url == f"sqlite:///{tmp_path / 'rel' / 'index.sqlite'}"

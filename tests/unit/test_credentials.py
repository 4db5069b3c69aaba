from __future__ import annotations

from pathlib import Path

import pytest

from dicom_cloud.credentials import aws_settings, azure_settings, parse_connection_string
from dicom_cloud.errors import UsageError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PROFILE_SECRET = "profile-secret-0123456789"


def _aws_home(tmp_path: Path, credentials: str = "", config: str = "") -> dict[str, str]:
    aws = tmp_path / ".aws"
    aws.mkdir(exist_ok=True)
    if credentials:
        (aws / "credentials").write_text(credentials)
    if config:
        (aws / "config").write_text(config)
    return {"HOME": str(tmp_path)}


def test_nothing_configured_uses_library_chain(tmp_path: Path) -> None:
    settings = aws_settings(env={"HOME": str(tmp_path)})
    assert settings.access_key_id is None and settings.secret_access_key is None
    assert settings.source == "library default chain"
    assert settings.region == "us-east-1"
    assert settings.endpoint is None


def test_environment_keys_win_over_profile(tmp_path: Path) -> None:
    env = _aws_home(
        tmp_path,
        credentials=f"[default]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = {PROFILE_SECRET}\n",
    )
    env |= {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": "tok"}
    settings = aws_settings(env=env)
    assert (settings.access_key_id, settings.secret_access_key, settings.session_token) == (
        "ENVKEY",
        SECRET,
        "tok",
    )
    assert settings.source == "environment"


def test_key_id_without_secret_falls_back_to_profile(tmp_path: Path) -> None:
    env = _aws_home(
        tmp_path,
        credentials=f"[default]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = {PROFILE_SECRET}\n",
    )
    env["AWS_ACCESS_KEY_ID"] = "ENVKEY"
    settings = aws_settings(env=env)
    assert settings.access_key_id == "PROFILEKEY"
    assert settings.source == "profile default"


def test_default_profile_from_credentials_file(tmp_path: Path) -> None:
    env = _aws_home(
        tmp_path,
        credentials=(
            "[default]\naws_access_key_id = DEFKEY\n"
            f"aws_secret_access_key = {PROFILE_SECRET}\naws_session_token = sess\n"
        ),
    )
    settings = aws_settings(env=env)
    assert settings.access_key_id == "DEFKEY"
    assert settings.secret_access_key == PROFILE_SECRET
    assert settings.session_token == "sess"
    assert settings.source == "profile default"


def test_named_profile_from_credentials_and_config(tmp_path: Path) -> None:
    env = _aws_home(
        tmp_path,
        credentials=(
            "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = x\n"
            f"[work]\naws_access_key_id = WORKKEY\naws_secret_access_key = {PROFILE_SECRET}\n"
        ),
        config=(
            "[default]\nregion = eu-west-1\n"
            "[profile work]\nregion = ap-south-1\nendpoint_url = http://127.0.0.1:8333\n"
        ),
    )
    env["AWS_PROFILE"] = "work"
    settings = aws_settings(env=env)
    assert settings.access_key_id == "WORKKEY"
    assert settings.source == "profile work"
    assert settings.region == "ap-south-1"
    assert settings.endpoint == "http://127.0.0.1:8333"


def test_named_profile_only_in_config_file(tmp_path: Path) -> None:
    env = _aws_home(
        tmp_path,
        config=(
            "[profile cfgonly]\naws_access_key_id = CFGKEY\n"
            f"aws_secret_access_key = {PROFILE_SECRET}\nregion = ca-central-1\n"
        ),
    )
    env["AWS_PROFILE"] = "cfgonly"
    settings = aws_settings(env=env)
    assert settings.access_key_id == "CFGKEY"
    assert settings.region == "ca-central-1"


def test_config_section_without_profile_word_is_not_a_named_profile(tmp_path: Path) -> None:
    env = _aws_home(tmp_path, config="[work]\nregion = eu-north-1\n")
    env["AWS_PROFILE"] = "work"
    with pytest.raises(UsageError, match="'work' not found"):
        aws_settings(env=env)


def test_missing_named_profile_is_a_usage_error(tmp_path: Path) -> None:
    env = _aws_home(tmp_path, credentials="[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    env["AWS_PROFILE"] = "nope"
    with pytest.raises(UsageError, match="nope"):
        aws_settings(env=env)


def test_aws_default_profile_variable(tmp_path: Path) -> None:
    env = _aws_home(tmp_path, credentials="[other]\naws_access_key_id = O\naws_secret_access_key = S\n")
    env["AWS_DEFAULT_PROFILE"] = "other"
    assert aws_settings(env=env).access_key_id == "O"


def test_credentials_file_location_variables(tmp_path: Path) -> None:
    creds = tmp_path / "elsewhere-creds"
    creds.write_text("[default]\naws_access_key_id = ELSE\naws_secret_access_key = S\n")
    config = tmp_path / "elsewhere-config"
    config.write_text("[default]\nregion = sa-east-1\n")
    env = {
        "HOME": str(tmp_path),
        "AWS_SHARED_CREDENTIALS_FILE": str(creds),
        "AWS_CONFIG_FILE": str(config),
    }
    settings = aws_settings(env=env)
    assert settings.access_key_id == "ELSE"
    assert settings.region == "sa-east-1"


def test_region_precedence(tmp_path: Path) -> None:
    env = _aws_home(tmp_path, config="[default]\nregion = profile-region\n")
    assert aws_settings(env=env).region == "profile-region"
    env["AWS_DEFAULT_REGION"] = "default-region"
    assert aws_settings(env=env).region == "default-region"
    env["AWS_REGION"] = "aws-region"
    assert aws_settings(env=env).region == "aws-region"
    assert aws_settings(env=env, region="argument-region").region == "argument-region"


def test_endpoint_precedence(tmp_path: Path) -> None:
    env = _aws_home(tmp_path, config="[default]\nendpoint_url = http://profile:1\n")
    assert aws_settings(env=env).endpoint == "http://profile:1"
    env["AWS_ENDPOINT_URL"] = "http://generic:2"
    assert aws_settings(env=env).endpoint == "http://generic:2"
    env["AWS_ENDPOINT_URL_S3"] = "http://s3-specific:3"
    assert aws_settings(env=env).endpoint == "http://s3-specific:3"
    assert aws_settings(env=env, endpoint="http://argument:4").endpoint == "http://argument:4"


def test_malformed_ini_is_a_usage_error(tmp_path: Path) -> None:
    env = _aws_home(tmp_path, credentials="this is not an ini file\n[\n")
    with pytest.raises(UsageError, match="cannot parse"):
        aws_settings(env=env)


def test_aws_repr_never_shows_secrets(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_SESSION_TOKEN": "session-token-secret",
    }
    settings = aws_settings(env=env)
    for text in (repr(settings), str(settings), f"{settings!r}"):
        assert SECRET not in text
        assert "session-token-secret" not in text
        assert "AKIAEXAMPLEKEYID" not in text


# -- Azure ---------------------------------------------------------------------------------

ACCOUNT_KEY = "c2VjcmV0LWFjY291bnQta2V5LWJ5dGVzLTAxMjM0NTY3ODk="


def test_connection_string_with_account_key() -> None:
    conn = (
        "DefaultEndpointsProtocol=https;AccountName=myacct;"
        f"AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net"
    )
    settings = azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    assert settings.account == "myacct"
    assert settings.account_key == ACCOUNT_KEY  # '=' padding kept
    assert settings.endpoint == "https://myacct.blob.core.windows.net"
    assert settings.sas_token is None
    assert settings.source == "AZURE_STORAGE_CONNECTION_STRING"


def test_connection_string_blob_endpoint() -> None:
    conn = f"AccountName=dev;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:10000/dev;"
    settings = azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    assert settings.account == "dev"
    assert settings.endpoint == "http://127.0.0.1:10000/dev"
    # An explicit endpoint argument wins.
    assert azure_settings(
        endpoint="http://other:1/dev", env={"AZURE_STORAGE_CONNECTION_STRING": conn}
    ).endpoint == ("http://other:1/dev")


def test_connection_string_shared_access_signature_without_account_name() -> None:
    conn = (
        "BlobEndpoint=https://sasacct.blob.core.windows.net/;SharedAccessSignature=?sv=2021-08-06&sig=abc%3D"
    )
    settings = azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    assert settings.account == "sasacct"
    assert settings.sas_token == "sv=2021-08-06&sig=abc%3D"
    assert settings.account_key is None


def test_connection_string_emulator_style_endpoint_gives_account() -> None:
    conn = "BlobEndpoint=http://127.0.0.1:10000/emuacct;SharedAccessSignature=sv=1&sig=x"
    assert azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": conn}).account == "emuacct"


def test_development_storage() -> None:
    settings = azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"})
    assert settings.account == "devstoreaccount1"
    assert settings.account_key
    assert settings.endpoint == "http://127.0.0.1:10000/devstoreaccount1"
    assert "development" in settings.source


def test_connection_string_without_account_is_usage_error() -> None:
    with pytest.raises(UsageError):
        azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": f"AccountKey={ACCOUNT_KEY}"})


def test_malformed_connection_string() -> None:
    with pytest.raises(UsageError, match="malformed"):
        parse_connection_string("AccountName=x;garbage")
    assert parse_connection_string(" A=1;;B = 2; ") == {"A": "1", "B": "2"}


def test_account_and_key() -> None:
    settings = azure_settings(env={"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_KEY": ACCOUNT_KEY})
    assert (settings.account, settings.account_key, settings.sas_token) == ("acct", ACCOUNT_KEY, None)
    assert settings.source == "AZURE_STORAGE_KEY"
    assert settings.endpoint is None


def test_account_and_sas_token() -> None:
    settings = azure_settings(
        env={
            "AZURE_STORAGE_ACCOUNT": "acct",
            "AZURE_STORAGE_SAS_TOKEN": "?sv=2021&sig=s",
            "AZURE_STORAGE_BLOB_ENDPOINT": "http://127.0.0.1:10000/acct",
        }
    )
    assert settings.sas_token == "sv=2021&sig=s"
    assert settings.account_key is None
    assert settings.source == "AZURE_STORAGE_SAS_TOKEN"
    assert settings.endpoint == "http://127.0.0.1:10000/acct"


def test_account_alone_uses_library_chain() -> None:
    settings = azure_settings(env={"AZURE_STORAGE_ACCOUNT_NAME": "acct"})
    assert settings.account == "acct"
    assert settings.source == "library default chain"


def test_no_azure_credentials_is_usage_error() -> None:
    with pytest.raises(UsageError, match="no Azure credentials"):
        azure_settings(env={})


def test_azure_repr_hides_key_and_sas() -> None:
    conn = f"AccountName=acct;AccountKey={ACCOUNT_KEY};SharedAccessSignature=sv=1&sig=SIGSECRET"
    settings = azure_settings(env={"AZURE_STORAGE_CONNECTION_STRING": conn})
    text = repr(settings)
    assert ACCOUNT_KEY not in text
    assert "SIGSECRET" not in text
    assert "acct" in text

"""AWS profiles that botocore resolves: credential_process for real, role and SSO profiles failing
clearly (never a silent fall back to other keys), and the aws extra named when botocore is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dicom_cloud.backends.sigv4 import Signer, SigningCredentials, current_credentials
from dicom_cloud.credentials import aws_settings
from dicom_cloud.errors import AuthenticationError, MissingExtraError, NetworkError


def _process_script(tmp_path: Path, payload: dict[str, object]) -> str:
    script = tmp_path / "creds.py"
    script.write_text(f"import json\nprint(json.dumps({payload!r}))\n")
    return f"{sys.executable} {script}"


def _env(tmp_path: Path, config: str, credentials: str = "", profile: str = "work") -> dict[str, str]:
    (tmp_path / "config").write_text(config)
    (tmp_path / "credentials").write_text(credentials)
    return {
        "HOME": str(tmp_path),
        "AWS_PROFILE": profile,
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
    }


def test_credential_process_gives_the_keys(tmp_path: Path) -> None:
    command = _process_script(
        tmp_path,
        {"Version": 1, "AccessKeyId": "AKPROCESS", "SecretAccessKey": "s3cr3t", "SessionToken": "tok"},
    )
    env = _env(tmp_path, f"[profile work]\ncredential_process = {command}\nregion = eu-west-3\n")
    settings = aws_settings(env=env)
    assert settings.access_key_id is None  # nothing static: the keys come from the source each time
    assert settings.has_keys
    keys = settings.keys()
    assert keys is not None
    assert (keys.access_key_id, keys.secret_access_key, keys.session_token) == ("AKPROCESS", "s3cr3t", "tok")
    assert settings.region == "eu-west-3"
    assert "credential_process" in settings.source and "s3cr3t" not in settings.source
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in repr(keys)
    assert settings.obstore_provider is not None
    provided = settings.obstore_provider()
    assert provided["access_key_id"] == "AKPROCESS" and provided["token"] == "tok"
    assert provided["expires_at"] is not None
    # Our own signers (resumable uploads, bucket listings, presigned URLs) sign with the same keys.
    source = current_credentials(settings)
    assert callable(source)
    signed = Signer(source, settings.region).sign("GET", "https://s3.example.com/bucket/key")
    assert "Credential=AKPROCESS/" in signed.headers["Authorization"]
    assert signed.headers["x-amz-security-token"] == "tok"


def test_credential_process_comes_after_keys_in_the_credentials_file(tmp_path: Path) -> None:
    """The AWS CLI's order inside one profile: keys in the credentials file win over credential_process."""
    command = _process_script(tmp_path, {"Version": 1, "AccessKeyId": "AKPROCESS", "SecretAccessKey": "x"})
    env = _env(
        tmp_path,
        f"[profile work]\ncredential_process = {command}\n",
        "[work]\naws_access_key_id = AKFILE\naws_secret_access_key = y\n",
    )
    keys = aws_settings(env=env).keys()
    assert keys is not None and keys.access_key_id == "AKFILE"


def test_environment_keys_still_come_first(tmp_path: Path) -> None:
    env = _env(tmp_path, "[profile work]\ncredential_process = /nonexistent/never-run\n")
    env.update(AWS_ACCESS_KEY_ID="AKENV", AWS_SECRET_ACCESS_KEY="z")
    settings = aws_settings(env=env)
    assert settings.access_key_id == "AKENV" and settings.key_source is None


def test_failing_credential_process_is_an_authentication_error(tmp_path: Path) -> None:
    env = _env(
        tmp_path, f"[profile work]\ncredential_process = {sys.executable} -c 'import sys; sys.exit(3)'\n"
    )
    with pytest.raises(AuthenticationError) as info:
        aws_settings(env=env)
    assert "AWS profile 'work' (credential_process)" in str(info.value)


def test_role_profile_resolves_through_sts_and_fails_clearly(tmp_path: Path) -> None:
    """role_arn + source_profile: botocore assumes the role with the source profile's keys, at the STS
    endpoint the profile names (here a closed port: a network failure naming the profile; no other keys
    are tried)."""
    env = _env(
        tmp_path,
        "[profile base]\nregion = us-east-1\n"
        "[profile work]\nrole_arn = arn:aws:iam::123456789012:role/reader\nsource_profile = base\n"
        "region = us-east-1\nendpoint_url = http://127.0.0.1:9\nmax_attempts = 1\n",
        "[base]\naws_access_key_id = AKBASE\naws_secret_access_key = base-secret\n",
    )
    with pytest.raises(NetworkError) as info:
        aws_settings(env=env)
    assert "AWS profile 'work' (role_arn)" in str(info.value)
    assert "base-secret" not in str(info.value)


def test_sso_profile_without_a_login_says_to_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # botocore's SSO token cache is under ~/.aws/sso/cache
    env = _env(
        tmp_path,
        "[profile work]\nsso_session = corp\nsso_account_id = 123456789012\nsso_role_name = Reader\n"
        "region = us-east-1\n"
        "[sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n",
    )
    with pytest.raises(AuthenticationError) as info:
        aws_settings(env=env)
    assert "AWS profile 'work' (SSO)" in str(info.value)
    assert info.value.hint == "run 'aws sso login --profile work'"


def test_without_botocore_the_aws_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore", None)
    env = _env(tmp_path, "[profile work]\nrole_arn = arn:aws:iam::123456789012:role/r\nsource_profile = b\n")
    with pytest.raises(MissingExtraError) as info:
        aws_settings(env=env)
    assert info.value.exit_code == 15
    assert info.value.hint == "pip install 'dicom-cloud[aws]'"
    assert "AWS profile 'work' (role_arn)" in str(info.value)


def test_static_profiles_do_not_need_botocore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "botocore", None)
    env = _env(
        tmp_path,
        "[profile work]\nregion = us-east-1\n",
        "[work]\naws_access_key_id = AK\naws_secret_access_key = s\n",
    )
    settings = aws_settings(env=env)
    assert settings.access_key_id == "AK" and settings.key_source is None
    assert current_credentials(settings) == SigningCredentials("AK", "s", None)


def test_one_process_runs_credential_process_once(tmp_path: Path) -> None:
    """Stores opened with one profile share its keys: a copy between buckets asks once, not twice."""
    runs = tmp_path / "runs"
    script = tmp_path / "counting.py"
    script.write_text(
        "import json, pathlib\n"
        f"p = pathlib.Path({str(runs)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': 'AKONCE', 'SecretAccessKey': 's'}))\n"
    )
    env = _env(tmp_path, f"[profile work]\ncredential_process = {sys.executable} {script}\n")
    first, second = aws_settings(env=env), aws_settings(env=env)
    assert first.keys() == second.keys()
    assert runs.read_text() == "x"

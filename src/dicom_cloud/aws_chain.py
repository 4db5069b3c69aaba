"""AWS profiles that need more than keys in a file, resolved by botocore exactly as the AWS CLI does.

A profile with ``role_arn`` (with ``source_profile`` or ``credential_source``), ``credential_process``,
``web_identity_token_file`` or SSO settings (``sso_session``, ``sso_start_url``...) gets its keys from
botocore's credential chain for that profile: the AWS CLI's own code, order and caches (SSO tokens
under ``~/.aws/sso/cache``, assumed-role sessions). Such keys are temporary; botocore refreshes them
before they expire. :class:`ProfileKeys` hands the current ones to obstore (its credential
provider) and to the SigV4 signers of resumable uploads, bucket listings and presigned URLs.

botocore is the ``aws`` extra. Without it such a profile is an error naming the extra
(:class:`~dicom_cloud.errors.MissingExtraError`), never a silent fall back to other keys.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AuthenticationError, DicomCloudError, NetworkError
from .extras import require

if TYPE_CHECKING:
    from .credentials import AwsKeys

#: Profile settings that only botocore's chain resolves, and how messages name them.
_CHAIN_SETTINGS = (
    ("role_arn", "role_arn"),
    ("web_identity_token_file", "web_identity_token_file"),
    ("sso_session", "SSO"),
    ("sso_start_url", "SSO"),
    ("sso_account_id", "SSO"),
    ("credential_process", "credential_process"),
)
#: obstore asks again for keys after this long; botocore answers from its cache, refreshing the keys
#: itself 10 to 15 minutes before they expire, so what it hands out is valid for longer than this.
PROVIDER_TTL = timedelta(minutes=5)


def chain_setting(profile: Mapping[str, str]) -> str | None:
    """What in ``profile`` needs botocore's chain ("role_arn", "SSO"...), or None (static keys or nothing)."""
    for key, what in _CHAIN_SETTINGS:
        if profile.get(key):
            return what
    return None


_OPENED: dict[tuple[str, Path, Path], ProfileKeys] = {}
_OPENED_LOCK = threading.Lock()


def profile_keys(profile: str, *, what: str, config_file: Path, credentials_file: Path) -> ProfileKeys:
    """The :class:`ProfileKeys` of ``profile``, one per process: every store opened with the profile
    (a copy between two buckets, a sync) shares one role session or one run of credential_process."""
    key = (profile, config_file, credentials_file)
    with _OPENED_LOCK:
        if key not in _OPENED:  # a failure is not kept: the next store tries again
            _OPENED[key] = ProfileKeys(
                profile, what=what, config_file=config_file, credentials_file=credentials_file
            )
        return _OPENED[key]


class ProfileKeys:
    """The current keys of one AWS profile, from botocore's credential chain for it.

    The first keys are fetched at construction, so that a profile that cannot give keys (an
    expired SSO login, a role that may not be assumed, a failing credential_process) fails before
    anything is transferred, as an :class:`AuthenticationError` naming the profile.
    """

    def __init__(self, profile: str, *, what: str, config_file: Path, credentials_file: Path) -> None:
        require("aws", f"AWS profile '{profile}' ({what})")
        import botocore.exceptions
        import botocore.session

        self.profile = profile
        self.what = what
        # botocore logs a failed refresh as a warning with its traceback, then raises: the error we
        # raise says the same in one line. Its logger stays quiet unless the embedder configured it.
        chatty = logging.getLogger("botocore.credentials")
        if chatty.level == logging.NOTSET:
            chatty.setLevel(logging.ERROR)
        session = botocore.session.Session(profile=profile)
        session.set_config_variable("config_file", str(config_file))
        session.set_config_variable("credentials_file", str(credentials_file))
        self._errors: tuple[type[Exception], ...] = (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
        )
        #: STS, the SSO portal or the metadata service could not be reached: a network failure.
        self._network_errors: tuple[type[Exception], ...] = (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
        )
        try:
            credentials: Any = session.get_credentials()
        except self._errors as exc:
            raise self._error(exc) from None
        if credentials is None:
            raise AuthenticationError(
                f"AWS profile '{profile}' ({what}) gave no credentials",
                hint="check the profile with 'aws sts get-caller-identity --profile " + profile + "'",
            )
        self._credentials = credentials
        #: botocore's name for the provider that answered ("assume-role", "custom-process", "sso"...).
        self.method: str = str(getattr(credentials, "method", what))
        self.current()

    def _error(self, exc: Exception) -> DicomCloudError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, self._network_errors):
            return NetworkError(f"AWS profile '{self.profile}' ({self.what}): {first}")
        hint = (
            f"run 'aws sso login --profile {self.profile}'"
            if self.what == "SSO"
            else f"check the profile with 'aws sts get-caller-identity --profile {self.profile}'"
        )
        return AuthenticationError(f"AWS profile '{self.profile}' ({self.what}): {first}", hint=hint)

    def current(self) -> AwsKeys:
        """The keys to sign with now (botocore refreshes them when they near their expiry)."""
        from .credentials import AwsKeys

        try:
            frozen = self._credentials.get_frozen_credentials()
        except self._errors as exc:
            raise self._error(exc) from None
        return AwsKeys(frozen.access_key, frozen.secret_key, frozen.token or None)

    def obstore_provider(self) -> dict[str, Any]:
        """obstore's S3 credential provider protocol: the keys, and when to ask again."""
        keys = self.current()
        return {
            "access_key_id": keys.access_key_id,
            "secret_access_key": keys.secret_access_key,
            "token": keys.session_token,
            "expires_at": datetime.now(UTC) + PROVIDER_TTL,
        }

    def __repr__(self) -> str:  # never the keys
        return f"ProfileKeys(profile={self.profile!r}, method={self.method!r})"

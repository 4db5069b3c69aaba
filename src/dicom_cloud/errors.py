"""The errors dicom-cloud raises, and the exit code each one maps to.

Every failure that reaches a user is one of these. Backends translate their library's
exceptions into the most specific class here (keeping the original as ``__cause__``);
the CLI maps a class to an exit code and the service maps it to an HTTP status, each
in one place.

    DicomCloudError                 exit 1   (anything else that went wrong)
    ├── UsageError                  exit 2   bad arguments, bad URL, bad configuration
    ├── NotFoundError               exit 3   missing bucket/container, object or local path
    │   └── BucketNotFoundError     exit 3
    ├── AuthenticationError         exit 4   credentials missing, wrong or expired
    ├── PermissionDeniedError       exit 5   credentials valid but not allowed
    │   └── UnreadableFileError     exit 5   a local source file this process may not read
    ├── NetworkError                exit 6   server unreachable, timeouts, resets (retryable)
    │   ├── ThrottledError          exit 6   429 / 503 SlowDown (retryable)
    │   └── UntrustedCertificateError exit 6 a server's TLS certificate refused (not retried)
    ├── IntegrityError              exit 7   checksum mismatch, truncated or tampered data
    │   ├── SourceChangedError      exit 7   a local file changed while it was being transferred
    │   └── CorruptedInTransitError exit 7   the server assembled other bytes than were sent (retryable)
    ├── AlreadyExistsError          exit 8   destination exists and overwriting was refused
    │   └── ConflictError           exit 8   destination holds other bytes (--on-conflict fail)
    ├── UnsafeNameError             exit 9   an object name that would escape its directory
    ├── NotSupportedError           exit 10  the store cannot do this (e.g. sign on file://)
    ├── DicomFormatError            exit 12  not DICOM, or a header malformed beyond the policy
    │   └── RejectedObjectError     exit 12  an uploaded object refused at ingest (and quarantined)
    ├── TransferFailedError         exit 1   a batch finished with some items failed
    ├── DifferencesFoundError       exit 1   verify found the two trees differ
    ├── JobLockedError              exit 13  the same job is already running
    └── DeleteLimitError            exit 14  a sync would delete more than --max-delete allows
    UsageError
    ├── KeyMissingError             exit 11  an object is encrypted under a master key not given
    └── MissingExtraError           exit 15  the command needs an optional part not installed
                                             (pip install 'dicom-cloud[EXTRA]')

``NotFoundError`` is also a ``FileNotFoundError`` so that library users can catch the
built-in, as with obstore; ``MissingExtraError`` is also an ``ImportError``.
"""

from __future__ import annotations


class DicomCloudError(Exception):
    """Base of every error dicom-cloud raises on purpose."""

    exit_code: int = 1
    http_status: int = 500
    #: Whether repeating the same operation later may succeed.
    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: One sentence telling the user what to do next, shown after the message.
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(DicomCloudError):
    """The command, URL or configuration is wrong; nothing was attempted."""

    exit_code = 2
    http_status = 400


class KeyMissingError(UsageError):
    """An object is client-side encrypted under a master key id that was not supplied."""

    exit_code = 11
    http_status = 403

    def __init__(self, message: str, *, key_id: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.key_id = key_id


class MissingExtraError(UsageError, ImportError):
    """A feature needs an optional part of the package (an extra) that is not installed."""

    exit_code = 15
    http_status = 500

    def __init__(self, message: str, *, extra: str, hint: str | None = None) -> None:
        UsageError.__init__(self, message, hint=hint or f"pip install 'dicom-cloud[{extra}]'")
        #: The extra that provides it: service, postgres, parquet, aws...
        self.extra = extra


class NotFoundError(DicomCloudError, FileNotFoundError):
    """An object, prefix or local path does not exist."""

    exit_code = 3
    http_status = 404

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        DicomCloudError.__init__(self, message, hint=hint)


class BucketNotFoundError(NotFoundError):
    """The bucket or container itself does not exist."""


class AuthenticationError(DicomCloudError):
    """The store refused the credentials (missing, wrong, expired)."""

    exit_code = 4
    http_status = 401


class PermissionDeniedError(DicomCloudError):
    """The credentials are valid but not allowed to do this."""

    exit_code = 5
    http_status = 403


class UnreadableFileError(PermissionDeniedError):
    """A local file to be read cannot be opened (its mode, an ACL, a vanished mount).

    Unlike a refusal by a store, it concerns that one file: a recursive transfer fails the file
    and goes on with the others.
    """


class NetworkError(DicomCloudError):
    """The store could not be reached or the connection failed."""

    exit_code = 6
    http_status = 502
    retryable = True


class ThrottledError(NetworkError):
    """The store asked us to slow down (429, 503 SlowDown)."""

    http_status = 503

    def __init__(self, message: str, *, hint: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, hint=hint)
        #: Seconds the server asked us to wait (its Retry-After header), when the backend can read it.
        self.retry_after = retry_after


class UntrustedCertificateError(NetworkError):
    """The server's TLS certificate was refused (an unknown authority, another name, expired):
    asking again cannot help."""

    retryable = False


class IntegrityError(DicomCloudError):
    """Data did not match its checksum, or was truncated or tampered with."""

    exit_code = 7
    http_status = 422


class SourceChangedError(IntegrityError):
    """A local file changed (size, modification time, identity) between its listing and the end of
    its read: what was read may mix two versions, so it is not written as good."""


class CorruptedInTransitError(IntegrityError):
    """The server holds other bytes than the ones sent (a fault on the way, e.g. a chunk cut short
    and resumed wrongly); the object was removed, so a new attempt from the start is safe."""

    retryable = True


class AlreadyExistsError(DicomCloudError):
    """The destination exists and the operation was asked not to overwrite it."""

    exit_code = 8
    http_status = 409


class ConflictError(AlreadyExistsError):
    """The destination holds different bytes under the same name, and the policy says fail."""


class UnsafeNameError(DicomCloudError):
    """An object name would escape the destination directory or is not representable."""

    exit_code = 9
    http_status = 400


class NotSupportedError(DicomCloudError):
    """The store has no such ability (for example presigned URLs on local disk)."""

    exit_code = 10
    http_status = 501


class DicomFormatError(DicomCloudError):
    """The data is not DICOM, or its header is malformed beyond what the policy accepts."""

    exit_code = 12
    http_status = 422

    def __init__(self, reason: str, *, detail: str = "", hint: str | None = None) -> None:
        message = f"{reason} ({detail})" if detail else reason
        super().__init__(message, hint=hint)
        #: A stable reason (``dicom.header.REASON_*``): safe to log, free of patient data.
        self.reason = reason


class RejectedObjectError(DicomFormatError):
    """An object uploaded for ingest was refused: not DICOM, wrong size or checksum, missing.

    ``reason`` is stable and free of patient data; ``quarantine_key`` tells where the refused
    object was moved for inspection (None when there was nothing to move).
    """

    exit_code = 12
    http_status = 422

    def __init__(self, reason: str, *, quarantine_key: str | None = None, hint: str | None = None) -> None:
        super().__init__(reason, hint=hint)
        self.quarantine_key = quarantine_key


class TransferFailedError(DicomCloudError):
    """A batch transfer ended with some items failed; the others completed."""

    exit_code = 1
    http_status = 500

    def __init__(self, message: str, *, failed: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.failed = failed


class DifferencesFoundError(DicomCloudError):
    """``verify`` compared two trees and they differ (the differences were reported)."""

    exit_code = 1
    http_status = 409

    def __init__(self, message: str, *, differences: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.differences = differences


class JobLockedError(DicomCloudError):
    """Another process is running the same job (same command, same source and destination)."""

    exit_code = 13
    http_status = 409


class DeleteLimitError(DicomCloudError):
    """A sync would delete more of the destination than allowed: nothing was changed."""

    exit_code = 14
    http_status = 409


#: The exit code of a run interrupted by SIGINT (Ctrl-C): 128 + 2, as shells report it.
EXIT_INTERRUPTED = 130
#: The exit code of a run stopped by SIGTERM (128 + 15): stopped as cleanly as by Ctrl-C.
EXIT_TERMINATED = 143

"""Turning command-line values into core settings: sizes, durations, tags, StoreConfig, TransferOptions."""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..backends import StoreConfig
from ..crypto.envelope import ClientEncryption
from ..crypto.keysource import load_keys
from ..dicom.phi import check_tags_allowed
from ..errors import UsageError
from ..filters import Filter
from ..retry import DEFAULT_ATTEMPTS
from ..store import PutOptions
from ..transfer import TransferOptions

if TYPE_CHECKING:  # pydicom (and numpy) load only when a DICOM option is used
    from ..dicom.deidentify import DeidentifyOptions
    from ..dicom.upload import DicomPolicy


def store_config(
    endpoint: str | None,
    region: str | None,
    path_style: bool | None,
    retries: int,
    timeout: float,
    *,
    encrypt: str | None = None,
    sse_kms_key_id: str | None = None,
    sse_customer_key_file: str | None = None,
    azure_encryption_scope: str | None = None,
    gcs_kms_key_name: str | None = None,
) -> StoreConfig:
    sse: str | None = None
    if encrypt == "server-side":
        sse = "AES256"
    if sse_kms_key_id:
        sse = "aws:kms"
    return StoreConfig(
        endpoint=endpoint,
        region=region,
        path_style=path_style,
        max_retries=retries,
        request_timeout=timeout,
        server_side_encryption=sse,
        sse_kms_key_id=sse_kms_key_id,
        sse_customer_key=_customer_key(sse_customer_key_file) if sse_customer_key_file else None,
        azure_encryption_scope=azure_encryption_scope,
        gcs_kms_key_name=gcs_kms_key_name,
    )


def _customer_key(path: str) -> bytes:
    """The 32 raw bytes of a base64 key file; errors name the file, never its content."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
        key = base64.b64decode(text, validate=True)
    except FileNotFoundError:
        raise UsageError(f"--sse-customer-key-file: {path} does not exist") from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise UsageError(f"--sse-customer-key-file: {path} does not hold base64 text") from None
    if len(key) != 32:
        raise UsageError(
            f"--sse-customer-key-file: {path} holds {len(key)} bytes, not 32",
            hint="make one with: head -c 32 /dev/urandom | base64 > sse.key",
        )
    return key


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}  # fmt: skip


def parse_size(text: str, option: str) -> int:
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else ""
    if not match or unit not in _UNITS:
        raise UsageError(f"{option}: cannot read size '{text}'", hint="write e.g. 8MiB, 64MB or 1048576")
    return int(float(match.group(1)) * _UNITS[unit])


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"--expires: cannot read duration '{text}'", hint="write e.g. 3600, 30m, 12h or 7d")
    value, unit = int(match.group(1)), (match.group(2) or "s").lower()
    seconds = value * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise UsageError(f"--expires: '{text}' is too long a duration") from None


def parse_tags(text: str | None) -> dict[str, str]:
    """``K=V,K2=V2`` into a dict; keys are checked so that every provider accepts them."""
    if not text:
        return {}
    tags: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(
                f"--tags: '{item}' is not KEY=VALUE", hint='write --tags "Source=PACS1,Dataset=CT"'
            )
        # Azure metadata names must be identifiers; S3 and GCS accept those too.
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(
                f"--tags: key '{key}' must be an identifier (letters, digits, _; not starting with a digit)",
                hint="Azure refuses metadata names with '-' or '.': write Study_Id, not Study-Id",
            )
        if not value.isascii():
            raise UsageError(f"--tags: value of '{key}' must be ASCII (HTTP headers carry metadata)")
        tags[key] = value.strip()
    return tags


def transfer_options(
    parallel: int,
    part_size: str,
    threshold: str,
    part_concurrency: int,
    *,
    tags: str | None = None,
    object_tags: bool = False,
    no_overwrite: bool = False,
    dry_run: bool = False,
    encryption: ClientEncryption | None = None,
    rekey: bool = False,
    dicom: DicomPolicy | None = None,
    allow_phi: bool = False,
    selection: Filter | None = None,
    deidentify: DeidentifyOptions | None = None,
    on_conflict: str | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> TransferOptions:
    metadata = parse_tags(tags)
    # "--tags PatientID=..." is the classic way PHI ends up in object metadata.
    check_tags_allowed(metadata, allow_phi, where="object metadata (--tags)")
    return TransferOptions(
        parallel=parallel,
        part_size=parse_size(part_size, "--part-size"),
        multipart_threshold=parse_size(threshold, "--multipart-threshold"),
        part_concurrency=part_concurrency,
        put=PutOptions(metadata=metadata, tags=metadata if object_tags else {}),
        no_overwrite=no_overwrite,
        dry_run=dry_run,
        encryption=encryption,
        rekey=rekey,
        dicom=dicom,
        filter=selection,
        deidentify=deidentify,
        on_conflict=on_conflict,  # type: ignore[arg-type]
        attempts=attempts,
    )


def selection(args: Any) -> Filter | None:
    """The --include/--exclude/--files-from/--modality/--study-uid/... filter, or None."""
    values = (args.include, args.exclude, args.files_from, args.modality, args.study_uid, args.series_uid)
    if not any(values) and not args.sop_class:
        return None
    modalities = [m.strip() for item in args.modality for m in item.split(",") if m.strip()]
    return Filter(
        args.include,
        args.exclude,
        files_from=Path(args.files_from) if args.files_from else None,
        modality=modalities,
        study_uid=args.study_uid,
        series_uid=args.series_uid,
        sop_class=args.sop_class,
    )


def dicom_selection_flags(args: Any) -> str:
    """The DICOM selection options given (``--modality CT --study 1.2.3``), as typed; empty if none."""
    given = (
        ("--modality", args.modality),
        ("--study", args.study_uid),
        ("--series", args.series_uid),
        ("--sop-class", args.sop_class),
    )
    return " ".join(f"{flag} {value}" for flag, values in given for value in values)


def deidentify_options(enabled: bool, secret_file: str | None, dates: str) -> DeidentifyOptions | None:
    if not enabled:
        if secret_file:
            raise UsageError("--deid-secret-file goes with --deidentify")
        return None
    if not secret_file:
        raise UsageError(
            "--deidentify needs --deid-secret-file",
            hint="the secret keeps new UIDs consistent across runs: head -c 32 /dev/urandom > deid.key",
        )
    secret = _read_secret(secret_file, "--deid-secret-file")
    from ..dicom.deidentify import DeidentifyOptions

    return DeidentifyOptions(secret=secret, keep_dates=dates)  # type: ignore[arg-type]


def _read_secret(path: str, option: str) -> bytes:
    """The raw bytes of a secret file (surrounding whitespace dropped); errors never show them."""
    try:
        return Path(path).read_bytes().strip()
    except OSError:
        raise UsageError(f"{option}: cannot read {path}") from None


def dicom_policy(
    layout: str | None,
    layout_key_file: str | None,
    dicom_tags: str | None,
    *,
    validate: bool,
    strict: bool,
    allow_phi: bool,
    encrypted: bool = False,
) -> DicomPolicy | None:
    """The DICOM handling asked for on the command line; None when none of its options is used."""
    if not (layout or dicom_tags or validate or strict):
        if layout_key_file:
            raise UsageError("--layout-key-file goes with --layout hashed")
        return None
    from ..dicom.layout import Layout
    from ..dicom.upload import DicomPolicy

    key = _read_secret(layout_key_file, "--layout-key-file") if layout_key_file else None
    tags = tuple(t.strip() for t in (dicom_tags or "").split(",") if t.strip())
    if layout in ("orthanc-flat", "orthanc-legacy"):
        return DicomPolicy(
            metadata_tags=tags,
            skip_invalid=validate,
            strict=strict,
            allow_phi=allow_phi,
            orthanc_structure="flat" if layout == "orthanc-flat" else "legacy",
            encrypted=encrypted,
        )
    return DicomPolicy(
        layout=Layout.from_spec(layout, key=key, allow_phi=allow_phi) if layout else None,
        metadata_tags=tags,
        skip_invalid=validate,
        strict=strict,
        allow_phi=allow_phi,
    )


def client_encryption(
    encrypt: str | None,
    fmt: str | None,
    master_key: str | None,
    previous_keys: Sequence[str],
    *,
    writes: bool | None = None,
) -> ClientEncryption | None:
    """Keys (flags, environment or configuration file) and whether to encrypt what is written
    (``writes``; by default, whenever ``encrypt`` is client-side). Client-side encryption asked
    for without any master key is refused, even where it only decrypts."""
    settings = load_keys(master_key, previous_keys)
    if writes is None:
        writes = encrypt == "client-side"
    if (writes or encrypt == "client-side") and settings.ring is None:
        option = "--encrypt client-side" if encrypt == "client-side" else "--keep-encrypted"
        raise UsageError(
            f"{option} needs a master key",
            hint="pass --master-key ID:PATH (make one with: openssl rand -base64 32 > master.key)",
        )
    if settings.ring is None:
        return None
    chosen = (fmt or settings.format or "A1").upper()
    if chosen not in ("A1", "DC2"):
        raise UsageError(f"unknown encryption format '{chosen}'", hint="use A1 (Orthanc-compatible) or DC2")
    return ClientEncryption(ring=settings.ring, encrypt_as=chosen if writes else None)  # type: ignore[arg-type]


def setup_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
        )
        # Third-party HTTP logs may print signed URLs: keep them at INFO.
        for noisy in ("urllib3", "google", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.INFO)
    else:
        logging.basicConfig(
            level=logging.WARNING, format="dicom-cloud: warning: %(message)s", stream=sys.stderr
        )


def _writes_encrypted(args: Any) -> bool:
    """Whether what the command writes is client-side encrypted.

    A download decrypts: ``--encrypt client-side`` there only says that the objects are encrypted
    (the flags of the upload give the plaintext back); local copies stay encrypted, under the
    current master key, only when ``--keep-encrypted`` asks for it.
    """
    if getattr(args, "command", None) == "download":
        return bool(getattr(args, "keep_encrypted", False))
    return bool(args.encrypt == "client-side")


def options_from_args(args: Any) -> TransferOptions:
    """The TransferOptions of a transfer command's parsed arguments (upload, download, copy, sync)."""
    encrypted = _writes_encrypted(args)
    return transfer_options(
        args.parallel,
        args.part_size,
        args.multipart_threshold,
        args.part_concurrency,
        tags=args.tags,
        object_tags=args.object_tags,
        no_overwrite=args.no_overwrite,
        dry_run=args.dry_run,
        encryption=client_encryption(
            args.encrypt,
            args.encryption_format,
            args.master_key,
            args.previous_key,
            writes=encrypted,
        ),
        dicom=dicom_policy(
            args.layout,
            args.layout_key_file,
            args.dicom_tags,
            validate=args.validate,
            strict=args.strict,
            allow_phi=args.allow_phi,
            encrypted=encrypted,
        ),
        allow_phi=args.allow_phi,
        selection=selection(args),
        deidentify=deidentify_options(args.deidentify, args.deid_secret_file, args.deid_dates),
        on_conflict=args.on_conflict,
        attempts=args.attempts,
    )


def config_from_args(args: Any, **kwargs: Any) -> StoreConfig:
    """The StoreConfig of any command's connection options."""
    return store_config(
        args.endpoint,
        args.region,
        args.path_style,
        args.retries,
        args.timeout,
        sse_customer_key_file=args.sse_customer_key_file,
        azure_encryption_scope=getattr(args, "azure_encryption_scope", None),
        gcs_kms_key_name=getattr(args, "gcs_kms_key", None),
        **kwargs,
    )

from __future__ import annotations

import re

import pytest

from dicom_cloud import errors
from dicom_cloud.cli.main import EXIT_CODES_HELP
from dicom_cloud.errors import DicomCloudError


def _all_subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def _documented() -> dict[str, int]:
    table: dict[str, int] = {}
    for line in (errors.__doc__ or "").splitlines():
        match = re.search(r"(\w+Error)\s+exit (\d+)", line)
        if match:
            table[match.group(1)] = int(match.group(2))
    return table


def test_docstring_table_lists_every_error_class() -> None:
    documented = _documented()
    classes = {cls.__name__ for cls in _all_subclasses(DicomCloudError) if cls.__module__ == errors.__name__}
    assert classes | {"DicomCloudError"} == set(documented)


@pytest.mark.parametrize("name", sorted(_documented()))
def test_exit_code_matches_docstring(name: str) -> None:
    assert getattr(errors, name).exit_code == _documented()[name]


def test_exit_codes_are_distinct_per_family() -> None:
    # Direct children of the base each have their own code, except the two "something differed or
    # failed" summaries, which share the generic 1.
    summaries = (errors.TransferFailedError, errors.DifferencesFoundError)
    direct = [c for c in DicomCloudError.__subclasses__() if c not in summaries]
    codes = [c.exit_code for c in direct]
    assert len(codes) == len(set(codes))
    assert 1 not in codes
    assert errors.TransferFailedError.exit_code == DicomCloudError.exit_code == 1
    # Subclasses share their parent's code.
    assert errors.BucketNotFoundError.exit_code == errors.NotFoundError.exit_code
    assert errors.ThrottledError.exit_code == errors.NetworkError.exit_code


def test_cli_help_documents_the_same_codes() -> None:
    for code in {*_documented().values(), errors.EXIT_INTERRUPTED, errors.EXIT_TERMINATED}:
        assert re.search(rf"(^|\s){code}\s", EXIT_CODES_HELP), code


def test_not_found_is_a_file_not_found_error() -> None:
    exc = errors.NotFoundError("gone", hint="look elsewhere")
    assert isinstance(exc, FileNotFoundError)
    assert isinstance(exc, OSError)
    assert str(exc) == "gone"
    assert exc.hint == "look elsewhere"
    with pytest.raises(FileNotFoundError):
        raise errors.BucketNotFoundError("no bucket")


def test_retryable_flags() -> None:
    assert errors.NetworkError("x").retryable
    assert errors.ThrottledError("x").retryable
    assert not errors.IntegrityError("x").retryable
    assert not errors.UsageError("x").retryable


def test_transfer_failed_counts() -> None:
    exc = errors.TransferFailedError("2 of 5 failed", failed=2)
    assert exc.failed == 2
    assert str(exc) == "2 of 5 failed"

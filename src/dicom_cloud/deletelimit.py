"""The limit on what one sync may delete (``--max-delete``): a count, or a share of the tree.

A sync deletes what its source does not have; an empty or wrong source would delete everything.
The plan is checked against the limit before anything changes."""

from __future__ import annotations

import re

from .errors import DeleteLimitError, UsageError

DEFAULT_MAX_DELETE = "50%"


def parse_max_delete(text: str) -> tuple[int | None, float | None]:
    """``"250"`` -> (250, None); ``"50%"`` -> (None, 0.5)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if not match:
        raise UsageError(f"--max-delete {text!r}: expected a count (1000) or a percentage (50%)")
    number, percent = match.groups()
    if percent:
        share = float(number) / 100
        if share > 1:
            raise UsageError(f"--max-delete {text}: more than 100%")
        return None, share
    if "." in number:
        raise UsageError(f"--max-delete {text}: a count is a whole number")
    return int(number), None


def check_delete_limit(deletions: int, total: int, limit: str, where: str) -> None:
    """Refuse (DeleteLimitError) to delete more than the limit allows; nothing has changed yet."""
    if not deletions:
        return
    count, share = parse_max_delete(limit)
    allowed = count if count is not None else int(total * (share or 0.0))
    if deletions > allowed:
        raise DeleteLimitError(
            f"this sync would delete {deletions} of the {total} objects in {where}, more than"
            f" --max-delete {limit} allows; nothing was changed",
            hint="check that the source is the tree you meant (an empty or wrong source deletes"
            " everything); to go ahead, raise the limit, e.g. --max-delete 100%",
        )

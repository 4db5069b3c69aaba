"""A listing cut into partitions of consecutive keys while it streams.

A partition is a key range of the listing (its first and last key) with the items in it: at most
``max_items`` of them and, past its first item, at most ``max_bytes`` (so that a run of large
objects is spread over several workers too). Nothing but the partition being filled is held here:
the caller decides how many partitions are in flight, and the listing waits while it is busy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine.model import TransferItem

#: Objects per partition: enough that a task's overhead (a few milliseconds of scheduling, the
#: worker opening its stores) is small beside its transfers, few enough that a worker lost redoes
#: little and progress moves often.
DEFAULT_PARTITION_ITEMS = 500
#: Bytes per partition (a partition holds at least one object, whatever its size).
DEFAULT_PARTITION_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class Partition:
    """Items ``first_key`` .. ``last_key`` (inclusive) of the listing, in listing order."""

    index: int
    items: tuple[TransferItem, ...]

    @property
    def first_key(self) -> str:
        return self.items[0].src_key

    @property
    def last_key(self) -> str:
        return self.items[-1].src_key

    @property
    def bytes(self) -> int:
        return sum(item.size for item in self.items)


async def partitions(
    items: AsyncIterator[TransferItem],
    *,
    max_items: int = DEFAULT_PARTITION_ITEMS,
    max_bytes: int = DEFAULT_PARTITION_BYTES,
) -> AsyncIterator[Partition]:
    """The partitions of ``items``, each yielded once full (the last one when the listing ends)."""
    if max_items < 1 or max_bytes < 1:
        raise ValueError("a partition holds at least one item")
    batch: list[TransferItem] = []
    size = 0
    index = 0
    async for item in items:
        if batch and (len(batch) >= max_items or size + item.size > max_bytes):
            yield Partition(index, tuple(batch))
            index += 1
            batch = []
            size = 0
        batch.append(item)
        size += item.size
    if batch:
        yield Partition(index, tuple(batch))

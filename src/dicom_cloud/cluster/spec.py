"""``--cluster`` values: ``local:N`` (a cluster of N worker processes on this machine, started and
stopped by the command) or the address of a running Dask scheduler (``tcp://HOST:8786``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

#: Worker processes a local cluster may have (more than a machine's cores only adds contention).
MAX_LOCAL_WORKERS = 256


@dataclass(frozen=True)
class ClusterSpec:
    #: Worker processes to start on this machine (``local:N``); 0 for a remote scheduler.
    local_workers: int = 0
    #: The scheduler's address (``tcp://HOST:PORT``) of a running cluster.
    address: str = ""

    @property
    def is_local(self) -> bool:
        return self.local_workers > 0

    def __str__(self) -> str:
        return f"local:{self.local_workers}" if self.is_local else self.address


def parse_cluster(text: str) -> ClusterSpec:
    if text.startswith("local:"):
        count = text.partition(":")[2]
        if not count.isdigit() or not 1 <= int(count) <= MAX_LOCAL_WORKERS:
            raise UsageError(
                f"--cluster {text}: the number of local workers must be 1 to {MAX_LOCAL_WORKERS}",
                hint="for example --cluster local:4",
            )
        return ClusterSpec(local_workers=int(count))
    scheme, separator, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme in ("tcp", "tls") and separator and host and colon and port.isdigit():
        return ClusterSpec(address=text)
    raise UsageError(
        f"--cluster {text!r} is neither local:N nor a scheduler address",
        hint="--cluster local:4 starts 4 workers here; --cluster tcp://scheduler:8786 uses a running cluster",
    )

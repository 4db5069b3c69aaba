"""Who may talk to the DIMSE face and how: our AE title, the known peers, limits and TLS.

A peer is a remote application entity: its AE title, the address it connects from (and the port it
listens on, for C-MOVE destinations), the tenant its data belongs to and the operations it may ask
for. Peers come from a repeatable flag (``--peer``) and a TOML table (``[[dimse.peers]]``); the
flag form is::

    AE_TITLE@HOST[:PORT][,tenant=NAME][,ops=echo+store+find+move+get]

An association is accepted only from a configured peer calling from its configured address (a
host name is resolved once, at start), or, in development with no peer configured, from any
calling AE on the loopback address. The tenant of an association is the peer's tenant; without
one, the tenant mapped to the called AE title (``called_tenants``), else ``default_tenant``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ..errors import UsageError

Operation = Literal["echo", "store", "find", "move", "get"]
OPERATIONS: Final[tuple[Operation, ...]] = ("echo", "store", "find", "move", "get")
_AE_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.+")


def check_ae_title(title: str, what: str = "AE title") -> str:
    """An AE title as DICOM allows it (1-16 characters, no backslash or control characters)."""
    stripped = title.strip()
    if not stripped or len(stripped) > 16 or not set(stripped) <= _AE_CHARS:
        raise UsageError(
            f"{what} '{title}' is not a valid AE title",
            hint="1 to 16 characters: letters, digits, space, _ - . +",
        )
    return stripped


@dataclass(frozen=True)
class Peer:
    """One remote AE the face knows."""

    ae_title: str
    host: str
    #: Where it listens (needed only to send it instances: C-MOVE destination).
    port: int | None = None
    tenant: str | None = None
    operations: frozenset[Operation] = frozenset(OPERATIONS)
    #: The addresses ``host`` resolved to when the face started.
    addresses: frozenset[str] = field(default=frozenset(), compare=False)

    def allows(self, operation: Operation) -> bool:
        return operation in self.operations


def parse_peer(text: str) -> Peer:
    """``AE@HOST[:PORT][,tenant=T][,ops=a+b]`` -> Peer (UsageError naming the problem)."""
    head, *options = [p.strip() for p in text.split(",")]
    ae, at, address = head.partition("@")
    if not at or not address:
        raise UsageError(f"peer '{text}' is not AE@HOST[:PORT]", hint="e.g. CT1@10.0.0.5:104,tenant=a")
    host, port = address, None
    if address.startswith("["):  # [IPv6]:port
        inner, _, rest = address[1:].partition("]")
        host, port = inner, rest.lstrip(":") or None
    elif address.count(":") == 1:
        host, port = address.split(":")
    values: dict[str, str] = {}  # tenant, ops
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in ("tenant", "ops"):
            raise UsageError(
                f"peer '{text}': unknown option '{option}'", hint="use tenant=NAME, ops=store+find"
            )
        values[key] = value
    return peer_from_mapping(
        {
            "ae_title": ae,
            "host": host,
            "port": port,
            "tenant": values.get("tenant"),
            "operations": str(values["ops"]).split("+") if "ops" in values else None,
        },
        where=f"peer '{text}'",
    )


def peer_from_mapping(table: Mapping[str, object], where: str = "peer") -> Peer:
    """A peer from a TOML table: ae_title, host, port, tenant, operations."""
    unknown = set(table) - {"ae_title", "host", "port", "tenant", "operations"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    ae = check_ae_title(str(table.get("ae_title") or ""), f"{where}: AE title")
    host = str(table.get("host") or "").strip()
    if not host:
        raise UsageError(f"{where}: host is missing")
    raw_port = table.get("port")
    port: int | None = None
    if raw_port not in (None, ""):
        try:
            port = int(str(raw_port))
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise UsageError(f"{where}: port must be 1-65535")
    ops_value = table.get("operations")
    if ops_value is None:
        operations = frozenset(OPERATIONS)
    else:
        names = [str(o).strip().lower() for o in (ops_value if isinstance(ops_value, list) else [ops_value])]
        bad = [n for n in names if n not in OPERATIONS]
        if bad or not names:
            raise UsageError(
                f"{where}: unknown operation(s) {', '.join(bad) or 'none'}",
                hint="operations: " + ", ".join(OPERATIONS),
            )
        operations = frozenset(n for n in OPERATIONS if n in names)
    tenant = table.get("tenant")
    return Peer(ae, host, port, str(tenant) if tenant else None, operations)


def _resolve(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        raise UsageError(f"peer host '{host}' does not resolve") from None
    return frozenset(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])) for info in infos)


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass(frozen=True)
class DimseSettings:
    """Everything the DIMSE face reads at start-up."""

    ae_title: str = "DICOMCLOUD"
    host: str = "127.0.0.1"
    port: int = 11112
    environment: Literal["development", "production"] = "development"
    peers: tuple[Peer, ...] = ()
    #: Tenant of associations whose peer names none, by called AE title (our titles besides ae_title).
    called_tenants: Mapping[str, str] = field(default_factory=dict)
    default_tenant: str = "default"
    #: Associations open at once; more are refused (transient, local limit exceeded).
    max_associations: int = 16
    #: Largest P-DATA PDU we accept (0: no limit); peers are told in the association.
    max_pdu: int = 65536
    #: Bytes of received instances being stored at once, all associations together.
    max_bytes_in_flight: int = 256 * 1024**2
    #: Seconds a C-STORE waits for its share of max_bytes_in_flight before 0xA700 (out of resources).
    memory_wait_seconds: float = 30.0
    #: Seconds without a message before an idle association is closed.
    idle_timeout: float = 60.0
    tls_cert: str | None = None
    tls_key: str | None = None
    #: With a CA file, callers must present a certificate it signed (mutual TLS).
    tls_ca: str | None = None

    def check(self) -> DimseSettings:
        """Validated copy with peer addresses resolved; UsageError on bad values."""
        check_ae_title(self.ae_title)
        for title in self.called_tenants:
            check_ae_title(title, "called AE title")
        if not 0 <= self.port < 65536:
            raise UsageError("the DICOM port must be 0-65535")
        if self.max_associations < 1 or self.max_bytes_in_flight < 1024**2:
            raise UsageError("max associations must be >= 1 and bytes in flight >= 1 MiB")
        if self.max_pdu and self.max_pdu < 4096:
            raise UsageError("max PDU must be 0 (unlimited) or at least 4096 bytes")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("DICOM TLS needs both a certificate and its key file")
        if self.tls_ca and not self.tls_cert:
            raise UsageError("a TLS CA file (client certificates) needs the server's certificate and key")
        if self.environment == "production" and not self.peers:
            raise UsageError(
                "the DICOM face in production needs configured peers",
                hint="add --peer AE@HOST[:PORT],tenant=T (or [[dimse.peers]] in the config file)",
            )
        titles = [p.ae_title for p in self.peers]
        if len(set(titles)) != len(titles):
            raise UsageError("a peer AE title is configured twice")
        resolved = tuple(
            Peer(p.ae_title, p.host, p.port, p.tenant, p.operations, _resolve(p.host)) for p in self.peers
        )
        return DimseSettings(**{**self.__dict__, "peers": resolved})

    @property
    def open_to_loopback(self) -> bool:
        """Development with no peer: any calling AE from the loopback address is accepted."""
        return self.environment == "development" and not self.peers

    def peer(self, ae_title: str) -> Peer | None:
        for peer in self.peers:
            if peer.ae_title == ae_title.strip():
                return peer
        return None

    def tenant_for(self, peer: Peer | None, called_ae: str) -> str:
        if peer is not None and peer.tenant:
            return peer.tenant
        return self.called_tenants.get(called_ae.strip(), self.default_tenant)

    def answers_to(self, called_ae: str) -> bool:
        return called_ae.strip() == self.ae_title or called_ae.strip() in self.called_tenants


def peers_from(flags: Sequence[str], tables: Sequence[Mapping[str, object]]) -> tuple[Peer, ...]:
    """Peers of the TOML tables, then of the flags (a flag replaces a table entry of the same AE)."""
    by_title: dict[str, Peer] = {}
    for i, table in enumerate(tables):
        peer = peer_from_mapping(table, where=f"dimse.peers[{i}]")
        by_title[peer.ae_title] = peer
    for text in flags:
        peer = parse_peer(text)
        by_title[peer.ae_title] = peer
    return tuple(by_title.values())

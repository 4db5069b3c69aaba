"""The DIMSE face (DICOM's network protocol, PS3.7/PS3.8) over pynetdicom: the archive's C-ECHO,
C-STORE, C-FIND, C-MOVE and C-GET SCP, and ``receive``'s C-STORE router into a bucket.

Modules: ``config`` (our AE, peers, limits, TLS), ``scp`` (the listener, the association gate,
the bridge to the event loop), ``store``, ``find``, ``retrieve`` (C-MOVE, C-GET) for the archive,
``face`` (the archive's listener, alone or beside the service), ``receive`` (the router).
Specification: docs/dimse.md.
"""

from __future__ import annotations

from .config import DimseSettings, Peer, parse_peer

__all__ = ["DimseSettings", "Peer", "parse_peer"]

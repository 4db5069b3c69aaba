"""Which certificate authorities our HTTPS clients trust, and the error when a server's
certificate is refused.

Three HTTP stacks speak TLS: obstore's (Rust, rustls with the system's trust store), the ranged
reader's (``http.client`` with ``ssl.create_default_context()``), and ``requests`` (resumable
uploads, Azure block lists), which trusts its own bundle (certifi) unless told otherwise. The first
two read ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` as OpenSSL does; :func:`ca_bundle` hands the same to
``requests``, so that a site's own CA, named once, is trusted by all three (docs/credentials.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UntrustedCertificateError


def ca_bundle() -> str | bool:
    """``requests``' ``verify`` for one request: the CA file (or directory) that ``SSL_CERT_FILE``
    (or ``SSL_CERT_DIR``) names, which the other two clients trust; else True (requests' own
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE``, else its bundle). Given per request, the path
    wins over requests' variables, which some systems set to their default bundle. A name that
    does not exist is passed over, as the other two clients pass it over."""
    for variable in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        path = os.environ.get(variable)
        if path and Path(path).exists():
            return path
    return True


def untrusted_certificate(endpoint: str, reason: str) -> UntrustedCertificateError:
    """The error for a TLS certificate of ``endpoint`` that verification refused (``reason``:
    the verifier's words, e.g. "unable to get local issuer certificate" or "UnknownIssuer")."""
    return UntrustedCertificateError(
        f"the TLS certificate of {endpoint} is not trusted ({reason})",
        hint="if the server uses your own certificate authority, set SSL_CERT_FILE to its "
        "certificate (PEM); check that the endpoint's name matches the certificate",
    )

"""JWT bearer tokens from an OIDC issuer: keys from a JWKS served on loopback, generated in the test."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from dicom_cloud.service.auth import Authenticator, OidcVerifier, Principal, bearer_credential
from dicom_cloud.service.http_errors import UnauthenticatedError


class Issuer:
    """An OIDC issuer on 127.0.0.1: discovery document and JWKS; keys can be rotated."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.jwks_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_requests += 1
                    body = {"keys": [issuer.public_jwk(kid) for kid in issuer.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_key(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def public_jwk(self, kid: str) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key()))
        jwk.update(kid=kid, use="sig", alg="RS256")
        return jwk

    def token(self, kid: str = "k1", **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": self.url, "aud": "dicom-cloud", "sub": "user-1", "iat": now, "exp": now + 300}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    server = Issuer()
    server.add_key("k1")
    yield server
    server.server.shutdown()


def verifier(issuer: Issuer, **overrides: Any) -> OidcVerifier:
    options: dict[str, Any] = dict(
        issuer=issuer.url,
        audience="dicom-cloud",
        jwks_url=None,
        tenant_claim="tenant",
        scope_claim="scope",
        algorithms=("RS256",),
        ttl=300.0,
    )
    options.update(overrides)
    return OidcVerifier(**options)


def verify(v: OidcVerifier, token: str) -> Principal:
    return asyncio.run(v.verify(token))


def test_valid_token_gives_tenant_and_implied_scopes(issuer: Issuer) -> None:
    principal = verify(verifier(issuer), issuer.token(tenant="acme", scope="openid write"))
    assert principal == Principal("acme", frozenset({"read", "write"}), "user-1", "jwt")


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "refused"),
        ({"iss": "https://other.example"}, "refused"),
        ({"tenant": None}, "tenant"),
    ],
)
def test_refused_claims(issuer: Issuer, claims: dict[str, Any], message: str) -> None:
    claims.setdefault("tenant", "acme")
    claims = {k: v for k, v in claims.items()}
    token = issuer.token(**claims)
    with pytest.raises(UnauthenticatedError, match=message):
        verify(verifier(issuer), token)


def test_forged_signature_and_unknown_keys_are_refused(issuer: Issuer) -> None:
    good = issuer.token(tenant="acme", scope="read")
    header, payload, _ = good.split(".")
    other = Issuer()
    other.add_key("k1")
    forged = other.token(tenant="acme", scope="admin")
    with pytest.raises(UnauthenticatedError):
        verify(verifier(issuer), forged)
    with pytest.raises(UnauthenticatedError):
        verify(verifier(issuer), f"{header}.{payload}.AAAA")
    none_alg = jwt.encode({"iss": issuer.url, "tenant": "acme"}, None, algorithm="none")
    with pytest.raises(UnauthenticatedError):
        verify(verifier(issuer), none_alg)
    other.server.shutdown()


def test_rotated_keys_are_fetched_again(issuer: Issuer) -> None:
    v = verifier(issuer, refetch_cooldown=0.0)

    async def both() -> tuple[Principal, Principal]:
        first = await v.verify(issuer.token(tenant="acme", scope="read"))
        issuer.add_key("k2")
        second = await v.verify(issuer.token("k2", tenant="acme", scope="read"))
        return first, second

    first, second = asyncio.run(both())
    assert first.tenant == second.tenant == "acme"
    assert issuer.jwks_requests == 2


def test_unreachable_issuer_is_401_not_500() -> None:
    v = OidcVerifier("http://127.0.0.1:9", None, None, "tenant", "scope", ("RS256",), 300.0)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"iss": "x", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    with pytest.raises(UnauthenticatedError):
        verify(v, token)


def test_authenticator_routes_jwts_and_secrets(issuer: Issuer) -> None:
    async def resolve(secret: str) -> Principal | None:
        return Principal("t", frozenset({"read"}), "1", "token") if secret == "dct_good" else None

    auth = Authenticator(resolve, verifier(issuer))

    async def run() -> None:
        assert (await auth.authenticate("dct_good")).kind == "token"
        assert (await auth.authenticate(issuer.token(tenant="acme", scope="read"))).kind == "jwt"
        for bad in (None, "", "dct_bad"):
            with pytest.raises(UnauthenticatedError):
                await auth.authenticate(bad)

    asyncio.run(run())
    assert bearer_credential("bearer  abc ") == "abc"
    assert bearer_credential(None) is None
    with pytest.raises(UnauthenticatedError):
        bearer_credential("Basic dXNlcjpwYXNz")

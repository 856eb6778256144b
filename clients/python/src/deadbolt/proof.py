"""Signed grants: the offline check a protected resource makes of a grant's
``proof`` (a server started with ``deadbolt serve --sign-grants``).

A proof is an EdDSA (Ed25519) JWS in compact form:
``base64url(header) "." base64url(payload) "." base64url(signature)``; the
format is in docs/protocol.md, "Signed grants". Checking one needs the
``cryptography`` package (``pip install 'deadbolt[proof]'``)::

    keys = deadbolt.proof.parse_public_keys(open("deadbolt-pubkey.json").read())
    statement = deadbolt.proof.verify(lock.proof, keys, key="job/42")
    write(statement.token)
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Union

#: The payload version this module reads.
PROOF_VERSION = 1
#: Longest proof read (as the server's own check).
PROOF_BYTES_MAX = 8 * 1024


class ProofError(Exception):
    """Why a proof was refused. ``code``: ``malformed``, ``unknown_key``
    (signed by a key not given), ``bad_signature`` (changed or forged),
    ``expired``, ``other_grant`` (not the expected key or token)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"proof refused: {code}: {message}")
        self.code = code


@dataclass(frozen=True)
class Statement:
    """What a valid proof states: one grant of one lock."""

    key: str
    token: int
    client: str
    mode: str
    granted_at_ms: int
    ttl_ms: int

    @property
    def expires_at_ms(self) -> int:
        """When the lease ends, in ms since the Unix epoch."""
        return self.granted_at_ms + self.ttl_ms


def _b64decode(text: str) -> bytes:
    if not isinstance(text, str) or not all(c.isalnum() or c in "-_" for c in text):
        raise ProofError("malformed", "not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as error:
        raise ProofError("malformed", f"not base64url: {error}") from None


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def key_id(raw: bytes) -> str:
    """The ``kid`` of a 32-byte Ed25519 public key: base64url of the first 8
    bytes of its SHA-256."""
    return _b64encode(hashlib.sha256(raw).digest()[:8])


def parse_public_keys(keys: Union[str, dict, Iterable[Any]]) -> List[bytes]:
    """The 32-byte Ed25519 keys in ``keys``: a JSON Web Key Set (as ``GET
    /pubkey`` serves, parsed or as text), one JWK, a base64url key, or a
    list of these."""
    if isinstance(keys, str):
        text = keys.strip()
        if text.startswith("{"):
            return parse_public_keys(json.loads(text))
        raw = _b64decode(text.rstrip("="))
        if len(raw) != 32:
            raise ProofError("malformed", f"an Ed25519 public key is 32 bytes, not {len(raw)}")
        return [raw]
    if isinstance(keys, dict):
        if isinstance(keys.get("keys"), list):
            return parse_public_keys(keys["keys"])
        if keys.get("kty") == "OKP" and keys.get("crv") == "Ed25519":
            return parse_public_keys(str(keys.get("x", "")))
        return []
    return [raw for item in keys for raw in parse_public_keys(item)]


def _part(text: str, name: str) -> dict:
    try:
        value = json.loads(_b64decode(text).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProofError("malformed", f"{name} is not JSON") from None
    if not isinstance(value, dict):
        raise ProofError("malformed", f"{name} is not a JSON object")
    return value


def verify(
    proof: str,
    keys: Union[str, dict, Iterable[Any]],
    now_ms: Optional[int] = None,
    key: Optional[str] = None,
    token: Optional[int] = None,
) -> Statement:
    """Checks ``proof`` against the trusted ``keys`` (see
    :func:`parse_public_keys`) at ``now_ms`` (default: the wall clock):
    its signature, its version, that its lease has not ended, and, if
    given, that it is the grant of ``key`` and ``token``. Returns what it
    states; raises :class:`ProofError`."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("checking proofs needs `cryptography`: pip install 'deadbolt[proof]'") from error
    if not isinstance(proof, str) or len(proof) > PROOF_BYTES_MAX:
        raise ProofError("malformed", "not a proof")
    parts = proof.strip().split(".")
    if len(parts) != 3:
        raise ProofError("malformed", "not three base64url parts joined by `.`")
    header_text, payload_text, signature_text = parts
    header = _part(header_text, "header")
    if header.get("alg") != "EdDSA":
        raise ProofError("malformed", f"alg {header.get('alg')!r} (only EdDSA is accepted)")
    kid = header.get("kid")
    signer = next((raw for raw in parse_public_keys(keys) if key_id(raw) == kid), None)
    if signer is None:
        raise ProofError("unknown_key", f"signed by key {kid}, which is not among the keys given")
    try:
        Ed25519PublicKey.from_public_bytes(signer).verify(
            _b64decode(signature_text), f"{header_text}.{payload_text}".encode("ascii")
        )
    except InvalidSignature:
        raise ProofError("bad_signature", "the signature does not match (a changed or forged proof)") from None
    payload = _part(payload_text, "payload")
    if payload.get("v") != PROOF_VERSION:
        raise ProofError("malformed", f"version {payload.get('v')} (this reads {PROOF_VERSION})")
    try:
        statement = Statement(
            key=str(payload["key"]),
            token=int(payload["token"]),
            client=str(payload["client"]),
            mode=str(payload["mode"]),
            granted_at_ms=int(payload["granted_at_ms"]),
            ttl_ms=int(payload["ttl_ms"]),
        )
    except (KeyError, TypeError, ValueError):
        raise ProofError("malformed", "the payload lacks a field") from None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if now >= statement.expires_at_ms:
        ago = now - statement.expires_at_ms
        raise ProofError("expired", f"the lease ended at {statement.expires_at_ms}, {ago} ms ago")
    if key is not None and key != statement.key:
        raise ProofError("other_grant", f"the proof is for key {statement.key!r}, not {key!r}")
    if token is not None and token != statement.token:
        raise ProofError("other_grant", f"the proof is for token {statement.token}, not {token}")
    return statement

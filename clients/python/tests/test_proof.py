"""Signed grants in the Python client, against a real server started with
--sign-grants: a real grant's proof verifies with the key GET /pubkey
serves; tampered, other-key, other-lock and expired proofs are refused."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from conftest import Server
from test_client import run_async, unique

import deadbolt
from deadbolt.proof import ProofError, verify


@pytest.fixture
def signing(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path / "data", extra=["--sign-grants"])
    yield running
    running.stop()


def pubkey(server: Server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/pubkey", timeout=5) as answer:
        return answer.read().decode()


def tampered(proof: str) -> str:
    at = proof.index(".") + 5
    return proof[:at] + ("B" if proof[at] == "A" else "A") + proof[at + 1:]


def refused(code: str, *args, **kwargs) -> None:
    with pytest.raises(ProofError) as caught:
        verify(*args, **kwargs)
    assert caught.value.code == code, str(caught.value)


@run_async
async def test_a_real_grant_verifies_and_changed_other_and_expired_proofs_are_refused(signing: Server, tmp_path: Path) -> None:
    keys = pubkey(signing)
    client = await deadbolt.connect(signing.url)
    try:
        key = unique("py/proof")
        lock = await client.lock(key, ttl=20)
        assert isinstance(lock.proof, str)
        statement = verify(lock.proof, keys, key=key, token=lock.token)
        assert (statement.token, statement.client, statement.mode) == (lock.token, client.client_id, "exclusive")
        assert statement.ttl_ms == 20_000
        assert abs(statement.granted_at_ms - time.time() * 1000) < 5_000
        refused("bad_signature", tampered(lock.proof), keys)
        refused("other_grant", lock.proof, keys, key="py/other")
        refused("other_grant", lock.proof, keys, token=lock.token + 1)
        refused("expired", lock.proof, keys, now_ms=statement.expires_at_ms)
        refused("malformed", "not a proof", keys)
        other = Server(tmp_path / "other", extra=["--sign-grants"])
        try:
            refused("unknown_key", lock.proof, pubkey(other))
        finally:
            other.stop()
        await lock.unlock()
    finally:
        await client.close()

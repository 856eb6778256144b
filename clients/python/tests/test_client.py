"""The Python client against the real server."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from typing import Any, Awaitable, Callable, List, Tuple, TypeVar

import pytest

import deadbolt
from deadbolt import sync

T = TypeVar("T")


def run_async(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Runs an async test on a fresh event loop, with a time limit."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 30))

    return wrapper


def unique(name: str) -> str:
    return f"{name}/{uuid.uuid4().hex[:8]}"


@run_async
async def test_lock_as_a_context_manager_holds_a_token_and_releases_at_the_end(server: Any) -> None:
    key = unique("job")
    async with await deadbolt.connect(server.url) as client:
        async with client.lock(key, ttl=30) as lock:
            assert lock.token > 0
            assert 0 < lock.valid_for() <= 30
            assert lock.is_held()
            info = await client.inspect(key)
            assert info.holder is not None
            assert info.holder.token == lock.token
            assert info.holder.client == client.client_id
        assert (await client.inspect(key)).holder is None


@run_async
async def test_valid_for_is_conservative_and_runs_out_without_renewal(server: Any) -> None:
    key = unique("short")
    async with await deadbolt.connect(server.url) as client:
        lock = await client.lock(key, ttl=0.3, auto_renew=False)
        # Below the lease by the drift margin (1 % + 2 ms) at least.
        assert lock.valid_for() <= 0.3 - 0.005
        started = time.monotonic()
        await lock.lost()
        assert not lock.is_held()
        assert time.monotonic() - started < 0.3
        with pytest.raises(deadbolt.NotHeld):
            await asyncio.sleep(0.05)
            await lock.unlock()


@run_async
async def test_try_lock_and_bounded_waits_on_a_held_key(server: Any) -> None:
    key = unique("held")
    async with await deadbolt.connect(server.url) as holder, await deadbolt.connect(server.url) as other:
        lock = await holder.lock(key, ttl=30)
        assert await other.try_lock(key, ttl=30) is None
        started = time.monotonic()
        assert await other.try_lock(key, ttl=30, wait=0.2) is None
        assert time.monotonic() - started >= 0.15
        with pytest.raises(deadbolt.Timeout) as timed_out:
            await other.lock(key, ttl=30, wait=0.1)
        assert timed_out.value.code == "timeout"
        with pytest.raises(deadbolt.Busy):
            await other.lock(key, ttl=30, wait=0)
        # The holder itself gets its grant back (a safe retry), same token.
        again = await holder.try_lock(key, ttl=30)
        assert again is not None and again.token == lock.token
        again.detach()
        await lock.unlock()
        taken = await other.try_lock(key, ttl=30)
        assert taken is not None and taken.token > lock.token
        await taken.unlock()


@run_async
async def test_shared_locks_semaphores_and_a_lock_delay(server: Any) -> None:
    key, pool, delayed = unique("shared"), unique("pool"), unique("delayed")
    async with await deadbolt.connect(server.url) as a, await deadbolt.connect(server.url) as b, await deadbolt.connect(server.url) as c:
        # Readers share the key; a writer waits for both.
        first = await a.lock(key, ttl=30, shared=True)
        second = await b.lock(key, ttl=30, shared=True)
        assert first.token != second.token
        info = await c.inspect(key)
        assert [h.mode for h in info.holders] == ["shared", "shared"]
        assert info.holder is not None and info.holder.client == info.holders[0].client
        assert await c.try_lock(key, ttl=30) is None
        await first.unlock()
        await second.unlock()
        writer = await c.try_lock(key, ttl=30)
        assert writer is not None
        await writer.unlock()
        # A semaphore of 2 permits admits two holders, not a third, and a
        # disagreeing limit is a conflict.
        permits = [await a.lock(pool, ttl=30, limit=2), await b.lock(pool, ttl=30, limit=2)]
        assert (await c.inspect(pool)).limit == 2
        assert await c.try_lock(pool, ttl=30, limit=2) is None
        with pytest.raises(deadbolt.Conflict):
            await c.lock(pool, ttl=30, limit=3, wait=0)
        for permit in permits:
            await permit.unlock()
        # A lease that runs out keeps the key from everyone for the delay.
        paused = await a.lock(delayed, ttl=0.1, lock_delay=0.6, auto_renew=False)
        paused.detach()
        await asyncio.sleep(0.25)
        assert await b.try_lock(delayed, ttl=30) is None
        taken = await b.lock(delayed, ttl=30, wait=5)
        assert taken.token > paused.token
        await taken.unlock()
        # Bad kinds are refused before anything is sent.
        with pytest.raises(ValueError):
            a.lock(key, ttl=30, shared=True, limit=2)
        with pytest.raises(ValueError):
            a.lock(key, ttl=30, limit=0)
        with pytest.raises(ValueError):
            a.lock(key, ttl=30, lock_delay=61)


@run_async
async def test_two_workers_hand_a_lock_over_first_come_first_served(server: Any) -> None:
    key = unique("handoff")
    order: List[Tuple[str, int]] = []
    async with await deadbolt.connect(server.url) as a, await deadbolt.connect(server.url) as b, await deadbolt.connect(server.url) as c:
        first = await a.lock(key, ttl=30)

        async def take(client: deadbolt.Client, name: str) -> None:
            async with client.lock(key, ttl=30) as lock:
                order.append((name, lock.token))
                await asyncio.sleep(0.05)

        waiting_b = asyncio.ensure_future(take(b, "b"))
        await asyncio.sleep(0.1)
        waiting_c = asyncio.ensure_future(take(c, "c"))
        await asyncio.sleep(0.1)
        assert (await a.inspect(key)).waiters == 2
        await first.unlock()
        await asyncio.gather(waiting_b, waiting_c)
        assert [name for name, _ in order] == ["b", "c"]
        tokens = [first.token] + [token for _, token in order]
        assert tokens == sorted(tokens) and len(set(tokens)) == 3


@run_async
async def test_an_expired_lease_passes_the_lock_to_the_waiter_and_signals_lost(server: Any) -> None:
    key = unique("expiry")
    async with await deadbolt.connect(server.url) as a, await deadbolt.connect(server.url) as b:
        stale = await a.lock(key, ttl=0.3, auto_renew=False)
        successor = await b.lock(key, ttl=30, wait=5)
        assert successor.token > stale.token
        assert not stale.is_held()
        await asyncio.wait_for(stale.lost(), 1)
        with pytest.raises(deadbolt.NotHeld):
            await stale.unlock()
        await successor.unlock()


@run_async
async def test_auto_renewal_keeps_a_short_lease_and_lost_fires_when_it_is_taken_away(server: Any) -> None:
    key = unique("renew")
    async with await deadbolt.connect(server.url) as holder, await deadbolt.connect(server.url) as admin:
        lock = await holder.lock(key, ttl=0.3)
        await asyncio.sleep(1.0)  # Three leases.
        assert lock.is_held()
        info = await admin.inspect(key)
        assert info.holder is not None and info.holder.token == lock.token
        # Another process ends the grant by its token: renewal finds out.
        await admin.unlock(key, lock.token)
        await asyncio.wait_for(lock.lost(), 1)
        assert not lock.is_held()


@run_async
async def test_a_cancelled_wait_leaves_the_queue(server: Any) -> None:
    key = unique("cancel")
    async with await deadbolt.connect(server.url) as a, await deadbolt.connect(server.url) as b:
        lock = await a.lock(key, ttl=30)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.lock(key, ttl=30), 0.2)
        await asyncio.sleep(0.1)
        assert (await a.inspect(key)).waiters == 0
        await lock.unlock()
        assert (await a.inspect(key)).holder is None


@run_async
async def test_two_workers_deduplicate_a_set_each_key_owned_once(server: Any) -> None:
    name = unique("results")
    keys_a = [f"r{i}" for i in range(0, 1500)]
    keys_b = [f"r{i}" for i in range(1000, 2500)]
    async with await deadbolt.connect(server.url) as a, await deadbolt.connect(server.url) as b:
        created = await a.set(name).set_up(ttl=60)
        assert created.created
        assert not (await b.set(name).set_up(ttl=60)).created
        got_a, got_b = await asyncio.gather(a.set(name).insert_many(keys_a), b.set(name).insert_many(keys_b))
        owned_a = {k for k, r in zip(keys_a, got_a) if r.first}
        owned_b = {k for k, r in zip(keys_b, got_b) if r.first}
        assert not owned_a & owned_b
        assert owned_a | owned_b == set(keys_a) | set(keys_b)
        index_a = {k: r.index for k, r in zip(keys_a, got_a)}
        index_b = {k: r.index for k, r in zip(keys_b, got_b)}
        assert all(index_a[k] == index_b[k] for k in set(keys_a) & set(keys_b))
        # A retry by the owner keeps `first`; anyone else's says no.
        again = await a.set(name).insert("r1200")
        assert again.first == ("r1200" in owned_a) and again.index == index_a["r1200"]
        members = [m async for m in a.set(name).members(page=700)]
        assert [m.index for m in members] == list(range(1, 2501))
        assert {m.key for m in members} == set(keys_a) | set(keys_b)
        assert (await a.set(name).inspect()).size == 2500
        assert await a.set(name).tear_down() == 2500


@run_async
async def test_errors_are_typed_by_their_wire_code(server: Any) -> None:
    async with await deadbolt.connect(server.url) as client:
        with pytest.raises(deadbolt.BadRequest) as bad:
            await client.inspect("")
        assert bad.value.code == "bad_request" and "key" in bad.value.message
        with pytest.raises(deadbolt.NoSuchSet):
            await client.set(unique("never")).insert("x")
        with pytest.raises(deadbolt.NotHeld):
            await client.unlock(unique("free"), 12345)
        with pytest.raises(ValueError):
            client.lock("k", ttl=0)
        assert isinstance(deadbolt.Timeout("x"), TimeoutError)


@run_async
async def test_an_unreachable_server_fails_within_the_retry_budget() -> None:
    started = time.monotonic()
    with pytest.raises(deadbolt.ConnectionLost):
        await deadbolt.connect("ws://127.0.0.1:1/ws", retry_for=0.3)
    assert time.monotonic() - started < 5


@run_async
async def test_a_restarted_server_is_reconnected_to_with_the_same_client_id(own_server: Any) -> None:
    client_id = uuid.uuid4().hex
    async with await deadbolt.connect(own_server.url, client_id=client_id) as client:
        lock = await client.lock("kept", ttl=30, auto_renew=False)
        results = client.set("kept")
        await results.set_up(ttl=60)
        inserted = await results.insert("only-once")
        assert inserted.first
        own_server.kill()

        async def restart_later() -> None:
            await asyncio.sleep(0.5)
            await asyncio.get_running_loop().run_in_executor(None, own_server.start)

        restarting = asyncio.ensure_future(restart_later())
        # Sent while the server is down: retried until it is back.
        retried = await results.insert("only-once")
        await restarting
        assert retried == inserted
        # The grant survived (durable server); a re-lock is the same grant.
        relocked = await client.try_lock("kept", ttl=30, auto_renew=False)
        assert relocked is not None and relocked.token == lock.token
        relocked.detach()
        await lock.unlock()


@run_async
async def test_a_second_url_is_used_when_the_first_cannot_be_reached(server: Any) -> None:
    async with await deadbolt.connect(["ws://127.0.0.1:1/ws", server.url]) as client:
        await client.ping()
        assert (await client.inspect(unique("any"))).holder is None


def test_the_sync_wrapper_for_scripts(server: Any) -> None:
    key = unique("script")
    with sync.connect(server.url) as client:
        with client.lock(key, ttl=0.3) as lock:
            time.sleep(0.5)  # Renewed by the background loop meanwhile.
            assert lock.is_held()
            assert client.inspect(key).holder is not None
        assert client.inspect(key).holder is None
        taken = client.try_lock(key, ttl=5)
        assert taken is not None
        taken.unlock()
        results = client.set(unique("sync"))
        results.set_up(ttl=60)
        assert [r.first for r in results.insert_many(["a", "b", "a"])] == [True, True, True]
        assert [(m.index, m.key) for m in results.members()] == [(1, "a"), (2, "b")]


@run_async
async def test_over_quic_a_stream_per_request_with_the_servers_certificate(server: Any) -> None:
    key = unique("quic")
    async with await deadbolt.connect(server.quic_url, ca=server.cert) as client, await deadbolt.connect(server.url) as ws:
        async with client.lock(key, ttl=0.3) as lock:
            await asyncio.sleep(0.5)  # Renewed over QUIC.
            assert lock.is_held()
            info = await ws.inspect(key)
            assert info.holder is not None and info.holder.client == client.client_id
            # A waiting lock cancelled by its task resets its stream: the
            # server drops the waiter.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(ws.lock(key, ttl=5), 0.2)
        held = await ws.lock(key, ttl=30)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.lock(key, ttl=30), 0.2)
        await asyncio.sleep(0.1)
        assert (await ws.inspect(key)).waiters == 0
        await held.unlock()
        results = client.set(unique("quic-set"))
        await results.set_up(ttl=60)
        got = await results.insert_many([f"k{i}" for i in range(2500)])
        assert [r.index for r in got] == list(range(1, 2501))
        assert len([m async for m in results.members()]) == 2500
        with pytest.raises(deadbolt.NoSuchSet):
            await client.set(unique("none")).inspect()


@run_async
async def test_quic_refuses_an_untrusted_certificate_unless_insecure(server: Any) -> None:
    with pytest.raises(deadbolt.ConnectionLost):
        await deadbolt.connect(server.quic_url, retry_for=0.2)
    async with await deadbolt.connect(server.quic_url, insecure=True) as client:
        await client.ping()


def test_the_server_and_client_id_come_from_the_environment_as_for_the_cli(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEADBOLT_SERVER", f"ws://127.0.0.1:1/ws,{server.url}")
    monkeypatch.setenv("DEADBOLT_CLIENT_ID", "rerun-of-job-7")
    with sync.connect() as client:
        assert client.client_id == "rerun-of-job-7"
        key = unique("env")
        lock = client.lock(key, ttl=30)
        assert client.inspect(key).holder.client == "rerun-of-job-7"  # type: ignore[union-attr]
        lock.unlock()


def test_bad_urls_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="quic://HOST:PORT"):
        deadbolt.Client("quic://no-port")
    with pytest.raises(ValueError, match="ws://HOST:PORT/ws"):
        deadbolt.Client("http://127.0.0.1:7420")


@run_async
async def test_a_secret_is_said_in_hello_to_a_server_with_auth(auth_server: Any) -> None:
    with pytest.raises(deadbolt.Unauthorized):
        await deadbolt.connect(auth_server.url, retry_for=0.5)
    client = await deadbolt.connect(auth_server.url, auth="workers-secret")
    try:
        lock = await client.try_lock("jobs/py", ttl=30)
        assert lock is not None and lock.token > 0
        with pytest.raises(deadbolt.Unauthorized):
            await client.try_lock("other", ttl=30)
        await lock.unlock()
        assert "workers-secret" not in repr(client)
    finally:
        await client.close()


@run_async
async def test_wss_with_the_servers_certificate_and_a_secret(server: Any, tmp_path: Any) -> None:
    from conftest import AUTH_POLICY, Server

    policy = tmp_path / "auth.toml"
    policy.write_text(AUTH_POLICY)
    # The shared server runs QUIC, so its data directory holds the
    # self-signed certificate QUIC uses: serve wss:// with the same pair.
    key = server.cert.replace("cert.pem", "key.pem")
    tls = Server(
        tmp_path / "data",
        extra=["--auth", str(policy), "--tls-cert", server.cert, "--tls-key", key],
    )
    try:
        assert tls.url.startswith("wss://"), tls.url
        url = tls.url.replace("127.0.0.1", "localhost")
        client = await deadbolt.connect(url, ca=server.cert, auth="workers-secret")
        try:
            lock = await client.try_lock("jobs/wss", ttl=30)
            assert lock is not None
            await lock.unlock()
        finally:
            await client.close()
    finally:
        tls.stop()

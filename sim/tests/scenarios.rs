//! Scripted scenarios for the rules that random seeds reach rarely, each a
//! short turmoil script against the real server assembly: cut, assert,
//! repair, assert.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::EngineConfig;
use deadbolt_core::client::LockOptions;
use deadbolt_core::proto::{ErrorCode, Inserted, Keys, Okay, Op, SetOp};
use deadbolt_sim::scenario::SET;
use deadbolt_sim::script::{
    Log, SCRIPT_SHARDS, SERVER, add_server, connect, connect_as, step_until, world,
};
use deadbolt_sim::trace::Trace;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Asserts that no shard invariant broke during the script, and that the
/// server kept its own order and timing rules (`server_checker`).
fn assert_invariants_kept(trace: &Trace, log: &Log) {
    assert_eq!(trace.broken(), Vec::new(), "log:\n{}", log.dump());
    let engine = EngineConfig {
        shards: SCRIPT_SHARDS,
        ..EngineConfig::new()
    };
    assert_eq!(
        trace.check_server(&engine),
        Vec::new(),
        "log:\n{}",
        log.dump()
    );
}

#[test]
fn a_partitioned_holder_loses_its_lease_to_a_waiter_and_its_stale_unlock_is_refused()
-> turmoil::Result {
    let mut sim = world(1);
    let trace = Arc::new(Trace::default());
    add_server(&mut sim, &trace);
    let log = Log::default();
    let tokens = Arc::new(Mutex::new((0u64, 0u64)));

    let (holder_log, holder_tokens) = (log.clone(), tokens.clone());
    sim.client("holder", async move {
        let client = connect().await?;
        let token = client.lock("k", ms(1000)).await?.detach();
        holder_tokens.lock().expect("tokens").0 = token;
        holder_log.note("holder granted");
        tokio::time::sleep(ms(3000)).await;
        match client.unlock("k", token).await {
            Err(e) if e.code() == Some(ErrorCode::NotHeld) => {
                holder_log.note("stale unlock refused")
            }
            other => holder_log.note(format!("stale unlock answered {other:?}")),
        }
        Ok(())
    });
    let (waiter_log, waiter_tokens) = (log.clone(), tokens.clone());
    sim.client("waiter", async move {
        tokio::time::sleep(ms(200)).await;
        let client = connect().await?;
        let guard = client.lock("k", ms(10_000)).await?;
        waiter_tokens.lock().expect("tokens").1 = guard.token();
        waiter_log.note("waiter granted");
        tokio::time::sleep(ms(4000)).await;
        guard.unlock().await?;
        Ok(())
    });

    assert!(step_until(&mut sim, 5_000, || log
        .when("holder granted")
        .is_some())?);
    sim.partition("holder", SERVER);
    let granted = log.when("holder granted").expect("noted");
    step_until(&mut sim, granted + 2_500, || false)?;
    sim.repair("holder", SERVER);
    sim.run()?;

    let waited = log.when("waiter granted").expect("the waiter was granted") - granted;
    // The lease runs 1000 ms from the grant; the hand-off is due within
    // 10 ms of its end, and each note is up to one 5 ms link away.
    assert!(
        (995..=1_015).contains(&waited),
        "the waiter was granted {waited} ms after the holder\n{}",
        log.dump()
    );
    let (stale, fresh) = *tokens.lock().expect("tokens");
    assert!(fresh > stale, "tokens {stale} then {fresh}");
    assert!(log.when("stale unlock refused").is_some(), "{}", log.dump());
    assert_invariants_kept(&trace, &log);
    Ok(())
}

#[test]
fn an_ephemeral_lock_of_a_silently_vanished_holder_is_freed_when_the_server_gives_up_on_it()
-> turmoil::Result {
    let mut sim = world(2);
    let trace = Arc::new(Trace::default());
    add_server(&mut sim, &trace);
    let log = Log::default();

    let holder_log = log.clone();
    // A host, not a client: it never finishes, it just goes silent.
    sim.host("holder", move || {
        let log = holder_log.clone();
        async move {
            let client = connect().await?;
            let options = LockOptions::new(ms(60_000)).ephemeral(true);
            let guard = client.lock_with("k", options).await?;
            log.note("holder granted");
            let _keep = guard;
            std::future::pending::<()>().await;
            Ok(())
        }
    });
    let waiter_log = log.clone();
    sim.client("waiter", async move {
        tokio::time::sleep(ms(300)).await;
        let client = connect().await?;
        let options = LockOptions::new(ms(1000)).wait(ms(20_000));
        let guard = client.lock_with("k", options).await?.expect("granted");
        waiter_log.note("waiter granted");
        guard.unlock().await?;
        Ok(())
    });

    assert!(step_until(&mut sim, 5_000, || log
        .when("holder granted")
        .is_some())?);
    step_until(&mut sim, 1_000, || false)?;
    // The holder's machine is gone without a FIN: the connection is
    // half-open, and only the server's idle limit (1200 ms) ends it.
    sim.partition("holder", SERVER);
    let cut = sim.elapsed().as_millis() as u64;
    sim.run()?;

    let freed = log.when("waiter granted").expect("the waiter was granted") - cut;
    assert!(
        (1_000..=2_500).contains(&freed),
        "granted {freed} ms after the holder vanished (idle close is 1200 ms; the lease was 60 s)\n{}",
        log.dump()
    );
    assert_invariants_kept(&trace, &log);
    Ok(())
}

#[test]
fn a_retried_insert_whose_reply_was_lost_keeps_first_and_its_index() -> turmoil::Result {
    let mut sim = world(3);
    let trace = Arc::new(Trace::default());
    add_server(&mut sim, &trace);
    let log = Log::default();
    let results = Arc::new(Mutex::new(Vec::new()));

    let insert = |key: &str| {
        Op::Set(SetOp::Insert {
            set: "results".into(),
            keys: Keys::One(key.into()),
        })
    };
    let (a_log, a_results, a_insert) = (log.clone(), results.clone(), insert("r1"));
    sim.client("a", async move {
        let client = connect().await?;
        client.set("results").set_up(ms(60_000)).await?;
        a_log.note("a ready");
        tokio::time::sleep(ms(100)).await;
        let reply = client.call(a_insert).await?;
        a_results.lock().expect("results").push(("a", reply));
        a_log.note("a answered");
        Ok(())
    });
    let (b_log, b_results, b_insert) = (log.clone(), results.clone(), insert("r1"));
    sim.client("b", async move {
        tokio::time::sleep(ms(1_500)).await;
        let client = connect().await?;
        let reply = client.call(b_insert).await?;
        b_results.lock().expect("results").push(("b", reply));
        b_log.note("b answered");
        Ok(())
    });

    assert!(step_until(&mut sim, 5_000, || log
        .when("a ready")
        .is_some())?);
    // a's insert reaches the server; its reply, and everything after it
    // from the server, is lost until the repair.
    sim.partition_oneway(SERVER, "a");
    step_until(&mut sim, 3_000, || false)?;
    assert!(log.when("a answered").is_none(), "the reply was lost");
    sim.repair_oneway(SERVER, "a");
    sim.run()?;

    let results = results.lock().expect("results");
    let of = |who: &str| {
        results
            .iter()
            .find(|(w, _)| *w == who)
            .map(|(_, reply)| reply.clone())
            .unwrap_or_else(|| panic!("{who} got no answer\n{}", log.dump()))
    };
    let inserted = |index, first| Okay::Inserted(Inserted { index, first });
    assert_eq!(of("b"), inserted(1, false), "b came second");
    assert_eq!(
        of("a"),
        inserted(1, true),
        "a's retry is still first, index 1"
    );
    assert!(log.when("b answered") < log.when("a answered"));
    assert_invariants_kept(&trace, &log);
    Ok(())
}

#[test]
fn a_server_crash_keeps_a_held_lock_with_its_lease_and_an_insert_and_drops_waiters_and_ephemeral_locks()
-> turmoil::Result {
    let mut sim = world(4);
    let trace = Arc::new(Trace::default());
    add_server(&mut sim, &trace);
    let log = Log::default();
    let token = Arc::new(Mutex::new(0u64));

    let (holder_log, holder_token) = (log.clone(), token.clone());
    sim.client("holder", async move {
        let client = connect_as("holder").await?;
        let granted = client.lock("k", ms(4_000)).await?.detach();
        *holder_token.lock().expect("token") = granted;
        holder_log.note("holder granted");
        client.set("results").set_up(ms(60_000)).await?;
        let inserted = client.set("results").insert("r1").await?;
        assert_eq!((inserted.index, inserted.first), (1, true));
        let ephemeral = LockOptions::new(ms(60_000)).ephemeral(true);
        let _kept = client.lock_with("e", ephemeral).await?.expect("free");
        holder_log.note("holder ready");
        tokio::time::sleep(ms(3_000)).await;
        // After the restart: the grant is still this holder's.
        client.unlock("k", granted).await?;
        holder_log.note("holder unlocked");
        Ok(())
    });
    let waiter_log = log.clone();
    sim.client("waiter", async move {
        tokio::time::sleep(ms(200)).await;
        let client = connect_as("waiter").await?;
        waiter_log.note("waiter asks");
        // Its request dies with the server; the client asks again.
        let guard = client.lock("k", ms(1_000)).await?;
        waiter_log.note("waiter granted");
        guard.unlock().await?;
        Ok(())
    });
    let info = Arc::new(Mutex::new(None));
    let (late_log, late_info) = (log.clone(), info.clone());
    sim.client("late", async move {
        tokio::time::sleep(ms(2_800)).await;
        let client = connect_as("late").await?;
        let holder = client.inspect("k").await?.holder;
        *late_info.lock().expect("info") = holder;
        let ephemeral_free = client.try_lock("e", ms(1_000)).await?.is_some();
        let inserted = client.set("results").insert("r1").await?;
        late_log.note(format!(
            "late: e free {ephemeral_free}, r1 index {} first {}",
            inserted.index, inserted.first
        ));
        Ok(())
    });

    assert!(step_until(&mut sim, 5_000, || log
        .when("holder ready")
        .is_some()
        && log.when("waiter asks").is_some())?);
    step_until(&mut sim, 600, || false)?;
    let crashed = sim.elapsed().as_millis() as u64;
    sim.crash(SERVER);
    step_until(&mut sim, crashed + 2_000, || false)?;
    sim.bounce(SERVER);
    sim.run()?;

    let granted = log.when("holder granted").expect("noted");
    let holder = info.lock().expect("info").clone();
    let holder = holder.unwrap_or_else(|| panic!("k is held after the restart\n{}", log.dump()));
    assert_eq!(holder.client, "holder");
    assert_eq!(holder.token, *token.lock().expect("token"));
    // The lease went on with the time it had left: the 2 s the server was
    // down did not shorten it (they may lengthen it: the clock goes on
    // from the last time the log reached, before the crash), and it ran
    // again once the server was back.
    let left_at_crash = 4_000 - (crashed - granted);
    let run_since_restart = 2_800 - (crashed + 2_000);
    assert!(
        holder.remaining_ms + run_since_restart + 50 >= left_at_crash
            && holder.remaining_ms <= 4_000 - run_since_restart,
        "{} ms left after the restart, {left_at_crash} at the crash\n{}",
        holder.remaining_ms,
        log.dump()
    );
    assert!(
        log.when("late: e free true, r1 index 1 first false")
            .is_some(),
        "the ephemeral lock died with its connection; the insert kept its index and owner\n{}",
        log.dump()
    );
    let unlocked = log.when("holder unlocked").expect("the holder unlocked");
    let waited = log.when("waiter granted").expect("the waiter asked again");
    assert!(waited >= unlocked, "{}", log.dump());
    assert_invariants_kept(&trace, &log);
    Ok(())
}

#[test]
fn the_set_renewer_keeps_a_short_lived_set_alive_across_a_server_crash() -> turmoil::Result {
    // Seed 5850: a renewal that met the server down retried with a connect
    // that waited out its 5 s timeout, long after the restart, and the set
    // ran out meanwhile. The simulation's renewer must reach the restarted
    // server in time: the set, with its member, outlives the crash.
    const TTL_MS: u64 = 1_000;
    let mut sim = world(5);
    let trace = Arc::new(Trace::default());
    add_server(&mut sim, &trace);
    let log = Log::default();
    sim.host("renewer", || async {
        tokio::time::sleep(ms(100)).await;
        deadbolt_sim::world::renew_set(Arc::new(vec![SERVER.to_owned()]), TTL_MS).await;
        Ok(())
    });
    let worker_log = log.clone();
    sim.client("worker", async move {
        let client = connect_as("worker").await?;
        client.set(SET).set_up(ms(TTL_MS)).await?;
        client.set(SET).insert("r1").await?;
        worker_log.note("inserted");
        // Well after the restart, past the set's lifetime as it stood at
        // the crash, and past a connect timeout begun during the outage.
        tokio::time::sleep(ms(7_000)).await;
        let members = client.set(SET).members_page(0, 10).await;
        let keys: Vec<String> = members.map_or_else(
            |e| vec![format!("error {e}")],
            |page| page.members.into_iter().map(|m| m.key).collect(),
        );
        worker_log.note(format!("members {keys:?}"));
        Ok(())
    });

    assert!(step_until(&mut sim, 5_000, || log
        .when("inserted")
        .is_some())?);
    step_until(&mut sim, 800, || false)?;
    let crashed = sim.elapsed().as_millis() as u64;
    // The renewer's packets are lost while the server is down (a connect
    // begun now hears nothing, as one begun just before a crash), and
    // reach it again once it is back.
    sim.partition("renewer", SERVER);
    sim.crash(SERVER);
    step_until(&mut sim, crashed + 2_000, || false)?;
    sim.bounce(SERVER);
    sim.repair("renewer", SERVER);
    sim.run()?;

    assert!(
        log.when(r#"members ["r1"]"#).is_some(),
        "the renewed set kept its member\n{}",
        log.dump()
    );
    assert_invariants_kept(&trace, &log);
    Ok(())
}

//! An acknowledgement is a promise (SPEC section 8), tried on the real
//! binary: several workers insert results and take locks while the server
//! is killed with SIGKILL at a random moment, twenty times over, each time
//! restarted on the same data directory. After every restart, every insert
//! that was acknowledged is there with its index, every key's last
//! acknowledged token is still its holder's (or the key was released), and
//! new tokens are larger than every token acknowledged before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, LockOptions};
use deadbolt_transport_ws::WsConnector;

mod support;
use support::{KillOnDrop, serve_ws};

const WORKERS: usize = 4;
const KILLS: usize = 20;
const SET: &str = "results";

/// What the server acknowledged, as the workers heard it.
#[derive(Default)]
struct Acknowledged {
    /// Result key → the index the server gave it.
    indices: HashMap<String, u64>,
    /// Lock key → the largest token granted on it.
    tokens: HashMap<String, u64>,
}

/// `deadbolt serve` on a free port and `dir`; killed with SIGKILL.
struct Server {
    child: KillOnDrop,
    url: String,
}

impl Server {
    fn start(dir: &std::path::Path) -> Server {
        let (child, url) = serve_ws(dir, &[]);
        Server { child, url }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

async fn connect(url: &str, client_id: &str) -> Client {
    let options = ClientOptions {
        client_id: Some(client_id.to_owned()),
        // A killed server is not waited for: the worker just stops.
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    let connector = WsConnector::new(url).expect("url");
    Client::connect(connector, options).await.expect("connect")
}

/// Inserts batches of fresh results and takes and releases its lock until
/// the server dies, recording everything acknowledged.
async fn work(url: String, worker: usize, life: usize, seen: Arc<Mutex<Acknowledged>>) {
    let Ok(client) =
        tokio::time::timeout(Duration::from_secs(5), connect(&url, &format!("w{worker}"))).await
    else {
        return;
    };
    let set = client.set(SET);
    let lock_key = format!("job-{worker}");
    for round in 0.. {
        let keys: Vec<String> = (0..8)
            .map(|i| format!("r-{life}-{worker}-{round}-{i}"))
            .collect();
        let Ok(results) = set.insert_many(keys.iter()).await else {
            return;
        };
        {
            let mut seen_now = seen.lock().expect("seen");
            for (key, result) in keys.into_iter().zip(results) {
                seen_now.indices.insert(key, result.index);
            }
        }
        let options = LockOptions::new(Duration::from_millis(300)).wait(Duration::from_secs(2));
        let Ok(Some(guard)) = client.lock_with(&lock_key, options).await else {
            return;
        };
        record_token(&seen, &lock_key, guard.token());
        if guard.unlock().await.is_err() {
            return;
        }
    }
}

fn record_token(seen: &Mutex<Acknowledged>, key: &str, token: u64) {
    let mut seen = seen.lock().expect("seen");
    let largest = seen.tokens.entry(key.to_owned()).or_insert(0);
    *largest = (*largest).max(token);
}

/// Checks what the restarted server remembers against what was promised.
async fn check(url: &str, life: usize, seen: &Mutex<Acknowledged>) {
    let checker = connect(url, &format!("checker-{life}")).await;
    let set = checker.set(SET);
    set.set_up(Duration::from_secs(3600)).await.expect("set_up");
    let promised: Vec<(String, u64)> = {
        let seen = seen.lock().expect("seen");
        let mut all: Vec<_> = seen.indices.iter().map(|(k, i)| (k.clone(), *i)).collect();
        all.sort_by_key(|(_, index)| *index);
        all
    };
    for chunk in promised.chunks(1000) {
        let results = set
            .insert_many(chunk.iter().map(|(k, _)| k))
            .await
            .expect("insert");
        for ((key, index), result) in chunk.iter().zip(results) {
            assert_eq!(result.index, *index, "life {life}: {key} changed its index");
            assert!(
                !result.first,
                "life {life}: {key} was lost and inserted anew"
            );
        }
    }
    let tokens: Vec<(String, u64)> = {
        let seen = seen.lock().expect("seen");
        seen.tokens.iter().map(|(k, t)| (k.clone(), *t)).collect()
    };
    for (key, largest) in tokens {
        if let Some(holder) = checker.inspect(&key).await.expect("inspect").holder {
            assert!(
                holder.token >= largest,
                "life {life}: {key} is held by an older token"
            );
        }
        let options = LockOptions::new(Duration::from_millis(100)).wait(Duration::from_secs(5));
        let guard = checker
            .lock_with(&key, options)
            .await
            .expect("lock after restart")
            .expect("granted within the wait");
        assert!(
            guard.token() > largest,
            "life {life}: token {} after {largest}",
            guard.token()
        );
        record_token(seen, &key, guard.token());
        guard.unlock().await.expect("unlock");
    }
}

#[test]
fn every_acknowledged_change_survives_twenty_sigkills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let seen = Arc::new(Mutex::new(Acknowledged::default()));
    // A fixed seed: the kill moments are the same every run.
    let mut rng = 0x5eed_u64;
    for life in 0..KILLS {
        let server = Server::start(dir.path());
        runtime.block_on(async {
            check(&server.url, life, &seen).await;
            let workers: Vec<_> = (0..WORKERS)
                .map(|w| tokio::spawn(work(server.url.clone(), w, life, Arc::clone(&seen))))
                .collect();
            rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let kill_after = Duration::from_millis(50 + (rng >> 33) % 400);
            tokio::time::sleep(kill_after).await;
            server.kill();
            for worker in workers {
                tokio::time::timeout(Duration::from_secs(10), worker)
                    .await
                    .expect("a worker stops once its server is gone")
                    .expect("worker");
            }
        });
    }
    let server = Server::start(dir.path());
    runtime.block_on(check(&server.url, KILLS, &seen));
    let promised = seen.lock().expect("seen").indices.len();
    assert!(
        promised > 1000,
        "the workload made enough inserts to mean something: {promised}"
    );
    server.kill();
}

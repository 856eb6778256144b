//! A worker host: the real Rust client running a plan of lock-guarded
//! counter steps and distinct dedup steps, recording everything it does
//! and believes. A crashed worker restarts at the step it was in, with the
//! same client id, as a queue consumer whose message is redelivered would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, Error, LockGuard, LockOptions};
use deadbolt_transport_quic::QuicConnector;
use deadbolt_transport_ws::{WsClientConfig, WsConnector};

use crate::history::{Actor, History, What, micros, now_us};
use crate::net::{SimDialer, quic_client_config, quic_endpoint};
use crate::resource::{self, Answer};
use crate::scenario::{LOCK_KEYS, SET, Scenario, Step, Transport, Wait};

/// The WebSocket port of the server (and of the planted-bug proxy).
pub const WS_PORT: u16 = 7420;
/// The QUIC port of the server.
pub const QUIC_PORT: u16 = 7421;

/// What every host of a run shares.
#[derive(Clone)]
pub struct Shared {
    /// The history.
    pub history: History,
    /// The run's scenario.
    pub scenario: Arc<Scenario>,
    /// Per worker, the step it is in (the next one, once a step is done).
    pub progress: Arc<Mutex<Vec<usize>>>,
    /// The server certificate, for QUIC clients.
    pub ca_pem: Arc<Vec<u8>>,
    /// The host WebSocket workers connect to: the server, or the proxy.
    pub ws_host: &'static str,
}

impl Shared {
    /// Whether every worker has finished its plan.
    pub fn all_done(&self) -> bool {
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        self.scenario
            .workers
            .iter()
            .zip(progress.iter())
            .all(|(plan, &at)| at >= plan.steps.len())
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The name of a result key.
pub fn result_key(index: usize) -> String {
    format!("r{index:02}")
}

/// Runs worker `me` until its plan is done.
pub async fn run(shared: Shared, me: usize) -> turmoil::Result {
    let record = |what| shared.history.record(Actor::Worker(me), what);
    record(What::Started);
    let client = connect(&shared, me).await;
    loop {
        let at = shared.progress.lock().unwrap_or_else(|p| p.into_inner())[me];
        let Some(step) = shared.scenario.workers[me].steps.get(at) else {
            break;
        };
        match step {
            Step::Counter {
                key,
                ttl_ms,
                wait,
                hold_ms,
                extend,
                ephemeral,
            } => {
                let counter = Counter {
                    client: &client,
                    history: &shared.history,
                    me,
                    key: LOCK_KEYS[*key],
                };
                counter
                    .run(*ttl_ms, *wait, *hold_ms, *extend, *ephemeral)
                    .await;
            }
            Step::Dedup { keys, work_ms } => {
                dedup(&client, &shared.history, me, keys, *work_ms).await
            }
        }
        shared.progress.lock().unwrap_or_else(|p| p.into_inner())[me] = at + 1;
    }
    record(What::Done);
    Ok(())
}

/// Connects, retrying until the server answers.
async fn connect(shared: &Shared, me: usize) -> Client {
    let options = ClientOptions {
        client_id: Some(format!("worker-{me}")),
        retry_for: Duration::from_secs(3),
        retry_delay: ms(50),
        retry_delay_max: ms(500),
    };
    loop {
        let connected = match shared.scenario.workers[me].transport {
            Transport::Ws => {
                let url = format!("ws://{}:{WS_PORT}/ws", shared.ws_host);
                let config = WsClientConfig {
                    connect_timeout: ms(1000),
                    ping_interval: ms(250),
                    silence_timeout: ms(1000),
                    ..WsClientConfig::default()
                };
                match WsConnector::with_dialer(&url, SimDialer) {
                    Ok(connector) => {
                        Client::connect(connector.config(config), options.clone()).await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Transport::Quic => connect_quic(shared, me, options.clone()).await,
        };
        match connected {
            Ok(client) => return client,
            Err(_) => tokio::time::sleep(ms(200)).await,
        }
    }
}

async fn connect_quic(shared: &Shared, me: usize, options: ClientOptions) -> Result<Client, Error> {
    let lost = |e: String| {
        Error::Transport(deadbolt_core::client::TransportError::Connect {
            server: "server".into(),
            reason: e,
        })
    };
    let host = 10 + me as u8;
    let endpoint = quic_endpoint(0, shared.scenario.seed, host, None)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let config = quic_client_config(&shared.ca_pem, host).map_err(|e| lost(e.to_string()))?;
    let server = SocketAddr::new(turmoil::lookup("server"), QUIC_PORT);
    Client::connect(
        QuicConnector::new(endpoint, config, server, "localhost"),
        options,
    )
    .await
}

/// One lock-guarded counter step.
struct Counter<'a> {
    client: &'a Client,
    history: &'a History,
    me: usize,
    key: &'static str,
}

impl Counter<'_> {
    fn record(&self, what: What) {
        self.history.record(Actor::Worker(self.me), what);
    }

    fn valid_until_us(guard: &LockGuard) -> u64 {
        now_us() + micros(guard.valid_for())
    }

    async fn run(&self, ttl_ms: u64, wait: Wait, hold_ms: u64, extend: bool, ephemeral: bool) {
        let key = self.key.to_owned();
        let wait_ms = match wait {
            Wait::Forever => None,
            Wait::Try => Some(0),
            Wait::UpTo(ms) => Some(ms),
        };
        self.record(What::LockAsked {
            key: key.clone(),
            ttl_ms,
            wait_ms,
            ephemeral,
        });
        let mut options = LockOptions::new(ms(ttl_ms)).ephemeral(ephemeral);
        if let Some(wait_ms) = wait_ms {
            options = options.wait(ms(wait_ms));
        }
        let guard = match self.client.lock_with(self.key, options).await {
            Ok(Some(guard)) => guard,
            Ok(None) => return self.record(What::NotGranted { key }),
            Err(e) => {
                return self.record(What::LockFailed {
                    key,
                    error: e.to_string(),
                });
            }
        };
        let token = guard.token();
        self.record(What::Granted {
            key: key.clone(),
            token,
            valid_until_us: Self::valid_until_us(&guard),
        });
        // The worker may be stuck in a call to the resource when its guard
        // is lost (an ephemeral lock whose connection closed): its belief
        // ends when the client knows, not when the worker next looks.
        let watcher = {
            let (lost, history, me) = (guard.lost_signal(), self.history.clone(), self.me);
            let key = key.clone();
            tokio::spawn(async move {
                lost.await;
                history.record(Actor::Worker(me), What::Lost { key, token });
            })
        };
        let value = self.fenced_read(&guard).await;
        tokio::time::sleep(ms(hold_ms / 2)).await;
        let mut believed = true;
        if extend {
            match guard.extend(ms(ttl_ms)).await {
                Ok(()) => self.record(What::Extended {
                    key: key.clone(),
                    token,
                    valid_until_us: Self::valid_until_us(&guard),
                }),
                Err(e) => {
                    believed = false;
                    self.record(What::ExtendFailed {
                        key: key.clone(),
                        token,
                        error: e.to_string(),
                    });
                }
            }
        }
        tokio::time::sleep(ms(hold_ms - hold_ms / 2)).await;
        if let Some(value) = value.filter(|_| believed && guard.is_held()) {
            self.fenced_write(token, value + 1).await;
        }
        watcher.abort();
        self.record(What::Released {
            key: key.clone(),
            token,
        });
        let ok = guard.unlock().await.is_ok();
        self.record(What::Unlocked { key, token, ok });
    }

    async fn fenced_read(&self, guard: &LockGuard) -> Option<u64> {
        if !guard.is_held() {
            return None;
        }
        let (key, token) = (self.key.to_owned(), guard.token());
        self.record(What::ReadAsked {
            key: key.clone(),
            token,
        });
        match resource::read(self.key, token).await {
            Ok(Answer::Yes(value)) => {
                self.record(What::Read { key, value });
                Some(value)
            }
            Ok(Answer::Refused) => {
                self.record(What::ResourceFailed {
                    key,
                    error: "read refused: a newer token exists".into(),
                });
                None
            }
            Err(error) => {
                self.record(What::ResourceFailed { key, error });
                None
            }
        }
    }

    async fn fenced_write(&self, token: u64, value: u64) {
        let key = self.key.to_owned();
        self.record(What::WriteAsked {
            key: key.clone(),
            token,
            value,
        });
        match resource::write(self.key, token, value).await {
            Ok(answer) => self.record(What::Written {
                key,
                token,
                accepted: answer != Answer::Refused,
            }),
            Err(error) => self.record(What::ResourceFailed { key, error }),
        }
    }
}

/// One dedup step: insert the keys (retrying until the server answers) and
/// process every key this worker owns.
async fn dedup(client: &Client, history: &History, me: usize, keys: &[usize], work_ms: u64) {
    let record = |what| history.record(Actor::Worker(me), what);
    let set = client.set(SET);
    let names: Vec<String> = keys.iter().map(|&k| result_key(k)).collect();
    let results = loop {
        record(What::InsertAsked {
            set: SET.into(),
            keys: names.clone(),
        });
        let attempt = async {
            set.set_up(Duration::from_secs(600)).await?;
            set.insert_many(names.clone()).await
        };
        match attempt.await {
            Ok(results) => break results,
            Err(e) => {
                record(What::InsertFailed {
                    set: SET.into(),
                    error: e.to_string(),
                });
                tokio::time::sleep(ms(100)).await;
            }
        }
    };
    for (key, result) in names.iter().zip(&results) {
        record(What::Inserted {
            set: SET.into(),
            key: key.clone(),
            index: result.index,
            first: result.first,
        });
    }
    for (key, result) in names.iter().zip(&results) {
        if result.first {
            // Processing takes time: a crash here leaves the key to the
            // restarted worker.
            tokio::time::sleep(ms(work_ms)).await;
            record(What::Processed {
                set: SET.into(),
                key: key.clone(),
            });
        }
    }
}

//! `deadbolt-bench abuse`: the attacks of issue 18, each against a fresh
//! release `deadbolt serve`, beside a well-behaved canary client on the
//! attacked shard. A benchmark, not a test: it prints one markdown table
//! (the canary's latency and errors, the server's resident memory after
//! setup and its peak during the attack) and asserts nothing.
//!
//! The attacks: `members` pages pipelined by connections that read nothing,
//! the same flood read as fast as it comes, `stats` polled back to back
//! with a different `top` each time over many held locks, sockets that
//! connect and send nothing (from many source addresses), thousands of
//! connections closed at once (each holding an ephemeral lock), and pages
//! of keys made of control characters (each escaped to six bytes).
//!
//! The peak is the kernel's high-water mark (`VmHWM` in
//! `/proc/PID/status`), reset after setup by writing `5` to
//! `/proc/PID/clear_refs`, so it is the peak of the attack alone.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::engine::{DEFAULT_SHARDS, shard_of};
use deadbolt_core::proto::{Acquire, LockOp, Mode, Op, Wait};
use deadbolt_transport_ws::WsConnector;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::procs::{self, Server, Tail};
use crate::systems::deadbolt::binary;

/// The attacks, by the names `--only` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// `members` pages pipelined without reading a reply.
    MembersFlood,
    /// `members` pages pipelined and read as fast as they come.
    MembersFloodReading,
    /// `stats` back to back, a different `top` each time, over held locks.
    StatsPolling,
    /// TCP sockets that connect and send nothing.
    IdleSockets,
    /// Connections, each with an ephemeral lock, closed at once.
    MassDisconnect,
    /// `members` pages of keys made of control characters.
    ControlCharPages,
}

impl Attack {
    const ALL: [Attack; 6] = [
        Attack::MembersFlood,
        Attack::MembersFloodReading,
        Attack::StatsPolling,
        Attack::IdleSockets,
        Attack::MassDisconnect,
        Attack::ControlCharPages,
    ];

    fn label(self) -> &'static str {
        match self {
            Attack::MembersFlood => "members flood, not reading",
            Attack::MembersFloodReading => "members flood, reading",
            Attack::StatsPolling => "stats polling, varying top",
            Attack::IdleSockets => "idle-socket flood",
            Attack::MassDisconnect => "mass disconnect",
            Attack::ControlCharPages => "control-character pages",
        }
    }
}

/// The abuse benchmark's sizes; each has a full default close to the
/// issue's and a `--quick` one.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Small sizes and 2 s attacks: a smoke run of well under a minute.
    #[arg(long)]
    quick: bool,
    /// Only these attacks (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Attack>,
    /// Members of the set the members floods page through [1,000,000;
    /// quick 20,000].
    #[arg(long)]
    members: Option<u64>,
    /// Attacking connections in the members floods and the control-
    /// character pages.
    #[arg(long, default_value_t = 2)]
    attackers: usize,
    /// `members` requests each attacker pipelines (limit 10,000 each).
    #[arg(long, default_value_t = 4096)]
    pipeline: usize,
    /// Locks held while `stats` is polled [1,000,000; quick 20,000].
    #[arg(long)]
    locks: Option<u64>,
    /// Sockets in the idle-socket flood [10,000; quick 1,000].
    #[arg(long)]
    idle_sockets: Option<usize>,
    /// Source addresses the idle sockets come from (127.0.0.2 onward), so
    /// that a per-address cap alone cannot stop them.
    #[arg(long, default_value_t = 64)]
    idle_addresses: u8,
    /// Connections closed at once in the mass disconnect [9,900; quick
    /// 1,000].
    #[arg(long)]
    disconnects: Option<usize>,
    /// Keys of 1,000 control characters in the set whose pages are read
    /// [2,560; quick 512].
    #[arg(long)]
    control_keys: Option<u64>,
    /// How long each attack runs, the canary beside it [10s; quick 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// The server's shard count (the canary's key is placed on the
    /// attacked set's shard).
    #[arg(long, default_value_t = DEFAULT_SHARDS)]
    shards: usize,
    /// More flags for `deadbolt serve`, one per use
    /// (`--serve-arg=--pending-reply-bytes-max=1048576`).
    #[arg(long, allow_hyphen_values = true)]
    serve_arg: Vec<String>,
}

/// The sizes of one run, `--quick` or flags applied.
#[derive(Debug, Clone)]
struct Sizes {
    members: u64,
    attackers: usize,
    pipeline: usize,
    locks: u64,
    idle_sockets: usize,
    idle_addresses: u8,
    disconnects: usize,
    control_keys: u64,
    duration: Duration,
    shards: usize,
}

impl Sizes {
    fn of(args: &Args) -> Sizes {
        let pick = |full, quick| if args.quick { quick } else { full };
        Sizes {
            members: args.members.unwrap_or(pick(1_000_000, 20_000)),
            attackers: args.attackers.max(1),
            pipeline: args.pipeline.max(1),
            locks: args.locks.unwrap_or(pick(1_000_000, 20_000)),
            idle_sockets: args.idle_sockets.unwrap_or(pick(10_000, 1_000) as usize),
            idle_addresses: args.idle_addresses.clamp(1, 250),
            disconnects: args.disconnects.unwrap_or(pick(9_900, 1_000) as usize),
            control_keys: args.control_keys.unwrap_or(pick(2_560, 512)),
            duration: args.duration.unwrap_or(Duration::from_secs(pick(10, 2))),
            shards: args.shards.max(1),
        }
    }
}

/// One attack's row.
struct Measured {
    attack: Attack,
    setup: String,
    canary: CanaryReport,
    rss_after_setup: u64,
    /// `None` where the peak could not be reset (then it is not the
    /// attack's own).
    peak_rss: Option<u64>,
    notes: Vec<String>,
}

/// Runs the attacks asked for, each on a fresh server, and prints the table.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let sizes = Sizes::of(&args);
    let attacks: Vec<Attack> = Attack::ALL
        .into_iter()
        .filter(|a| args.only.is_empty() || args.only.contains(a))
        .collect();
    let mut rows = Vec::new();
    for attack in attacks {
        eprintln!("== {}", attack.label());
        match measure(attack, &sizes, &args.serve_arg).await {
            Ok(row) => rows.push(row),
            Err(error) => eprintln!("{}: failed: {error:#}", attack.label()),
        }
    }
    println!(
        "abuse benchmark ({}), {} per attack, release `deadbolt serve` with {} shards{}",
        if args.quick { "quick" } else { "full" },
        humantime::format_duration(sizes.duration),
        sizes.shards,
        if args.serve_arg.is_empty() {
            String::new()
        } else {
            format!(" and {}", args.serve_arg.join(" "))
        }
    );
    println!();
    println!("{}", table(&rows));
    Ok(())
}

async fn measure(attack: Attack, sizes: &Sizes, serve_args: &[String]) -> anyhow::Result<Measured> {
    let mut serve_args = serve_args.to_vec();
    if attack == Attack::MassDisconnect && !serve_args.iter().any(|a| a.contains("max-connections"))
    {
        // The connections must all be open before they close at once; the
        // server's cap from its memory budget may be lower.
        serve_args.push(format!("--max-connections={}", sizes.disconnects + 100));
    }
    let target = Target::start(sizes.shards, &serve_args).await?;
    let measured = match attack {
        Attack::MembersFlood => members_flood(&target, sizes, false).await,
        Attack::MembersFloodReading => members_flood(&target, sizes, true).await,
        Attack::StatsPolling => stats_polling(&target, sizes).await,
        Attack::IdleSockets => idle_sockets(&target, sizes).await,
        Attack::MassDisconnect => mass_disconnect(&target, sizes).await,
        Attack::ControlCharPages => control_char_pages(&target, sizes).await,
    };
    let mut measured = measured?;
    if !target.alive() {
        measured
            .notes
            .push(format!("SERVER DIED: {}", target.tail.text()));
    }
    Ok(measured)
}

/// What an attack does while the canary runs, given the attack window.
type Notes = anyhow::Result<Vec<String>>;

/// Measures `attack` (a future that runs for the attack's window and says
/// what it did) beside a canary on `canary_key` (and `set`), after setup.
async fn beside_canary(
    target: &Target,
    which: Attack,
    setup: String,
    canary_key: String,
    set: Option<&str>,
    attack: impl std::future::Future<Output = Notes>,
) -> anyhow::Result<Measured> {
    let rss_after_setup = target.rss();
    let reset = target.reset_peak();
    let canary = Canary::start(target, canary_key, set.map(str::to_owned)).await?;
    let notes = attack.await?;
    let canary = canary.stop().await?;
    Ok(Measured {
        attack: which,
        setup,
        canary,
        rss_after_setup,
        peak_rss: reset.then(|| target.peak_rss()),
        notes,
    })
}

// ---- the attacks ----

async fn members_flood(target: &Target, sizes: &Sizes, reading: bool) -> anyhow::Result<Measured> {
    let set = "big";
    let began = Instant::now();
    fill_set(target, set, sizes.members, |i| format!("member/{i:010}")).await?;
    let setup = format!(
        "{} members in one set ({:.1} s)",
        sizes.members,
        began.elapsed().as_secs_f64()
    );
    let key = key_on_shard_of(set, sizes.shards);
    let which = if reading {
        Attack::MembersFloodReading
    } else {
        Attack::MembersFlood
    };
    let attack = async {
        let members = sizes.members.max(1);
        let request = move |id: u64| {
            let after = (id * 10_000) % members;
            format!(r#"{{"id":{id},"op":"members","set":"{set}","after":{after},"limit":10000}}"#)
        };
        let counts = Arc::new(FloodCounts::default());
        let mut attackers = Vec::new();
        for _ in 0..sizes.attackers {
            let ws = raw_ws(&target.ws_url).await?;
            let counts = Arc::clone(&counts);
            attackers.push(tokio::spawn(flood(
                ws,
                sizes.pipeline,
                reading,
                request,
                counts,
            )));
        }
        tokio::time::sleep(sizes.duration).await;
        for attacker in attackers {
            attacker.abort();
            if let Err(e) = attacker.await
                && e.is_panic()
            {
                anyhow::bail!("an attacker panicked");
            }
        }
        let sent = counts.sent.load(Ordering::Relaxed);
        let read = counts.read.load(Ordering::Relaxed);
        let bytes = counts.bytes.load(Ordering::Relaxed);
        let mut notes = vec![format!(
            "{} connections, {} pages of up to 10,000 asked",
            sizes.attackers, sent
        )];
        if reading {
            notes.push(format!(
                "{read} pages read ({:.0} MB/s)",
                bytes as f64 / 1e6 / sizes.duration.as_secs_f64()
            ));
        }
        Ok(notes)
    };
    beside_canary(target, which, setup, key, Some(set), attack).await
}

/// What the flooding connections did, summed over them.
#[derive(Default)]
struct FloodCounts {
    sent: AtomicU64,
    read: AtomicU64,
    bytes: AtomicU64,
}

/// Sends `pipeline` requests (made by `request`) on `ws` without waiting;
/// reading, keeps sending one more for each reply read, for as long as it
/// runs. Runs until aborted.
async fn flood(
    ws: WebSocketStream<TcpStream>,
    pipeline: usize,
    reading: bool,
    request: impl Fn(u64) -> String + Send + 'static,
    counts: Arc<FloodCounts>,
) {
    let (mut sink, mut stream) = ws.split();
    let window = Arc::new(tokio::sync::Semaphore::new(pipeline));
    let reader = reading.then(|| {
        let window = Arc::clone(&window);
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(text) = message {
                    counts.read.fetch_add(1, Ordering::Relaxed);
                    counts.bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                    window.add_permits(1);
                }
                // The harness has one thread: without a yield, a reader
                // with replies waiting would keep it for up to tokio's
                // budget of 128 of them, and the canary's latency would
                // measure the harness.
                tokio::task::yield_now().await;
            }
        })
    });
    let mut id = 0;
    loop {
        if !reading && id == pipeline as u64 {
            // Everything is sent; hold the connection without reading.
            std::future::pending::<()>().await;
        }
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        id += 1;
        if sink.send(Message::text(request(id))).await.is_err() {
            break;
        }
        counts.sent.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(reader) = reader {
        reader.abort();
    }
}

async fn stats_polling(target: &Target, sizes: &Sizes) -> anyhow::Result<Measured> {
    let began = Instant::now();
    hold_locks(target, sizes.locks).await?;
    let setup = format!(
        "{} held locks ({:.1} s)",
        sizes.locks,
        began.elapsed().as_secs_f64()
    );
    let attack = async {
        let client = target.client().await?;
        let until = Instant::now() + sizes.duration;
        let mut polls = 0u64;
        let mut longest = Duration::ZERO;
        while Instant::now() < until {
            let top = (polls % 100) as u32 + 1;
            let asked = Instant::now();
            client.stats(top).await.context("stats")?;
            longest = longest.max(asked.elapsed());
            polls += 1;
        }
        Ok(vec![format!(
            "{polls} stats replies back to back, top 1..=100 in turn, slowest {}",
            millis(longest)
        )])
    };
    // Any key: stats visits every shard.
    beside_canary(
        target,
        Attack::StatsPolling,
        setup,
        "canary/0".to_owned(),
        None,
        attack,
    )
    .await
}

async fn idle_sockets(target: &Target, sizes: &Sizes) -> anyhow::Result<Measured> {
    let setup = format!(
        "{} sockets from {} addresses",
        sizes.idle_sockets, sizes.idle_addresses
    );
    let attack = async {
        let opened = open_idle(target.ws_addr, sizes.idle_sockets, sizes.idle_addresses).await;
        let mut healthz = Probes::default();
        let mut newcomer = Probes::default();
        let until = Instant::now() + sizes.duration;
        while Instant::now() < until {
            healthz.record(probe_healthz(target.ws_addr).await);
            newcomer.record(probe_new_client(target).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let still_open = still_open(&opened).await;
        Ok(vec![
            format!(
                "{} of {} sockets connected, {still_open} still open at the end",
                opened.len(),
                sizes.idle_sockets
            ),
            format!("/healthz {}", healthz.summary()),
            format!("new client (connect, lock, unlock) {}", newcomer.summary()),
        ])
    };
    beside_canary(
        target,
        Attack::IdleSockets,
        setup,
        "canary/0".to_owned(),
        None,
        attack,
    )
    .await
}

async fn mass_disconnect(target: &Target, sizes: &Sizes) -> anyhow::Result<Measured> {
    let began = Instant::now();
    let connections = open_with_ephemeral_locks(target, sizes.disconnects).await?;
    let setup = format!(
        "{} connections (--max-connections {}), each holding an ephemeral lock ({:.1} s)",
        connections.len(),
        sizes.disconnects + 100,
        began.elapsed().as_secs_f64()
    );
    let attack = async {
        // The canary runs alone for a moment, then every connection closes
        // at once (a TCP close, as from a crashed fleet).
        tokio::time::sleep(sizes.duration / 4).await;
        let closed = connections.len();
        drop(connections);
        tokio::time::sleep(sizes.duration - sizes.duration / 4).await;
        Ok(vec![format!(
            "{closed} closed at once at +{}",
            millis(sizes.duration / 4)
        )])
    };
    beside_canary(
        target,
        Attack::MassDisconnect,
        setup,
        "canary/0".to_owned(),
        None,
        attack,
    )
    .await
}

async fn control_char_pages(target: &Target, sizes: &Sizes) -> anyhow::Result<Measured> {
    let set = "control";
    let began = Instant::now();
    // 1,000 control characters (each `\u0001` on the wire) and a number:
    // 1,006 bytes of key, about 6 KB escaped.
    let control = "\u{1}".repeat(1000);
    fill_set(target, set, sizes.control_keys, |i| {
        format!("{control}{i:06}")
    })
    .await?;
    let setup = format!(
        "{} keys of 1,000 control characters ({:.1} s)",
        sizes.control_keys,
        began.elapsed().as_secs_f64()
    );
    let key = key_on_shard_of(set, sizes.shards);
    let attack = async {
        let limit = 1 << 20;
        let mut readers = Vec::new();
        for _ in 0..sizes.attackers {
            let ws = raw_ws(&target.ws_url).await?;
            readers.push(tokio::spawn(read_pages(
                ws,
                set.to_owned(),
                sizes.control_keys,
                limit,
                Instant::now() + sizes.duration,
            )));
        }
        let mut pages = 0;
        let mut largest = 0;
        let mut over = 0;
        for reader in readers {
            let (p, l, o) = reader.await??;
            pages += p;
            largest = largest.max(l);
            over += o;
        }
        Ok(vec![format!(
            "{pages} pages read by {} connections, largest reply {largest} bytes, \
             {over} over 1 MiB",
            sizes.attackers
        )])
    };
    beside_canary(
        target,
        Attack::ControlCharPages,
        setup,
        key,
        Some(set),
        attack,
    )
    .await
}

/// Reads pages of `set` (limit 10,000, cycling through its `size` keys) 16
/// at a time until `until`: pages read, the largest reply and how many
/// were over `limit` bytes.
async fn read_pages(
    ws: WebSocketStream<TcpStream>,
    set: String,
    size: u64,
    limit: usize,
    until: Instant,
) -> anyhow::Result<(u64, usize, u64)> {
    let (mut sink, mut stream) = ws.split();
    let (mut pages, mut largest, mut over) = (0, 0, 0);
    let mut id = 0u64;
    let mut in_flight = 0;
    while Instant::now() < until {
        while in_flight < 16 {
            id += 1;
            let after = (id * 97) % size.max(1);
            let request = format!(
                r#"{{"id":{id},"op":"members","set":"{set}","after":{after},"limit":10000}}"#
            );
            sink.send(Message::text(request)).await?;
            in_flight += 1;
        }
        match tokio::time::timeout_at(until, stream.next()).await {
            Ok(Some(message)) => {
                let bytes = message?.len();
                pages += 1;
                in_flight -= 1;
                largest = largest.max(bytes);
                over += u64::from(bytes > limit);
                // As in `flood`: the canary shares the harness's thread.
                tokio::task::yield_now().await;
            }
            Ok(None) => anyhow::bail!("the server closed the page reader"),
            Err(_) => break,
        }
    }
    Ok((pages, largest, over))
}

// ---- setup ----

/// A set named `set` with `count` keys (`key(i)`), inserted in batches.
async fn fill_set(
    target: &Target,
    set: &str,
    count: u64,
    key: impl Fn(u64) -> String,
) -> anyhow::Result<()> {
    let client = target.client().await?;
    let set = client.set(set);
    set.set_up(Duration::from_secs(86_400)).await?;
    // Batches of up to 1 MiB of request, at most 10,000 keys.
    let per_batch = (900_000 / (key(0).len() as u64 * 6 + 8)).clamp(1, 10_000);
    let batches: Vec<Vec<String>> = (0..count)
        .collect::<Vec<_>>()
        .chunks(per_batch as usize)
        .map(|chunk| chunk.iter().map(|&i| key(i)).collect())
        .collect();
    let set = &set;
    futures_util::stream::iter(batches)
        .map(|batch| async move { set.insert_many(batch).await })
        .buffer_unordered(4)
        .for_each(|done| {
            if let Err(e) = done {
                eprintln!("insert: {e}");
            }
            async {}
        })
        .await;
    let size = set.inspect().await?.size;
    anyhow::ensure!(size == count, "the set has {size} keys, not {count}");
    Ok(())
}

/// `count` locks held for a day, taken by four connections.
async fn hold_locks(target: &Target, count: u64) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for part in 0..4u64 {
        let client = target.client().await?;
        tasks.push(tokio::spawn(async move {
            let keys = (part..count).step_by(4);
            futures_util::stream::iter(keys)
                .map(|i| {
                    let client = &client;
                    async move {
                        let op = Op::Lock(LockOp::Acquire(Acquire {
                            key: format!("held/{i:09}"),
                            ttl_ms: 86_400_000,
                            wait: Wait::Never,
                            ephemeral: false,
                            mode: Mode::MUTEX,
                            lock_delay_ms: 0,
                            notify: false,
                        }));
                        client.call(op).await
                    }
                })
                .buffer_unordered(1000)
                .filter(|r| std::future::ready(r.is_err()))
                .count()
                .await
        }));
    }
    let mut failed = 0;
    for task in tasks {
        failed += task.await?;
    }
    anyhow::ensure!(failed == 0, "{failed} of {count} locks were not granted");
    Ok(())
}

/// `count` WebSocket connections, each of which took an ephemeral lock.
async fn open_with_ephemeral_locks(
    target: &Target,
    count: usize,
) -> anyhow::Result<Vec<WebSocketStream<TcpStream>>> {
    let url = &target.ws_url;
    let opened: Vec<anyhow::Result<WebSocketStream<TcpStream>>> =
        futures_util::stream::iter(0..count)
            .map(|i| async move {
                let mut ws = raw_ws(url).await?;
                let lock = format!(
                    r#"{{"id":1,"op":"lock","key":"gone/{i}","ttl_ms":60000,"ephemeral":true}}"#
                );
                ws.send(Message::text(lock)).await?;
                let reply = ws
                    .next()
                    .await
                    .context("closed before the lock's reply")??;
                anyhow::ensure!(reply.to_text()?.contains("\"ok\""), "lock refused: {reply}");
                Ok(ws)
            })
            // Fewer at once than the server's per-address handshake cap.
            .buffer_unordered(32)
            .collect()
            .await;
    let total = opened.len();
    let mut failures = opened.iter().filter_map(|o| o.as_ref().err());
    if let Some(first) = failures.next() {
        eprintln!(
            "{} of {total} connections did not open (first: {first:#})",
            failures.count() + 1
        );
    }
    Ok(opened.into_iter().filter_map(Result::ok).collect())
}

/// `count` TCP connections to `server` that send nothing, from
/// 127.0.0.2 onward (`addresses` of them).
async fn open_idle(server: SocketAddr, count: usize, addresses: u8) -> Vec<TcpStream> {
    let opened: Vec<Option<TcpStream>> = futures_util::stream::iter(0..count)
        .map(|i| async move {
            let from = Ipv4Addr::new(127, 0, 0, 2 + (i % addresses as usize) as u8);
            let socket = TcpSocket::new_v4().ok()?;
            socket.bind(SocketAddr::from((from, 0))).ok()?;
            tokio::time::timeout(Duration::from_secs(2), socket.connect(server))
                .await
                .ok()?
                .ok()
        })
        .buffer_unordered(256)
        .collect()
        .await;
    opened.into_iter().flatten().collect()
}

/// How many of `sockets` the server has not closed.
async fn still_open(sockets: &[TcpStream]) -> usize {
    let mut open = 0;
    for socket in sockets {
        let mut byte = [0u8; 1];
        match socket.try_read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    open
}

// ---- probes ----

/// Successes, failures and latencies of a probe.
#[derive(Default)]
struct Probes {
    ok: Vec<Duration>,
    failed: usize,
    first_failure: Option<String>,
}

impl Probes {
    fn record(&mut self, outcome: anyhow::Result<Duration>) {
        match outcome {
            Ok(took) => self.ok.push(took),
            Err(e) => {
                self.failed += 1;
                self.first_failure.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }

    fn summary(&mut self) -> String {
        self.ok.sort();
        let total = self.ok.len() + self.failed;
        let slowest = self.ok.last().map_or("-".to_owned(), |d| millis(*d));
        let mut text = format!("{} of {total} ok, slowest {slowest}", self.ok.len());
        if let Some(failure) = &self.first_failure {
            text.push_str(&format!(" (first failure: {failure})"));
        }
        text
    }
}

/// `GET /healthz` on a fresh connection: how long until `200`.
async fn probe_healthz(server: SocketAddr) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let ask = async {
        let mut stream = TcpStream::connect(server).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut status = String::new();
        BufReader::new(&mut stream).read_line(&mut status).await?;
        anyhow::ensure!(status.contains(" 200 "), "answered {}", status.trim());
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .context("no answer within 2 s")??;
    Ok(began.elapsed())
}

/// A new client connects, locks and unlocks a key: how long it took.
async fn probe_new_client(target: &Target) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let cycle = async {
        let client = target.client().await?;
        let guard = client.lock("newcomer", Duration::from_secs(10)).await?;
        guard.unlock().await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(2), cycle)
        .await
        .context("not done within 2 s")??;
    Ok(began.elapsed())
}

// ---- the canary ----

/// A well-behaved client beside the attack: one request at a time, a
/// try-lock and unlock of its key, then an `inspect_set` of the attacked
/// set (or an `inspect` of its key), over and over.
struct Canary {
    stop: Arc<AtomicBool>,
    task: JoinHandle<CanaryReport>,
}

/// The canary's latencies (microseconds, every request) and errors.
struct CanaryReport {
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Canary {
    async fn start(target: &Target, key: String, set: Option<String>) -> anyhow::Result<Canary> {
        let client = target.client().await?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut report = CanaryReport {
                // Microseconds, up to a minute.
                latency: Histogram::new_with_bounds(1, 60_000_000, 3)
                    .expect("valid histogram bounds"),
                errors: 0,
                first_error: None,
            };
            while !stopped.load(Ordering::Relaxed) {
                let outcome = canary_round(&client, &key, set.as_deref(), &mut report).await;
                if let Err(e) = outcome {
                    report.errors += 1;
                    report.first_error.get_or_insert_with(|| format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            report
        });
        Ok(Canary { stop, task })
    }

    async fn stop(self) -> anyhow::Result<CanaryReport> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// One round of the canary: each request's latency recorded.
async fn canary_round(
    client: &Client,
    key: &str,
    set: Option<&str>,
    report: &mut CanaryReport,
) -> anyhow::Result<()> {
    let mut timed = Instant::now();
    let mut lap = |report: &mut CanaryReport| {
        let now = Instant::now();
        let us = u64::try_from((now - timed).as_micros()).unwrap_or(u64::MAX);
        report.latency.saturating_record(us);
        timed = now;
    };
    let guard = client
        .try_lock(key, Duration::from_secs(10))
        .await?
        .context("the canary's own key was busy")?;
    lap(report);
    guard.unlock().await?;
    lap(report);
    match set {
        Some(set) => {
            client.set(set).inspect().await?;
        }
        None => {
            client.inspect(key).await?;
        }
    }
    lap(report);
    Ok(())
}

/// A key that lives on the same shard as `set`, so the canary's locks
/// queue behind the attack's requests.
fn key_on_shard_of(set: &str, shards: usize) -> String {
    let shard = shard_of(set, shards);
    (0..)
        .map(|i| format!("canary/{i}"))
        .find(|key| shard_of(key, shards) == shard)
        .unwrap_or_else(|| "canary/0".to_owned())
}

// ---- the server ----

/// A fresh release `deadbolt serve`, in memory, on free ports.
struct Target {
    server: Server,
    tail: Tail,
    ws_url: String,
    ws_addr: SocketAddr,
}

impl Target {
    async fn start(shards: usize, extra: &[String]) -> anyhow::Result<Target> {
        let bin = binary()?;
        let mut args: Vec<String> = [
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--in-memory",
            "--data-dir",
            "data",
            "--shards",
        ]
        .map(str::to_owned)
        .into();
        args.push(shards.to_string());
        args.extend(extra.iter().cloned());
        let mut server = Server::start("abuse", &bin.to_string_lossy(), &args, None)?;
        let stderr = server.stderr().context("server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut said = Vec::new();
        while let Some(line) = lines.next_line().await? {
            let Some(at) = line.find("ws://") else {
                said.push(line);
                continue;
            };
            let ws_url = line[at..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            let ws_addr = ws_url
                .trim_start_matches("ws://")
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .with_context(|| format!("the address in {ws_url}"))?;
            for line in &said {
                eprintln!("server: {line}");
            }
            let tail = Tail::follow_lines(lines);
            return Ok(Target {
                server,
                tail,
                ws_url,
                ws_addr,
            });
        }
        anyhow::bail!("the server exited before it listened: {}", said.join(" / "))
    }

    async fn client(&self) -> anyhow::Result<Client> {
        let connector = WsConnector::new(&self.ws_url)?;
        Ok(Client::connect(connector, ClientOptions::default()).await?)
    }

    fn rss(&self) -> u64 {
        procs::rss(self.server.pid)
    }

    /// Resets the kernel's peak resident size of the server; `false` where
    /// that is not allowed.
    fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.server.pid), "5").is_ok()
    }

    /// The server's peak resident size since the last reset, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.server.pid))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kb| kb.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn alive(&self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.server.pid as i32);
        nix::sys::signal::kill(pid, None).is_ok()
            && std::fs::read_to_string(format!("/proc/{}/stat", self.server.pid))
                .is_ok_and(|stat| !stat.contains(") Z "))
    }
}

/// A raw WebSocket connection, to send what the client library would not
/// (pipelines it never reads, pages it only measures).
async fn raw_ws(url: &str) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default();
    let tcp = TcpStream::connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    Ok(ws)
}

// ---- the table ----

fn table(rows: &[Measured]) -> String {
    let mut out = String::from(
        "| attack | setup | canary requests | canary p50 | canary p99 | canary max | canary errors \
         | RSS after setup | peak RSS during attack | notes |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for row in rows {
        let l = &row.canary.latency;
        let errors = match &row.canary.first_error {
            Some(first) => format!("{} (first: {first})", row.canary.errors),
            None => "0".to_owned(),
        };
        let peak = row.peak_rss.map_or("(no reset)".to_owned(), megabytes);
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {errors} | {} | {peak} | {} |\n",
            row.attack.label(),
            row.setup,
            l.len(),
            micros(l.value_at_quantile(0.5)),
            micros(l.value_at_quantile(0.99)),
            micros(l.max()),
            megabytes(row.rss_after_setup),
            row.notes.join("; "),
        ));
    }
    out
}

fn micros(us: u64) -> String {
    if us >= 1_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn quick_sizes_are_small_and_flags_override_them() {
        let quick = Sizes::of(&Cli::parse_from(["abuse", "--quick"]).args);
        assert_eq!(quick.members, 20_000);
        assert_eq!(quick.duration, Duration::from_secs(2));
        let full = Sizes::of(&Cli::parse_from(["abuse", "--idle-sockets", "7"]).args);
        assert_eq!((full.members, full.idle_sockets), (1_000_000, 7));
        assert_eq!(full.disconnects, 9_900);
    }

    #[test]
    fn the_canary_key_lives_on_the_attacked_sets_shard() {
        for shards in [1, 4, 7] {
            let key = key_on_shard_of("big", shards);
            assert_eq!(shard_of(&key, shards), shard_of("big", shards));
        }
    }

    #[test]
    fn serve_flags_pass_through_with_their_hyphens() {
        let cli = Cli::parse_from([
            "abuse",
            "--serve-arg=--max-in-flight=8",
            "--only",
            "idle-sockets",
        ]);
        assert_eq!(cli.args.serve_arg, ["--max-in-flight=8"]);
        assert_eq!(cli.args.only, [Attack::IdleSockets]);
    }
}

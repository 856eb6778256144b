//! The decoder and HTTP-head fuzz, shared by `tests/fuzz.rs` (a few
//! thousand cases in `cargo test`) and `examples/deadbolt-fuzz.rs` (a
//! million or more, `cargo run --release`).
//!
//! Three layers, each fed by proptest strategies (arbitrary bytes, and
//! structure-aware JSON or HTTP with mangled fields):
//!
//! - **decoder**: [`check_decode`] gives bytes to the server's request
//!   decoder (`deadbolt_core::proto::decode_request`). A request it accepts
//!   must encode and decode back to itself; one it refuses must come back
//!   as a well-formed reply: `{"id":…,"err":{"code":"bad_request" or
//!   "too_large","message":…}}`, with the id it read.
//! - **head**: [`Rig::head`] writes bytes as an HTTP request head to the
//!   real WebSocket server (`deadbolt_transport_ws::serve`, over an
//!   in-memory stream) and requires a well-formed HTTP answer: a status
//!   line, headers, and a body as long as its `Content-Length`, or the
//!   `101` of an upgrade.
//! - **frame**: [`Rig::frame`] upgrades a connection and sends the bytes
//!   as one WebSocket text (or binary) frame, and requires the reply the
//!   decoder's verdict implies: the same error code and id for a refused
//!   request, a reply for an accepted one, close code 1007 for text that
//!   is not UTF-8, 1009 for a message over the limit.
//!
//! A panic anywhere (this thread or a server task) is counted by the hook
//! [`count_panics`] installs, and fails the case.

#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use deadbolt_core::proto::{
    ErrorCode, OP_NAMES, Op, Request, decode_reply, decode_request, encode_reply, encode_request,
};
use deadbolt_core::{Engine, EngineConfig, Limits};
use deadbolt_transport_ws::{Listener, WsConfig, serve};
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

/// The limits the fuzz runs under: the defaults, but a 4 KiB message limit,
/// so that `too_large` is met without generating megabytes per case.
pub fn limits() -> Limits {
    Limits {
        message_bytes_max: 4096,
        ..Limits::default()
    }
}

/// Replies by kind, over a run.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub cases: u64,
    pub kinds: BTreeMap<String, u64>,
}

impl Tally {
    pub fn add(&mut self, kind: String) {
        self.cases += 1;
        *self.kinds.entry(kind).or_default() += 1;
    }
}

// ---------------------------------------------------------------------
// Panics

thread_local! {
    /// Panics on this thread so far, and the last one's message. The fuzz
    /// runs the server on a current-thread runtime, so the server's tasks
    /// panic on the thread that drives them; other tests' threads do not
    /// count.
    static PANICS: std::cell::RefCell<(u64, String)> = const {
        std::cell::RefCell::new((0, String::new()))
    };
}

/// Installs (once) a panic hook that counts every panic on the thread it
/// happens on and keeps its message, then calls the previous hook.
pub fn count_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    p.0 += 1;
                    p.1 = info.to_string();
                }
            });
            previous(info);
        }));
    });
}

/// Panics on this thread so far, and the last one's message.
pub fn panics() -> (u64, String) {
    PANICS.with(|p| p.borrow().clone())
}

/// Escapes `bytes` for a failure message (valid UTF-8 as is).
pub fn show(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    if text.len() > 600 {
        format!("{}… ({} bytes)", &text[..600], bytes.len())
    } else {
        text
    }
}

// ---------------------------------------------------------------------
// The decoder

/// What the decoder makes of `bytes`: the reply kind (`valid <op>`,
/// `bad_request`, `too_large`), or what is wrong.
pub fn check_decode(bytes: &[u8], limits: &Limits) -> Result<String, String> {
    match decode_request(bytes, limits) {
        Ok(request) => {
            let text = encode_request(&request);
            let again = decode_request(text.as_bytes(), limits)
                .map_err(|e| format!("accepted, but its encoding {text} is refused: {e}"))?;
            if again != request {
                return Err(format!(
                    "{request:?} encodes as {text}, read back as {again:?}"
                ));
            }
            Ok(format!("valid {}", request.op.name()))
        }
        Err(refusal) => {
            let (id, code) = (refusal.id, refusal.error.code);
            if !matches!(code, ErrorCode::BadRequest | ErrorCode::TooLarge) {
                return Err(format!("refused with {code:?}"));
            }
            let reply = encode_reply(&refusal.into_reply());
            check_error_reply(&reply, id, code)?;
            Ok(code.as_str().to_owned())
        }
    }
}

/// `reply` is `{"id":id,"err":{"code":code,"message":…}}` and nothing else.
fn check_error_reply(reply: &str, id: Option<u64>, code: ErrorCode) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_str(reply).map_err(|e| format!("reply {reply} is not JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or(format!("reply {reply} is not an object"))?;
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let well_formed = keys.len() == 2
        && object.get("id") == Some(&serde_json::json!(id))
        && value["err"]["code"] == code.as_str()
        && value["err"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty());
    if !well_formed {
        return Err(format!(
            "reply {reply}: expected id {id:?} and code {code:?}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------
// Strategies: requests

/// Every request field of the protocol, and a few that version 1 does
/// not have (yet), which must be ignored or refused, never fatal.
const FIELDS: &[&str] = &[
    "id",
    "op",
    "client",
    "target",
    "top",
    "key",
    "ttl_ms",
    "wait_ms",
    "ephemeral",
    "token",
    "set",
    "keys",
    "after",
    "limit",
    "mode",
    "lock_delay_ms",
    "notify",
    "auth",
];

/// Numbers at and past every edge.
fn number() -> BoxedStrategy<String> {
    prop_oneof![
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        prop::sample::select(vec![
            "0",
            "-0",
            "1",
            "-1",
            "1.0",
            "1.5",
            "1e3",
            "1E400",
            "-1e-400",
            "9007199254740993",
            "18446744073709551615",
            "18446744073709551616",
            "340282366920938463463374607431768211456",
            "86400000",
            "86400001",
            "0x10",
            "01",
            "+1",
            "NaN",
            "Infinity",
            ".5",
            "5.",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

/// Strings: short, long (over the key limit), escaped, odd Unicode, lone
/// surrogates, control characters.
fn string() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-z/]{1,12}".prop_map(|s| format!("\"{s}\"")),
        2 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
        1 => (1000usize..1100).prop_map(|n| format!("\"{}\"", "k".repeat(n))),
        1 => prop::sample::select(vec![
            r#""""#, r#""\ud800""#, r#""\udfff\ud800""#, r#""\u0000""#, r#""\x41""#, "\"\t\"",
            r#""\"""#, r#""\\""#, r#""é😀""#, r#""\uD83D\uDE00""#, "\"unterminated",
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

/// Any JSON value, as text, nested a little.
fn value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number(),
        string(),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..4).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
    .boxed()
}

/// Nesting far past what the decoder holds as a value.
fn deep() -> BoxedStrategy<String> {
    (1usize..3000, any::<bool>())
        .prop_map(|(depth, arrays)| {
            if arrays {
                format!("{}{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
            }
        })
        .boxed()
}

/// A value that suits `field` (so that whole requests are often valid).
fn plausible(field: &str) -> BoxedStrategy<String> {
    match field {
        "op" => prop::sample::select(OP_NAMES.to_vec())
            .prop_map(|op| format!("\"{op}\""))
            .boxed(),
        "key" | "set" | "client" | "auth" => {
            "[a-z/]{1,10}".prop_map(|s| format!("\"{s}\"")).boxed()
        }
        "keys" => prop::collection::vec("[a-z]{1,6}", 0..5)
            .prop_map(|keys| serde_json::to_string(&keys).unwrap_or_default())
            .boxed(),
        "ephemeral" | "notify" => any::<bool>().prop_map(|b| b.to_string()).boxed(),
        "mode" => prop::sample::select(vec!["\"exclusive\"", "\"shared\"", "\"other\""])
            .prop_map(str::to_owned)
            .boxed(),
        // wait_ms stays small: a valid lock on a held key waits that long.
        "wait_ms" => (0u64..50).prop_map(|n| n.to_string()).boxed(),
        _ => (0u64..100_000).prop_map(|n| n.to_string()).boxed(),
    }
}

/// One field: a known name with a plausible or any value, or an unknown
/// name.
fn field() -> BoxedStrategy<(String, String)> {
    prop_oneof![
        6 => prop::sample::select(FIELDS.to_vec()).prop_flat_map(|name| {
            let value = prop_oneof![3 => plausible(name), 1 => value(), 1 => number()];
            (Just(name.to_owned()), value)
        }),
        1 => ("[a-z_]{1,10}", value()),
    ]
    .boxed()
}

/// A request object: usually an id, an op and its fields; sometimes
/// missing, repeated, unknown or mistyped ones.
fn request_text() -> BoxedStrategy<String> {
    let id = prop_oneof![6 => (0u64..1000).prop_map(|n| n.to_string()), 1 => value()];
    let op = prop_oneof![6 => plausible("op"), 1 => value()];
    (
        prop::option::weighted(0.95, id),
        prop::option::weighted(0.95, op),
        prop::collection::vec(field(), 0..6),
        any::<bool>(),
    )
        .prop_map(|(id, op, fields, shuffle)| {
            let mut parts = Vec::new();
            if let Some(id) = id {
                parts.push(format!("\"id\":{id}"));
            }
            if let Some(op) = op {
                parts.push(format!("\"op\":{op}"));
            }
            parts.extend(fields.into_iter().map(|(k, v)| format!("\"{k}\":{v}")));
            if shuffle {
                parts.reverse();
            }
            format!("{{{}}}", parts.join(","))
        })
        .boxed()
}

/// A request of a known op with exactly its fields, plausible values, and
/// perhaps one more field (known, unknown or mistyped): mostly valid.
fn well_formed() -> BoxedStrategy<String> {
    let op_fields: Vec<(&str, &[&str])> = vec![
        ("hello", &["client"]),
        ("ping", &[]),
        ("cancel", &["target"]),
        ("stats", &["top"]),
        ("lock", &["key", "ttl_ms"]),
        ("lock", &["key", "ttl_ms", "wait_ms"]),
        ("lock", &["key", "ttl_ms", "wait_ms", "ephemeral"]),
        ("unlock", &["key", "token"]),
        ("extend", &["key", "token", "ttl_ms"]),
        ("inspect", &["key"]),
        ("set_up", &["set", "ttl_ms"]),
        ("insert", &["set", "key"]),
        ("insert", &["set", "keys"]),
        ("members", &["set", "after", "limit"]),
        ("inspect_set", &["set"]),
        ("tear_down", &["set"]),
    ];
    let id = 0u64..1000;
    (
        prop::sample::select(op_fields),
        id,
        prop::option::weighted(0.3, field()),
    )
        .prop_flat_map(|((op, names), id, extra)| {
            let values: Vec<BoxedStrategy<String>> = names.iter().map(|n| plausible(n)).collect();
            (Just((op, names, id, extra)), values)
        })
        .prop_map(|((op, names, id, extra), values)| {
            let mut parts = vec![format!("\"id\":{id}"), format!("\"op\":\"{op}\"")];
            parts.extend(
                names
                    .iter()
                    .zip(values)
                    .map(|(n, v)| format!("\"{n}\":{v}")),
            );
            if let Some((name, value)) = extra {
                parts.push(format!("\"{name}\":{value}"));
            }
            format!("{{{}}}", parts.join(","))
        })
        .boxed()
}

/// Byte-level damage: truncation, an inserted byte (often one that breaks
/// UTF-8), a changed byte, trailing garbage, padding past the limit.
fn mangle(text: String) -> BoxedStrategy<Vec<u8>> {
    let bytes = text.into_bytes();
    let len = bytes.len().max(1);
    prop_oneof![
        8 => Just(bytes.clone()),
        1 => (0..len).prop_map({
            let bytes = bytes.clone();
            move |at| bytes[..at.min(bytes.len())].to_vec()
        }),
        1 => (0..len, prop_oneof![Just(0xffu8), Just(0xc3), Just(0x80), Just(0), any::<u8>()]).prop_map({
            let bytes = bytes.clone();
            move |(at, byte)| {
                let mut b = bytes.clone();
                b.insert(at.min(b.len()), byte);
                b
            }
        }),
        1 => (0..len, any::<u8>()).prop_map({
            let bytes = bytes.clone();
            move |(at, byte)| {
                let mut b = bytes.clone();
                if let Some(slot) = b.get_mut(at) {
                    *slot = byte;
                }
                b
            }
        }),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map({
            let bytes = bytes.clone();
            move |tail| [bytes.clone(), tail].concat()
        }),
        1 => (4000usize..4200).prop_map(move |n| {
            let mut b = bytes.clone();
            b.resize(n.max(b.len()), b' ');
            b
        }),
    ]
    .boxed()
}

/// Messages for the decoder: arbitrary bytes, arbitrary JSON, deep
/// nesting, and (mostly) request objects, each perhaps mangled.
pub fn message() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..128),
        1 => value().prop_map(String::into_bytes),
        1 => deep().prop_map(String::into_bytes),
        4 => request_text().prop_flat_map(mangle),
        4 => well_formed().prop_flat_map(mangle),
    ]
    .boxed()
}

// ---------------------------------------------------------------------
// Strategies: request heads

/// A header line: a known one with a good or bad value, or junk.
fn header_line() -> BoxedStrategy<Vec<u8>> {
    let known = prop::sample::select(vec![
        ("Host", "x"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", "http://127.0.0.1"),
        ("Origin", "https://evil.example"),
        ("Authorization", "Bearer s3cr3t"),
        ("Content-Length", "5"),
        ("Transfer-Encoding", "chunked"),
    ]);
    prop_oneof![
        6 => known.prop_map(|(n, v)| format!("{n}: {v}\r\n").into_bytes()),
        1 => (prop::sample::select(vec!["Upgrade", "Connection", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Origin"]), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(n, v)| [format!("{n}: ").into_bytes(), v, b"\r\n".to_vec()].concat()),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(|mut v| { v.extend_from_slice(b"\r\n"); v }),
        1 => (17_000usize..18_000).prop_map(|n| format!("X-Long: {}\r\n", "a".repeat(n)).into_bytes()),
    ]
    .boxed()
}

/// The headers of a valid WebSocket upgrade.
const UPGRADE: &str = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// A request head: a request line (good or mangled), the headers of an
/// upgrade or not, more headers (perhaps too many, or too long), perhaps no
/// end; or arbitrary bytes.
pub fn head() -> BoxedStrategy<Vec<u8>> {
    let method = prop_oneof![
        6 => Just("GET"),
        1 => prop::sample::select(vec!["POST", "HEAD", "PUT", "get", "G\u{e9}T", ""]),
    ];
    let path = prop_oneof![
        6 => prop::sample::select(vec!["/ws", "/ws/forwarded", "/", "/healthz", "/nope", "/ws?x=1", "*", "ws", "/ws/"]).prop_map(str::to_owned),
        1 => "[ -~]{0,30}",
        1 => (2000usize..20_000).prop_map(|n| format!("/{}", "p".repeat(n))),
    ];
    let version = prop_oneof![
        6 => Just("HTTP/1.1"),
        1 => prop::sample::select(vec!["HTTP/1.0", "HTTP/2", "HTTP/1.1 ", "", "http/1.1"]),
    ];
    let end = prop_oneof![8 => Just("\r\n"), 1 => prop::sample::select(vec!["", "\n", "\r\n\r\n"])];
    let many = prop_oneof![8 => Just(0usize), 1 => 1usize..4];
    let structured = (
        method,
        path,
        version,
        any::<bool>(),
        prop::collection::vec(header_line(), 0..4),
        many,
        end,
    )
        .prop_map(|(method, path, version, upgrade, headers, many, end)| {
            let mut bytes = format!("{method} {path} {version}\r\n").into_bytes();
            if upgrade {
                bytes.extend_from_slice(UPGRADE.as_bytes());
            }
            for _ in 0..many * 40 {
                bytes.extend_from_slice(b"X-Many: 1\r\n");
            }
            for header in headers {
                bytes.extend_from_slice(&header);
            }
            bytes.extend_from_slice(end.as_bytes());
            bytes
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        6 => structured.prop_flat_map(|bytes| mangle(String::from_utf8_lossy(&bytes).into_owned())),
    ]
    .boxed()
}

// ---------------------------------------------------------------------
// The real server, over in-memory streams

/// Connections handed to the server one by one.
struct Incoming(mpsc::UnboundedReceiver<DuplexStream>);

#[async_trait]
impl Listener for Incoming {
    type Stream = DuplexStream;

    async fn accept(&mut self) -> std::io::Result<(DuplexStream, SocketAddr)> {
        match self.0.recv().await {
            Some(stream) => Ok((stream, SocketAddr::from(([127, 0, 0, 1], 40_000)))),
            None => std::future::pending().await,
        }
    }
}

/// The WebSocket server with a real engine, fed over in-memory streams.
pub struct Rig {
    connect: mpsc::UnboundedSender<DuplexStream>,
    limits: Limits,
}

/// How long a case may take before it counts as a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

impl Rig {
    /// Starts the engine and the server on the current runtime.
    pub fn start() -> Rig {
        let limits = limits();
        let engine = Engine::start(EngineConfig {
            shards: 2,
            limits,
            ..EngineConfig::new()
        });
        let (connect, incoming) = mpsc::unbounded_channel();
        let config = WsConfig {
            head_bytes_max: 16 * 1024,
            ..WsConfig::default()
        };
        tokio::spawn(serve(
            Incoming(incoming),
            engine,
            config,
            std::future::pending(),
        ));
        Rig { connect, limits }
    }

    fn open(&self) -> Result<DuplexStream, String> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        self.connect
            .send(theirs)
            .map_err(|_| "the server is gone".to_owned())?;
        Ok(ours)
    }

    /// Sends `bytes` as a request head (then ends the stream) and checks
    /// that the answer is well-formed HTTP; returns `http <status>`.
    pub async fn head(&self, bytes: &[u8]) -> Result<String, String> {
        let stream = self.open()?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let write = async {
            // The server may stop reading (and close) before the end.
            let _ = writer.write_all(bytes).await;
            let _ = writer.shutdown().await;
        };
        let read = async {
            let mut answer = Vec::new();
            let _ = reader.read_to_end(&mut answer).await;
            answer
        };
        let exchange = async { tokio::join!(write, read).1 };
        let answer = tokio::time::timeout(CASE_TIMEOUT, exchange)
            .await
            .map_err(|_| "no answer and no close within 10 s".to_owned())?;
        check_http_answer(&answer)
    }

    /// Upgrades a connection, sends `payload` as one text (or binary)
    /// frame, and checks the answer against the decoder's verdict.
    pub async fn frame(&self, payload: &[u8], text: bool) -> Result<String, String> {
        let stream = self.open()?;
        let (mut ws, _) = tokio_tungstenite::client_async("ws://fuzz/ws", stream)
            .await
            .map_err(|e| format!("upgrade failed: {e}"))?;
        let opcode = OpCode::Data(if text { Data::Text } else { Data::Binary });
        let frame = Frame::message(payload.to_vec(), opcode, true);
        ws.send(Message::Frame(frame))
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        let expected = self.expect(payload, text);
        // A valid lock on a key that an earlier case holds waits for it:
        // give it a moment to be granted, then count it as waiting.
        let patience = match expected {
            Expect::ValidMayWait => Duration::from_millis(50),
            _ => Duration::from_secs(2),
        };
        let answer = tokio::time::timeout(patience, next_answer(&mut ws)).await;
        let _ = ws.close(None).await;
        match (answer, expected) {
            (Err(_), Expect::ValidMayWait) => Ok("valid lock, waiting".to_owned()),
            (Err(_), _) => Err("no answer within 2 s".to_owned()),
            (Ok(answer), expected) => judge(answer, expected),
        }
    }

    /// What the server must answer `payload` with.
    fn expect(&self, payload: &[u8], text: bool) -> Expect {
        if payload.len() > self.limits.message_bytes_max {
            return Expect::Close(1009);
        }
        if !text {
            return Expect::Refused(None, ErrorCode::BadRequest);
        }
        if std::str::from_utf8(payload).is_err() {
            return Expect::Close(1007);
        }
        match decode_request(payload, &self.limits) {
            Ok(Request {
                op: Op::Lock(deadbolt_core::proto::LockOp::Acquire(acquire)),
                ..
            }) if acquire.wait != deadbolt_core::proto::Wait::Never => Expect::ValidMayWait,
            Ok(request) => Expect::Valid(request.id),
            Err(refusal) => Expect::Refused(refusal.id, refusal.error.code),
        }
    }
}

/// What a frame must be answered with.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A reply to this id (any outcome but `bad_request`/`too_large`).
    Valid(u64),
    /// A valid `lock` that may wait for its key.
    ValidMayWait,
    /// This error, under this id.
    Refused(Option<u64>, ErrorCode),
    /// The connection closed with this code.
    Close(u16),
}

/// The server's answer to a frame.
#[derive(Debug)]
enum Answer {
    Reply(String),
    Close(Option<u16>),
}

async fn next_answer<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Answer
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(text)) => return Answer::Reply(text.as_str().to_owned()),
            Ok(Message::Close(frame)) => return Answer::Close(frame.map(|f| u16::from(f.code))),
            Ok(_) => continue,
            Err(_) => return Answer::Close(None),
        }
    }
    Answer::Close(None)
}

fn judge(answer: Answer, expected: Expect) -> Result<String, String> {
    match (answer, expected) {
        (Answer::Close(Some(code)), Expect::Close(want)) if code == want => {
            Ok(format!("close {code}"))
        }
        (Answer::Reply(reply), Expect::Refused(id, code)) => {
            check_error_reply(&reply, id, code)?;
            Ok(code.as_str().to_owned())
        }
        (Answer::Reply(reply), expected @ (Expect::Valid(_) | Expect::ValidMayWait)) => {
            let raw = decode_reply(reply.as_bytes()).map_err(|e| format!("reply {reply}: {e}"))?;
            let refused_as_bad = raw
                .err
                .as_ref()
                .is_some_and(|e| matches!(e.code, ErrorCode::BadRequest | ErrorCode::TooLarge));
            if refused_as_bad || raw.ok.is_none() && raw.err.is_none() {
                return Err(format!("a valid request answered {reply}"));
            }
            if let Expect::Valid(want) = expected
                && raw.id != Some(want)
            {
                return Err(format!("reply {reply} to request id {want}"));
            }
            Ok(match raw.err {
                Some(error) => format!("valid, {}", error.code.as_str()),
                None => "valid, ok".to_owned(),
            })
        }
        (answer, expected) => Err(format!("answered {answer:?}, expected {expected:?}")),
    }
}

/// A complete HTTP/1.1 response: status line, headers, and exactly
/// `Content-Length` bytes of body (or a `101` upgrade with its accept key).
fn check_http_answer(answer: &[u8]) -> Result<String, String> {
    if answer.is_empty() {
        return Err("closed without an answer".to_owned());
    }
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let end = match response.parse(answer) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return Err(format!("a partial answer: {}", show(answer))),
        Err(e) => return Err(format!("not HTTP ({e}): {}", show(answer))),
    };
    let code = response.code.unwrap_or_default();
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    if code == 101 {
        return match header("sec-websocket-accept") {
            Some(_) => Ok("http 101".to_owned()),
            None => Err("101 without Sec-WebSocket-Accept".to_owned()),
        };
    }
    let length: usize = header("content-length")
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| format!("{code} without a Content-Length"))?;
    if answer.len() - end != length {
        return Err(format!(
            "{code}: Content-Length {length}, body of {} bytes",
            answer.len() - end
        ));
    }
    Ok(format!("http {code}"))
}

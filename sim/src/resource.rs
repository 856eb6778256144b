//! The protected resource: a tiny store that workers write to under their
//! locks, fenced by token. It refuses any read or write whose token is
//! below the highest it has seen for that key, which is what makes a lock
//! safe even when a holder's writes arrive late.
//!
//! Protocol, one line each way over simulated TCP:
//! `R key token` → `V value` or `NO highest`;
//! `W key token value` → `OK` or `NO highest`;
//! `P key` → `V value` (unfenced, for the auditor).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::history::{Actor, History, What};

/// The resource's port.
pub const PORT: u16 = 9000;
/// How long a worker waits for the resource before giving up on a request.
const TIMEOUT: Duration = Duration::from_millis(800);

/// One key's state.
#[derive(Debug, Default, Clone, Copy)]
struct Cell {
    value: u64,
    highest: u64,
}

/// Serves the resource until the simulation ends.
pub async fn serve(history: History) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    let cells = Arc::new(Mutex::new(BTreeMap::<String, Cell>::new()));
    loop {
        let (stream, _) = listener.accept().await?;
        let (cells, history) = (cells.clone(), history.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = apply(&line, &cells, &history);
                if write
                    .write_all(format!("{answer}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

fn apply(line: &str, cells: &Mutex<BTreeMap<String, Cell>>, history: &History) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut cells = cells.lock().unwrap_or_else(|p| p.into_inner());
    if let ["P", key] = words[..] {
        return format!("V {}", cells.get(key).map_or(0, |c| c.value));
    }
    let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
    let (Some(key), Some(token)) = (words.get(1), number(2)) else {
        return "ERR malformed".to_owned();
    };
    let cell = cells.entry((*key).to_owned()).or_default();
    if token < cell.highest {
        let highest = cell.highest;
        history.record(
            Actor::Resource,
            What::Refused {
                key: (*key).to_owned(),
                token,
                highest,
            },
        );
        return format!("NO {highest}");
    }
    cell.highest = token;
    match (words.first().copied(), number(3)) {
        (Some("R"), _) => format!("V {}", cell.value),
        (Some("W"), Some(value)) => {
            cell.value = value;
            history.record(
                Actor::Resource,
                What::Accepted {
                    key: (*key).to_owned(),
                    token,
                    value,
                },
            );
            "OK".to_owned()
        }
        _ => "ERR malformed".to_owned(),
    }
}

/// Sends one line to the resource and returns its answer.
async fn call(line: String) -> Result<String, String> {
    let exchange = async {
        let stream = turmoil::net::TcpStream::connect(("resource", PORT))
            .await
            .map_err(|e| e.to_string())?;
        let (read, mut write) = stream.into_split();
        write
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(read).lines();
        lines
            .next_line()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "closed".to_owned())
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// What a fenced read or write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Read: the value; write: accepted.
    Yes(u64),
    /// Refused: a higher token has been seen.
    Refused,
}

/// A fenced read.
pub async fn read(key: &str, token: u64) -> Result<Answer, String> {
    parse(&call(format!("R {key} {token}")).await?)
}

/// A fenced write.
pub async fn write(key: &str, token: u64, value: u64) -> Result<Answer, String> {
    parse(&call(format!("W {key} {token} {value}")).await?)
}

/// A worker's fenced read of `key` with `token`, recorded in its history
/// (asked, then read or failed): the value, if the resource let it read.
pub async fn recorded_read(history: &History, worker: usize, key: &str, token: u64) -> Option<u64> {
    let record = |what| history.record(Actor::Worker(worker), what);
    record(What::ReadAsked {
        key: key.to_owned(),
        token,
    });
    let key = key.to_owned();
    match read(&key, token).await {
        Ok(Answer::Yes(value)) => {
            record(What::Read { key, value });
            Some(value)
        }
        Ok(Answer::Refused) => {
            record(What::ResourceFailed {
                key,
                error: "read refused: a newer token exists".into(),
            });
            None
        }
        Err(error) => {
            record(What::ResourceFailed { key, error });
            None
        }
    }
}

/// A worker's fenced write of `value` to `key` with `token`, recorded in its
/// history (asked, then written or failed).
pub async fn recorded_write(history: &History, worker: usize, key: &str, token: u64, value: u64) {
    let record = |what| history.record(Actor::Worker(worker), what);
    let key = key.to_owned();
    record(What::WriteAsked {
        key: key.clone(),
        token,
        value,
    });
    match write(&key, token, value).await {
        Ok(answer) => record(What::Written {
            key,
            token,
            accepted: answer != Answer::Refused,
        }),
        Err(error) => record(What::ResourceFailed { key, error }),
    }
}

/// The current value, unfenced, for the auditor.
pub async fn peek(key: &str) -> Result<u64, String> {
    let answer = call(format!("P {key}")).await?;
    match answer.split_whitespace().collect::<Vec<_>>()[..] {
        ["V", value] => value.parse().map_err(|_| answer.clone()),
        _ => Err(answer),
    }
}

fn parse(answer: &str) -> Result<Answer, String> {
    match answer.split_whitespace().collect::<Vec<_>>()[..] {
        ["V", value] => value
            .parse()
            .map(Answer::Yes)
            .map_err(|_| answer.to_owned()),
        ["OK"] => Ok(Answer::Yes(0)),
        ["NO", _] => Ok(Answer::Refused),
        _ => Err(answer.to_owned()),
    }
}

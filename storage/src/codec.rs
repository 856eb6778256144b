//! The bytes of log records: a shard's batch of commands, a run's start,
//! a token reservation. Integers are LEB128 varints; an op is its wire
//! JSON (the one schema, `deadbolt_core::proto`), so the log needs no
//! second definition of the ops.

use std::sync::Arc;

use deadbolt_core::limits::Limits;
use deadbolt_core::proto::{Op, Request, decode_request, encode_request};
use deadbolt_core::shard::{Caller, Command, Handle, Input, ShardOp};
use deadbolt_core::time::Tick;

/// A record of the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A server started on the log: its shard count and the limits its
    /// shards enforce from here on (a replay must refuse what they refused).
    Run {
        /// Shards of the engine.
        shards: u32,
        /// The engine-wide limits.
        limits: Limits,
    },
    /// Commands of one shard, in the order it applied them.
    Batch {
        /// The shard.
        shard: u32,
        /// Its commands.
        commands: Vec<Command>,
    },
    /// Shard `shard` may hand out tokens below `upto`: after a restart its
    /// tokens start at `upto` or above, even if the end of the log was lost.
    Reserve {
        /// The shard.
        shard: u32,
        /// The first token not reserved.
        upto: u64,
    },
}

/// What a record's bytes could not be read as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable record: {0}")]
pub struct CodecError(pub String);

const RUN: u8 = 1;
const BATCH: u8 = 2;
const RESERVE: u8 = 3;

const OP: u8 = 0;
const CANCEL: u8 = 1;
const GONE: u8 = 2;
const CLOSED: u8 = 3;
const TICK: u8 = 4;
const RESTART: u8 = 5;
/// An [`Input::Op`] of a [`ShardOp::Claim`], which has no wire JSON.
const CLAIM: u8 = 6;

/// The payload of record number `lsn`.
pub fn encode(lsn: u64, record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    match record {
        Record::Run { shards, limits } => {
            put_header(&mut out, RUN, lsn, *shards);
            put_limits(&mut out, limits);
        }
        Record::Batch { shard, commands } => {
            put_header(&mut out, BATCH, lsn, *shard);
            out.extend_from_slice(&encode_commands(commands));
        }
        Record::Reserve { shard, upto } => {
            put_header(&mut out, RESERVE, lsn, *shard);
            put_u64(&mut out, *upto);
        }
    }
    out
}

/// A batch record's payload with its commands already encoded by
/// [`encode_commands`] (the shard encodes them; the writer numbers them).
pub fn encode_batch(lsn: u64, shard: u32, commands: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(commands.len() + 16);
    put_header(&mut out, BATCH, lsn, shard);
    out.extend_from_slice(commands);
    out
}

fn put_header(out: &mut Vec<u8>, kind: u8, lsn: u64, shard: u32) {
    out.push(kind);
    put_u64(out, lsn);
    put_u64(out, u64::from(shard));
}

/// A record's number and content.
pub fn decode(payload: &[u8]) -> Result<(u64, Record), CodecError> {
    let mut reader = Reader(payload);
    let kind = reader.byte()?;
    let lsn = reader.u64()?;
    let shard = u32::try_from(reader.u64()?).map_err(|_| bad("shard out of range"))?;
    let record = match kind {
        RUN => Record::Run {
            shards: shard,
            limits: reader.limits()?,
        },
        BATCH => Record::Batch {
            shard,
            commands: reader.commands()?,
        },
        RESERVE => Record::Reserve {
            shard,
            upto: reader.u64()?,
        },
        other => return Err(bad(format!("unknown record kind {other}"))),
    };
    if !reader.0.is_empty() {
        return Err(bad("bytes after the record"));
    }
    Ok((lsn, record))
}

/// A batch of commands, as a batch record carries them.
pub fn encode_commands(commands: &[Command]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, commands.len() as u64);
    for command in commands {
        put_u64(&mut out, command.at.0);
        put_input(&mut out, &command.input);
    }
    out
}

fn put_input(out: &mut Vec<u8>, input: &Input) {
    match input {
        Input::Op { handle, caller, op } => {
            let claim = matches!(op, ShardOp::Claim { .. });
            out.push(if claim { CLAIM } else { OP });
            put_u64(out, handle.0);
            put_u64(out, caller.conn);
            put_str(out, &caller.client);
            put_op(out, op);
        }
        Input::Cancel { handle, key } => {
            out.push(CANCEL);
            put_u64(out, handle.0);
            put_str(out, key);
        }
        Input::RequesterGone { handle, key } => {
            out.push(GONE);
            put_u64(out, handle.0);
            put_str(out, key);
        }
        Input::ConnectionClosed { conn } => {
            out.push(CLOSED);
            put_u64(out, *conn);
        }
        Input::Tick => out.push(TICK),
        Input::Restart { token_floor } => {
            out.push(RESTART);
            put_u64(out, *token_floor);
        }
    }
}

/// An op: as the JSON request a client would send for it, or for a claim
/// (no client's op) its client id and principal.
fn put_op(out: &mut Vec<u8>, op: &ShardOp) {
    let op = match op {
        ShardOp::Lock(op) => Op::Lock(op.clone()),
        ShardOp::Set(op) => Op::Set(op.clone()),
        ShardOp::Claim { client, principal } => {
            put_str(out, client);
            put_str(out, principal);
            return;
        }
    };
    put_str(out, &encode_request(&Request { id: 0, op }));
}

/// Limits wide enough to read back any op a server once accepted, whatever
/// limits it ran with.
fn replay_limits() -> Limits {
    Limits {
        message_bytes_max: usize::MAX,
        key_bytes_max: usize::MAX,
        client_id_bytes_max: usize::MAX,
        ttl_ms_max: u64::MAX,
        wait_ms_max: u64::MAX,
        insert_batch_max: usize::MAX,
        members_page_max: u32::MAX,
        stats_top_max: u32::MAX,
        ..Limits::unbounded_capacity()
    }
}

/// The limits' fields in a fixed order; a new field goes at the end.
fn limits_fields(limits: &Limits) -> [u64; 17] {
    let wide = |n: usize| n as u64;
    [
        wide(limits.message_bytes_max),
        wide(limits.key_bytes_max),
        wide(limits.client_id_bytes_max),
        limits.ttl_ms_max,
        limits.wait_ms_max,
        wide(limits.insert_batch_max),
        u64::from(limits.members_page_max),
        u64::from(limits.stats_top_max),
        wide(limits.locks_max),
        wide(limits.lock_key_bytes_max),
        wide(limits.waiters_per_key_max),
        wide(limits.waiters_max),
        wide(limits.sets_max),
        wide(limits.set_members_max),
        wide(limits.members_max),
        wide(limits.member_bytes_max),
        wide(limits.mailbox_len),
    ]
}

/// Writes `limits` (for run records and snapshot headers).
pub fn put_limits(out: &mut Vec<u8>, limits: &Limits) {
    for field in limits_fields(limits) {
        put_u64(out, field);
    }
}

/// Appends `n` as a LEB128 varint.
pub fn put_u64(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn bad(message: impl Into<String>) -> CodecError {
    CodecError(message.into())
}

/// Reads what the functions above wrote, front to back.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    /// One byte.
    pub fn byte(&mut self) -> Result<u8, CodecError> {
        let (&first, rest) = self.0.split_first().ok_or_else(|| bad("cut short"))?;
        self.0 = rest;
        Ok(first)
    }

    /// A varint.
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(bad("varint too long"))
    }

    /// A varint that must fit a `usize`.
    pub fn usize(&mut self) -> Result<usize, CodecError> {
        usize::try_from(self.u64()?).map_err(|_| bad("number too large"))
    }

    /// `len` raw bytes.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < len {
            return Err(bad("cut short"));
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    fn str(&mut self) -> Result<&'a str, CodecError> {
        let len = self.usize()?;
        std::str::from_utf8(self.bytes(len)?).map_err(|_| bad("invalid UTF-8"))
    }

    /// Limits written by [`put_limits`].
    pub fn limits(&mut self) -> Result<Limits, CodecError> {
        let mut f = [0u64; 17];
        for field in &mut f {
            *field = self.u64()?;
        }
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let small = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Limits {
            message_bytes_max: size(f[0]),
            key_bytes_max: size(f[1]),
            client_id_bytes_max: size(f[2]),
            ttl_ms_max: f[3],
            wait_ms_max: f[4],
            insert_batch_max: size(f[5]),
            members_page_max: small(f[6]),
            stats_top_max: small(f[7]),
            locks_max: size(f[8]),
            lock_key_bytes_max: size(f[9]),
            waiters_per_key_max: size(f[10]),
            waiters_max: size(f[11]),
            sets_max: size(f[12]),
            set_members_max: size(f[13]),
            members_max: size(f[14]),
            member_bytes_max: size(f[15]),
            mailbox_len: size(f[16]),
            // The bounds on pushed events are the frontends', not the
            // shards': a replay never needs them, so they are not logged.
            ..Limits::default()
        })
    }

    /// A batch of commands, as [`encode_commands`] wrote them.
    pub fn commands(&mut self) -> Result<Vec<Command>, CodecError> {
        let count = self.usize()?;
        // Each command takes at least two bytes: a bound on a garbage count.
        let mut commands = Vec::with_capacity(count.min(self.0.len() / 2));
        for _ in 0..count {
            let at = Tick(self.u64()?);
            let input = self.input()?;
            commands.push(Command { at, input });
        }
        Ok(commands)
    }

    fn input(&mut self) -> Result<Input, CodecError> {
        Ok(match self.byte()? {
            OP => {
                let handle = Handle(self.u64()?);
                let conn = self.u64()?;
                let client: Arc<str> = Arc::from(self.str()?);
                let op = shard_op(self.str()?)?;
                Input::Op {
                    handle,
                    caller: Caller { client, conn },
                    op,
                }
            }
            CLAIM => {
                let handle = Handle(self.u64()?);
                let conn = self.u64()?;
                let client: Arc<str> = Arc::from(self.str()?);
                let op = ShardOp::Claim {
                    client: self.str()?.to_owned(),
                    principal: self.str()?.to_owned(),
                };
                Input::Op {
                    handle,
                    caller: Caller { client, conn },
                    op,
                }
            }
            CANCEL => Input::Cancel {
                handle: Handle(self.u64()?),
                key: self.str()?.to_owned(),
            },
            GONE => Input::RequesterGone {
                handle: Handle(self.u64()?),
                key: self.str()?.to_owned(),
            },
            CLOSED => Input::ConnectionClosed { conn: self.u64()? },
            TICK => Input::Tick,
            RESTART => Input::Restart {
                token_floor: self.u64()?,
            },
            other => return Err(bad(format!("unknown command kind {other}"))),
        })
    }
}

/// The shard op of a logged JSON request.
fn shard_op(json: &str) -> Result<ShardOp, CodecError> {
    let request = decode_request(json.as_bytes(), &replay_limits())
        .map_err(|e| bad(format!("logged op: {e:?}")))?;
    match request.op {
        Op::Lock(op) => Ok(ShardOp::Lock(op)),
        Op::Set(op) => Ok(ShardOp::Set(op)),
        other => Err(bad(format!("logged op {} is not a shard op", other.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deadbolt_core::proto::{Acquire, Keys, LockOp, Mode, SetOp, Wait};

    fn caller(conn: u64) -> Caller {
        Caller {
            client: Arc::from("worker-7"),
            conn,
        }
    }

    fn every_kind_of_command() -> Vec<Command> {
        let lock = LockOp::Acquire(Acquire {
            key: "job/\"42\"\n".to_owned(),
            ttl_ms: 30_000,
            wait: Wait::from_wait_ms(Some(250)),
            ephemeral: true,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        });
        let insert = SetOp::Insert {
            set: "results".to_owned(),
            keys: Keys::Many(vec!["a".to_owned(), "é".to_owned()]),
        };
        let inputs = vec![
            Input::Op {
                handle: Handle(1),
                caller: caller(3),
                op: ShardOp::Lock(lock),
            },
            Input::Op {
                handle: Handle(u64::MAX),
                caller: caller(4),
                op: ShardOp::Set(insert),
            },
            Input::Op {
                handle: Handle(5),
                caller: caller(4),
                op: ShardOp::Claim {
                    client: "worker-7".to_owned(),
                    principal: "ingest".to_owned(),
                },
            },
            Input::Cancel {
                handle: Handle(1),
                key: "job/\"42\"\n".to_owned(),
            },
            Input::RequesterGone {
                handle: Handle(9),
                key: "k".to_owned(),
            },
            Input::ConnectionClosed { conn: 3 },
            Input::Tick,
            Input::Restart {
                token_floor: 1 << 40,
            },
        ];
        inputs
            .into_iter()
            .enumerate()
            .map(|(i, input)| Command {
                at: Tick(1_000_000 * i as u64),
                input,
            })
            .collect()
    }

    #[test]
    fn every_record_reads_back_as_written() {
        let commands = every_kind_of_command();
        let records = [
            Record::Run {
                shards: 4,
                limits: Limits::default(),
            },
            Record::Batch {
                shard: 3,
                commands: commands.clone(),
            },
            Record::Reserve {
                shard: 2,
                upto: 65_536,
            },
        ];
        for (lsn, record) in records.into_iter().enumerate() {
            let lsn = lsn as u64 + 300;
            assert_eq!(decode(&encode(lsn, &record)), Ok((lsn, record)));
        }
        let batch = encode_batch(7, 3, &encode_commands(&commands));
        assert_eq!(
            decode(&batch),
            Ok((7, Record::Batch { shard: 3, commands }))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = encode(
            1,
            &Record::Batch {
                shard: 0,
                commands: every_kind_of_command(),
            },
        );
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = decode(&flipped);
            flipped[i] ^= 0xff;
        }
    }
}

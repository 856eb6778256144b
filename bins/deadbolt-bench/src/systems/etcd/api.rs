//! The few calls of etcd's v3 API the harness makes, as its JSON gateway
//! spells them: `POST /v3/...` with keys and values in base64, 64-bit
//! integers as strings, and fields at their zero value left out of
//! answers (a failed transaction has no `succeeded`).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::http::Http;

/// One connection to one etcd member's client port.
pub struct Api {
    http: Http,
}

/// A member's `/v3/maintenance/status`, the parts the harness reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The member that answered.
    pub member: u64,
    /// The leader it knows of (0: none).
    pub leader: u64,
    /// Bytes of its backend database in use.
    pub db_in_use: u64,
}

impl Api {
    /// Connects to a member's client port.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Api> {
        Ok(Api {
            http: Http::connect(addr).await?,
        })
    }

    async fn call<R: DeserializeOwned>(
        &mut self,
        path: &str,
        request: &impl Serialize,
    ) -> anyhow::Result<R> {
        let body = serde_json::to_vec(request)?;
        let response = self.http.post(path, &body).await?;
        if response.status != 200 {
            bail!(
                "etcd {path}: HTTP {}: {}",
                response.status,
                failure(&response.body)
            );
        }
        serde_json::from_slice(&response.body).with_context(|| {
            format!(
                "etcd {path}: an answer we cannot read: {}",
                String::from_utf8_lossy(&response.body)
            )
        })
    }

    /// A new lease of `ttl_s` seconds: its id.
    pub async fn grant(&mut self, ttl_s: i64) -> anyhow::Result<i64> {
        let grant: Grant = self
            .call(
                "/v3/lease/grant",
                &serde_json::json!({ "TTL": ttl_s.to_string() }),
            )
            .await?;
        anyhow::ensure!(grant.error.is_empty(), "lease grant: {}", grant.error);
        Ok(grant.id)
    }

    /// Runs a transaction: whether its comparisons held, and the answers
    /// of the transactions nested in it.
    pub async fn txn(&mut self, txn: &Txn) -> anyhow::Result<TxnAnswer> {
        self.call("/v3/kv/txn", txn).await
    }

    /// Waits on the server (the lock service) until the lock `name` is this
    /// lease's: the key that holds it.
    pub async fn lock(&mut self, name: &[u8], lease: i64) -> anyhow::Result<Vec<u8>> {
        let request = serde_json::json!({ "name": b64(name), "lease": lease.to_string() });
        let locked: Locked = self.call("/v3/lock/lock", &request).await?;
        STANDARD
            .decode(&locked.key)
            .context("the lock service's key is not base64")
    }

    /// Deletes one key (what `/v3/lock/unlock` does, without its detour
    /// through the server's own client).
    pub async fn delete(&mut self, key: &[u8]) -> anyhow::Result<()> {
        let _: serde_json::Value = self
            .call(
                "/v3/kv/deleterange",
                &serde_json::json!({ "key": b64(key) }),
            )
            .await?;
        Ok(())
    }

    /// Writes `key` unconditionally.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        let put = serde_json::json!({ "key": b64(key), "value": b64(value) });
        let _: serde_json::Value = self.call("/v3/kv/put", &put).await?;
        Ok(())
    }

    /// This member's status.
    pub async fn status(&mut self) -> anyhow::Result<Status> {
        let status: StatusAnswer = self
            .call("/v3/maintenance/status", &serde_json::json!({}))
            .await?;
        Ok(Status {
            member: status.header.member_id,
            leader: status.leader,
            db_in_use: status.db_size_in_use,
        })
    }
}

/// What an error answer says (`{"error": ..., "message": ..., "code": ...}`),
/// or its text.
fn failure(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Failure {
        message: String,
    }
    serde_json::from_slice::<Failure>(body)
        .map(|f| f.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The end of the range of every key that starts with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff raised by
/// one and what follows dropped; `\0` (every key) if all bytes are 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

/// A transaction: if every comparison holds, its `success` operations.
/// (The harness never needs a `failure` branch: a failed comparison is
/// the answer.)
#[derive(Debug, Serialize)]
pub struct Txn {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    compare: Vec<Compare>,
    success: Vec<Request>,
}

/// A comparison: that no key in `[key, range_end)` (or `key` alone) exists,
/// which etcd says as "its create revision is 0".
#[derive(Debug, Serialize)]
struct Compare {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    range_end: Option<String>,
    target: &'static str,
    result: &'static str,
    create_revision: &'static str,
}

/// An operation in a transaction.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    RequestPut(Put),
    RequestTxn(Txn),
}

#[derive(Debug, Serialize)]
struct Put {
    key: String,
    value: String,
    /// The lease the key dies with (none: the key lives until deleted).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
}

impl Compare {
    fn absent(key: &[u8], range_end: Option<&[u8]>) -> Compare {
        Compare {
            key: b64(key),
            range_end: range_end.map(b64),
            target: "CREATE",
            result: "EQUAL",
            create_revision: "0",
        }
    }
}

impl Put {
    fn new(key: &[u8], lease: Option<i64>) -> Put {
        Put {
            key: b64(key),
            value: String::new(),
            lease: lease.map(|l| l.to_string()),
        }
    }
}

impl Txn {
    /// Writes `key` with `lease` only if it does not exist.
    pub fn create(key: &[u8], lease: Option<i64>) -> Txn {
        Txn {
            compare: vec![Compare::absent(key, None)],
            success: vec![Request::RequestPut(Put::new(key, lease))],
        }
    }

    /// Takes the lock `name` for `lease` only if nobody holds it or waits
    /// for it: the key the lock service would write (`name/<lease in
    /// hex>`), written only if no key starts with `name/`. Compatible with
    /// the lock service, whose holder is the oldest key under `name/`.
    pub fn try_lock(name: &[u8], lease: i64) -> Txn {
        let prefix = [name, b"/"].concat();
        Txn {
            compare: vec![Compare::absent(&prefix, Some(&prefix_end(&prefix)))],
            success: vec![Request::RequestPut(Put::new(
                &lock_key(name, lease),
                Some(lease),
            ))],
        }
    }

    /// One transaction of `Txn::create` for each key, each deciding on its
    /// own: the nested answers say which keys were new. The keys must be
    /// distinct (etcd refuses two writes of one key in a transaction).
    pub fn create_each<'a>(keys: impl IntoIterator<Item = &'a [u8]>, lease: Option<i64>) -> Txn {
        Txn {
            compare: Vec::new(),
            success: keys
                .into_iter()
                .map(|key| Request::RequestTxn(Txn::create(key, lease)))
                .collect(),
        }
    }
}

/// The key that holds the lock `name` for `lease`, as etcd's lock service
/// names it (`concurrency.Mutex`: the prefix, then the lease id in hex).
pub fn lock_key(name: &[u8], lease: i64) -> Vec<u8> {
    [name, format!("/{lease:x}").as_bytes()].concat()
}

/// A transaction's answer.
#[derive(Debug, Default, Deserialize)]
pub struct TxnAnswer {
    /// Whether the comparisons held (absent when false).
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    responses: Vec<Response>,
}

#[derive(Debug, Deserialize)]
struct Response {
    response_txn: Option<TxnAnswer>,
}

impl TxnAnswer {
    /// Whether each nested transaction succeeded, in order.
    pub fn nested(&self) -> anyhow::Result<Vec<bool>> {
        self.responses
            .iter()
            .map(|r| {
                r.response_txn
                    .as_ref()
                    .map(|t| t.succeeded)
                    .context("an answer that is not a nested transaction")
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct Grant {
    #[serde(rename = "ID", deserialize_with = "int")]
    id: i64,
    #[serde(default)]
    error: String,
}

#[derive(Deserialize)]
struct Locked {
    key: String,
}

#[derive(Deserialize)]
struct StatusAnswer {
    header: Header,
    #[serde(default, deserialize_with = "int")]
    leader: u64,
    #[serde(default, rename = "dbSizeInUse", deserialize_with = "int")]
    db_size_in_use: u64,
}

#[derive(Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "int")]
    member_id: u64,
}

/// A 64-bit integer, which the gateway writes as a string (JSON numbers
/// lose precision past 2^53); a plain number is read too.
fn int<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: std::fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int<T> {
        Text(String),
        Number(T),
    }
    match Int::<T>::deserialize(deserializer)? {
        Int::Text(text) => text.parse().map_err(serde::de::Error::custom),
        Int::Number(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"lock/a/"), b"lock/a0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn a_try_lock_writes_the_lock_services_key_if_none_is_under_the_name() {
        // The key etcd 3.4's lock service wrote for lease 0x2040a22c6687eb05
        // on the name "h": "h/2040a22c6687eb05".
        assert_eq!(lock_key(b"h", 0x2040_a22c_6687_eb05), b"h/2040a22c6687eb05");
        let txn = serde_json::to_value(Txn::try_lock(b"h", 10)).unwrap();
        assert_eq!(
            txn,
            json!({
                "compare": [{
                    "key": b64(b"h/"), "range_end": b64(b"h0"),
                    "target": "CREATE", "result": "EQUAL", "create_revision": "0",
                }],
                "success": [{ "request_put": { "key": b64(b"h/a"), "value": "", "lease": "10" } }],
            })
        );
    }

    #[test]
    fn inserts_nest_one_transaction_per_key() {
        let keys: [&[u8]; 2] = [b"s/x", b"s/y"];
        let txn = serde_json::to_value(Txn::create_each(keys, None)).unwrap();
        let create = |key: &[u8]| {
            json!({ "request_txn": {
                "compare": [{ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
                "success": [{ "request_put": { "key": b64(key), "value": "" } }],
            }})
        };
        assert_eq!(txn, json!({ "success": [create(b"s/x"), create(b"s/y")] }));
    }

    #[test]
    fn answers_read_as_the_gateway_writes_them() {
        // Verbatim from etcd 3.4.23: a nested transaction whose first key
        // was new and whose second was not, and a failed plain one.
        let nested: TxnAnswer = serde_json::from_str(
            r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"3","raft_term":"2"},"succeeded":true,"responses":[{"response_txn":{"header":{},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"3"}}}]}},{"response_txn":{"header":{}}}]}"#,
        )
        .unwrap();
        assert!(nested.succeeded);
        assert_eq!(nested.nested().unwrap(), [true, false]);
        let failed: TxnAnswer = serde_json::from_str(
            r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"2","raft_term":"2"}}"#,
        )
        .unwrap();
        assert!(!failed.succeeded);
        let grant: Grant = serde_json::from_str(
            r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"1","raft_term":"2"},"ID":"2324035719305620229","TTL":"30"}"#,
        )
        .unwrap();
        assert_eq!(grant.id, 2_324_035_719_305_620_229);
        let status: StatusAnswer = serde_json::from_str(
            r#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"1","raft_term":"2"},"version":"3.4.23","dbSize":"20480","leader":"3319814642761637952","raftIndex":"5","raftTerm":"2","raftAppliedIndex":"5","dbSizeInUse":"16384"}"#,
        )
        .unwrap();
        assert_eq!(status.header.member_id, 3_319_814_642_761_637_952);
        assert_eq!(status.leader, status.header.member_id);
        assert_eq!(status.db_size_in_use, 16384);
    }

    #[test]
    fn an_error_answer_says_its_message() {
        let body = br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#;
        assert_eq!(failure(body), "etcdserver: requested lease not found");
        assert_eq!(failure(b"not json"), "not json");
    }
}

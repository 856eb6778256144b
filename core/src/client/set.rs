//! Distinct-set handles.

use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt, TryStreamExt};

use super::{Client, Error};
use crate::proto::{
    ErrorCode, Inserted, Keys, Member, MembersPage, Op, SetInfo, SetOp, SetUpReply, TornDown,
};

/// Keys per `insert` request when inserting many: well under the server's
/// default batch limit (10,000 keys) and message limit (1 MiB).
const INSERT_BATCH_KEYS: usize = 1000;
/// Bytes of keys per `insert` request when inserting many.
const INSERT_BATCH_BYTES: usize = 256 * 1024;
/// Keys per `members` page when streaming.
const MEMBERS_PAGE: u32 = 1000;

/// A handle on one distinct set. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DistinctSet {
    client: Client,
    name: String,
}

impl DistinctSet {
    pub(crate) fn new(client: Client, name: &str) -> DistinctSet {
        DistinctSet {
            client,
            name: name.to_owned(),
        }
    }

    /// The set's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn op(&self, make: impl FnOnce(String) -> SetOp) -> Op {
        Op::Set(make(self.name.clone()))
    }

    /// Creates the set with time to live `ttl`, or restarts its time to
    /// live if it exists; every worker may call it.
    pub async fn set_up(&self, ttl: Duration) -> Result<SetUpReply, Error> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let op = self.op(|set| SetOp::SetUp { set, ttl_ms });
        self.client.request(op).await
    }

    /// Inserts `key`: its index, and whether this client owns it (`first`).
    pub async fn insert(&self, key: &str) -> Result<Inserted, Error> {
        let keys = Keys::One(key.to_owned());
        let op = self.op(|set| SetOp::Insert { set, keys });
        self.client.request(op).await
    }

    /// Inserts `keys` in order, in as few requests as the limits allow; one
    /// result per key, in the same order.
    pub async fn insert_many<I, S>(&self, keys: I) -> Result<Vec<Inserted>, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut results = Vec::new();
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for key in keys {
            let key = key.into();
            if !batch.is_empty()
                && (batch.len() == INSERT_BATCH_KEYS
                    || batch_bytes + key.len() > INSERT_BATCH_BYTES)
            {
                let full = std::mem::take(&mut batch);
                results.extend(self.client.insert_batch(&self.name, full).await?);
                batch_bytes = 0;
            }
            batch_bytes += key.len();
            batch.push(key);
        }
        if !batch.is_empty() {
            results.extend(self.client.insert_batch(&self.name, batch).await?);
        }
        Ok(results)
    }

    /// One page of members: at most `limit` keys after index `after`.
    pub async fn members_page(&self, after: u64, limit: u32) -> Result<MembersPage, Error> {
        let op = self.op(|set| SetOp::Members { set, after, limit });
        self.client.request(op).await
    }

    /// Every member in index order, fetched a page at a time.
    pub fn members(&self) -> impl Stream<Item = Result<Member, Error>> + Send + 'static {
        let set = self.clone();
        stream::try_unfold(Some(0u64), move |after| {
            let set = set.clone();
            async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let page = set.members_page(after, MEMBERS_PAGE).await?;
                Ok::<_, Error>(Some((page.members, page.next)))
            }
        })
        .map_ok(|members| stream::iter(members.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    /// Size and remaining time to live.
    pub async fn inspect(&self) -> Result<SetInfo, Error> {
        let op = self.op(|set| SetOp::Inspect { set });
        self.client.request(op).await
    }

    /// Removes the set now. Returns how many keys it held, or `None` if it
    /// was already gone (never set up, expired, or torn down — perhaps by an
    /// earlier attempt of this call whose reply was lost).
    pub async fn tear_down(&self) -> Result<Option<u64>, Error> {
        let op = self.op(|set| SetOp::TearDown { set });
        match self.client.request::<TornDown>(op).await {
            Ok(torn) => Ok(Some(torn.size)),
            Err(e) if e.code() == Some(ErrorCode::NoSuchSet) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

//! A key's grants: a set of holders, one entry for a mutex.
//!
//! The rules never assume a single holder: they ask whether the set has
//! room, find a grant by token or by client, and remove one. A mutex is a
//! set of capacity one; shared locks and semaphores (SPEC section 7) are
//! the same set with more room, not a second code path. The first holder
//! is stored inline, because almost every held key has exactly one.

use crate::image::Deadline;
use crate::{ClientId, ConnId, Handle};

/// One grant of a key.
#[derive(Debug, Clone)]
pub(super) struct Holder {
    pub client: ClientId,
    /// The connection that took (or last re-took) the lock; for ephemeral
    /// release.
    pub conn: ConnId,
    pub token: u64,
    /// When its lease ends, with the number of the timer that ends it.
    pub deadline: Deadline,
    pub ephemeral: bool,
    /// Held shared (a reader), not exclusive. Every holder of a key holds
    /// it in the same mode.
    pub shared: bool,
    /// How long nobody is granted the key after this lease runs out.
    pub lock_delay_ms: u64,
    /// The request whose answer made this grant, until a later request of
    /// the holder (a re-lock, an extend) shows that the holder knows of it.
    /// If that answer cannot be delivered, the grant is undone: nobody is
    /// left who knows they hold it.
    pub granted_by: Option<Handle>,
}

/// The holders of one key.
#[derive(Debug, Default)]
pub(super) struct Holders {
    first: Option<Holder>,
    /// Holders beyond the first, for kinds of lock that admit several.
    #[allow(clippy::box_collection)] // 8 bytes when unused, as it nearly always is
    more: Option<Box<Vec<Holder>>>,
}

impl Holders {
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.as_ref().map_or(0, |m| m.len())
    }

    /// The oldest grant.
    pub fn first(&self) -> Option<&Holder> {
        self.first.as_ref()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Holder> {
        self.first
            .iter()
            .chain(self.more.iter().flat_map(|m| m.iter()))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Holder> {
        self.first
            .iter_mut()
            .chain(self.more.iter_mut().flat_map(|m| m.iter_mut()))
    }

    /// The holder with `token`.
    pub fn by_token_mut(&mut self, token: u64) -> Option<&mut Holder> {
        self.iter_mut().find(|h| h.token == token)
    }

    /// Whether some grant has `token`.
    pub fn has_token(&self, token: u64) -> bool {
        self.iter().any(|h| h.token == token)
    }

    /// The grant `client` holds, if any.
    pub fn by_client_mut(&mut self, client: &ClientId) -> Option<&mut Holder> {
        self.iter_mut().find(|h| same_client(&h.client, client))
    }

    pub fn insert(&mut self, holder: Holder) {
        match &self.first {
            None => self.first = Some(holder),
            Some(_) => self.more.get_or_insert_with(Box::default).push(holder),
        }
    }

    /// Takes out the grant with `token`.
    pub fn remove_token(&mut self, token: u64) -> Option<Holder> {
        if self.first.as_ref().is_some_and(|h| h.token == token) {
            let removed = self.first.take();
            self.first = self.pop_more();
            return removed;
        }
        let more = self.more.as_mut()?;
        let position = more.iter().position(|h| h.token == token)?;
        let removed = more.remove(position);
        if more.is_empty() {
            self.more = None;
        }
        Some(removed)
    }

    fn pop_more(&mut self) -> Option<Holder> {
        let more = self.more.as_mut()?;
        let next = (!more.is_empty()).then(|| more.remove(0));
        if more.is_empty() {
            self.more = None;
        }
        next
    }

    /// Forgets the requests that made the grants: their handles died with
    /// the process that gave them.
    pub fn forget_requests(&mut self) {
        for holder in self.iter_mut() {
            holder.granted_by = None;
        }
    }

    /// Takes out every grant for which `take` says yes.
    pub fn take_where(&mut self, mut take: impl FnMut(&Holder) -> bool) -> Vec<Holder> {
        let mut taken = Vec::new();
        let tokens: Vec<u64> = self.iter().filter(|h| take(h)).map(|h| h.token).collect();
        for token in tokens {
            taken.extend(self.remove_token(token));
        }
        taken
    }
}

/// Whether two client ids are the same client.
pub(super) fn same_client(a: &ClientId, b: &ClientId) -> bool {
    std::sync::Arc::ptr_eq(a, b) || **a == **b
}

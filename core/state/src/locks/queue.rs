//! A key's wait queue: queued `lock` requests, first come first served.

use std::collections::VecDeque;

use crate::image::Deadline;
use crate::{ClientId, ConnId, Handle};

/// A queued `lock` request: data, not a blocked task.
#[derive(Debug, Clone)]
pub(super) struct Waiter {
    /// Unique within the shard and rising in arrival order, so its wait
    /// timer can find it and the queue stays sorted by it.
    pub id: u64,
    /// Where its answer goes.
    pub handle: Handle,
    pub client: ClientId,
    pub conn: ConnId,
    pub ttl_ms: u64,
    /// For the `timeout` message; 0 when waiting forever.
    pub wait_ms: u64,
    /// When its wait runs out, if it has a limit, with its timer's number.
    pub deadline: Option<Deadline>,
    pub ephemeral: bool,
    /// Asks to hold the key shared.
    pub shared: bool,
    /// The lock delay its grant is to have.
    pub lock_delay_ms: u64,
}

/// A key's waiters, first come first. Most held keys have none, so the
/// queue lives behind a pointer that is null when empty: 8 bytes per key
/// instead of a `VecDeque`'s 32.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // the box is the point: see above
pub(super) struct WaitQueue(Option<Box<VecDeque<Waiter>>>);

impl WaitQueue {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Waiter> {
        self.0.iter().flat_map(|q| q.iter())
    }

    /// Where waiter `id` is. Waiters join at the back with ever larger ids
    /// and leave without reordering, so the queue is sorted by id and a
    /// key with thousands of waiters is searched, not scanned.
    pub fn position_of(&self, id: u64) -> Option<usize> {
        self.0.as_ref()?.binary_search_by_key(&id, |w| w.id).ok()
    }

    /// Where the waiter answering to `handle` is.
    pub fn position_of_handle(&self, handle: Handle) -> Option<usize> {
        self.iter().position(|w| w.handle == handle)
    }

    /// The oldest waiter.
    pub fn front(&self) -> Option<&Waiter> {
        self.0.as_ref()?.front()
    }

    /// The newest waiter.
    pub fn back(&self) -> Option<&Waiter> {
        self.0.as_ref()?.back()
    }

    pub fn push_back(&mut self, waiter: Waiter) {
        self.0.get_or_insert_with(Box::default).push_back(waiter);
    }

    pub fn pop_front(&mut self) -> Option<Waiter> {
        let waiter = self.0.as_mut()?.pop_front();
        self.free_if_empty();
        waiter
    }

    /// The newest waiter: only for [`crate::planted::PlantedBug::GrantOutOfOrder`].
    pub fn pop_back(&mut self) -> Option<Waiter> {
        let waiter = self.0.as_mut()?.pop_back();
        self.free_if_empty();
        waiter
    }

    pub fn remove(&mut self, position: usize) -> Option<Waiter> {
        let waiter = self.0.as_mut()?.remove(position);
        self.free_if_empty();
        waiter
    }

    /// Takes out every waiter for which `take` says yes, in queue order.
    pub fn take_where(&mut self, mut take: impl FnMut(&Waiter) -> bool) -> Vec<Waiter> {
        let Some(queue) = self.0.as_mut() else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(queue.len());
        for waiter in queue.drain(..) {
            if take(&waiter) {
                taken.push(waiter);
            } else {
                kept.push_back(waiter);
            }
        }
        **queue = kept;
        self.free_if_empty();
        taken
    }

    fn free_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|q| q.is_empty()) {
            self.0 = None;
        }
    }
}

impl IntoIterator for WaitQueue {
    type Item = Waiter;
    type IntoIter = std::iter::Flatten<std::option::IntoIter<VecDeque<Waiter>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.map(|q| *q).into_iter().flatten()
    }
}

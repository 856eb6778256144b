//! Who leads the simulated cluster, as the nodes themselves say it.
//!
//! A node's role watcher logs `leading` (with its node id and term) the
//! moment its engine starts to lead, and `no longer leading` when it stops
//! (`deadbolt_replication::node`). The simulation runs every host on one
//! thread, so a `tracing` subscriber set as that thread's default hears
//! both the moment they happen, inside the node's host: it records them in
//! the history (the checker measures election gaps from them) and keeps
//! the current leaders for the fault driver, which crashes or cuts off
//! "the leader" or "a follower" by them. Nothing in the nodes changes.
//!
//! A crashed node says nothing more (its future is dropped), so the driver
//! tells [`Leaders::crashed`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::{DefaultGuard, Interest};
use tracing::{Event, Level, Metadata, Subscriber, span};

use crate::history::{Actor, History, What};

/// The target of the role watcher's log lines.
const TARGET: &str = "deadbolt_replication::node";

/// The nodes that lead now, by their own word.
#[derive(Debug, Clone, Default)]
pub struct Leaders {
    /// Per node that leads, the term it leads in.
    leading: Arc<Mutex<BTreeMap<u64, u64>>>,
}

impl Leaders {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, u64>> {
        self.leading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node that leads in the highest term, if any does. (A deposed
    /// leader cut off from the others still leads in its old term until it
    /// hears of the new one.)
    pub fn current(&self) -> Option<u64> {
        let leading = self.lock();
        leading
            .iter()
            .max_by_key(|&(_, term)| *term)
            .map(|(&node, _)| node)
    }

    /// Whether `node` says it leads.
    pub fn leads(&self, node: u64) -> bool {
        self.lock().contains_key(&node)
    }

    /// `node` crashed: it leads no more.
    pub fn crashed(&self, node: u64) {
        self.lock().remove(&node);
    }

    /// Listens on this thread until the guard is dropped, recording every
    /// change in `history`.
    pub fn listen(&self, history: &History) -> DefaultGuard {
        let subscriber = RoleListener {
            leaders: self.clone(),
            history: history.clone(),
        };
        tracing::subscriber::set_default(subscriber)
    }

    fn heard(&self, history: &History, line: &RoleLine) {
        let (Some(node), Some(message)) = (line.node, line.message.as_deref()) else {
            return;
        };
        let actor = Actor::Node(node);
        match (message, line.term) {
            ("leading", Some(term)) => {
                self.lock().insert(node, term);
                history.record(actor, What::Leading { term });
            }
            ("no longer leading", _) => {
                self.lock().remove(&node);
                history.record(actor, What::NotLeading);
            }
            _ => {}
        }
    }
}

/// The subscriber: hears the role watcher's lines and nothing else.
struct RoleListener {
    leaders: Leaders,
    history: History,
}

impl RoleListener {
    fn wants(metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() == Level::INFO && metadata.target() == TARGET
    }
}

impl Subscriber for RoleListener {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        if Self::wants(metadata) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        Self::wants(metadata)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        // No span is ever enabled; an id is still owed.
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = RoleLine::default();
        event.record(&mut line);
        self.leaders.heard(&self.history, &line);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// The fields of one role line.
#[derive(Debug, Default)]
struct RoleLine {
    message: Option<String>,
    node: Option<u64>,
    term: Option<u64>,
}

impl Visit for RoleLine {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "node" => self.node = Some(value),
            "term" => self.term = Some(value),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_lines_of_a_node_make_it_lead_and_follow() {
        let (leaders, history) = (Leaders::default(), History::default());
        let _listening = leaders.listen(&history);
        tracing::info!(target: TARGET, node = 2u64, term = 3u64, "leading");
        tracing::info!(target: TARGET, node = 1u64, term = 2u64, "leading");
        assert_eq!(leaders.current(), Some(2), "the higher term leads");
        tracing::info!(target: TARGET, node = 2u64, term = 3u64, "no longer leading");
        assert_eq!(leaders.current(), Some(1));
        leaders.crashed(1);
        assert_eq!(leaders.current(), None);
        tracing::info!(target: "elsewhere", node = 3u64, term = 9u64, "leading");
        assert_eq!(leaders.current(), None, "only the role watcher counts");
        assert_eq!(history.events().len(), 3);
    }
}

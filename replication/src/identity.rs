//! Who a node is, beyond its id: an incarnation number made when its Raft
//! directory is made, and the incarnations it has met of its peers.
//!
//! Raft's safety rests on every node remembering its vote and its log. A
//! node whose disk was lost comes back with neither, and could vote twice
//! in one term or acknowledge a deposed leader's entries, and so let two
//! leaders commit different things. Its incarnation gives it away: each
//! node keeps (durably, before it answers) the incarnation it first met of
//! every peer, and refuses to talk to a peer that comes back as another.
//! The cluster goes on with the rest, as with any lost node; the node with
//! the lost disk stays fenced off until an operator replaces it (see
//! docs/operations in the README's cluster section).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use deadbolt_storage::Disk;

use crate::types::NodeId;

const OWN_FILE: &str = "incarnation";
const PEERS_FILE: &str = "peers";

/// This node's incarnation and those of its peers.
pub struct Identities {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    own: u64,
    known: Mutex<BTreeMap<NodeId, u64>>,
    /// Whether a node votes in this node's current membership (a node
    /// that does not may come back as another incarnation).
    voter: Box<dyn Fn(NodeId) -> bool + Send + Sync>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

/// A peer that is not the one this node met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node {node} came back as incarnation {now:016x}, not {was:016x}: it lost its disk \
     (its vote and log), so it is refused until it is readmitted: deadbolt cluster readmit {node}"
)]
pub struct Impostor {
    /// The node.
    pub node: NodeId,
    /// The incarnation first met.
    pub was: u64,
    /// The one it says now.
    pub now: u64,
}

impl Identities {
    /// Reads (or makes, from `fresh`, for a new directory) this node's
    /// incarnation and the peers it has met, in `dir`.
    pub fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
        fresh: u64,
        voter: Box<dyn Fn(NodeId) -> bool + Send + Sync>,
    ) -> io::Result<Identities> {
        let own = match read_numbers(disk.as_ref(), &dir.join(OWN_FILE))? {
            Some(numbers) if numbers.len() == 1 => numbers[0].1,
            _ => {
                write_numbers(disk.as_ref(), dir, OWN_FILE, &[(0, fresh)])?;
                fresh
            }
        };
        let known = read_numbers(disk.as_ref(), &dir.join(PEERS_FILE))?
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(Identities {
            disk,
            dir: dir.to_owned(),
            own,
            known: Mutex::new(known),
            voter,
        })
    }

    /// This node's incarnation.
    pub fn own(&self) -> u64 {
        self.own
    }

    /// Accepts `node` as `incarnation` if it is the one first met, or if
    /// `node` does not vote now (it was taken out of the voters to be
    /// readmitted: see `Node::readmit`), keeping it, durably, if it is new.
    pub fn check(&self, node: NodeId, incarnation: u64) -> Result<(), CheckError> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match known.get(&node) {
            Some(&was) if was == incarnation => Ok(()),
            Some(&was) if (self.voter)(node) => Err(CheckError::Impostor(Impostor {
                node,
                was,
                now: incarnation,
            })),
            _ => {
                if known.contains_key(&node) {
                    tracing::info!(
                        node,
                        "a node that is not a voter now comes back as a new incarnation"
                    );
                }
                known.insert(node, incarnation);
                let all: Vec<_> = known.iter().map(|(n, i)| (*n, *i)).collect();
                if let Err(error) = write_numbers(self.disk.as_ref(), &self.dir, PEERS_FILE, &all) {
                    known.remove(&node);
                    return Err(CheckError::Io(error.to_string()));
                }
                Ok(())
            }
        }
    }
}

/// Why a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// It is not the node first met.
    #[error(transparent)]
    Impostor(#[from] Impostor),
    /// Its incarnation could not be kept.
    #[error("cannot keep a peer's incarnation: {0}")]
    Io(String),
}

/// Lines of `id incarnation` (hex), or `None` if the file is absent.
fn read_numbers(disk: &dyn Disk, path: &Path) -> io::Result<Option<Vec<(NodeId, u64)>>> {
    let bytes = match disk.read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: malformed", path.display()),
        )
    };
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut numbers = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (node, incarnation) = line.split_once(' ').ok_or_else(bad)?;
        let node = node.parse().map_err(|_| bad())?;
        let incarnation = u64::from_str_radix(incarnation.trim(), 16).map_err(|_| bad())?;
        numbers.push((node, incarnation));
    }
    Ok(Some(numbers))
}

/// Replaces `name` in `dir` with `numbers`, atomically and durably.
fn write_numbers(
    disk: &dyn Disk,
    dir: &Path,
    name: &str,
    numbers: &[(NodeId, u64)],
) -> io::Result<()> {
    let text: String = numbers
        .iter()
        .map(|(node, incarnation)| format!("{node} {incarnation:016x}\n"))
        .collect();
    let beside = dir.join(format!("{name}.new"));
    disk.write_synced(&beside, text.as_bytes())?;
    disk.rename(&beside, &dir.join(name))?;
    disk.sync_dir(dir)
}

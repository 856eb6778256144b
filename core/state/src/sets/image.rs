//! The sets' part of a shard image: taken from the table, and the table
//! rebuilt from it (see `crate::image` for what an image holds and why).
//!
//! A restore of a large set pushes its members in index order into
//! tables sized for all of them, so that nothing is copied or rehashed
//! twice.

use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use super::{DistinctSet, SetDue, Sets, key_at};
use crate::hasher::KeyHasher;
use crate::image::{
    ImageError, Interner, MemberImage, SetImage, SetsImage, check_distinct, check_issued,
};
use crate::timers::{Timer, Timers};
use deadbolt_proto::SetCounters;
use deadbolt_proto::limits::Limits;

impl Sets {
    /// The sets' part of a shard image, sets in name order.
    pub fn image(&self) -> SetsImage {
        let mut sets: Vec<SetImage> = self.table.iter().map(DistinctSet::image).collect();
        sets.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        SetsImage {
            next_set: self.next_set,
            timers_pushed: self.timers.pushed(),
            counters: self.counters(),
            sets,
        }
    }

    /// The sets `image` describes, or why it describes none.
    pub fn from_image(
        hasher: KeyHasher,
        limits: Limits,
        image: SetsImage,
        clients: &mut Interner,
    ) -> Result<Sets, ImageError> {
        let mut sets = Sets::new(hasher, limits);
        sets.table = HashTable::with_capacity(image.sets.len());
        sets.next_set = image.next_set;
        sets.counters = SetCounters {
            // Sizes, not counters: `counters()` reads them off the tables.
            count: 0,
            members: 0,
            ..image.counters
        };
        let mut timers = Vec::with_capacity(image.sets.len());
        for set in image.sets {
            check_issued("set", set.id, image.next_set)?;
            check_issued("set timer", set.deadline.seq, image.timers_pushed)?;
            let hash = hasher.hash_one(&*set.name);
            let (at, seq) = (set.deadline.at, set.deadline.seq);
            let due = SetDue { hash, set: set.id };
            timers.push(Timer { at, seq, due });
            sets.insert_restored(hash, DistinctSet::from_image(hasher, set, clients)?)?;
        }
        let mut ids: Vec<u64> = timers.iter().map(|t| t.due.set).collect();
        check_distinct("sets", &mut ids)?;
        let mut seqs: Vec<u64> = timers.iter().map(|t| t.seq).collect();
        check_distinct("set timers", &mut seqs)?;
        sets.timers = Timers::restore(timers, image.timers_pushed);
        Ok(sets)
    }

    /// Adds a restored set, unless one of its name is there already.
    fn insert_restored(&mut self, hash: u64, set: DistinctSet) -> Result<(), ImageError> {
        let hasher = self.hasher;
        let name = &set.name;
        match self
            .table
            .entry(hash, |s| s.name == *name, |s| hasher.hash_one(&*s.name))
        {
            Entry::Occupied(_) => Err(ImageError::Duplicate {
                what: "sets",
                name: format!("{name:?}"),
            }),
            Entry::Vacant(vacant) => {
                self.members += set.len();
                self.member_bytes += set.packed.len();
                vacant.insert(set);
                Ok(())
            }
        }
    }
}

impl DistinctSet {
    /// This set in an image.
    fn image(&self) -> SetImage {
        let members = (0..self.len() as u32).map(|position| MemberImage {
            key: key_at(&self.packed, &self.ends, position).to_owned(),
            owner: self.owners[position as usize],
        });
        SetImage {
            name: self.name.to_string(),
            id: self.id,
            deadline: self.deadline,
            clients: self.clients.iter().map(|c| c.to_string()).collect(),
            creator: self.creator.as_ref().map(|c| c.to_string()),
            members: members.collect(),
        }
    }

    /// The set `image` describes, its tables sized for all its members.
    fn from_image(
        hasher: KeyHasher,
        image: SetImage,
        clients: &mut Interner,
    ) -> Result<DistinctSet, ImageError> {
        let name = image.name.into_boxed_str();
        let bytes: usize = image.members.iter().map(|m| m.key.len()).sum();
        // Positions and offsets are 32-bit (see `Room::check_room`).
        let addressable = u32::MAX as usize;
        if image.members.len() > addressable || bytes > addressable {
            return Err(ImageError::SetTooLarge { set: name.into() });
        }
        let mut set = DistinctSet::new(name, image.id, image.deadline, hasher);
        set.creator = image.creator.map(|c| clients.intern(c));
        set.packed.reserve_exact(bytes);
        set.ends.reserve_exact(image.members.len());
        set.owners.reserve_exact(image.members.len());
        set.positions = HashTable::with_capacity(image.members.len());
        for client in image.clients {
            set.restore_client(clients.intern(client))?;
        }
        for member in image.members {
            set.restore_member(hasher, member)?;
        }
        Ok(set)
    }

    /// Gives `client` the next owner slot.
    fn restore_client(&mut self, client: super::ClientId) -> Result<(), ImageError> {
        let slot = self.clients.len() as u32;
        if self
            .client_slots
            .insert(Arc::clone(&client), slot)
            .is_some()
        {
            return Err(ImageError::Duplicate {
                what: "clients of one set",
                name: format!("{client:?} in {:?}", self.name),
            });
        }
        self.clients.push(client);
        Ok(())
    }

    /// Adds the next member, unless the set has its key already.
    fn restore_member(&mut self, hasher: KeyHasher, member: MemberImage) -> Result<(), ImageError> {
        if member.owner as usize >= self.clients.len() {
            return Err(ImageError::NoSuchOwner {
                set: self.name.to_string(),
                key: member.key,
                owner: member.owner,
                clients: self.clients.len(),
            });
        }
        let key = member.key.as_str();
        let hash = hasher.hash_one(key);
        let position = self.ends.len() as u32;
        let (packed, ends) = (&self.packed, &self.ends);
        let entry = self.positions.entry(
            hash,
            |&p| key_at(packed, ends, p) == key,
            |&p| hasher.hash_one(key_at(packed, ends, p)),
        );
        match entry {
            Entry::Occupied(_) => {
                return Err(ImageError::Duplicate {
                    what: "members of one set",
                    name: format!("{key:?} in {:?}", self.name),
                });
            }
            Entry::Vacant(vacant) => {
                vacant.insert(position);
            }
        }
        self.packed.push_str(key);
        self.ends.push(self.packed.len() as u32);
        self.owners.push(member.owner);
        Ok(())
    }
}

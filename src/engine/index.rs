//! The id -> slot index of an entity store: open addressing with linear probing over 8-byte
//! entries (32 bits of the id's hash and the 32-bit slot number).
//!
//! A general-purpose hash map would do the same job; this one exists so that the bucket an id
//! will probe is an address computed from the hash alone. The engine can then ask the CPU to
//! load it several events ahead (see `Engine::warm`), and likewise the slot's state one step
//! later, so that the cache misses of consecutive events overlap instead of queueing.

/// An entry: `tag << 32 | slot`, or one of the two markers below.
type Entry = u64;
const EMPTY: Entry = u64::MAX;
/// A removed entry: probing continues past it.
const REMOVED: Entry = u64::MAX - 1;

#[derive(Debug, Default, Clone)]
pub struct SlotIndex {
    entries: Vec<Entry>,
    live: usize,
    removed: usize,
}

fn tag_of(hash: u64) -> u64 {
    hash >> 32
}

impl SlotIndex {
    fn mask(&self) -> usize {
        self.entries.len().wrapping_sub(1)
    }

    fn home(&self, hash: u64) -> usize {
        // The low bits pick the bucket, the high bits are the tag: independent parts.
        hash as usize & self.mask()
    }

    /// The slot of the id with `hash` for which `is_it` holds.
    pub fn find(&self, hash: u64, mut is_it: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let tag = tag_of(hash);
        let mut at = self.home(hash);
        loop {
            match self.entries[at] {
                EMPTY => return None,
                REMOVED => {}
                entry if entry >> 32 == tag && is_it(entry as u32) => return Some(entry as u32),
                _ => {}
            }
            at = (at + 1) & self.mask();
        }
    }

    /// The slot the first entry with this hash's tag names, without checking the id: for
    /// prefetching only.
    pub fn probable_slot(&self, hash: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let tag = tag_of(hash);
        let mut at = self.home(hash);
        for _ in 0..4 {
            match self.entries[at] {
                EMPTY => return None,
                entry if entry != REMOVED && entry >> 32 == tag => return Some(entry as u32),
                _ => {}
            }
            at = (at + 1) & self.mask();
        }
        None
    }

    /// The address of the bucket `hash` starts probing at, for prefetching.
    pub fn bucket_address(&self, hash: u64) -> Option<*const Entry> {
        self.entries.get(self.home(hash)).map(|e| e as *const Entry)
    }

    /// Adds an id known not to be present. `rehash` gives the hash of the id in a slot.
    pub fn insert(&mut self, hash: u64, slot: u32, rehash: impl Fn(u32) -> u64) {
        // At most 3/4 full, counting removed entries (they lengthen probes too).
        if (self.live + self.removed + 1) * 4 > self.entries.len() * 3 {
            self.resize(rehash);
        }
        self.place(hash, slot);
        self.live += 1;
    }

    fn place(&mut self, hash: u64, slot: u32) {
        let mut at = self.home(hash);
        loop {
            match self.entries[at] {
                EMPTY => break,
                REMOVED => {
                    self.removed -= 1;
                    break;
                }
                _ => at = (at + 1) & self.mask(),
            }
        }
        self.entries[at] = tag_of(hash) << 32 | u64::from(slot);
    }

    fn resize(&mut self, rehash: impl Fn(u32) -> u64) {
        // Grow when the live entries need it; otherwise just clear out removed ones.
        let capacity = ((self.live + 1) * 2).next_power_of_two().max(16);
        let old = std::mem::replace(&mut self.entries, vec![EMPTY; capacity]);
        self.removed = 0;
        for entry in old {
            if entry != EMPTY && entry != REMOVED {
                let slot = entry as u32;
                self.place(rehash(slot), slot);
            }
        }
    }

    /// Removes the entry for `slot`, whose id has `hash`.
    pub fn remove(&mut self, hash: u64, slot: u32) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let wanted = tag_of(hash) << 32 | u64::from(slot);
        let mut at = self.home(hash);
        loop {
            match self.entries[at] {
                EMPTY => return false,
                entry if entry == wanted => {
                    self.entries[at] = REMOVED;
                    self.live -= 1;
                    self.removed += 1;
                    return true;
                }
                _ => at = (at + 1) & self.mask(),
            }
        }
    }

    pub fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Inserts and removes in random order agree with a standard map, including ids whose
        /// hashes collide in bucket and tag.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((any::<bool>(), 0u32..300), 1..2000)) {
            // A deliberately weak hash: many ids share buckets and tags.
            let hash = |id: u32| u64::from(id % 37) << 32 | u64::from(id % 53);
            let mut index = SlotIndex::default();
            let mut reference: HashMap<u32, u32> = HashMap::new();
            // Slot `s` holds id `ids[s]`.
            let mut ids: Vec<u32> = Vec::new();
            for (insert, id) in ops {
                let found = index.find(hash(id), |s| ids[s as usize] == id);
                prop_assert_eq!(found, reference.get(&id).copied());
                match (insert, found) {
                    (true, None) => {
                        let slot = ids.len() as u32;
                        ids.push(id);
                        let snapshot = ids.clone();
                        index.insert(hash(id), slot, |s| hash(snapshot[s as usize]));
                        reference.insert(id, slot);
                    }
                    (false, Some(slot)) => {
                        prop_assert!(index.remove(hash(id), slot));
                        reference.remove(&id);
                    }
                    _ => {}
                }
            }
            for (id, slot) in &reference {
                prop_assert_eq!(index.find(hash(*id), |s| ids[s as usize] == *id), Some(*slot));
            }
        }
    }
}

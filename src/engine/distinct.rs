//! Distinct counts over hopping (and so tumbling and sliding) windows for `emit: on_update`.
//!
//! Instead of a set of values per pane plus a running multiset, each value is kept once, with
//! the newest pane it occurred in. The values whose newest pane lies in the window are exactly
//! the distinct values of the window (every pane up to the entity's as-of time is in it), so
//! the count is a running total over "newest pane" counts: pane `p` counts the values last seen
//! in `p`. A value seen again moves its unit from its old pane to the new one. This keeps one
//! entry per value instead of one per value and pane, and updates in O(1) per event.
//! (`on_window_close` needs the contents of each past window and keeps per-pane sets.)

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::agg::{CountAcc, Input, value_hash};
use super::window::Panes;

/// Past this many values a set moves from a sorted vector to a hash map.
const MAP_AT: usize = 64;

/// Value hash -> newest pane the value occurred in.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum NewestPane {
    /// Sorted by hash: compact and cache-friendly for the usual few values per entity.
    Small(Vec<(u64, i64)>),
    Large(FxHashMap<u64, i64>),
}

impl Default for NewestPane {
    fn default() -> Self {
        NewestPane::Small(Vec::new())
    }
}

impl NewestPane {
    /// Records `pane` for `hash`; returns the pane it had before if it was older, or `None`
    /// with nothing changed if the value was already seen in `pane` or later. `Some(None)`:
    /// a new value.
    fn observe(&mut self, hash: u64, pane: i64) -> Option<Option<i64>> {
        match self {
            NewestPane::Small(v) => match v.binary_search_by_key(&hash, |(h, _)| *h) {
                Ok(i) if v[i].1 >= pane => None,
                Ok(i) => Some(Some(std::mem::replace(&mut v[i].1, pane))),
                Err(i) => {
                    super::prefetch::reserve_one(v);
                    v.insert(i, (hash, pane));
                    if v.len() > MAP_AT {
                        *self = NewestPane::Large(v.iter().copied().collect());
                    }
                    Some(None)
                }
            },
            NewestPane::Large(m) => match m.get_mut(&hash) {
                Some(p) if *p >= pane => None,
                Some(p) => Some(Some(std::mem::replace(p, pane))),
                None => {
                    m.insert(hash, pane);
                    Some(None)
                }
            },
        }
    }

    /// Forgets values last seen before `pane`.
    fn forget_before(&mut self, pane: i64) {
        match self {
            NewestPane::Small(v) => v.retain(|(_, p)| *p >= pane),
            NewestPane::Large(m) => {
                m.retain(|_, p| *p >= pane);
                if m.len() < MAP_AT / 2 {
                    let mut v: Vec<(u64, i64)> = m.iter().map(|(h, p)| (*h, *p)).collect();
                    v.sort_unstable();
                    *self = NewestPane::Small(v);
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            NewestPane::Small(v) => v.is_empty(),
            NewestPane::Large(m) => m.is_empty(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            NewestPane::Small(v) => v.capacity() * std::mem::size_of::<(u64, i64)>(),
            NewestPane::Large(m) => m.capacity() * (std::mem::size_of::<(u64, i64)>() + 1),
        }
    }

    fn prefetch(&self) {
        if let NewestPane::Small(v) = self {
            super::prefetch::prefetch(v.as_ptr());
        }
    }
}

/// The distinct values of an entity's recent windows (see the module note).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecentDistinct {
    newest: NewestPane,
    /// Per pane, how many values were last seen in it; the running total is the count.
    counts: Panes<CountAcc>,
}

impl RecentDistinct {
    pub fn add(&mut self, pane: i64, input: &Input<'_, '_>) {
        match self.newest.observe(value_hash(input.value), pane) {
            None => {}
            Some(moved_from) => {
                if let Some(old) = moved_from {
                    self.counts.subtract_at(old, &CountAcc(1));
                }
                self.counts.add(pane, input);
            }
        }
    }

    pub fn set_running_from(&mut self, from: i64) {
        self.counts.set_running_from(from);
    }

    pub fn count(&self) -> u64 {
        self.counts.running().0
    }

    /// Drops what no window from `pane` on can contain.
    pub fn evict_below(&mut self, pane: i64) {
        let had = self.counts.oldest();
        let limit = self.counts.evict_below(pane);
        if had.is_some_and(|oldest| oldest < limit) {
            self.newest.forget_before(limit);
        }
    }

    /// The oldest pane holding a value counted in the window.
    pub fn oldest_running(&self) -> Option<i64> {
        self.counts.oldest_running()
    }

    pub fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.newest.heap_bytes() + self.counts.heap_bytes()
    }

    pub fn prefetch(&self) {
        self.newest.prefetch();
        self.counts.prefetch();
    }
}

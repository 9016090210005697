//! The timer queue of one partition: `(due, slot)` entries saying when an entity next changes
//! by time alone, taken out in bulk as the watermark passes them.
//!
//! A radix heap. The watermark only moves forward, so entries are bucketed by the highest bit
//! in which their due time differs from the last minimum taken (`floor`): pushing is O(1), and
//! each entry moves to a lower bucket at most 64 times over its life. Compared with a binary
//! heap over ~100,000 entities, this avoids a sift through ~17 levels of cold memory for every
//! timer fired. An entry due before `floor` (an entity behind the watermark) is filed as due
//! at `floor`, which is already passed: it comes out with the next batch.
//!
//! Entries are not removed when an entity's due time changes; the engine drops stale ones
//! when they come out (see `EntityState::queued`).

/// Due times mapped to unsigned keys in the same order.
fn key(due: i64) -> u64 {
    (due as u64) ^ (1 << 63)
}

#[derive(Debug, Clone)]
pub struct TimerQueue {
    /// Bucket `b` holds entries whose key differs from `floor` first in bit `b - 1`; bucket
    /// 0 holds entries whose key is `floor`.
    buckets: Vec<Vec<(i64, u32)>>,
    /// The smallest key in each bucket (`u64::MAX` when empty), so that finding the next
    /// minimum never scans a bucket that is not due yet.
    mins: Vec<u64>,
    /// Bit `b` set when bucket `b` holds entries.
    filled: u128,
    /// The smallest key taken out so far (never past the latest watermark drained to).
    floor: u64,
    len: usize,
}

impl Default for TimerQueue {
    fn default() -> Self {
        TimerQueue {
            buckets: vec![Vec::new(); 65],
            mins: vec![u64::MAX; 65],
            filled: 0,
            floor: 0,
            len: 0,
        }
    }
}

impl TimerQueue {
    /// Files an entry under its key, clamped to `floor`.
    fn file(&mut self, due: i64, slot: u32) {
        let k = key(due).max(self.floor);
        let b = (64 - (k ^ self.floor).leading_zeros()) as usize;
        self.buckets[b].push((due, slot));
        self.mins[b] = self.mins[b].min(k);
        self.filled |= 1 << b;
    }

    pub fn push(&mut self, due: i64, slot: u32) {
        self.file(due, slot);
        self.len += 1;
    }

    /// Moves every entry due at or before `watermark` into `out` (in no particular order).
    pub fn drain_due(&mut self, watermark: i64, out: &mut Vec<(i64, u32)>) {
        let limit = key(watermark);
        loop {
            if self.filled & 1 != 0 {
                // Keyed at `floor`, which is at or before a watermark already drained to.
                self.len -= self.buckets[0].len();
                out.append(&mut self.buckets[0]);
                self.mins[0] = u64::MAX;
                self.filled &= !1;
            }
            if self.filled == 0 {
                return;
            }
            let b = self.filled.trailing_zeros() as usize;
            let min = self.mins[b];
            if min > limit {
                return;
            }
            // Advance to the smallest key and spread that bucket over the lower ones.
            self.floor = min;
            let mut moving = std::mem::take(&mut self.buckets[b]);
            self.mins[b] = u64::MAX;
            self.filled &= !(1 << b);
            for (due, slot) in moving.drain(..) {
                self.file(due, slot);
            }
            // A small emptied buffer is kept for the next time this bucket fills; a large one
            // is freed (the entries now live in lower buckets, and keeping every bucket's
            // peak capacity would hold several times the live timers).
            if moving.capacity() <= 4096 && self.buckets[b].is_empty() {
                self.buckets[b] = moving;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn heap_bytes(&self) -> usize {
        self.buckets
            .iter()
            .map(|b| b.capacity() * std::mem::size_of::<(i64, u32)>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a sorted list: pushes at any time (before the floor too) and drains to a
        /// rising watermark return exactly the entries due, each once.
        #[test]
        fn drains_exactly_what_is_due(
            steps in proptest::collection::vec(
                (any::<bool>(), -2_000i64..2_000, 0u32..50), 1..400)
        ) {
            let mut queue = TimerQueue::default();
            let mut reference: Vec<(i64, u32)> = Vec::new();
            let mut watermark = -2_500i64;
            for (drain, value, slot) in steps {
                if drain {
                    watermark += value.abs() / 4;
                    let mut out = Vec::new();
                    queue.drain_due(watermark, &mut out);
                    out.sort_unstable();
                    let mut due: Vec<(i64, u32)> =
                        reference.iter().copied().filter(|(d, _)| *d <= watermark).collect();
                    due.sort_unstable();
                    reference.retain(|(d, _)| *d > watermark);
                    prop_assert_eq!(out, due);
                } else {
                    queue.push(value, slot);
                    reference.push((value, slot));
                }
                prop_assert_eq!(queue.len(), reference.len());
            }
        }
    }
}

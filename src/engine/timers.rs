//! The timer queue of one partition: `(due, slot)` entries saying when an entity next changes
//! by time alone, taken out in bulk as the watermark passes them.
//!
//! A radix queue over due times with 8-bit digits (a hierarchical timing wheel spanning every
//! time). The watermark only moves forward, so an entry is filed at the level of the highest
//! digit in which its due time differs from the last time taken out (`floor`), in the slot of
//! that digit: pushing is O(1), and an entry moves down a level at most 7 times over its life
//! (two or three for a due time minutes to hours ahead), where a binary heap would sift through
//! ~17 levels of cold memory per timer and a radix heap with 1-bit digits moves an entry about
//! twenty times. An entry due before `floor` (an entity behind the watermark) is filed as due
//! at `floor`, which is already passed: it comes out with the next batch.
//!
//! Entries are not removed when an entity's due time changes; the engine drops stale ones
//! when they come out (see `EntityState::queued`).

/// Due times mapped to unsigned keys in the same order.
fn key(due: i64) -> u64 {
    (due as u64) ^ (1 << 63)
}

const DIGIT_BITS: u32 = 8;
const SLOTS: usize = 1 << DIGIT_BITS;
const LEVELS: usize = (u64::BITS / DIGIT_BITS) as usize;
/// Occupancy words per level.
const WORDS: usize = SLOTS / 64;
/// Entries an emptied slot keeps room for, for the next time it fills; a larger buffer is
/// freed (its entries have moved on, and keeping every slot's peak capacity would hold several
/// times the live timers).
const KEPT_CAPACITY: usize = 64;

/// The level at which `k` is filed relative to `floor`: that of its highest digit differing.
fn level_of(k: u64, floor: u64) -> usize {
    match k ^ floor {
        0 => 0,
        diff => ((u64::BITS - 1 - diff.leading_zeros()) / DIGIT_BITS) as usize,
    }
}

fn digit(k: u64, level: usize) -> usize {
    ((k >> (level as u32 * DIGIT_BITS)) as usize) & (SLOTS - 1)
}

#[derive(Debug, Clone)]
pub struct TimerQueue {
    /// Slot `level * SLOTS + d` holds entries whose key agrees with `floor` above `level`'s
    /// digit and has digit `d` there, which is above `floor`'s digit (at level 0, equal or
    /// above: the key is then exactly determined).
    slots: Vec<Vec<(i64, u32)>>,
    /// Per level, bit `d` set when slot `d` holds entries.
    occupied: [[u64; WORDS]; LEVELS],
    /// The smallest key taken out so far (never past the latest watermark drained to).
    floor: u64,
    len: usize,
}

impl Default for TimerQueue {
    fn default() -> Self {
        TimerQueue {
            slots: vec![Vec::new(); LEVELS * SLOTS],
            occupied: [[0; WORDS]; LEVELS],
            floor: 0,
            len: 0,
        }
    }
}

impl TimerQueue {
    /// Files an entry under its key, clamped to `floor`.
    fn file(&mut self, due: i64, slot: u32) {
        let k = key(due).max(self.floor);
        let level = level_of(k, self.floor);
        let d = digit(k, level);
        self.slots[level * SLOTS + d].push((due, slot));
        self.occupied[level][d / 64] |= 1 << (d % 64);
    }

    /// The lowest occupied slot of `level`.
    fn lowest_occupied(&self, level: usize) -> Option<usize> {
        self.occupied[level]
            .iter()
            .enumerate()
            .find(|(_, word)| **word != 0)
            .map(|(w, word)| w * 64 + word.trailing_zeros() as usize)
    }

    fn clear_occupied(&mut self, level: usize, d: usize) {
        self.occupied[level][d / 64] &= !(1 << (d % 64));
    }

    pub fn push(&mut self, due: i64, slot: u32) {
        self.file(due, slot);
        self.len += 1;
    }

    /// Moves every entry due at or before `watermark` into `out` (in no particular order).
    pub fn drain_due(&mut self, watermark: i64, out: &mut Vec<(i64, u32)>) {
        let limit = key(watermark);
        loop {
            // A level-0 slot holds one key: `floor` with its lowest digit replaced.
            if let Some(d) = self.lowest_occupied(0) {
                let k = (self.floor & !(SLOTS as u64 - 1)) | d as u64;
                if k > limit {
                    return;
                }
                self.len -= self.slots[d].len();
                out.append(&mut self.slots[d]);
                if self.slots[d].capacity() > KEPT_CAPACITY {
                    self.slots[d] = Vec::new();
                }
                self.clear_occupied(0, d);
                self.floor = k;
                continue;
            }
            // Level 0 is empty: the lowest slot of the lowest level with entries begins the
            // next keys. If it is passed, advance to its start and spread it over the levels
            // below.
            let Some((level, d)) = (1..LEVELS).find_map(|l| Some((l, self.lowest_occupied(l)?)))
            else {
                return;
            };
            let shift = level as u32 * DIGIT_BITS;
            let above = self
                .floor
                .checked_shr(shift + DIGIT_BITS)
                .map_or(0, |high| high << (shift + DIGIT_BITS));
            let start = above | (d as u64) << shift;
            if start > limit {
                return;
            }
            self.floor = start;
            let index = level * SLOTS + d;
            let mut moving = std::mem::take(&mut self.slots[index]);
            self.clear_occupied(level, d);
            for (due, slot) in moving.drain(..) {
                self.file(due, slot);
            }
            if moving.capacity() <= KEPT_CAPACITY && self.slots[index].is_empty() {
                self.slots[index] = moving;
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
        self.slots.capacity() * std::mem::size_of::<Vec<(i64, u32)>>()
            + self
                .slots
                .iter()
                .map(|b| b.capacity() * std::mem::size_of::<(i64, u32)>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Drains `queue` to `watermark` and checks that exactly the entries of `reference` due
    /// came out, each once; drops them from `reference`.
    fn drain_matches(
        queue: &mut TimerQueue,
        reference: &mut Vec<(i64, u32)>,
        watermark: i64,
    ) -> Result<(), TestCaseError> {
        let mut out = Vec::new();
        queue.drain_due(watermark, &mut out);
        out.sort_unstable();
        let mut due: Vec<(i64, u32)> = reference
            .iter()
            .copied()
            .filter(|(d, _)| *d <= watermark)
            .collect();
        due.sort_unstable();
        reference.retain(|(d, _)| *d > watermark);
        prop_assert_eq!(out, due);
        Ok(())
    }

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
                    drain_matches(&mut queue, &mut reference, watermark)?;
                } else {
                    queue.push(value, slot);
                    reference.push((value, slot));
                }
                prop_assert_eq!(queue.len(), reference.len());
            }
        }

        /// The same over spans from milliseconds to centuries (every level of the queue),
        /// across the sign of due times and with the extremes, and watermark jumps of any size.
        #[test]
        fn drains_exactly_what_is_due_over_any_span(
            start in any::<i64>(),
            steps in proptest::collection::vec(
                (any::<bool>(), 0u32..63, any::<u64>(), 0u32..50, 0u8..20), 1..400)
        ) {
            let mut queue = TimerQueue::default();
            let mut reference: Vec<(i64, u32)> = Vec::new();
            let mut watermark = start / 2;
            for (drain, scale, random, slot, extreme) in steps {
                let offset = (random % (1u64 << scale)) as i64 - (1i64 << scale) / 2;
                if drain {
                    watermark = watermark.saturating_add(offset.abs() / 3);
                    drain_matches(&mut queue, &mut reference, watermark)?;
                } else {
                    let due = match extreme {
                        0 => i64::MIN,
                        1 => i64::MAX,
                        _ => watermark.saturating_add(offset),
                    };
                    queue.push(due, slot);
                    reference.push((due, slot));
                }
                prop_assert_eq!(queue.len(), reference.len());
            }
        }
    }
}

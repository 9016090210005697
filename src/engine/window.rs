//! Window state for one feature of one entity: panes for hopping (and so tumbling and sliding)
//! windows, a list of sessions, or a lifetime total.
//!
//! Hopping windows of SIZE and STEP are kept as panes of STEP (pane `p` holds events in
//! `[p*STEP, (p+1)*STEP)`), so a window is `n = SIZE/STEP` consecutive panes. A running total
//! covers the panes of the window that the entity's as-of time falls in; moving the as-of time
//! subtracts panes that leave and (rarely, for an event behind the watermark) adds panes back.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::agg::{Accumulator, CountAcc, Input, Part};

/// Floor division for pane and window arithmetic on possibly negative times.
pub fn floor_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "StoredPanes<A>", bound = "")]
pub struct Panes<A: Accumulator> {
    /// Sorted by pane index; each pane holds at least one event.
    panes: VecDeque<(i64, A::Part)>,
    /// The merge of every pane with index `>= running_from`.
    running: A,
    running_from: i64,
    /// Start (in panes) of the earliest window not yet emitted by `on_window_close`.
    closed_before: i64,
    /// Position in `panes` of the first pane of the running total, kept in step with
    /// `running_from` so that moving the window never searches (derived, not stored).
    #[serde(skip_serializing)]
    running_pos: usize,
}

/// The stored form of [`Panes`]: the same fields without the derived position.
#[derive(Deserialize)]
#[serde(bound = "")]
struct StoredPanes<A: Accumulator> {
    panes: VecDeque<(i64, A::Part)>,
    running: A,
    running_from: i64,
    closed_before: i64,
}

impl<A: Accumulator> From<StoredPanes<A>> for Panes<A> {
    fn from(stored: StoredPanes<A>) -> Self {
        let running_pos = stored
            .panes
            .partition_point(|(p, _)| *p < stored.running_from);
        Panes {
            panes: stored.panes,
            running: stored.running,
            running_from: stored.running_from,
            closed_before: stored.closed_before,
            running_pos,
        }
    }
}

impl<A: Accumulator> Default for Panes<A> {
    fn default() -> Self {
        Panes {
            panes: VecDeque::new(),
            running: A::default(),
            running_from: i64::MIN,
            closed_before: i64::MIN,
            running_pos: 0,
        }
    }
}

impl<A: Accumulator> Panes<A> {
    pub fn add(&mut self, pane: i64, input: &Input<'_, '_>) {
        let at = match self.panes.back() {
            Some((last, _)) if *last == pane => Ok(self.panes.len() - 1),
            Some((last, _)) if *last < pane => Err(self.panes.len()),
            None => Err(0),
            Some(_) => self.panes.binary_search_by_key(&pane, |(p, _)| *p),
        };
        match at {
            Ok(i) => self.panes[i].1.add(input),
            Err(i) => {
                let mut part = A::Part::default();
                part.add(input);
                super::prefetch::reserve_one(&mut self.panes);
                self.panes.insert(i, (pane, part));
                if pane < self.running_from {
                    self.running_pos += 1;
                }
            }
        }
        if pane >= self.running_from {
            self.running.add(input);
        }
    }

    /// Index in `panes` of the first pane with index `>= pane`.
    fn position(&self, pane: i64) -> usize {
        self.panes.partition_point(|(p, _)| *p < pane)
    }

    /// Makes the running total cover panes `>= from`.
    pub fn set_running_from(&mut self, from: i64) {
        if from > self.running_from {
            let mut exact = true;
            while let Some((p, acc)) = self.panes.get(self.running_pos) {
                if *p >= from {
                    break;
                }
                exact = exact && self.running.subtract_part(acc);
                self.running_pos += 1;
            }
            self.running_from = from;
            if !exact {
                self.rebuild();
            }
        } else if from < self.running_from {
            while let Some(prev) = self.running_pos.checked_sub(1) {
                let (p, acc) = &self.panes[prev];
                if *p < from {
                    break;
                }
                self.running.merge_part(acc);
                self.running_pos = prev;
            }
            self.running_from = from;
        }
    }

    fn rebuild(&mut self) {
        let mut running = A::default();
        for (_, acc) in self.panes.range(self.running_pos..) {
            running.merge_part(acc);
        }
        self.running = running;
    }

    /// Drops panes below `pane` that are no longer part of the running total; returns the
    /// index below which panes are gone.
    pub fn evict_below(&mut self, pane: i64) -> i64 {
        let limit = pane.min(self.running_from);
        while self.panes.front().is_some_and(|(p, _)| *p < limit) {
            self.panes.pop_front();
            self.running_pos = self.running_pos.saturating_sub(1);
        }
        limit
    }

    pub fn running(&self) -> &A {
        &self.running
    }

    /// The oldest pane held.
    pub fn oldest(&self) -> Option<i64> {
        self.panes.front().map(|(p, _)| *p)
    }

    /// The oldest pane in the running total.
    pub fn oldest_running(&self) -> Option<i64> {
        self.panes.get(self.running_pos).map(|(p, _)| *p)
    }

    pub fn is_empty(&self) -> bool {
        self.panes.is_empty()
    }

    pub fn closed_before(&self) -> i64 {
        self.closed_before
    }

    /// The first window (start pane) holding data that is not yet emitted.
    pub fn next_window_to_close(&self, n: i64) -> Option<i64> {
        let first = self
            .panes
            .get(self.position(self.closed_before.saturating_sub(n - 1)))?
            .0;
        Some(self.closed_before.max(first - n + 1))
    }

    /// Emits every window holding data whose end (in ms) satisfies `is_closed`, in start order.
    pub fn close_windows(
        &mut self,
        n: i64,
        step: i64,
        is_closed: impl Fn(i64) -> bool,
        mut emit: impl FnMut(i64, i64, &A),
    ) {
        while let Some(start) = self.next_window_to_close(n) {
            let end_ms = (start + n).saturating_mul(step);
            if !is_closed(end_ms) {
                break;
            }
            let mut acc = A::default();
            for (p, pane) in &self.panes {
                if *p >= start + n {
                    break;
                }
                if *p >= start {
                    acc.merge_part(pane);
                }
            }
            if !acc.is_empty() {
                emit(start.saturating_mul(step), end_ms, &acc);
            }
            self.closed_before = start + 1;
        }
    }

    /// Starts loading the panes an update touches: the newest and the running total's first.
    pub fn prefetch(&self) {
        if let Some(newest) = self.panes.back() {
            super::prefetch::prefetch(newest);
        }
        if let Some(first) = self.panes.get(self.running_pos) {
            super::prefetch::prefetch(first);
        }
        self.running.prefetch();
    }

    pub fn heap_bytes(&self) -> usize {
        self.panes.capacity() * std::mem::size_of::<(i64, A::Part)>()
            + self
                .panes
                .iter()
                .map(|(_, a)| a.heap_bytes())
                .sum::<usize>()
            + self.running.heap_bytes()
    }
}

impl Panes<CountAcc> {
    /// Removes `part` (added earlier) from pane `pane`, and from the running total if the pane
    /// is in it; a pane left empty is dropped. False if there is no such pane.
    pub fn subtract_at(&mut self, pane: i64, part: &CountAcc) -> bool {
        let Ok(i) = self.panes.binary_search_by_key(&pane, |(p, _)| *p) else {
            return false;
        };
        let exact = self.panes[i].1.subtract(part);
        if pane >= self.running_from && !self.running.subtract(part) {
            self.rebuild();
        }
        if exact && Accumulator::is_empty(&self.panes[i].1) {
            self.panes.remove(i);
            if i < self.running_pos {
                self.running_pos -= 1;
            }
        }
        exact
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session<A> {
    pub start: i64,
    pub last: i64,
    pub acc: A,
}

/// An entity's sessions that may still grow or merge, sorted by start and disjoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sessions<A> {
    list: Vec<Session<A>>,
}

impl<A> Default for Sessions<A> {
    fn default() -> Self {
        Sessions { list: Vec::new() }
    }
}

impl<A: Accumulator> Sessions<A> {
    pub fn add(&mut self, time: i64, gap: i64, input: &Input<'_, '_>) {
        let joins = |s: &Session<A>| {
            time > s.start.saturating_sub(gap) && time < s.last.saturating_add(gap)
        };
        let first = self.list.iter().position(joins);
        match first {
            None => {
                let at = self.list.partition_point(|s| s.start < time);
                let mut acc = A::default();
                acc.add(input);
                self.list.insert(
                    at,
                    Session {
                        start: time,
                        last: time,
                        acc,
                    },
                );
            }
            Some(i) => {
                // An event can bridge at most two neighbouring sessions.
                if i + 1 < self.list.len() && joins(&self.list[i + 1]) {
                    let next = self.list.remove(i + 1);
                    let merged = &mut self.list[i];
                    merged.acc.merge(&next.acc);
                    merged.last = merged.last.max(next.last);
                }
                let s = &mut self.list[i];
                s.acc.add(input);
                s.start = s.start.min(time);
                s.last = s.last.max(time);
            }
        }
    }

    /// The latest session if it is still open at watermark `w`.
    pub fn open(&self, w: i64, gap: i64) -> Option<&A> {
        self.list
            .last()
            .filter(|s| w <= s.last.saturating_add(gap))
            .map(|s| &s.acc)
    }

    /// Removes sessions that can no longer change (`w > last + gap + lateness`).
    pub fn finish(&mut self, w: i64, gap: i64, lateness: i64, mut emit: impl FnMut(&Session<A>)) {
        while let Some(first) = self.list.first() {
            if w > first.last.saturating_add(gap).saturating_add(lateness) {
                emit(first);
                self.list.remove(0);
            } else {
                break;
            }
        }
    }

    /// The next watermark at which something about these sessions changes.
    pub fn next_change(&self, w: i64, gap: i64, lateness: i64) -> Option<i64> {
        let finish = self.list.first().map(|s| {
            s.last
                .saturating_add(gap)
                .saturating_add(lateness)
                .saturating_add(1)
        });
        let close = self
            .list
            .last()
            .filter(|s| w <= s.last.saturating_add(gap))
            .map(|s| s.last.saturating_add(gap).saturating_add(1));
        match (finish, close) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn prefetch(&self) {
        super::prefetch::prefetch(self.list.as_ptr());
    }

    pub fn heap_bytes(&self) -> usize {
        self.list.capacity() * std::mem::size_of::<Session<A>>()
            + self.list.iter().map(|s| s.acc.heap_bytes()).sum::<usize>()
    }
}

//! The feature engine: synchronous, deterministic, no I/O.
//!
//! [`Engine::process`] takes one decoded event of one input partition and emits the records it
//! causes into a [`RecordSink`]; [`Engine::tick`] lets processing time mark partitions idle.
//! The order of work for an event is fixed (see `docs/semantics.md`): lateness check, the
//! event's own update, then the watermark advances and everything it makes due is emitted.
//! State lives per input partition and can be snapshotted and restored partition by partition.

pub mod agg;
mod column;
pub mod distinct;
mod index;
mod prefetch;
pub mod sketch;
pub mod state;
mod timers;
pub mod window;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use agg::FeatureValue;
use agg::Input;
use column::min_opt;
use state::{Clock, Closed, EntityMut, EntityState, PartitionState, expiry_due, hash_values};
pub use state::{SnapshotCapture, SnapshotError};

use crate::config::{Emit, Pipeline};
use crate::decode::{DecodedEvent, Value};

/// Receives the records the engine emits, in order.
pub trait RecordSink {
    /// An `on_update` record: every feature's value for `entity` as of `as_of`.
    fn update(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]);
    /// An `on_window_close` record for feature number `feature`.
    fn window_closed(
        &mut self,
        entity: &str,
        feature: usize,
        start: i64,
        end: i64,
        value: &FeatureValue,
    );
}

/// A record as plain data, for tests and for collecting output.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Update {
        entity: String,
        as_of: i64,
        values: Vec<FeatureValue>,
    },
    WindowClosed {
        entity: String,
        feature: usize,
        start: i64,
        end: i64,
        value: FeatureValue,
    },
}

impl RecordSink for Vec<Record> {
    fn update(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]) {
        self.push(Record::Update {
            entity: entity.to_string(),
            as_of,
            values: values.to_vec(),
        });
    }
    fn window_closed(
        &mut self,
        entity: &str,
        feature: usize,
        start: i64,
        end: i64,
        value: &FeatureValue,
    ) {
        self.push(Record::WindowClosed {
            entity: entity.to_string(),
            feature,
            start,
            end,
            value: value.clone(),
        });
    }
}

/// A sink that only counts, for benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingSink {
    pub updates: u64,
    pub closed: u64,
}

impl RecordSink for CountingSink {
    fn update(&mut self, _: &str, _: i64, _: &[FeatureValue]) {
        self.updates += 1;
    }
    fn window_closed(&mut self, _: &str, _: usize, _: i64, _: i64, _: &FeatureValue) {
        self.closed += 1;
    }
}

/// What happened to an event given to [`Engine::process`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Aggregated,
    /// Older than watermark minus allowed lateness; not aggregated.
    Late {
        watermark: i64,
    },
}

/// Size of the engine's state, for metrics and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    pub entities: usize,
    pub bytes: usize,
}

/// How many upcoming events [`Engine::warm`] uses.
pub const WARM_AHEAD: usize = 3;

pub struct Engine {
    pipeline: Arc<Pipeline>,
    partitions: BTreeMap<u32, PartitionState>,
    /// Processing time of each partition's latest event (or assignment), for idleness.
    last_activity: BTreeMap<u32, i64>,
    watermark: i64,
    values: Vec<FeatureValue>,
    closed: Vec<Closed>,
    /// Scratch lists of `(due, slot)`: timers taken out by one watermark move, and the
    /// entities actually due among them; kept to reuse their buffers.
    drained: Vec<(i64, u32)>,
    due_now: Vec<(i64, u32)>,
}

impl Engine {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Engine {
            pipeline,
            partitions: BTreeMap::new(),
            last_activity: BTreeMap::new(),
            watermark: i64::MIN,
            values: Vec::new(),
            closed: Vec::new(),
            drained: Vec::new(),
            due_now: Vec::new(),
        }
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// The pipeline watermark, `None` before any event.
    pub fn watermark(&self) -> Option<i64> {
        (self.watermark != i64::MIN).then_some(self.watermark)
    }

    /// The watermark of one partition, `None` before its first event.
    pub fn partition_watermark(&self, partition: u32) -> Option<i64> {
        let max = self.partitions.get(&partition)?.max_event_time?;
        Some(max.saturating_sub(self.pipeline.source.max_out_of_order_ms))
    }

    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.partitions.keys().copied()
    }

    /// Starts owning an input partition with empty state.
    pub fn assign(&mut self, partition: u32, now_ms: i64) {
        if !self.partitions.contains_key(&partition) {
            // A partition joining others (a hand-over, a new partition of the topic) has not
            // been seen here: until it has data or is idle, the pipeline watermark is not
            // defined, and none of its events can be late for having moved.
            if !self.partitions.is_empty() {
                self.watermark = i64::MIN;
            }
            self.partitions.insert(partition, self.empty_partition());
        }
        self.last_activity.insert(partition, now_ms);
    }

    /// After a partition arrived with its state: the watermark is the minimum over the
    /// partitions owned, so one that is behind the others (handed over from an instance that
    /// was behind, or a backlog) brings it back to its own. Its events are then judged late or
    /// not as they were where it came from. All partitions count, not only the one that
    /// arrived: a restored checkpoint's watermark may have raised it past one restored before.
    /// Only ever lowers; events raise it again.
    fn lower_watermark_to_partitions(&mut self) {
        let lowest = self
            .partitions
            .values()
            .filter_map(|p| p.max_event_time)
            .map(|max| max.saturating_sub(self.pipeline.source.max_out_of_order_ms))
            .min();
        if let Some(lowest) = lowest
            && lowest < self.watermark
        {
            self.watermark = lowest;
        }
    }

    fn empty_partition(&self) -> PartitionState {
        PartitionState::new(
            &self.pipeline.features,
            self.pipeline.emit() == Emit::OnWindowClose,
        )
    }

    /// Stops owning a partition and drops its state (snapshot it first to hand it over).
    pub fn revoke(&mut self, partition: u32) {
        self.partitions.remove(&partition);
        self.last_activity.remove(&partition);
    }

    fn clock(&self) -> Clock {
        Clock {
            watermark: self.watermark,
            lateness: self.pipeline.source.allowed_lateness_ms,
            close_windows: self.pipeline.emit() == Emit::OnWindowClose,
        }
    }

    /// Processes one event of `partition`, emitting its records into `sink`.
    pub fn process(
        &mut self,
        partition: u32,
        event: &DecodedEvent<'_>,
        now_ms: i64,
        sink: &mut dyn RecordSink,
    ) -> Outcome {
        self.note_activity(partition, now_ms);
        let time = event.time_ms;
        if time
            < self
                .watermark
                .saturating_sub(self.pipeline.source.allowed_lateness_ms)
        {
            return Outcome::Late {
                watermark: self.watermark,
            };
        }
        let clock = self.clock();
        // The fields are borrowed apart (rather than the pipeline cloned) so that an event
        // costs no reference-count traffic.
        let Engine {
            pipeline,
            partitions,
            values: feature_values,
            ..
        } = self;
        let features = &pipeline.features;
        let part = partitions.entry(partition).or_insert_with(|| {
            PartitionState::new(features, pipeline.emit() == Emit::OnWindowClose)
        });
        let seq = part.next_seq;
        part.next_seq += 1;

        let slot = match part.entities.find(&event.entity) {
            Some(slot) => slot,
            None => part.entities.insert(EntityState::new(&event.entity, time)),
        };
        part.entities.prefetch_heap(slot);
        let Some(EntityMut {
            header: entity,
            columns,
            dues,
        }) = part.entities.entity_mut(slot)
        else {
            return Outcome::Aggregated;
        };
        let as_of = entity.newest.max(time);
        entity.newest = as_of;
        entity.as_of = as_of;
        // Each feature's state is visited once: updated, read, and asked when time next
        // changes it.
        feature_values.clear();
        let mut changes = None;
        for ((column, feature), feature_due) in columns.iter_mut().zip(features).zip(dues) {
            let passes = feature
                .filter
                .as_ref()
                .is_none_or(|f| f.eval(&event.fields));
            let value = match feature.field {
                _ if !passes => None,
                Some(i) if event.fields[i].is_null() => None,
                Some(i) => Some(&event.fields[i]),
                None => Some(&Value::Null),
            };
            let input = value.map(|value| Input { value, time, seq });
            let values = (!clock.close_windows).then_some(&mut *feature_values);
            let change = column.update_event(
                slot as usize,
                feature,
                as_of,
                input.as_ref(),
                &clock,
                values,
            );
            *feature_due = change.unwrap_or(state::NEVER);
            changes = min_opt(changes, change);
        }
        if !clock.close_windows {
            entity.emitted = hash_values(feature_values);
            sink.update(&entity.id, as_of, feature_values);
        }
        let due = min_opt(changes, expiry_due(entity, pipeline.entity_ttl_ms));
        part.schedule(slot, due);

        if part.max_event_time.is_none_or(|m| time > m) {
            part.max_event_time = Some(time);
            self.advance(now_ms, sink);
        } else if due.is_some_and(|d| d <= clock.watermark) {
            // An event behind the watermark: its own record is as of its time, and what the
            // watermark has already made due for the entity follows at once.
            self.fire_timers(sink);
        }
        Outcome::Aggregated
    }

    /// Records that `partition` has an event at processing time `now_ms`. When every partition
    /// had gone idle, the stream is resuming: every partition counts as active again from now
    /// (it must show its events, or stay quiet for `idle_timeout`, before the watermark leaves
    /// it behind). Otherwise the first partition read after a pause would carry the watermark
    /// past the events of the others, fetched with it or on their way, and make them late.
    fn note_activity(&mut self, partition: u32, now_ms: i64) {
        let idle_timeout = self.pipeline.source.idle_timeout_ms;
        let is_idle = |last: &i64| now_ms.saturating_sub(*last) > idle_timeout;
        // The usual case, a partition that was active, in one look-up.
        if let Some(last) = self.last_activity.get_mut(&partition)
            && !is_idle(last)
        {
            *last = now_ms;
            return;
        }
        if self.last_activity.values().all(is_idle) {
            for last in self.last_activity.values_mut() {
                *last = now_ms;
            }
        }
        self.last_activity.insert(partition, now_ms);
    }

    /// A hint with no effect on results: starts loading what processing the next events will
    /// touch. `upcoming` are the `(partition, entity id)` of the events after the one about to
    /// be processed, nearest first: what the first's feature states keep on the heap is
    /// loaded, the header and feature states of the second, and the index bucket of the
    /// third, so that by the time each is processed every level of its state arrived while
    /// earlier events were being worked on. Ids may be guesses (a message key): a wrong one
    /// only wastes a load.
    pub fn warm<'a>(&self, upcoming: impl IntoIterator<Item = (u32, &'a str)>) {
        let mut upcoming = upcoming.into_iter();
        for level in 0..WARM_AHEAD {
            let Some((partition, id)) = upcoming.next() else {
                return;
            };
            let Some(part) = self.partitions.get(&partition) else {
                continue;
            };
            match level {
                0 => part.entities.warm_heap(id),
                1 => part.entities.warm_state(id),
                _ => part.entities.warm_index(id),
            }
        }
    }

    /// Re-evaluates idleness with the current processing time; may advance the watermark.
    /// Also fires what is already due: timers of a partition restored behind the watermark.
    pub fn tick(&mut self, now_ms: i64, sink: &mut dyn RecordSink) {
        let before = self.watermark;
        self.advance(now_ms, sink);
        if self.watermark == before && before != i64::MIN {
            self.fire_timers(sink);
        }
    }

    /// Recomputes the watermark and, if it moved, fires every timer it passed.
    fn advance(&mut self, now_ms: i64, sink: &mut dyn RecordSink) {
        let source = &self.pipeline.source;
        let mut active_min: Option<i64> = None;
        let mut idle_max: Option<i64> = None;
        for (p, part) in &self.partitions {
            let Some(max) = part.max_event_time else {
                // A partition that never had data holds the watermark back until it is idle.
                let idle = self
                    .last_activity
                    .get(p)
                    .is_some_and(|t| now_ms.saturating_sub(*t) > source.idle_timeout_ms);
                if !idle {
                    return;
                }
                continue;
            };
            let w = max.saturating_sub(source.max_out_of_order_ms);
            let idle = self
                .last_activity
                .get(p)
                .is_some_and(|t| now_ms.saturating_sub(*t) > source.idle_timeout_ms);
            if idle {
                idle_max = Some(idle_max.map_or(w, |m: i64| m.max(w)));
            } else {
                active_min = Some(active_min.map_or(w, |m: i64| m.min(w)));
            }
        }
        let Some(candidate) = active_min.or(idle_max) else {
            return;
        };
        if candidate <= self.watermark {
            return;
        }
        self.watermark = candidate;
        self.fire_timers(sink);
    }

    fn fire_timers(&mut self, sink: &mut dyn RecordSink) {
        let clock = self.clock();
        let pipeline = Arc::clone(&self.pipeline);
        let features = &pipeline.features;
        let w = clock.watermark;
        let mut due_now = std::mem::take(&mut self.due_now);
        let mut drained = std::mem::take(&mut self.drained);
        for part in self.partitions.values_mut() {
            // Collect what is due first and fire it in (due time, slot) order, so the order of
            // records does not depend on the history of the timer queue (it differs after a
            // restore, which queues exact times).
            due_now.clear();
            drained.clear();
            part.timers.drain_due(w, &mut drained);
            for &(at, slot) in &drained {
                let Some(entity) = part.entities.get_mut(slot) else {
                    continue;
                };
                if entity.queued != at {
                    continue;
                }
                entity.queued = state::NEVER;
                match entity.due {
                    due if due <= w => due_now.push((due, slot)),
                    state::NEVER => {}
                    due => part.schedule(slot, Some(due)),
                }
            }
            due_now.sort_unstable();
            for (i, &(_, slot)) in due_now.iter().enumerate() {
                // A short software pipeline over the entities due: header and feature states
                // two ahead, what the next one's due features keep on the heap.
                if let Some(&(_, ahead)) = due_now.get(i + 2) {
                    part.entities.prefetch_state(ahead);
                }
                if let Some(&(_, next)) = due_now.get(i + 1) {
                    part.entities.prefetch_due_heap(next, w);
                }
                let Some(EntityMut {
                    header: entity,
                    columns,
                    dues,
                }) = part.entities.entity_mut(slot)
                else {
                    continue;
                };
                let expired = pipeline
                    .entity_ttl_ms
                    .is_some_and(|ttl| w > entity.newest.saturating_add(ttl));
                let as_of = (w > entity.as_of).then_some(w);
                if let Some(as_of) = as_of {
                    entity.as_of = as_of;
                }
                self.values.clear();
                let mut changes = None;
                let features_due = columns.iter_mut().zip(features).zip(dues.iter_mut());
                for (index, ((column, feature), feature_due)) in features_due.enumerate() {
                    if *feature_due > w {
                        // Time has not changed this feature: its value is read, its state
                        // left as it is (nothing in it is due to leave, close or expire).
                        if !clock.close_windows {
                            self.values.push(column.value(slot as usize, feature, w));
                        }
                        changes =
                            min_opt(changes, Some(*feature_due).filter(|&d| d != state::NEVER));
                        continue;
                    }
                    self.closed.clear();
                    let values = (!clock.close_windows).then_some(&mut self.values);
                    let change = column.update_time(
                        slot as usize,
                        feature,
                        as_of,
                        &clock,
                        &mut self.closed,
                        values,
                    );
                    *feature_due = change.unwrap_or(state::NEVER);
                    changes = min_opt(changes, change);
                    for (start, end, value) in &self.closed {
                        sink.window_closed(&entity.id, index, *start, *end, value);
                    }
                }
                if !clock.close_windows {
                    let hash = hash_values(&self.values);
                    if hash != entity.emitted {
                        entity.emitted = hash;
                        sink.update(&entity.id, entity.as_of, &self.values);
                    }
                }
                // Expiry comes last: what the same watermark made due (decayed values, closed
                // windows) is emitted first. With `on_window_close` an entity also outlives its
                // TTL until every window holding its events has closed, so none is lost.
                if expired {
                    match changes.filter(|_| clock.close_windows) {
                        Some(close) => part.schedule(slot, Some(close)),
                        None => {
                            part.entities.remove(slot);
                        }
                    }
                    continue;
                }
                let due = min_opt(changes, expiry_due(entity, pipeline.entity_ttl_ms));
                part.schedule(slot, due);
            }
        }
        self.due_now = due_now;
        self.drained = drained;
    }

    /// Every feature value of `entity` as of now (the watermark, or the entity's newest event
    /// if later): `(as_of, values)`.
    pub fn lookup(&self, entity: &str) -> Option<(i64, Vec<FeatureValue>)> {
        let features = &self.pipeline.features;
        for part in self.partitions.values() {
            if let Some(slot) = part.entities.find(entity) {
                let state = part.entities.get(slot)?;
                let mut values = Vec::with_capacity(features.len());
                part.entities
                    .values_into(slot, features, self.watermark, &mut values);
                return Some((state.as_of.max(self.watermark), values));
            }
        }
        None
    }

    /// Visits every live entity with its current values: `(entity, as_of, values)`.
    pub fn for_each_entity(&self, mut visit: impl FnMut(&str, i64, &[FeatureValue])) {
        let features = &self.pipeline.features;
        let mut values = Vec::with_capacity(features.len());
        for part in self.partitions.values() {
            for (slot, state) in part.entities.iter() {
                part.entities
                    .values_into(slot, features, self.watermark, &mut values);
                visit(&state.id, state.as_of.max(self.watermark), &values);
            }
        }
    }

    /// Live entities over all partitions (cheap, unlike [`Engine::state_stats`]).
    pub fn entity_count(&self) -> usize {
        self.partitions.values().map(|p| p.entities.len()).sum()
    }

    pub fn state_stats(&self) -> StateStats {
        let mut stats = StateStats::default();
        for part in self.partitions.values() {
            stats.entities += part.entities.len();
            stats.bytes += part.entities.bytes() + part.timers.heap_bytes();
        }
        stats
    }

    /// Bytes of state per feature, in pipeline order: each feature's fixed part plus what it
    /// holds on the heap, summed over entities (for the benchmark; walks every entity).
    pub fn feature_bytes(&self) -> Vec<usize> {
        let mut bytes = vec![0; self.pipeline.features.len()];
        for part in self.partitions.values() {
            for (total, feature) in bytes.iter_mut().zip(part.entities.feature_bytes()) {
                *total += feature;
            }
        }
        bytes
    }

    /// Serialises one partition's state.
    pub fn snapshot_partition(&self, partition: u32) -> Result<Vec<u8>, SnapshotError> {
        match self.partitions.get(&partition) {
            Some(part) => part.snapshot(),
            None => self.empty_partition().snapshot(),
        }
    }

    /// Begins a snapshot of each of `partitions` (those owned), as they are now, to be taken a
    /// slice at a time ([`Engine::snapshot_step`]) while events go on being processed. Each
    /// partition's result is byte for byte what [`Engine::snapshot_partition`] returns now.
    pub fn begin_snapshot(&mut self, partitions: impl IntoIterator<Item = u32>) {
        for p in partitions {
            if let Some(part) = self.partitions.get_mut(&p) {
                part.begin_capture();
            }
        }
    }

    /// Encodes up to `budget` more entities of the snapshots begun, over all partitions; true
    /// when every one is complete.
    pub fn snapshot_step(&mut self, budget: usize) -> bool {
        let mut left = budget;
        self.partitions
            .values_mut()
            .all(|part| part.capture_step(&mut left))
    }

    /// Completes the snapshots begun of every partition: `(partition, snapshot)`.
    pub fn finish_snapshots(&mut self) -> Vec<(u32, SnapshotCapture)> {
        self.partitions
            .iter_mut()
            .filter_map(|(&p, part)| Some((p, part.finish_capture()?)))
            .collect()
    }

    /// Drops the snapshots begun, unfinished.
    pub fn abandon_snapshots(&mut self) {
        for part in self.partitions.values_mut() {
            part.abandon_capture();
        }
    }

    /// Replaces one partition's state with a snapshot and rebuilds its timers. The pipeline
    /// watermark is kept as the maximum of what this engine and the snapshot have seen.
    pub fn restore_partition(
        &mut self,
        partition: u32,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<(), SnapshotError> {
        let clock = self.clock();
        let features = &self.pipeline.features;
        let mut part = PartitionState::restore(bytes, features, clock.close_windows)?;
        let slots: Vec<u32> = part.entities.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let due =
                part.entities
                    .refresh_dues(slot, features, &clock, self.pipeline.entity_ttl_ms);
            part.schedule(slot, due);
        }
        self.partitions.insert(partition, part);
        self.last_activity.insert(partition, now_ms);
        self.lower_watermark_to_partitions();
        Ok(())
    }

    /// Restores the pipeline watermark saved with a checkpoint (it spans partitions).
    pub fn restore_watermark(&mut self, watermark: Option<i64>) {
        if let Some(w) = watermark {
            self.watermark = self.watermark.max(w);
        }
    }
}

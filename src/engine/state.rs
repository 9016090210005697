//! Per-entity feature state, the entity store of one input partition, and its snapshots.
//!
//! State is partitioned by input partition so that a partition's entities can be snapshotted,
//! restored and handed to another instance on their own. Each feature's state is one
//! [`FeatureState`] variant per accumulator type: adding an aggregation is a compile error until
//! every match here handles it.

use std::hash::{BuildHasher, Hasher};

use compact_str::CompactString;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};

use super::agg::*;
use super::distinct::RecentDistinct;
use super::index::SlotIndex;
use super::timers::TimerQueue;
use super::window::{Panes, Sessions, floor_div};
use crate::config::{Feature, Window};

/// The window state of one feature, for one accumulator type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum Slot<A: Accumulator> {
    Panes(Panes<A>),
    Sessions(Sessions<A>),
    Lifetime(A),
}

/// Where time stands for an entity while its state is updated.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The pipeline watermark (`i64::MIN` before any event).
    pub watermark: i64,
    pub lateness: i64,
    /// Whether closed windows are emitted (`emit: on_window_close`).
    pub close_windows: bool,
}

/// A window-close result: window start, end and the value.
pub type Closed = (i64, i64, FeatureValue);

impl<A: Accumulator> Slot<A> {
    fn new(feature: &Feature) -> Self {
        match feature.window {
            Window::Hopping { .. } => Slot::Panes(Panes::default()),
            Window::Session { .. } => Slot::Sessions(Sessions::default()),
            Window::Lifetime => Slot::Lifetime(A::default()),
        }
    }

    fn set_as_of(&mut self, feature: &Feature, as_of: i64) {
        if let (
            Slot::Panes(panes),
            Window::Hopping {
                size_ms, step_ms, ..
            },
        ) = (self, feature.window)
        {
            panes.set_running_from(floor_div(as_of, step_ms) - size_ms / step_ms + 1);
        }
    }

    fn add(&mut self, feature: &Feature, input: &Input<'_, '_>) {
        match (self, feature.window) {
            (Slot::Panes(panes), Window::Hopping { step_ms, .. }) => {
                panes.add(floor_div(input.time, step_ms), input)
            }
            (Slot::Sessions(sessions), Window::Session { gap_ms }) => {
                sessions.add(input.time, gap_ms, input)
            }
            (Slot::Lifetime(acc), _) => acc.add(input),
            _ => {}
        }
    }

    fn value(&self, feature: &Feature, watermark: i64) -> FeatureValue {
        let out = |acc: &A| acc.output(feature.agg, feature.value_type);
        match (self, feature.window) {
            (Slot::Panes(panes), _) => out(panes.running()),
            (Slot::Sessions(sessions), Window::Session { gap_ms }) => sessions
                .open(watermark, gap_ms)
                .map_or_else(|| out(&A::default()), out),
            (Slot::Lifetime(acc), _) => out(acc),
            (Slot::Sessions(_), _) => out(&A::default()),
        }
    }

    /// Closes what the watermark has passed and drops what can no longer matter.
    fn on_watermark(&mut self, feature: &Feature, clock: &Clock, closed: &mut Vec<Closed>) {
        let out = |acc: &A| acc.output(feature.agg, feature.value_type);
        match (self, feature.window) {
            (
                Slot::Panes(panes),
                Window::Hopping {
                    size_ms, step_ms, ..
                },
            ) => {
                let n = size_ms / step_ms;
                let horizon = clock.watermark.saturating_sub(clock.lateness);
                if clock.close_windows {
                    panes.close_windows(
                        n,
                        step_ms,
                        |end| clock.watermark > end.saturating_add(clock.lateness),
                        |start, end, acc| {
                            closed.push((start, end, out(acc)));
                        },
                    );
                }
                // Future events are at or after `horizon`, so no as-of time can reach further back.
                let mut keep_from = floor_div(horizon, step_ms).saturating_sub(n - 1);
                if clock.close_windows {
                    keep_from = keep_from.min(panes.closed_before());
                }
                panes.evict_below(keep_from);
            }
            (Slot::Sessions(sessions), Window::Session { gap_ms }) => {
                sessions.finish(clock.watermark, gap_ms, clock.lateness, |s| {
                    if clock.close_windows {
                        closed.push((s.start, s.last.saturating_add(gap_ms), out(&s.acc)));
                    }
                });
            }
            _ => {}
        }
    }

    /// The next watermark at which this state changes by time alone.
    fn next_change(&self, feature: &Feature, clock: &Clock) -> Option<i64> {
        match (self, feature.window) {
            (
                Slot::Panes(panes),
                Window::Hopping {
                    size_ms, step_ms, ..
                },
            ) => {
                let n = size_ms / step_ms;
                let leaves = panes
                    .oldest_running()
                    .map(|q| (q + n).saturating_mul(step_ms));
                let closes = if clock.close_windows {
                    panes.next_window_to_close(n).map(|s| {
                        (s + n)
                            .saturating_mul(step_ms)
                            .saturating_add(clock.lateness)
                            .saturating_add(1)
                    })
                } else {
                    None
                };
                min_opt(leaves, closes)
            }
            (Slot::Sessions(sessions), Window::Session { gap_ms }) => {
                sessions.next_change(clock.watermark, gap_ms, clock.lateness)
            }
            _ => None,
        }
    }

    /// True when nothing is held that a future record could depend on.
    fn is_empty(&self) -> bool {
        match self {
            Slot::Panes(p) => p.is_empty(),
            Slot::Sessions(s) => s.is_empty(),
            Slot::Lifetime(a) => a.is_empty(),
        }
    }

    fn prefetch(&self) {
        match self {
            Slot::Panes(p) => p.prefetch(),
            Slot::Sessions(s) => s.prefetch(),
            Slot::Lifetime(a) => a.prefetch(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Slot::Panes(p) => p.heap_bytes(),
            Slot::Sessions(s) => s.heap_bytes(),
            Slot::Lifetime(a) => a.heap_bytes(),
        }
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FeatureState {
    Count(Slot<CountAcc>),
    SumInt(Slot<SumIntAcc>),
    SumFloat(Slot<SumFloatAcc>),
    Moments(Slot<MomentsAcc>),
    Min(Slot<ExtremeAcc<false>>),
    Max(Slot<ExtremeAcc<true>>),
    First(Slot<EdgeAcc<false>>),
    Last(Slot<EdgeAcc<true>>),
    Distinct(Slot<DistinctAcc>),
    Sketch(Slot<SketchAcc>),
    /// A distinct count over hopping windows with `emit: on_update` (see `distinct.rs`).
    RecentDistinct(RecentDistinct),
}

/// Runs `$body` with `$slot` bound to the state's slot, whatever its accumulator type, or
/// `$other` with `$recent` bound to a [`RecentDistinct`].
macro_rules! with_slot {
    ($state:expr, $slot:ident => $body:expr, $recent:ident => $other:expr) => {
        match $state {
            FeatureState::RecentDistinct($recent) => $other,
            FeatureState::Count($slot) => $body,
            FeatureState::SumInt($slot) => $body,
            FeatureState::SumFloat($slot) => $body,
            FeatureState::Moments($slot) => $body,
            FeatureState::Min($slot) => $body,
            FeatureState::Max($slot) => $body,
            FeatureState::First($slot) => $body,
            FeatureState::Last($slot) => $body,
            FeatureState::Distinct($slot) => $body,
            FeatureState::Sketch($slot) => $body,
        }
    };
}

impl FeatureState {
    /// The empty state of `feature`; `close_windows` is whether closed windows are emitted.
    pub fn new(feature: &Feature, close_windows: bool) -> Self {
        use crate::config::{Agg, ValueType};
        match feature.agg {
            Agg::DistinctCount
                if !close_windows && matches!(feature.window, Window::Hopping { .. }) =>
            {
                FeatureState::RecentDistinct(RecentDistinct::default())
            }
            Agg::Count => FeatureState::Count(Slot::new(feature)),
            Agg::Sum if feature.value_type == ValueType::Int => {
                FeatureState::SumInt(Slot::new(feature))
            }
            Agg::Sum => FeatureState::SumFloat(Slot::new(feature)),
            Agg::Mean | Agg::Stddev | Agg::Variance | Agg::StddevPop | Agg::VariancePop => {
                FeatureState::Moments(Slot::new(feature))
            }
            Agg::Min => FeatureState::Min(Slot::new(feature)),
            Agg::Max => FeatureState::Max(Slot::new(feature)),
            Agg::First => FeatureState::First(Slot::new(feature)),
            Agg::Last => FeatureState::Last(Slot::new(feature)),
            Agg::DistinctCount => FeatureState::Distinct(Slot::new(feature)),
            Agg::Percentile(_) => FeatureState::Sketch(Slot::new(feature)),
        }
    }

    pub fn set_as_of(&mut self, feature: &Feature, as_of: i64) {
        with_slot!(self, slot => slot.set_as_of(feature, as_of), d => {
            if let Window::Hopping { size_ms, step_ms, .. } = feature.window {
                d.set_running_from(floor_div(as_of, step_ms) - size_ms / step_ms + 1);
            }
        })
    }

    pub fn add(&mut self, feature: &Feature, input: &Input<'_, '_>) {
        with_slot!(self, slot => slot.add(feature, input), d => {
            if let Window::Hopping { step_ms, .. } = feature.window {
                d.add(floor_div(input.time, step_ms), input);
            }
        })
    }

    pub fn value(&self, feature: &Feature, watermark: i64) -> FeatureValue {
        with_slot!(self, slot => slot.value(feature, watermark), d => {
            FeatureValue::Int(i64::try_from(d.count()).unwrap_or(i64::MAX))
        })
    }

    pub fn on_watermark(&mut self, feature: &Feature, clock: &Clock, closed: &mut Vec<Closed>) {
        with_slot!(self, slot => slot.on_watermark(feature, clock, closed), d => {
            if let Window::Hopping { size_ms, step_ms, .. } = feature.window {
                // As for panes: future events are at or after the horizon.
                let horizon = clock.watermark.saturating_sub(clock.lateness);
                d.evict_below(floor_div(horizon, step_ms).saturating_sub(size_ms / step_ms - 1));
            }
        })
    }

    pub fn next_change(&self, feature: &Feature, clock: &Clock) -> Option<i64> {
        with_slot!(self, slot => slot.next_change(feature, clock), d => {
            match feature.window {
                Window::Hopping { size_ms, step_ms, .. } => d
                    .oldest_running()
                    .map(|q| (q + size_ms / step_ms).saturating_mul(step_ms)),
                _ => None,
            }
        })
    }

    pub fn is_empty(&self) -> bool {
        with_slot!(self, slot => slot.is_empty(), d => d.is_empty())
    }

    pub fn heap_bytes(&self) -> usize {
        with_slot!(self, slot => slot.heap_bytes(), d => d.heap_bytes())
    }

    pub fn prefetch(&self) {
        with_slot!(self, slot => slot.prefetch(), d => d.prefetch())
    }
}

/// Everything kept for one entity in one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntityState {
    /// Ids up to 24 bytes are stored inline, which saves a cache miss per look-up.
    pub id: CompactString,
    /// The newest event time seen for this entity.
    pub newest: i64,
    /// The time the feature state currently describes (`>= newest`).
    pub as_of: i64,
    /// Hash of the last emitted feature values, to emit time-driven records only on change.
    pub emitted: u64,
    pub features: Box<[FeatureState]>,
    /// When time next changes this entity ([`NEVER`]: never); rebuilt on restore.
    #[serde(skip, default = "never")]
    pub due: i64,
    /// The time of this entity's live entry in the timer queue ([`NEVER`]: none).
    #[serde(skip, default = "never")]
    pub queued: i64,
}

/// "No time" for [`EntityState::due`] and [`EntityState::queued`]: no watermark passes it.
pub const NEVER: i64 = i64::MAX;

fn never() -> i64 {
    NEVER
}

impl EntityState {
    pub fn new(id: &str, time: i64, features: &[Feature], close_windows: bool) -> Self {
        EntityState {
            id: CompactString::from(id),
            newest: time,
            as_of: time,
            emitted: 0,
            features: features
                .iter()
                .map(|f| FeatureState::new(f, close_windows))
                .collect(),
            due: NEVER,
            queued: NEVER,
        }
    }

    /// Starts loading every allocation the entity's features own, so that the cache misses of
    /// a cold entity overlap rather than come one after another.
    pub fn prefetch(&self) {
        for state in self.features.iter() {
            state.prefetch();
        }
    }

    /// Starts loading the feature array (not what it points to).
    pub fn prefetch_features(&self) {
        let bytes = std::mem::size_of_val(&*self.features);
        let base = self.features.as_ptr().cast::<u8>();
        for offset in (0..bytes).step_by(64) {
            super::prefetch::prefetch(base.wrapping_add(offset));
        }
    }

    pub fn values_into(&self, features: &[Feature], watermark: i64, out: &mut Vec<FeatureValue>) {
        out.clear();
        out.extend(
            self.features
                .iter()
                .zip(features)
                .map(|(state, f)| state.value(f, watermark)),
        );
    }

    /// Next watermark at which time alone changes this entity, TTL expiry included.
    pub fn next_change(
        &self,
        features: &[Feature],
        clock: &Clock,
        ttl: Option<i64>,
    ) -> Option<i64> {
        let mut due = ttl.map(|ttl| self.newest.saturating_add(ttl).saturating_add(1));
        for (state, feature) in self.features.iter().zip(features) {
            due = min_opt(due, state.next_change(feature, clock));
        }
        due
    }

    pub fn bytes(&self) -> usize {
        std::mem::size_of::<EntityState>()
            + if self.id.is_heap_allocated() {
                self.id.len()
            } else {
                0
            }
            + self.features.len() * std::mem::size_of::<FeatureState>()
            + self
                .features
                .iter()
                .map(FeatureState::heap_bytes)
                .sum::<usize>()
    }
}

pub fn hash_values(values: &[FeatureValue]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    for v in values {
        v.hash_into(&mut h);
    }
    h.finish()
}

/// The entities of one partition: a slab of states and an index by id that stores only slot
/// numbers (the id lives once, in the state).
#[derive(Debug, Default)]
pub struct EntityStore {
    slots: Vec<Option<EntityState>>,
    free: Vec<u32>,
    index: SlotIndex,
    live: usize,
}

fn id_hash(id: &str) -> u64 {
    // FxHash is fast on short ids; a final mix spreads its bits over both the bucket (low
    // bits) and the tag (high bits) of the index.
    let mut z = FxBuildHasher.hash_one(id);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl EntityStore {
    pub fn find(&self, id: &str) -> Option<u32> {
        self.index.find(id_hash(id), |i| {
            self.slots
                .get(i as usize)
                .and_then(Option::as_ref)
                .is_some_and(|e| &*e.id == id)
        })
    }

    /// Starts loading the index bucket `id` will be looked up in.
    pub fn warm_index(&self, id: &str) {
        if let Some(bucket) = self.index.bucket_address(id_hash(id)) {
            super::prefetch::prefetch(bucket);
        }
    }

    /// Starts loading the state header of the entity `id` probably is (index already loaded).
    pub fn warm_header(&self, id: &str) {
        if let Some(slot) = self.index.probable_slot(id_hash(id)) {
            self.prefetch_slot(slot);
        }
    }

    /// Starts loading the feature array of the entity `id` probably is (header loaded).
    pub fn warm_features(&self, id: &str) {
        if let Some(entity) = self
            .index
            .probable_slot(id_hash(id))
            .and_then(|slot| self.get(slot))
        {
            entity.prefetch_features();
        }
    }

    pub fn insert(&mut self, state: EntityState) -> u32 {
        let hash = id_hash(&state.id);
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(state);
                i
            }
            None => {
                self.slots.push(Some(state));
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.index.insert(hash, slot, |i| {
            slots
                .get(i as usize)
                .and_then(Option::as_ref)
                .map_or(0, |e| id_hash(&e.id))
        });
        self.live += 1;
        slot
    }

    pub fn remove(&mut self, slot: u32) -> Option<EntityState> {
        let state = self.slots.get_mut(slot as usize)?.take()?;
        self.index.remove(id_hash(&state.id), slot);
        self.free.push(slot);
        self.live -= 1;
        Some(state)
    }

    pub fn get(&self, slot: u32) -> Option<&EntityState> {
        self.slots.get(slot as usize)?.as_ref()
    }

    /// Starts loading a slot's entity header without reading it.
    pub fn prefetch_slot(&self, slot: u32) {
        if let Some(entry) = self.slots.get(slot as usize) {
            super::prefetch::prefetch(entry);
        }
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut EntityState> {
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &EntityState)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as u32, s)))
    }

    pub fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<EntityState>>()
            + self.index.heap_bytes()
            + self
                .iter()
                .map(|(_, e)| e.bytes() - std::mem::size_of::<EntityState>())
                .sum::<usize>()
    }
}

/// The state of one input partition: its entities, their timers and its event-time progress.
#[derive(Debug, Default)]
pub struct PartitionState {
    pub entities: EntityStore,
    /// `(due, slot)`; an entry is live only when it matches the entity's `queued`.
    pub timers: TimerQueue,
    /// The newest event time seen in this partition (its watermark is this minus the bound).
    pub max_event_time: Option<i64>,
    /// Arrival counter; orders events with equal times (`first`/`last`).
    pub next_seq: u64,
}

impl PartitionState {
    /// Records when time next changes an entity, queueing a timer only if it is earlier than
    /// the one already queued (a later one is re-queued when the earlier fires).
    pub fn schedule(&mut self, slot: u32, due: Option<i64>) {
        let Some(entity) = self.entities.get_mut(slot) else {
            return;
        };
        entity.due = due.unwrap_or(NEVER);
        if let Some(d) = due
            && d < entity.queued
        {
            entity.queued = d;
            self.timers.push(d, slot);
        }
    }
}

/// Format 3: a header, then the slots in chunks encoded (and decoded) on parallel threads.
/// Format 3 added the rounding budget of float sums and moments to window totals; the entity
/// layout of formats 1 and 2 differs and they are refused with an error that says so.
const SNAPSHOT_VERSION: u32 = 3;

/// Slots per chunk at least: below this, threads cost more than they save.
const MIN_CHUNK: usize = 8192;

#[derive(Serialize)]
struct SnapshotHeaderRef<'a> {
    version: u32,
    max_event_time: Option<i64>,
    next_seq: u64,
    free: &'a [u32],
    /// Byte length of each chunk of slots that follows the header.
    chunks: &'a [u64],
}

#[derive(Deserialize)]
struct SnapshotHeader {
    /// Read positionally; `restore` has already looked at it.
    _version: u32,
    max_event_time: Option<i64>,
    next_seq: u64,
    free: Vec<u32>,
    chunks: Vec<u64>,
}

/// A decoded snapshot, before its entities are indexed.
struct DecodedSnapshot {
    max_event_time: Option<i64>,
    next_seq: u64,
    slots: Vec<Option<EntityState>>,
    free: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("partition snapshot could not be encoded: {0}")]
    Encode(postcard::Error),
    #[error("partition snapshot could not be decoded: {0}")]
    Decode(postcard::Error),
    #[error("partition snapshot is damaged: {0}")]
    Damaged(&'static str),
    #[error(
        "partition snapshot has format version {found}, this build reads version {SNAPSHOT_VERSION}"
    )]
    Version { found: u32 },
    #[error(
        "partition snapshot has format version {found}, written by an earlier build whose entity state this build cannot read; move the state directory aside and reset the consumer group's offsets to rebuild the state from the input"
    )]
    Outdated { found: u32 },
}

/// Runs `work` on each part, one thread per part, and returns the results in order.
/// Deterministic: the result does not depend on how the threads are scheduled.
fn in_parallel<T: Sync, R: Send>(parts: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if parts.len() <= 1 {
        return parts.iter().map(&work).collect();
    }
    std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = parts
            .iter()
            .map(|part| scope.spawn(move || work(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Slots per chunk: one chunk per core (at most eight), none smaller than `MIN_CHUNK`.
fn chunk_len(slots: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    slots.div_ceil(cores.clamp(1, 8)).max(MIN_CHUNK)
}

impl PartitionState {
    /// Serialises the partition (entities, slot numbers, event-time progress). Timers are not
    /// stored: they are a function of the state and are rebuilt on restore. The service waits
    /// for this at every checkpoint, so the slots are encoded in chunks on parallel threads.
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let slots = &self.entities.slots;
        let ranges: Vec<&[Option<EntityState>]> = slots.chunks(chunk_len(slots.len())).collect();
        let encoded = in_parallel(&ranges, postcard::to_allocvec);
        let chunks = encoded
            .into_iter()
            .collect::<Result<Vec<Vec<u8>>, _>>()
            .map_err(SnapshotError::Encode)?;
        let lengths: Vec<u64> = chunks.iter().map(|c| c.len() as u64).collect();
        let header = SnapshotHeaderRef {
            version: SNAPSHOT_VERSION,
            max_event_time: self.max_event_time,
            next_seq: self.next_seq,
            free: &self.entities.free,
            chunks: &lengths,
        };
        let mut out = postcard::to_allocvec(&header).map_err(SnapshotError::Encode)?;
        out.reserve_exact(chunks.iter().map(Vec::len).sum());
        for chunk in &chunks {
            out.extend_from_slice(chunk);
        }
        Ok(out)
    }

    /// Restores a snapshot; the caller re-schedules timers (they depend on the pipeline).
    pub fn restore(bytes: &[u8]) -> Result<PartitionState, SnapshotError> {
        let (version, _) =
            postcard::take_from_bytes::<u32>(bytes).map_err(SnapshotError::Decode)?;
        let snapshot = match version {
            1 | 2 => return Err(SnapshotError::Outdated { found: version }),
            SNAPSHOT_VERSION => {
                let (header, mut rest) = postcard::take_from_bytes::<SnapshotHeader>(bytes)
                    .map_err(SnapshotError::Decode)?;
                let mut parts = Vec::with_capacity(header.chunks.len());
                for &len in &header.chunks {
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&l| l <= rest.len())
                        .ok_or(SnapshotError::Damaged("a chunk runs past the end"))?;
                    let (part, tail) = rest.split_at(len);
                    parts.push(part);
                    rest = tail;
                }
                if !rest.is_empty() {
                    return Err(SnapshotError::Damaged("bytes after the last chunk"));
                }
                let decoded = in_parallel(&parts, |part| {
                    postcard::from_bytes::<Vec<Option<EntityState>>>(part)
                });
                let mut slots = Vec::new();
                for chunk in decoded {
                    slots.extend(chunk.map_err(SnapshotError::Decode)?);
                }
                DecodedSnapshot {
                    max_event_time: header.max_event_time,
                    next_seq: header.next_seq,
                    slots,
                    free: header.free,
                }
            }
            found => return Err(SnapshotError::Version { found }),
        };
        if snapshot
            .free
            .iter()
            .any(|&f| snapshot.slots.get(f as usize).is_none_or(Option::is_some))
        {
            return Err(SnapshotError::Damaged("a free slot is missing or in use"));
        }
        let mut store = EntityStore {
            slots: snapshot.slots,
            free: snapshot.free,
            index: SlotIndex::default(),
            live: 0,
        };
        for (i, slot) in store.slots.iter().enumerate() {
            if let Some(e) = slot {
                let slots = &store.slots;
                store.index.insert(id_hash(&e.id), i as u32, |j| {
                    slots
                        .get(j as usize)
                        .and_then(Option::as_ref)
                        .map_or(0, |e| id_hash(&e.id))
                });
                store.live += 1;
            }
        }
        Ok(PartitionState {
            entities: store,
            timers: TimerQueue::default(),
            max_event_time: snapshot.max_event_time,
            next_seq: snapshot.next_seq,
        })
    }
}

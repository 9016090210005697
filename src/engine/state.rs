//! The entity store of one input partition (entity headers, an index by id, and the feature
//! columns) and its snapshots.
//!
//! State is partitioned by input partition so that a partition's entities can be snapshotted,
//! restored and handed to another instance on their own. An entity is a slot number: its
//! header lives in the slot vector, and each feature's state at the same slot of that feature's
//! column (see `column.rs`).

use std::hash::{BuildHasher, Hasher};

use compact_str::CompactString;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};

use super::agg::FeatureValue;
use super::column::{Column, column_for, min_opt};
use super::index::SlotIndex;
use super::timers::TimerQueue;
use crate::config::Feature;

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

/// What is kept for one entity besides its feature states.
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
    pub fn new(id: &str, time: i64) -> Self {
        EntityState {
            id: CompactString::from(id),
            newest: time,
            as_of: time,
            emitted: 0,
            due: NEVER,
            queued: NEVER,
        }
    }

    fn id_heap_bytes(&self) -> usize {
        if self.id.is_heap_allocated() {
            self.id.len()
        } else {
            0
        }
    }
}

/// When an entity expires for having had no event for `ttl`: the first watermark past it.
pub fn expiry_due(entity: &EntityState, ttl: Option<i64>) -> Option<i64> {
    ttl.map(|ttl| entity.newest.saturating_add(ttl).saturating_add(1))
}

pub fn hash_values(values: &[FeatureValue]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    for v in values {
        v.hash_into(&mut h);
    }
    h.finish()
}

/// The entities of one partition: a slab of headers, one column per feature at the same slot
/// numbers, and an index by id that stores only slot numbers (the id lives once, in the header).
#[derive(Debug)]
pub struct EntityStore {
    slots: Vec<Option<EntityState>>,
    columns: Vec<Box<dyn Column>>,
    /// For each slot, when time alone next changes each feature ([`NEVER`]: never), features
    /// in pipeline order: a timer then updates only the features it is due for. Derived from
    /// the feature states (rebuilt on restore), not stored.
    feature_due: Vec<i64>,
    free: Vec<u32>,
    index: SlotIndex,
    live: usize,
    /// A snapshot being taken a slice at a time (see [`SnapshotCapture`]).
    capture: Option<Box<SnapshotCapture>>,
}

/// An entity being updated: its header, the feature columns (its states are at its slot) and
/// when time alone next changes each of its features.
pub struct EntityMut<'s> {
    pub header: &'s mut EntityState,
    pub columns: &'s mut [Box<dyn Column>],
    pub dues: &'s mut [i64],
}

/// The fewest slots the store grows by at a time.
const GROW_AT_LEAST: usize = 64;

fn id_hash(id: &str) -> u64 {
    // FxHash is fast on short ids; a final mix spreads its bits over both the bucket (low
    // bits) and the tag (high bits) of the index.
    let mut z = FxBuildHasher.hash_one(id);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl EntityStore {
    /// An empty store for entities with `features`.
    pub fn new(features: &[Feature], close_windows: bool) -> Self {
        EntityStore {
            slots: Vec::new(),
            columns: features
                .iter()
                .map(|f| column_for(f, close_windows))
                .collect(),
            feature_due: Vec::new(),
            free: Vec::new(),
            index: SlotIndex::default(),
            live: 0,
            capture: None,
        }
    }

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

    /// Starts loading the header and the feature states of the entity `id` probably is (its
    /// index bucket already loaded): all their addresses follow from the slot number.
    pub fn warm_state(&self, id: &str) {
        if let Some(slot) = self.index.probable_slot(id_hash(id)) {
            self.prefetch_state(slot);
        }
    }

    /// Starts loading what the feature states of the entity `id` probably is keep on the
    /// heap (the states themselves already loaded).
    pub fn warm_heap(&self, id: &str) {
        if let Some(slot) = self.index.probable_slot(id_hash(id)) {
            self.prefetch_heap(slot);
        }
    }

    pub fn insert(&mut self, state: EntityState) -> u32 {
        let hash = id_hash(&state.id);
        let slot = match self.free.pop() {
            Some(i) => {
                self.capture_before_change(i);
                self.slots[i as usize] = Some(state);
                self.feature_dues_mut(i).fill(NEVER);
                i
            }
            None => {
                if self.slots.len() == self.slots.capacity() {
                    self.grow();
                }
                self.slots.push(Some(state));
                for column in &mut self.columns {
                    column.push_empty();
                }
                let features = self.columns.len();
                self.feature_due
                    .extend(std::iter::repeat_n(NEVER, features));
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

    /// Grows the slots and every column by an eighth rather than doubling: the columns are
    /// the bulk of the state, and doubling would leave a quarter of it unused on average.
    /// Growth stays amortised O(1).
    fn grow(&mut self) {
        let additional = (self.slots.len() / 8).max(GROW_AT_LEAST);
        self.slots.reserve_exact(additional);
        for column in &mut self.columns {
            column.reserve_exact(additional);
        }
        self.feature_due
            .reserve_exact(additional * self.columns.len());
    }

    /// Where the due times of the features of the entity at `slot` are in `feature_due`.
    fn dues_range(&self, slot: u32) -> std::ops::Range<usize> {
        let n = self.columns.len();
        slot as usize * n..(slot as usize + 1) * n
    }

    /// When time alone next changes each feature of the entity at `slot`.
    pub fn feature_dues(&self, slot: u32) -> &[i64] {
        self.feature_due
            .get(self.dues_range(slot))
            .unwrap_or_default()
    }

    fn feature_dues_mut(&mut self, slot: u32) -> &mut [i64] {
        let range = self.dues_range(slot);
        self.feature_due.get_mut(range).unwrap_or_default()
    }

    pub fn remove(&mut self, slot: u32) -> Option<EntityState> {
        self.capture_before_change(slot);
        let state = self.slots.get_mut(slot as usize)?.take()?;
        self.index.remove(id_hash(&state.id), slot);
        for column in &mut self.columns {
            column.reset(slot as usize);
        }
        self.feature_dues_mut(slot).fill(NEVER);
        self.free.push(slot);
        self.live -= 1;
        Some(state)
    }

    pub fn get(&self, slot: u32) -> Option<&EntityState> {
        self.slots.get(slot as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut EntityState> {
        self.capture_before_change(slot);
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// An entity's header, the feature columns and its features' due times, to update its
    /// features at `slot`.
    pub fn entity_mut(&mut self, slot: u32) -> Option<EntityMut<'_>> {
        self.capture_before_change(slot);
        let range = self.dues_range(slot);
        let header = self.slots.get_mut(slot as usize)?.as_mut()?;
        let dues = self.feature_due.get_mut(range)?;
        Some(EntityMut {
            header,
            columns: &mut self.columns,
            dues,
        })
    }

    pub fn columns(&self) -> &[Box<dyn Column>] {
        &self.columns
    }

    /// Starts loading a slot's header and feature states without reading them.
    pub fn prefetch_state(&self, slot: u32) {
        if let Some(entry) = self.slots.get(slot as usize) {
            super::prefetch::prefetch(entry);
        }
        for column in &self.columns {
            column.prefetch_state(slot as usize);
        }
        let dues = self.feature_dues(slot);
        if let (Some(first), Some(last)) = (dues.first(), dues.last()) {
            super::prefetch::prefetch(first);
            super::prefetch::prefetch(last);
        }
    }

    /// Starts loading what a slot's feature states keep on the heap, so that the cache misses
    /// of a cold entity overlap rather than come one after another.
    pub fn prefetch_heap(&self, slot: u32) {
        for column in &self.columns {
            column.prefetch_heap(slot as usize);
        }
    }

    /// Starts loading what the slot's features due at `watermark` keep on the heap: a timer
    /// updates only those, and reads the others' values from their states alone.
    pub fn prefetch_due_heap(&self, slot: u32, watermark: i64) {
        for (column, &due) in self.columns.iter().zip(self.feature_dues(slot)) {
            if due <= watermark {
                column.prefetch_heap(slot as usize);
            }
        }
    }

    /// Every feature value of the entity at `slot`, as of `watermark` (sessions need it).
    pub fn values_into(
        &self,
        slot: u32,
        features: &[Feature],
        watermark: i64,
        out: &mut Vec<FeatureValue>,
    ) {
        out.clear();
        out.extend(
            self.columns
                .iter()
                .zip(features)
                .map(|(column, f)| column.value(slot as usize, f, watermark)),
        );
    }

    /// Works out when time alone next changes each feature of the entity at `slot` (after a
    /// restore) and returns when it next changes the entity, TTL expiry included.
    pub fn refresh_dues(
        &mut self,
        slot: u32,
        features: &[Feature],
        clock: &Clock,
        ttl: Option<i64>,
    ) -> Option<i64> {
        let entity = self.slots.get(slot as usize)?.as_ref()?;
        let mut due = expiry_due(entity, ttl);
        let range = self.dues_range(slot);
        let dues = self.feature_due.get_mut(range)?;
        for ((column, feature), feature_due) in self.columns.iter().zip(features).zip(dues) {
            let change = column.next_change(slot as usize, feature, clock);
            *feature_due = change.unwrap_or(NEVER);
            due = min_opt(due, change);
        }
        due
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

    /// Bytes of each feature's state summed over live entities, in pipeline order.
    pub fn feature_bytes(&self) -> Vec<usize> {
        self.columns
            .iter()
            .map(|column| {
                self.iter()
                    .map(|(slot, _)| column.slot_bytes(slot as usize))
                    .sum()
            })
            .collect()
    }

    /// Everything the store holds: headers, index, and every slot of every column (free and
    /// spare slots included, since their memory is held too).
    pub fn bytes(&self) -> usize {
        let slot_count = self.slots.len();
        self.slots.capacity() * std::mem::size_of::<Option<EntityState>>()
            + self.feature_due.capacity() * std::mem::size_of::<i64>()
            + self.free.capacity() * std::mem::size_of::<u32>()
            + self.index.heap_bytes()
            + self.iter().map(|(_, e)| e.id_heap_bytes()).sum::<usize>()
            + self
                .columns
                .iter()
                .map(|c| c.spare_bytes() + (0..slot_count).map(|s| c.slot_bytes(s)).sum::<usize>())
                .sum::<usize>()
    }
}

/// The state of one input partition: its entities, their timers and its event-time progress.
#[derive(Debug)]
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
    /// An empty partition for entities with `features`.
    pub fn new(features: &[Feature], close_windows: bool) -> Self {
        PartitionState {
            entities: EntityStore::new(features, close_windows),
            timers: TimerQueue::default(),
            max_event_time: None,
            next_seq: 0,
        }
    }

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

/// Format 4: a header, then the slots in chunks encoded (and decoded) on parallel threads. A
/// chunk is, for each slot in order, its header (`None` for a free slot) followed, for a live
/// entity, by each feature's state in pipeline order. Format 4 stores feature states by their
/// own type rather than as one tagged kind; formats 1 to 3 hold earlier entity layouts and
/// are refused with an error that says so.
const SNAPSHOT_VERSION: u32 = 4;

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

/// Encodes one slot onto `out`: its header (`None` when free), then a live entity's feature
/// states in pipeline order.
fn encode_slot(
    slots: &[Option<EntityState>],
    columns: &[Box<dyn Column>],
    slot: usize,
    mut out: Vec<u8>,
) -> Result<Vec<u8>, postcard::Error> {
    let Some(header) = slots.get(slot) else {
        return Ok(out);
    };
    out = postcard::to_extend(header, out)?;
    if header.is_some() {
        for column in columns {
            out = column.encode(slot, out)?;
        }
    }
    Ok(out)
}

/// Where one slot's bytes are in a [`SnapshotCapture`].
#[derive(Debug, Clone)]
enum Piece {
    Pending,
    /// In `in_order`, encoded by a step.
    InOrder(std::ops::Range<usize>),
    /// In `early`, encoded just before the slot changed.
    Early(std::ops::Range<usize>),
}

/// A partition snapshot taken a slice at a time while events go on being processed, so that a
/// checkpoint does not stop the stream while the whole state is serialised. It holds the
/// partition exactly as it was when it began: slots are encoded in order between batches, and
/// a slot about to change (an event, a timer, an expiry, a free slot reused) is encoded first,
/// as it still is. Slots added later are not part of it. Once every slot is encoded,
/// [`SnapshotCapture::assemble`] lays the bytes out as [`PartitionState::snapshot`] would have
/// at the start, byte for byte, on any thread.
#[derive(Debug)]
pub struct SnapshotCapture {
    max_event_time: Option<i64>,
    next_seq: u64,
    free: Vec<u32>,
    /// One per slot that existed when the capture began.
    pieces: Vec<Piece>,
    /// Slots per chunk, fixed when the capture began (as `snapshot` would have chosen then).
    chunk: usize,
    in_order: Vec<u8>,
    early: Vec<u8>,
    /// The next slot a step looks at.
    cursor: usize,
    error: Option<postcard::Error>,
}

impl SnapshotCapture {
    /// Keeps the first encoding error (the capture then fails as a whole) and the buffer.
    fn record(&mut self, result: Result<Vec<u8>, postcard::Error>) -> Vec<u8> {
        result.unwrap_or_else(|e| {
            self.error.get_or_insert(e);
            Vec::new()
        })
    }

    /// The snapshot's bytes, in the chunked format of [`PartitionState::snapshot`].
    pub fn assemble(self) -> Result<Vec<u8>, SnapshotError> {
        if let Some(e) = self.error {
            return Err(SnapshotError::Encode(e));
        }
        let bytes = |piece: &Piece| match piece {
            Piece::InOrder(r) => self.in_order.get(r.clone()),
            Piece::Early(r) => self.early.get(r.clone()),
            Piece::Pending => None,
        };
        let slot_count = self.pieces.len();
        let step = self.chunk;
        let mut lengths = Vec::new();
        for start in (0..slot_count).step_by(step) {
            let mut len = 0u64;
            for piece in &self.pieces[start..(start + step).min(slot_count)] {
                let piece =
                    bytes(piece).ok_or(SnapshotError::Damaged("a slot was not captured"))?;
                len += piece.len() as u64;
            }
            lengths.push(len);
        }
        let header = SnapshotHeaderRef {
            version: SNAPSHOT_VERSION,
            max_event_time: self.max_event_time,
            next_seq: self.next_seq,
            free: &self.free,
            chunks: &lengths,
        };
        let mut out = postcard::to_allocvec(&header).map_err(SnapshotError::Encode)?;
        out.reserve_exact(self.in_order.len() + self.early.len());
        for piece in &self.pieces {
            out.extend_from_slice(bytes(piece).unwrap_or_default());
        }
        Ok(out)
    }
}

/// The slots of one decoded chunk and their feature states, column by column.
struct DecodedChunk {
    slots: Vec<Option<EntityState>>,
    columns: Vec<Box<dyn Column>>,
}

impl EntityStore {
    /// Encodes the slots in `range`: each header, then a live entity's feature states.
    fn encode_slots(&self, range: &std::ops::Range<usize>) -> Result<Vec<u8>, postcard::Error> {
        let mut out = Vec::new();
        for slot in range.clone() {
            out = encode_slot(&self.slots, &self.columns, slot, out)?;
        }
        Ok(out)
    }

    /// Called before anything at `slot` changes: while a snapshot is being taken, a slot it
    /// has not encoded yet is encoded now, as it still is.
    fn capture_before_change(&mut self, slot: u32) {
        let Some(capture) = self.capture.as_deref_mut() else {
            return;
        };
        let slot = slot as usize;
        if matches!(capture.pieces.get(slot), Some(Piece::Pending)) {
            let start = capture.early.len();
            let out = std::mem::take(&mut capture.early);
            capture.early = capture.record(encode_slot(&self.slots, &self.columns, slot, out));
            capture.pieces[slot] = Piece::Early(start..capture.early.len());
        }
    }

    /// Encodes up to `budget` more slots of the snapshot being taken, in slot order, taking
    /// what it encodes off `budget`; true when every slot is encoded (or no snapshot is being
    /// taken).
    fn capture_step(&mut self, budget: &mut usize) -> bool {
        let Some(capture) = self.capture.as_deref_mut() else {
            return true;
        };
        while capture.cursor < capture.pieces.len() && *budget > 0 {
            let slot = capture.cursor;
            capture.cursor += 1;
            if !matches!(capture.pieces[slot], Piece::Pending) {
                continue;
            }
            let start = capture.in_order.len();
            let out = std::mem::take(&mut capture.in_order);
            capture.in_order = capture.record(encode_slot(&self.slots, &self.columns, slot, out));
            capture.pieces[slot] = Piece::InOrder(start..capture.in_order.len());
            *budget -= 1;
        }
        capture.cursor == capture.pieces.len()
    }

    /// Decodes one chunk written by [`EntityStore::encode_slots`] into columns like this
    /// store's.
    fn decode_slots(&self, mut bytes: &[u8]) -> Result<DecodedChunk, SnapshotError> {
        let mut chunk = DecodedChunk {
            slots: Vec::new(),
            columns: self.columns.iter().map(|c| c.empty_like()).collect(),
        };
        while !bytes.is_empty() {
            let (header, rest) = postcard::take_from_bytes::<Option<EntityState>>(bytes)
                .map_err(SnapshotError::Decode)?;
            bytes = rest;
            let live = header.is_some();
            chunk.slots.push(header);
            for column in &mut chunk.columns {
                if live {
                    bytes = column.decode_push(bytes).map_err(SnapshotError::Decode)?;
                } else {
                    column.push_empty();
                }
            }
        }
        Ok(chunk)
    }
}

impl PartitionState {
    /// Serialises the partition (entities, slot numbers, event-time progress). Timers are not
    /// stored: they are a function of the state and are rebuilt on restore. A final checkpoint
    /// (shutdown, rebalance) waits for this, so the slots are encoded in chunks on parallel
    /// threads; periodic ones take the same bytes a slice at a time ([`SnapshotCapture`]).
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let store = &self.entities;
        let slot_count = store.slots.len();
        let step = chunk_len(slot_count);
        let ranges: Vec<std::ops::Range<usize>> = (0..slot_count)
            .step_by(step)
            .map(|start| start..(start + step).min(slot_count))
            .collect();
        let encoded = in_parallel(&ranges, |range| store.encode_slots(range));
        let chunks = encoded
            .into_iter()
            .collect::<Result<Vec<Vec<u8>>, _>>()
            .map_err(SnapshotError::Encode)?;
        let lengths: Vec<u64> = chunks.iter().map(|c| c.len() as u64).collect();
        let header = SnapshotHeaderRef {
            version: SNAPSHOT_VERSION,
            max_event_time: self.max_event_time,
            next_seq: self.next_seq,
            free: &store.free,
            chunks: &lengths,
        };
        let mut out = postcard::to_allocvec(&header).map_err(SnapshotError::Encode)?;
        out.reserve_exact(chunks.iter().map(Vec::len).sum());
        for chunk in &chunks {
            out.extend_from_slice(chunk);
        }
        Ok(out)
    }

    /// Begins a snapshot of the partition as it is now, taken a slice at a time by
    /// [`PartitionState::capture_step`] (a snapshot already begun is started again).
    pub fn begin_capture(&mut self) {
        let store = &mut self.entities;
        store.capture = Some(Box::new(SnapshotCapture {
            max_event_time: self.max_event_time,
            next_seq: self.next_seq,
            free: store.free.clone(),
            pieces: vec![Piece::Pending; store.slots.len()],
            chunk: chunk_len(store.slots.len()),
            in_order: Vec::new(),
            early: Vec::new(),
            cursor: 0,
            error: None,
        }));
    }

    /// Encodes up to `budget` more slots of the snapshot begun, taking them off `budget`;
    /// true when it is complete.
    pub fn capture_step(&mut self, budget: &mut usize) -> bool {
        self.entities.capture_step(budget)
    }

    /// Completes the snapshot begun (encoding what is left) and hands it over; `None` when
    /// none was begun.
    pub fn finish_capture(&mut self) -> Option<SnapshotCapture> {
        let mut all = usize::MAX;
        self.entities.capture_step(&mut all);
        self.entities.capture.take().map(|capture| *capture)
    }

    /// Drops the snapshot begun, if any.
    pub fn abandon_capture(&mut self) {
        self.entities.capture = None;
    }

    /// Restores a snapshot taken with the same `features`; the caller re-schedules timers
    /// (they depend on the pipeline).
    pub fn restore(
        bytes: &[u8],
        features: &[Feature],
        close_windows: bool,
    ) -> Result<PartitionState, SnapshotError> {
        let (version, _) =
            postcard::take_from_bytes::<u32>(bytes).map_err(SnapshotError::Decode)?;
        match version {
            1..=3 => return Err(SnapshotError::Outdated { found: version }),
            SNAPSHOT_VERSION => {}
            found => return Err(SnapshotError::Version { found }),
        }
        let (header, mut rest) =
            postcard::take_from_bytes::<SnapshotHeader>(bytes).map_err(SnapshotError::Decode)?;
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
        let mut store = EntityStore::new(features, close_windows);
        let decoded = in_parallel(&parts, |part| store.decode_slots(part))
            .into_iter()
            .collect::<Result<Vec<DecodedChunk>, _>>()?;
        // Room for exactly what was stored: appending chunk by chunk would double capacity.
        let total: usize = decoded.iter().map(|c| c.slots.len()).sum();
        store.slots.reserve_exact(total);
        for column in &mut store.columns {
            column.reserve_exact(total);
        }
        store.feature_due = vec![NEVER; total * store.columns.len()];
        for chunk in decoded {
            store.slots.extend(chunk.slots);
            for (column, part) in store.columns.iter_mut().zip(chunk.columns) {
                column.append(part);
            }
        }
        if header
            .free
            .iter()
            .any(|&f| store.slots.get(f as usize).is_none_or(Option::is_some))
        {
            return Err(SnapshotError::Damaged("a free slot is missing or in use"));
        }
        let mut listed = header.free.clone();
        listed.sort_unstable();
        if listed.windows(2).any(|w| w[0] == w[1]) {
            return Err(SnapshotError::Damaged("a free slot is listed twice"));
        }
        store.free = header.free;
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
            max_event_time: header.max_event_time,
            next_seq: header.next_seq,
        })
    }
}

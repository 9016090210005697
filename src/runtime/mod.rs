//! `featurestream run`: the long-running service around the engine.
//!
//! One processing thread owns the Kafka consumer and drives the synchronous engine; the HTTP
//! server reads the engine's state under a lock. Delivery is at-least-once: every
//! `state.checkpoint_every` (and on rebalance and shutdown) the loop waits until every output
//! and dead letter sent so far is acknowledged, writes due Parquet files, saves each
//! partition's state with its next offset, and only then commits those offsets. The state is
//! taken as it is when a checkpoint begins but serialised a slice at a time between batches
//! (see `Engine::begin_snapshot`), so a checkpoint does not stop the stream.
//!
//! With `guarantee: exactly_once` the producer is transactional and each checkpoint, taken at
//! once between two batches, commits one transaction: the outputs and dead letters since the
//! last one, every partition's state (in the state topic, through the same producer) and the
//! offsets. Anything that leaves a transaction uncertain stops the service; a restart resumes
//! from the last one committed.

pub mod checkpoint;
pub mod encode;
pub mod outputs;
pub mod state_topic;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Timestamp};

use self::checkpoint::{Checkpoint, CheckpointError, CheckpointStore, Origin};
use self::encode::Encoder;
use self::outputs::ParquetOutputs;
use crate::config::{Format, Guarantee, OnLate, Pipeline, StartOffset};
use crate::connectors::kafka::{
    BrokerStatus, IDEMPOTENT_PRODUCER, TopicCheckError, check_topics, client_config, enforce,
    log_error, log_line,
};
use crate::decode::avro::{AvroDecoder, AvroError};
use crate::decode::json::JsonDecoder;
use crate::decode::{RejectReason, Rejection, check_not_future};
use crate::engine::{Engine, FeatureValue, Outcome, RecordSink, SnapshotCapture};
use crate::telemetry;

/// Wall-clock milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How `run` is started; the pipeline file gives everything else.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub http: Option<SocketAddr>,
    /// Overrides `source.kafka.brokers` (and the sinks' brokers).
    pub brokers: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub parquet_dir: Option<PathBuf>,
    /// Stop (cleanly) once this many input records were consumed: for demos and benchmarks.
    pub stop_after_events: Option<u64>,
}

/// Counts that reconcile: consumed = aggregated + rejected + late.
#[derive(Debug, Default)]
pub struct Counters {
    pub consumed: AtomicU64,
    pub aggregated: AtomicU64,
    pub late: AtomicU64,
    pub rejected: [AtomicU64; RejectReason::ALL.len()],
    pub dead_lettered: AtomicU64,
    pub produced: AtomicU64,
}

impl Counters {
    pub fn rejected_total(&self) -> u64 {
        self.rejected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// What the processing thread and the HTTP server share.
pub struct Shared {
    pub pipeline: Arc<Pipeline>,
    /// Written by the processing thread (in short stretches, yielding to waiting readers);
    /// read by look-ups, snapshots and checkpoints.
    pub engine: RwLock<Engine>,
    /// True once partitions are assigned and restored and records are being consumed.
    pub ready: AtomicBool,
    pub stop: Arc<AtomicBool>,
    pub counters: Counters,
    /// Readers waiting for the engine: the processing thread steps aside for them at once.
    readers_waiting: std::sync::atomic::AtomicUsize,
}

impl Shared {
    pub fn new(pipeline: Arc<Pipeline>, stop: Arc<AtomicBool>) -> Arc<Shared> {
        Arc::new(Shared {
            engine: RwLock::new(Engine::new(Arc::clone(&pipeline))),
            pipeline,
            ready: AtomicBool::new(false),
            stop,
            counters: Counters::default(),
            readers_waiting: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn engine(&self) -> RwLockWriteGuard<'_, Engine> {
        self.engine.write()
    }

    pub fn engine_read(&self) -> RwLockReadGuard<'_, Engine> {
        self.readers_waiting.fetch_add(1, Ordering::Relaxed);
        let guard = self.engine.read();
        self.readers_waiting.fetch_sub(1, Ordering::Relaxed);
        guard
    }

    /// The engine for reading, or `None` if it stays taken for `wait`.
    pub fn engine_read_for(&self, wait: Duration) -> Option<RwLockReadGuard<'_, Engine>> {
        self.readers_waiting.fetch_add(1, Ordering::Relaxed);
        let guard = self.engine.try_read_for(wait);
        self.readers_waiting.fetch_sub(1, Ordering::Relaxed);
        guard
    }

    fn readers_waiting(&self) -> bool {
        self.readers_waiting.load(Ordering::Relaxed) > 0
    }
}

/// Delivery reports: failures are remembered so that no checkpoint commits past them.
#[derive(Default)]
pub(crate) struct DeliveryContext {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    status: BrokerStatus,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_line(level, facility, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        log_error(&error, reason, "producer", &self.status);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_ok() && self.status.back() {
            tracing::info!("The output brokers are reachable again; deliveries resumed.");
        }
        if let Err((error, message)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(format!("{error} (topic {})", message.topic()));
            }
        }
    }
}

type Output = ThreadedProducer<DeliveryContext>;

/// The consumer's context: routes logs, and runs checkpoints and restores on rebalance.
struct RunContext {
    worker: Arc<Mutex<Worker>>,
    status: BrokerStatus,
}

impl ClientContext for RunContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_line(level, facility, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        log_error(&error, reason, "consumer", &self.status);
    }
    fn stats(&self, statistics: Statistics) {
        let pipeline = self.lock().shared.pipeline.name.clone();
        for topic in statistics.topics.values() {
            for (id, partition) in &topic.partitions {
                if *id >= 0 && partition.consumer_lag >= 0 {
                    metrics::gauge!(telemetry::CONSUMER_LAG, "pipeline" => pipeline.clone(), "partition" => id.to_string())
                        .set(partition.consumer_lag as f64);
                }
            }
        }
    }
}

impl RunContext {
    fn lock(&self) -> MutexGuard<'_, Worker> {
        self.worker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ConsumerContext for RunContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            let mut worker = self.lock();
            // Once the service has stopped, its last checkpoint is taken (or, after an error,
            // must not be: offsets past what failed would be committed).
            if worker.closing {
                return;
            }
            // Lost rather than handed over (the member was too slow or cut off): another
            // member may own them already, and a checkpoint now could overwrite its newer one.
            if consumer.assignment_lost() && worker.exactly_once {
                // The open transaction holds outputs of partitions another member now owns:
                // it cannot be committed, and the state of the others is ahead of what was.
                worker.fatal.get_or_insert(anyhow!(
                    "partitions {partitions:?} were lost to the group (this member was cut off); \
                     stopping, the transaction is aborted (a restart resumes from the last one committed)"
                ));
                return;
            }
            if consumer.assignment_lost() {
                tracing::warn!(
                    ?partitions,
                    "Partitions lost to the group; dropping them without a checkpoint (their \
                     records since the last one are read again by their new owner)."
                );
                worker.release(&partitions);
                return;
            }
            tracing::info!(
                ?partitions,
                "Partitions revoked; checkpointing them before they move."
            );
            match worker.checkpoint(consumer, true) {
                Ok(true) => {}
                // Exactly-once: the outputs of the partitions leaving are in the open
                // transaction without their offsets and state; it must never be committed.
                Ok(false) if worker.exactly_once => {
                    worker.fatal.get_or_insert(anyhow!(
                        "partitions {partitions:?} are revoked but their checkpoint could not be \
                         taken; stopping, the transaction is aborted (a restart resumes from the \
                         last one committed)"
                    ));
                }
                Ok(false) => {}
                Err(e) => {
                    worker.fatal.get_or_insert(e);
                }
            }
            worker.release(&partitions);
        }
    }

    /// As the client's own handler, except that assigned partitions are restored before they
    /// are assigned, so that one whose state ends before the group's committed offset starts
    /// fetching where its state ends (the records between are read again).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        assignment: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = assignment
                    .elements()
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                let exactly_once = self.lock().exactly_once;
                let committed = committed_offsets(consumer, assignment, exactly_once);
                let (starts, topic) = {
                    let mut worker = self.lock();
                    tracing::info!(?partitions, "Partitions assigned.");
                    let topic = worker.pipeline().source.kafka.topic.clone();
                    let adopted = committed
                        .and_then(|committed| worker.adopt(consumer, &partitions, &committed));
                    match adopted {
                        Ok(starts) => (starts, topic),
                        Err(e) => {
                            worker.fatal.get_or_insert(e);
                            (BTreeMap::new(), topic)
                        }
                    }
                };
                for (p, offset) in starts {
                    if let Err(e) =
                        assignment.set_partition_offset(&topic, p, Offset::Offset(offset))
                    {
                        tracing::error!("Cannot start partition {p} at offset {offset} ({e}).");
                    }
                }
                if cooperative {
                    consumer.incremental_assign(assignment)
                } else {
                    consumer.assign(assignment)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(assignment));
                if cooperative {
                    consumer.incremental_unassign(assignment)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!("Rebalancing failed: {}", RDKafkaErrorCode::from(other));
                if cooperative {
                    consumer.incremental_unassign(assignment)
                } else {
                    consumer.unassign()
                }
            }
        };
        if let Err(e) = result {
            tracing::error!("Cannot apply the group's assignment ({e}).");
        }
    }
}

/// The group's committed offset of each partition in `assigned` that has one. Asked before
/// the assigned partitions are restored, to tell a partition the group never read from one
/// whose state was built elsewhere; when the group coordinator cannot say (within 10 s),
/// nothing is known: the map is empty, or (exactly-once, which must know where the committed
/// state ends) an error.
fn committed_offsets(
    consumer: &BaseConsumer<RunContext>,
    assigned: &TopicPartitionList,
    exactly_once: bool,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    match consumer.committed_offsets(assigned.clone(), Duration::from_secs(10)) {
        Ok(list) => Ok(list
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(offset) => Some((e.partition(), offset)),
                _ => None,
            })
            .collect()),
        Err(e) if exactly_once => Err(anyhow!(
            "cannot read the group's committed offsets ({e}); a transaction of an instance that \
             stopped while committing may still be open: it ends when that instance restarts, \
             or when the broker times it out"
        )),
        Err(e) => {
            tracing::warn!("Cannot read the group's committed offsets ({e}).");
            Ok(BTreeMap::new())
        }
    }
}

/// Everything the processing thread owns besides the consumer.
struct Worker {
    shared: Arc<Shared>,
    producer: Arc<Output>,
    /// Exactly-once: every checkpoint commits the transaction its outputs, dead letters and
    /// state were written in, with its offsets.
    exactly_once: bool,
    output_topic: Option<String>,
    dead_letter_topic: Option<String>,
    json: JsonDecoder,
    avro: Option<AvroDecoder>,
    encoder: Encoder,
    store: CheckpointStore,
    parquet: Option<ParquetOutputs>,
    /// Next offset to commit, per assigned partition.
    positions: BTreeMap<i32, i64>,
    /// Offsets below these are already in restored state and are skipped.
    skip_below: BTreeMap<i32, i64>,
    last_checkpoint: Instant,
    /// A checkpoint whose files are being written off the consuming thread; its offsets are
    /// committed once they are durable.
    pending: Option<PendingCheckpoint>,
    /// A checkpoint whose state is being serialised a slice at a time between batches.
    capturing: Option<Capturing>,
    fatal: Option<anyhow::Error>,
    /// Set at shutdown: partitions revoked by leaving the group keep their state in memory
    /// (the HTTP API can still answer until the process exits).
    closing: bool,
}

/// Sends engine records to the output topic (and the feature log).
struct OutputSink<'w> {
    delivery: Delivery<'w>,
    topic: Option<&'w str>,
    encoder: &'w mut Encoder,
    pipeline: &'w Pipeline,
    parquet: Option<&'w mut ParquetOutputs>,
    produced: u64,
}

/// Where feature records go: the producer, and the stop flag that ends a wait on it.
#[derive(Clone, Copy)]
struct Delivery<'w> {
    producer: &'w Output,
    stop: &'w AtomicBool,
}

impl Delivery<'_> {
    /// Sends one encoded feature record; true when it was queued.
    fn emit(self, topic: &str, key: &str, payload: Option<&[u8]>) -> bool {
        emit(self.producer, topic, key, payload, self.stop)
    }
}

/// A dead letter: the event's original key and payload with `headers`.
fn dead_letter_record<'a>(
    topic: &'a str,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    headers: OwnedHeaders,
) -> BaseRecord<'a, [u8], [u8]> {
    let mut record: BaseRecord<'a, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    record
}

/// The headers every dead letter carries.
const DEAD_LETTER_HEADERS: [&str; 7] = [
    "reason",
    "error",
    "source.topic",
    "source.partition",
    "source.offset",
    "pipeline",
    "payload.truncated.from",
];

/// How long to wait for a partition assignment before saying why there is none yet.
const WAITING_FOR_PARTITIONS: Duration = Duration::from_secs(10);

/// How much of an event too large for Kafka its dead letter carries.
const DEAD_LETTER_PAYLOAD_CUT: usize = 64 * 1024;

/// Sends one record, waiting while the producer's queue is full (backpressure, never drop).
/// A stop requested meanwhile ends the wait with the queue-full error: the record counts as
/// not delivered, so the service stops without committing past it instead of waiting forever
/// for an unreachable broker.
fn send(
    producer: &Output,
    record: BaseRecord<'_, [u8], [u8]>,
    stop: &AtomicBool,
) -> Result<(), KafkaError> {
    send_until(producer, record, || stop.load(Ordering::Relaxed))
}

/// Queues one record, waiting while the producer's queue is full, until `give_up` says so.
fn send_until(
    producer: &Output,
    record: BaseRecord<'_, [u8], [u8]>,
    give_up: impl Fn() -> bool,
) -> Result<(), KafkaError> {
    let mut record = record;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if give_up() {
                    return Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull));
                }
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Sends one encoded feature record. A record that cannot even be queued counts as a failed
/// delivery: the next checkpoint then stops the service instead of committing past it.
fn emit(
    producer: &Output,
    topic: &str,
    key: &str,
    payload: Option<&[u8]>,
    stop: &AtomicBool,
) -> bool {
    let failure = match payload {
        None => "a feature record could not be encoded".to_string(),
        Some(payload) => {
            let record = BaseRecord::to(topic).key(key.as_bytes()).payload(payload);
            match send(producer, record, stop) {
                Ok(()) => return true,
                Err(e) => format!("cannot queue a feature record for `{topic}`: {e}"),
            }
        }
    };
    let context = producer.context();
    // The first failure is logged; the rest are counted (the stop that follows reports both).
    if context.failed.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::error!("{failure}");
    }
    context
        .first_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert(failure);
    false
}

impl RecordSink for OutputSink<'_> {
    fn update(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]) {
        if let Some(parquet) = self.parquet.as_deref_mut() {
            parquet.log_update(entity, as_of, values);
        }
        if let Some(topic) = self.topic {
            let payload = self.encoder.update(self.pipeline, entity, as_of, values);
            self.produced += u64::from(self.delivery.emit(topic, entity, payload));
        }
    }

    fn window_closed(
        &mut self,
        entity: &str,
        feature: usize,
        start: i64,
        end: i64,
        value: &FeatureValue,
    ) {
        if let Some(topic) = self.topic {
            let payload =
                self.encoder
                    .window_closed(self.pipeline, entity, feature, (start, end), value);
            self.produced += u64::from(self.delivery.emit(topic, entity, payload));
        }
    }
}

impl Worker {
    fn pipeline(&self) -> &Pipeline {
        &self.shared.pipeline
    }

    /// Restores newly assigned partitions from their checkpoints (or starts them empty).
    /// `committed` holds the group's committed offsets: a partition the group has read before
    /// but with no checkpoint here continues from that offset with empty state, which is said
    /// loudly and counted, since its entities' features restart from nothing.
    fn adopt(
        &mut self,
        consumer: &BaseConsumer<RunContext>,
        partitions: &[i32],
        committed: &BTreeMap<i32, i64>,
    ) -> anyhow::Result<BTreeMap<i32, i64>> {
        // Read before the engine is locked: look-ups go on meanwhile.
        let read_before: Vec<i32> = committed.keys().copied().collect();
        let mut checkpoints = self.store.load(partitions, &read_before)?;
        // Exactly-once: a partition's committed state ends where its committed offset is. One
        // that ends before was read past a transaction still open on its state-topic partition
        // (a reader stops there); it is read again once that has ended. Going on from it would
        // send committed records again.
        let mut attempts = 0;
        loop {
            // `(partition, where its state ends (-1: no state), committed offset)`
            let behind: Vec<(i32, i64, i64)> = committed
                .iter()
                .filter(|(p, _)| partitions.contains(p))
                .filter_map(|(&p, &offset)| {
                    let ends = checkpoints.get(&p).map_or(-1, |(c, _)| c.next_offset);
                    (ends < offset).then_some((p, ends, offset))
                })
                .collect();
            if !self.exactly_once || behind.is_empty() {
                break;
            }
            attempts += 1;
            if attempts > STALE_STATE_ATTEMPTS {
                return Err(anyhow!(
                    "the state topic's newest state of partitions (partition, state ends at \
                     (-1: none), committed offset) {behind:?} ends before the group's committed \
                     offset, and exactly-once cannot go on from it without sending committed \
                     records again or losing state. A transaction of an instance that stopped \
                     while committing may hide the newer state: it ends when that instance \
                     restarts or when the broker times it out; start again then. If the state \
                     topic really lacks it (the group ran without it before), start a new \
                     group_id to rebuild the state from the input topic"
                ));
            }
            tracing::info!(
                ?behind,
                "The state read ends before the committed offsets; reading it again."
            );
            std::thread::sleep(Duration::from_secs(2));
            checkpoints = self.store.load(partitions, &read_before)?;
        }
        let topic = self.shared.pipeline.source.kafka.topic.clone();
        let mut starts = BTreeMap::new();
        let now = now_ms();
        let mut engine = self.shared.engine();
        for &p in partitions {
            match checkpoints.remove(&p) {
                Some((checkpoint, origin)) => {
                    let from = match (origin, self.store.state_topic()) {
                        (Origin::StateTopic, Some(topic)) => format!("the state topic `{topic}`"),
                        _ => self.store.dir().display().to_string(),
                    };
                    engine.restore_watermark(checkpoint.watermark);
                    engine
                        .restore_partition(p as u32, &checkpoint.state, now)
                        .with_context(|| format!("restoring partition {p} from {from}"))?;
                    self.skip_below.insert(p, checkpoint.next_offset);
                    tracing::info!(
                        partition = p,
                        next_offset = checkpoint.next_offset,
                        "Restored partition state from its checkpoint in {from}."
                    );
                    // Fetching starts where the state ends (whatever the group committed),
                    // or at the oldest record the topic keeps if retention deleted that one.
                    let ends = checkpoint.next_offset;
                    if let Some(&offset) = committed.get(&p)
                        && offset > ends
                    {
                        tracing::warn!(
                            partition = p,
                            checkpoint_offset = ends,
                            committed_offset = offset,
                            "Partition {p}'s checkpoint here ends at offset {ends}, but the group \
                             has committed {offset}: another instance processed the records \
                             between. Reading them again so that this state holds them (their \
                             feature records are sent again)."
                        );
                    }
                    let start = match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))
                    {
                        Ok((oldest, _)) if oldest > ends => {
                            tracing::warn!(
                                partition = p,
                                "Partition {p} is read from offset {oldest}: the records from \
                                 {ends} on are no longer in the topic (retention), so its state \
                                 lacks them."
                            );
                            oldest
                        }
                        _ => ends,
                    };
                    starts.insert(p, start);
                    // Checkpointed from now on even if no record of it comes: time alone
                    // changes its state (and sends records) too.
                    self.positions.insert(p, start);
                }
                None => {
                    engine.assign(p as u32, now);
                    match committed.get(&p) {
                        Some(offset) => {
                            tracing::warn!(
                                partition = p,
                                committed_offset = offset,
                                state_dir = %self.store.dir().display(),
                                "Partition {p} has no checkpoint here, but the group has read it \
                                 before (committed offset {offset}): it continues from there with \
                                 empty state, so its entities' features restart from nothing. \
                                 Give every instance of the group the same state.dir, or a state \
                                 topic (state.topic), to keep them; or start a new group_id to \
                                 rebuild them from the input topic."
                            );
                            metrics::counter!(telemetry::PARTITIONS_WITHOUT_STATE, "pipeline" => self.pipeline().name.clone())
                                .increment(1);
                        }
                        None => tracing::info!(
                            partition = p,
                            "Partition {p} starts with empty state (no checkpoint, and no offset \
                             committed by the group)."
                        ),
                    }
                }
            }
        }
        self.shared.ready.store(true, Ordering::Relaxed);
        Ok(starts)
    }

    /// Drops revoked partitions (after their checkpoint).
    fn release(&mut self, partitions: &[i32]) {
        if self.closing {
            return;
        }
        let mut engine = self.shared.engine();
        for &p in partitions {
            engine.revoke(p as u32);
            self.positions.remove(&p);
            self.skip_below.remove(&p);
        }
    }

    fn dead_letter<'m>(
        &mut self,
        message: &'m BorrowedMessage<'_>,
        rejection: &Rejection,
    ) -> anyhow::Result<()> {
        let reason = rejection.reason.as_str();
        // Late events have their own counter; a `reason="late"` series here would stay at 0.
        if rejection.reason != RejectReason::Late {
            metrics::counter!(telemetry::EVENTS_REJECTED, "pipeline" => self.pipeline().name.clone(), "reason" => reason)
                .increment(1);
        }
        let Some(topic) = self.dead_letter_topic.as_deref() else {
            tracing::debug!(
                reason,
                "Rejected event (no dead-letter topic configured): {}",
                rejection.message
            );
            return Ok(());
        };
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "error",
                value: Some(rejection.message.as_str()),
            })
            .insert(Header {
                key: "source.topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "source.offset",
                value: Some(offset.as_str()),
            })
            .insert(Header {
                key: "pipeline",
                value: Some(self.shared.pipeline.name.as_str()),
            });
        // The event's own headers follow (a trace id, say), except any that share a name with
        // ours: a reader looking up `reason` finds the dead letter's.
        let mut headers = headers;
        if let Some(original) = message.headers() {
            for header in original.iter() {
                if !DEAD_LETTER_HEADERS.contains(&header.key) {
                    headers = headers.insert(header);
                }
            }
        }
        let payload = message.payload();
        let record = |headers: OwnedHeaders, payload: Option<&'m [u8]>| {
            dead_letter_record(topic, message.key(), payload, headers)
        };
        let sent = match send(
            &self.producer,
            record(headers.clone(), payload),
            &self.shared.stop,
        ) {
            // An event larger than Kafka takes (usually a `too_large` one) cannot go to the
            // dead-letter topic whole: it goes with its first bytes, says how long it was, and
            // can be read in full at its source offset.
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                let length = payload.map_or(0, <[u8]>::len);
                let headers = headers.insert(Header {
                    key: "payload.truncated.from",
                    value: Some(length.to_string().as_str()),
                });
                let cut = payload.map(|p| &p[..length.min(DEAD_LETTER_PAYLOAD_CUT)]);
                send(&self.producer, record(headers, cut), &self.shared.stop)
            }
            other => other,
        };
        sent.with_context(|| format!("cannot queue a dead letter for `{topic}`"))?;
        self.shared
            .counters
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::EVENTS_DEAD_LETTERED, "pipeline" => self.pipeline().name.clone(), "reason" => reason).increment(1);
        Ok(())
    }

    /// Processes a batch of records. Returns how many were consumed.
    fn process(&mut self, batch: &[BorrowedMessage<'_>]) -> anyhow::Result<u64> {
        let now = now_ms();
        let shared = Arc::clone(&self.shared);
        let counters = &shared.counters;
        let pipeline = Arc::clone(&shared.pipeline);
        let mut consumed = 0u64;
        let (mut aggregated, mut late) = (0u64, 0u64);
        let mut rejected: Vec<(BorrowedMessageRef, Rejection)> = Vec::new();
        {
            let mut engine = shared.engine();
            let mut sink = OutputSink {
                delivery: Delivery {
                    producer: &self.producer,
                    stop: &shared.stop,
                },
                topic: self.output_topic.as_deref(),
                encoder: &mut self.encoder,
                pipeline: &pipeline,
                parquet: self.parquet.as_mut(),
                produced: 0,
            };
            // One handle per batch: the label lookup is not repeated per event.
            let latency =
                metrics::histogram!(telemetry::OUTPUT_LATENCY, "pipeline" => pipeline.name.clone());
            'batch: for (index, message) in batch.iter().enumerate() {
                if shared.readers_waiting() {
                    // A look-up is waiting: hand it the lock and the core now (it sees the
                    // state between two events) rather than after this thread's time slice.
                    RwLockWriteGuard::unlocked_fair(&mut engine, std::thread::yield_now);
                }
                // Input topics are keyed by entity: the keys of the next messages tell the
                // engine whose state to start loading.
                engine.warm(
                    batch[index + 1..]
                        .iter()
                        .take(crate::engine::WARM_AHEAD)
                        .filter_map(|m| {
                            let key = std::str::from_utf8(m.key()?).ok()?;
                            Some((m.partition() as u32, key))
                        }),
                );
                let partition = message.partition();
                if !self.positions.contains_key(&partition)
                    && !engine.partitions().any(|p| p == partition as u32)
                {
                    // A record fetched before its partition was revoked: the new owner reads it.
                    continue;
                }
                if self
                    .skip_below
                    .get(&partition)
                    .is_some_and(|&below| message.offset() < below)
                {
                    continue;
                }
                consumed += 1;
                self.positions.insert(partition, message.offset() + 1);
                let payload = message.payload().unwrap_or_default();
                let decoded = loop {
                    let result = match &mut self.avro {
                        Some(avro) => avro.decode(payload),
                        None => self.json.decode(payload).map_err(AvroError::Rejected),
                    };
                    match result {
                        Err(AvroError::RegistryUnavailable(e)) => {
                            if shared.stop.load(Ordering::Relaxed) {
                                // Not processed: leave its offset (and the rest of the batch)
                                // uncommitted; what came before is finished normally below.
                                self.positions.insert(partition, message.offset());
                                consumed -= 1;
                                break 'batch;
                            }
                            tracing::warn!("{e}; retrying this record in 1s.");
                            // Look-ups and checkpoints may use the engine meanwhile.
                            RwLockWriteGuard::unlocked_fair(&mut engine, || {
                                std::thread::sleep(Duration::from_secs(1))
                            });
                        }
                        other => break other,
                    }
                };
                let decoded = decoded.and_then(|event| {
                    check_not_future(&pipeline.source, event.time_ms, now)
                        .map(|()| event)
                        .map_err(AvroError::Rejected)
                });
                match decoded {
                    Err(AvroError::Rejected(rejection)) => {
                        rejected.push((BorrowedMessageRef(index), rejection))
                    }
                    Err(AvroError::RegistryUnavailable(_)) => {}
                    Ok(event) => match engine.process(partition as u32, &event, now, &mut sink) {
                        Outcome::Aggregated => {
                            aggregated += 1;
                            if let Some(Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t)) =
                                Some(message.timestamp())
                            {
                                latency.record((now - t).max(0) as f64 / 1000.0);
                            }
                        }
                        Outcome::Late { watermark } => {
                            late += 1;
                            if pipeline.source.on_late == OnLate::Dlq {
                                let text = format!(
                                    "event time {} is older than the watermark {} minus allowed lateness",
                                    crate::decode::time::format_rfc3339_ms(event.time_ms),
                                    crate::decode::time::format_rfc3339_ms(watermark)
                                );
                                rejected.push((
                                    BorrowedMessageRef(index),
                                    Rejection::new(RejectReason::Late, text),
                                ));
                            }
                        }
                    },
                }
            }
            engine.tick(now, &mut sink);
            counters
                .produced
                .fetch_add(sink.produced, Ordering::Relaxed);
            metrics::counter!(telemetry::RECORDS_PRODUCED, "pipeline" => pipeline.name.clone())
                .increment(sink.produced);
            if let Some(w) = engine.watermark() {
                metrics::gauge!(telemetry::WATERMARK, "pipeline" => pipeline.name.clone())
                    .set(w as f64 / 1000.0);
            }
        }
        for (at, rejection) in &rejected {
            let message = &batch[at.0];
            if rejection.reason != RejectReason::Late {
                counters.rejected[reason_index(rejection.reason)].fetch_add(1, Ordering::Relaxed);
            }
            self.dead_letter(message, rejection)?;
        }
        counters.consumed.fetch_add(consumed, Ordering::Relaxed);
        counters.aggregated.fetch_add(aggregated, Ordering::Relaxed);
        counters.late.fetch_add(late, Ordering::Relaxed);
        let name = pipeline.name.clone();
        metrics::counter!(telemetry::EVENTS_CONSUMED, "pipeline" => name.clone())
            .increment(consumed);
        metrics::counter!(telemetry::EVENTS_AGGREGATED, "pipeline" => name.clone())
            .increment(aggregated);
        metrics::counter!(telemetry::EVENTS_LATE, "pipeline" => name).increment(late);
        Ok(consumed)
    }

    /// Makes everything so far durable and commits offsets. Returns false when the outputs are
    /// not yet acknowledged or a Parquet file could not be written (nothing is committed then;
    /// the next checkpoint tries again). An output that Kafka refused is an error: the service
    /// stops rather than commit past it.
    fn checkpoint(
        &mut self,
        consumer: &BaseConsumer<RunContext>,
        final_one: bool,
    ) -> anyhow::Result<bool> {
        // Exactly-once: the state goes in the transaction with the offsets it ends at, so it is
        // taken at once, between two batches; nothing is left for later.
        let final_one = final_one || self.exactly_once;
        let busy = self.capturing.is_some()
            || self
                .pending
                .as_ref()
                .is_some_and(|p| !p.writing.is_finished());
        if busy && !final_one {
            // The previous checkpoint is still being serialised or written: this one waits
            // for it rather than make the stream wait.
            return Ok(false);
        }
        if final_one && self.capturing.take().is_some() {
            // Superseded by this one, which is taken at once: no need to finish it.
            self.shared.engine().abandon_snapshots();
        }
        self.last_checkpoint = Instant::now();
        let began = Instant::now();
        let wait = if final_one {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(10)
        };
        // One checkpoint at a time: the previous one's files are durable and its offsets
        // committed before this one starts.
        self.finish_pending(consumer, true)?;
        if let Err(e) = wait_for_deliveries(&self.producer, wait) {
            if self.exactly_once {
                return Err(anyhow!(
                    "{e}; stopping, the transaction is aborted (a restart resumes from the last one committed)"
                ));
            }
            tracing::warn!(
                "Outputs are not all acknowledged yet ({e}); offsets stay uncommitted until they are."
            );
            return Ok(false);
        }
        let failed = self.producer.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = self
                .producer
                .context()
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return Err(anyhow!(
                "{failed} output records or dead letters could not be delivered (first: {}); stopping without committing their input offsets",
                first.unwrap_or_default()
            ));
        }
        let flushed = began.elapsed();
        let engine = self.shared.engine_read();
        if let Some(parquet) = &mut self.parquet
            && !parquet.flush(&self.shared.pipeline, &engine, now_ms(), final_one)
        {
            return Ok(false);
        }
        let snapshots_written = began.elapsed();
        let watermark = engine.watermark();
        for &p in self.positions.keys() {
            if let Some(w) = engine.partition_watermark(p as u32) {
                metrics::gauge!(telemetry::PARTITION_WATERMARK, "pipeline" => self.shared.pipeline.name.clone(), "partition" => p.to_string())
                    .set(w as f64 / 1000.0);
            }
        }
        let entities = engine.entity_count();
        metrics::gauge!(telemetry::STATE_ENTITIES, "pipeline" => self.shared.pipeline.name.clone())
            .set(entities as f64);
        let ms = |d: Duration| d.as_millis() as u64;
        if final_one {
            // Stopping or handing partitions over: all of the state at once (on parallel
            // threads, look-ups still served), and everything durable before returning.
            let mut files = Vec::with_capacity(self.positions.len());
            for (&p, &next_offset) in &self.positions {
                let state = engine.snapshot_partition(p as u32)?;
                files.push((
                    p,
                    Checkpoint {
                        next_offset,
                        watermark,
                        state,
                    },
                ));
            }
            drop(engine);
            tracing::debug!(
                outputs_flushed_ms = ms(flushed),
                parquet_ms = ms(snapshots_written - flushed),
                serialise_ms = ms(began.elapsed() - snapshots_written),
                "Final checkpoint serialised; writing it."
            );
            for (p, checkpoint) in &files {
                match self.store.save(*p, checkpoint) {
                    Ok(()) => {}
                    Err(e) if e.is_state_topic() && !self.exactly_once => {
                        tracing::warn!("{e}; offsets stay uncommitted.");
                        return Ok(false);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let offsets: Vec<(i32, i64)> = files.iter().map(|(p, c)| (*p, c.next_offset)).collect();
            if self.exactly_once {
                self.commit_transaction(consumer, &offsets, began)?;
                return Ok(true);
            }
            return Ok(self.commit(consumer, &offsets, began));
        }
        drop(engine);
        tracing::debug!(
            outputs_flushed_ms = ms(flushed),
            parquet_ms = ms(snapshots_written - flushed),
            "Checkpoint begun; serialising the state."
        );
        // The state as it is now goes with the offsets as they are now. It is serialised a
        // slice at a time between the next batches (an entity about to change first), so the
        // stream does not stop for it.
        self.shared
            .engine()
            .begin_snapshot(self.positions.keys().map(|&p| p as u32));
        self.capturing = Some(Capturing {
            offsets: self.positions.iter().map(|(&p, &o)| (p, o)).collect(),
            watermark,
            began,
        });
        Ok(true)
    }

    /// Serialises the next `slice` entities of the state of a checkpoint begun. Once it is
    /// complete, its files are written on a background thread and its offsets committed when
    /// they are durable.
    fn advance_capture(
        &mut self,
        consumer: &BaseConsumer<RunContext>,
        slice: usize,
    ) -> anyhow::Result<()> {
        if self.capturing.is_none() {
            return Ok(());
        }
        // Files are written, and offsets committed, in the order checkpoints began.
        self.join_writer(consumer, false)?;
        if self.pending.is_some() {
            return Ok(());
        }
        let mut engine = self.shared.engine();
        if !engine.snapshot_step(slice) {
            return Ok(());
        }
        let captured = engine.finish_snapshots();
        drop(engine);
        let Some(capturing) = self.capturing.take() else {
            return Ok(());
        };
        // Only partitions owned throughout: one that arrived since has no snapshot, and one
        // that left was checkpointed when it was revoked.
        let files: Vec<(i32, i64, SnapshotCapture)> = captured
            .into_iter()
            .filter_map(|(p, capture)| {
                let p = p as i32;
                let (_, next_offset) = capturing.offsets.iter().find(|(o, _)| *o == p)?;
                Some((p, *next_offset, capture))
            })
            .collect();
        let offsets: Vec<(i32, i64)> = files.iter().map(|(p, o, _)| (*p, *o)).collect();
        let store = self.store.clone();
        let watermark = capturing.watermark;
        let name = self.shared.pipeline.name.clone();
        let began = capturing.began;
        let write_all = move || -> Result<(), CheckpointError> {
            let mut bytes = 0usize;
            for (partition, next_offset, capture) in files {
                let state = capture
                    .assemble()
                    .map_err(|cause| CheckpointError::Encode { partition, cause })?;
                bytes += state.len();
                let checkpoint = Checkpoint {
                    next_offset,
                    watermark,
                    state,
                };
                store.save(partition, &checkpoint)?;
            }
            metrics::gauge!(telemetry::STATE_BYTES, "pipeline" => name).set(bytes as f64);
            tracing::debug!(
                bytes,
                since_begun_ms = began.elapsed().as_millis() as u64,
                "Checkpoint state serialised and written."
            );
            Ok(())
        };
        // Writing and syncing the files does not need the state: consumption goes on meanwhile.
        let writing = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(write_all)
            .context("cannot start the checkpoint writer thread")?;
        self.pending = Some(PendingCheckpoint {
            writing,
            offsets,
            began,
        });
        Ok(())
    }

    /// Completes the background checkpoint if its files are written (or waits for them when
    /// `wait`), then commits its offsets. A file that could not be written stops the service.
    fn finish_pending(
        &mut self,
        consumer: &BaseConsumer<RunContext>,
        wait: bool,
    ) -> anyhow::Result<()> {
        self.join_writer(consumer, wait)
    }

    /// The part of [`Worker::finish_pending`] that waits for the writer thread.
    fn join_writer(
        &mut self,
        consumer: &BaseConsumer<RunContext>,
        wait: bool,
    ) -> anyhow::Result<()> {
        if !self
            .pending
            .as_ref()
            .is_some_and(|p| wait || p.writing.is_finished())
        {
            return Ok(());
        }
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        match pending.writing.join() {
            Ok(Ok(())) => {
                self.commit(consumer, &pending.offsets, pending.began);
                Ok(())
            }
            // Kafka unreachable for the state topic: like outputs not yet acknowledged, the
            // offsets wait for a later checkpoint.
            Ok(Err(e)) if e.is_state_topic() => {
                tracing::warn!("{e}; offsets stay uncommitted until a checkpoint is written.");
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(anyhow!("the checkpoint writer thread panicked")),
        }
    }

    /// The offsets of a checkpoint, as Kafka takes them.
    fn offset_list(&self, offsets: &[(i32, i64)]) -> Result<TopicPartitionList, KafkaError> {
        let topic = &self.shared.pipeline.source.kafka.topic;
        let mut list = TopicPartitionList::new();
        for &(p, next_offset) in offsets {
            list.add_partition_offset(topic, p, Offset::Offset(next_offset))?;
        }
        Ok(list)
    }

    /// Counts a checkpoint that completed (its offsets committed).
    fn checkpoint_done(&self, began: Instant, what: &str) {
        let name = self.shared.pipeline.name.clone();
        metrics::counter!(telemetry::CHECKPOINTS, "pipeline" => name).increment(1);
        tracing::debug!(total_ms = began.elapsed().as_millis() as u64, "{what}");
    }

    /// Commits the offsets of a durable checkpoint. False when the commit failed (the next
    /// checkpoint commits newer offsets).
    fn commit(
        &self,
        consumer: &BaseConsumer<RunContext>,
        offsets: &[(i32, i64)],
        began: Instant,
    ) -> bool {
        let list = match self.offset_list(offsets) {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("Cannot list the offsets to commit ({e}).");
                return false;
            }
        };
        if list.count() > 0
            && let Err(e) = consumer.commit(&list, CommitMode::Sync)
        {
            tracing::warn!("Committing offsets failed ({e}); the next checkpoint commits them.");
            return false;
        }
        self.checkpoint_done(began, "Checkpoint durable and committed.");
        true
    }

    /// Exactly-once: puts the offsets in the open transaction, commits it (its outputs, dead
    /// letters and state with them) and begins the next. Any failure stops the service: the
    /// transaction is then aborted, and the engine's state is ahead of what was committed.
    fn commit_transaction(
        &self,
        consumer: &BaseConsumer<RunContext>,
        offsets: &[(i32, i64)],
        began: Instant,
    ) -> anyhow::Result<()> {
        let failed = |what: &str, e: KafkaError| {
            anyhow!(
                "cannot {what} ({e}); stopping, a restart resumes from the last transaction committed"
            )
        };
        let list = self
            .offset_list(offsets)
            .map_err(|e| failed("list the offsets to commit", e))?;
        let group = consumer
            .group_metadata()
            .ok_or_else(|| anyhow!("the consumer has no group metadata to commit offsets with"))?;
        if list.count() > 0 {
            self.producer
                .send_offsets_to_transaction(&list, &group, TRANSACTION_CALL)
                .map_err(|e| failed("add the offsets to the transaction", e))?;
        }
        self.producer
            .commit_transaction(TRANSACTION_CALL)
            .map_err(|e| failed("commit the transaction", e))?;
        self.producer
            .begin_transaction()
            .map_err(|e| failed("begin the next transaction", e))?;
        self.checkpoint_done(began, "Transaction committed with its state and offsets.");
        Ok(())
    }

    /// Exactly-once, when the service stops on an error: aborts the open transaction, so that
    /// `read_committed` consumers never see its outputs (a restart resumes from the last one
    /// committed) and need not wait for the broker to time it out.
    fn abort_open_transaction(&self) {
        if self.exactly_once
            && let Err(e) = self.producer.abort_transaction(Duration::from_secs(10))
        {
            tracing::warn!(
                "Cannot abort the open transaction ({e}); the broker aborts it when it times out."
            );
        }
    }
}

/// How long one transaction call may take.
const TRANSACTION_CALL: Duration = Duration::from_secs(60);

/// How many times (2 s apart) a state read that ends before the committed offsets is read
/// again before exactly-once gives up.
const STALE_STATE_ATTEMPTS: u32 = 10;

/// The broker aborts a transaction open for longer than this: a few checkpoint intervals, and
/// at least five minutes (a checkpoint may wait a minute for acknowledgements and a rebalance
/// two for the state topic while a transaction is open), at most the broker's default limit
/// (15 minutes).
fn transaction_timeout(checkpoint_every_ms: i64) -> Duration {
    let every = Duration::from_millis(checkpoint_every_ms.max(0) as u64);
    (every * 3).clamp(Duration::from_secs(300), Duration::from_secs(900))
}

/// The transactional id of this instance: the same across its restarts (so that a restart
/// aborts what the previous run left open at once), different between instances on other
/// machines or with other state folders.
fn transactional_id(pipeline: &Pipeline, state_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    let folder = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let folder_hash = checkpoint::fnv1a(folder.display().to_string().as_bytes());
    format!(
        "featurestream-{}-{}-{host}-{folder_hash:016x}",
        pipeline.name, pipeline.source.kafka.group_id
    )
}

/// Registers the transactional producer with its coordinator (fencing a previous run of this
/// instance and aborting what it left open) and begins the first transaction. Retries while
/// Kafka cannot be reached; false when a stop was asked for meanwhile.
fn start_transactions(producer: &Output, stop: &AtomicBool) -> anyhow::Result<bool> {
    loop {
        match producer.init_transactions(Duration::from_secs(30)) {
            Ok(()) => break,
            Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                tracing::warn!("Cannot start transactions yet ({e}); retrying.");
            }
            Err(e) => return Err(anyhow!("cannot start transactions for exactly-once ({e})")),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
    }
    producer
        .begin_transaction()
        .map_err(|e| anyhow!("cannot begin a transaction ({e})"))?;
    tracing::info!(
        "Exactly-once: outputs, dead letters, state and offsets are committed together."
    );
    Ok(true)
}

/// A consumer error: lost connections are already reported by the client's error callback
/// (and retried); anything else is logged here.
fn log_poll_error(error: &KafkaError, status: &BrokerStatus) {
    if !crate::connectors::kafka::is_transient_transport(error) {
        log_error(error, "while consuming", "consumer", status);
    }
}

/// Entities serialised per batch while a checkpoint's snapshot is taken: a few milliseconds
/// of work, so that a large state is spread over a second or so of batches. Not more when a
/// poll brings nothing: an empty poll does not mean that no event is on its way (polls wait
/// only a millisecond meanwhile, so that a quiet stream's slices still follow closely).
const SNAPSHOT_SLICE: usize = 2048;

/// A checkpoint begun: the offsets and watermark that go with the state being serialised.
struct Capturing {
    offsets: Vec<(i32, i64)>,
    watermark: Option<i64>,
    began: Instant,
}

/// Checkpoint files being written by a background thread, and what to commit after.
struct PendingCheckpoint {
    writing: std::thread::JoinHandle<Result<(), CheckpointError>>,
    offsets: Vec<(i32, i64)>,
    began: Instant,
}

/// Waits until every queued output has been acknowledged and its delivery report handled by
/// the producer's polling thread. (The client library's own flush polls in 100 ms steps that
/// compete with that thread, which made every checkpoint pause for at least 100 ms.)
fn wait_for_deliveries(producer: &Output, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    loop {
        let left = producer.in_flight_count();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{left} outputs not acknowledged after {}s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Index of a message within the current batch (dead letters are sent after the engine lock
/// is released).
struct BorrowedMessageRef(usize);

fn reason_index(reason: RejectReason) -> usize {
    RejectReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(0)
}

/// What a finished run did, for the demo and the logs.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub consumed: u64,
    pub aggregated: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub late: u64,
    pub dead_lettered: u64,
    pub produced: u64,
    pub elapsed: Duration,
    pub parquet_dir: Option<PathBuf>,
    pub last_snapshot: Option<PathBuf>,
    pub state_dir: PathBuf,
}

/// Runs the pipeline until `shared.stop` is set (or `stop_after_events` is reached), then
/// finishes in-flight work, makes it durable, commits and returns.
pub fn run_service(shared: Arc<Shared>, options: &RunOptions) -> anyhow::Result<RunReport> {
    let pipeline = Arc::clone(&shared.pipeline);
    let source = &pipeline.source;
    let brokers = options
        .brokers
        .clone()
        .unwrap_or_else(|| source.kafka.brokers.clone());
    let mut topics: Vec<(&str, &'static str)> = vec![(source.kafka.topic.as_str(), "input topic")];
    if let Some(k) = &pipeline.sinks.kafka {
        topics.push((k.topic.as_str(), "output topic"));
    }
    if let Some(d) = &pipeline.dead_letter_topic {
        topics.push((d.as_str(), "dead-letter topic"));
    }
    if let Some(s) = &pipeline.state_topic {
        topics.push((s.as_str(), "state topic"));
    }
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&pipeline.state_dir));
    telemetry::register_counters(&pipeline.name);
    // Before anything is consumed: a state folder that cannot take checkpoints would otherwise
    // stop the service at its first one, after it had produced outputs it cannot commit.
    let store = CheckpointStore::new(&state_dir, &pipeline);
    store
        .check_writable()
        .context("the state folder (`state.dir`) must be writable")?;
    match check_topics(&brokers, &source.kafka.options, &topics, &shared.stop) {
        // A stop asked for while Kafka was unreachable is a clean stop: nothing was consumed.
        Err(TopicCheckError::Stopped) => {
            tracing::info!("Stopped before Kafka could be reached; nothing was consumed.");
            return Ok(RunReport {
                state_dir,
                ..RunReport::default()
            });
        }
        other => other?,
    }
    let sink_options = pipeline
        .sinks
        .kafka
        .as_ref()
        .map(|k| k.options.clone())
        .unwrap_or_default();
    let exactly_once = pipeline.guarantee == Guarantee::ExactlyOnce;
    // A transaction spans a checkpoint interval; one left open by an instance that died is
    // aborted by the broker after this long (or at once when the instance restarts, since it
    // keeps its transactional id).
    let transaction_timeout_ms =
        exactly_once.then(|| transaction_timeout(pipeline.checkpoint_every_ms).as_millis());
    let mut settings = vec![
        ("linger.ms", "5".to_string()),
        ("compression.type", "lz4".to_string()),
        // Partition by key as Kafka's Java clients do, so that the feature topic is
        // co-partitioned with other topics keyed by the same entity (joins downstream).
        ("partitioner", "murmur2_random".to_string()),
        // Retry for as long as it takes: outputs are never dropped on a broker outage. In a
        // transaction, no longer than it may stay open (librdkafka requires it).
        (
            "message.timeout.ms",
            transaction_timeout_ms.map_or("0".to_string(), |ms| ms.to_string()),
        ),
        ("queue.buffering.max.messages", "500000".to_string()),
    ];
    if let Some(timeout) = transaction_timeout_ms {
        if let Some((_, theirs)) = sink_options
            .iter()
            .find(|(k, _)| *k == "transaction.timeout.ms")
            && theirs.parse::<u128>().is_ok_and(|ms| ms < timeout)
        {
            tracing::warn!(
                "`transaction.timeout.ms: {theirs}` is shorter than the {timeout} ms exactly-once \
                 would use: a checkpoint waiting for acknowledgements, or a rebalance reading \
                 the state topic, can outlast it, and the service then stops."
            );
        }
        settings.extend([
            ("transactional.id", transactional_id(&pipeline, &state_dir)),
            ("transaction.timeout.ms", timeout.to_string()),
        ]);
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut producer_config = client_config(&brokers, &settings, &sink_options);
    enforce(&mut producer_config, &sink_options, IDEMPOTENT_PRODUCER);
    let producer: Arc<Output> = Arc::new(
        producer_config
            .create_with_context(DeliveryContext::default())
            .context("cannot create the Kafka producer")?,
    );
    if exactly_once && !start_transactions(&producer, &shared.stop)? {
        tracing::info!("Stopped before Kafka could be reached; nothing was consumed.");
        return Ok(RunReport {
            state_dir,
            ..RunReport::default()
        });
    }
    let store = match &pipeline.state_topic {
        Some(topic) => store.with_state_topic(
            state_topic::StateTopic::connect(
                &brokers,
                &pipeline,
                topic,
                exactly_once.then(|| Arc::clone(&producer)),
            )
            .with_context(|| format!("cannot use the state topic `{topic}`"))?,
        ),
        None => store,
    };
    let store = if exactly_once {
        store.topic_only()
    } else {
        store
    };

    let encoder = Encoder::new(&pipeline)?;
    let avro = match source.format {
        Format::Json => None,
        Format::Avro | Format::AvroConfluent => {
            Some(AvroDecoder::new(source).map_err(|e| anyhow!(e))?)
        }
    };
    let worker = Arc::new(Mutex::new(Worker {
        shared: Arc::clone(&shared),
        producer,
        exactly_once,
        output_topic: pipeline.sinks.kafka.as_ref().map(|k| k.topic.clone()),
        dead_letter_topic: pipeline.dead_letter_topic.clone(),
        json: JsonDecoder::new(source),
        avro,
        encoder,
        store,
        parquet: ParquetOutputs::new(&pipeline, options.parquet_dir.as_deref()),
        positions: BTreeMap::new(),
        skip_below: BTreeMap::new(),
        last_checkpoint: Instant::now(),
        pending: None,
        capturing: None,
        fatal: None,
        closing: false,
    }));

    let start = match source.kafka.start {
        StartOffset::Earliest => "earliest",
        StartOffset::Latest => "latest",
    };
    let mut consumer_config = client_config(
        &brokers,
        &[
            ("group.id", source.kafka.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", start),
            ("statistics.interval.ms", "5000"),
            ("fetch.wait.max.ms", "50"),
        ],
        &source.kafka.options,
    );
    // Offsets are committed by checkpoints only (with exactly-once, inside the transaction),
    // and exactly-once never reads what an aborted upstream transaction wrote.
    let mut required = vec![("enable.auto.commit", "false")];
    if exactly_once {
        required.push(("isolation.level", "read_committed"));
    }
    enforce(&mut consumer_config, &source.kafka.options, &required);
    let consumer: BaseConsumer<RunContext> = consumer_config
        .create_with_context(RunContext {
            worker: Arc::clone(&worker),
            status: BrokerStatus::default(),
        })
        .context("cannot create the Kafka consumer")?;
    consumer
        .subscribe(&[source.kafka.topic.as_str()])
        .context("cannot subscribe to the input topic")?;
    tracing::info!(
        pipeline = %pipeline.name, topic = %source.kafka.topic, group = %source.kafka.group_id, brokers = %brokers,
        "Consuming; state checkpoints in {}.", state_dir.display()
    );

    let started = Instant::now();
    let interval = Duration::from_millis(pipeline.checkpoint_every_ms.max(100) as u64);
    let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(2048);
    let mut total = 0u64;
    let mut said_waiting = false;
    // While a checkpoint's state is being serialised, a poll waits only briefly: on a quiet
    // stream the slices then follow one another instead of one per 100 ms idle poll.
    let mut capture_going_on = false;
    let result: anyhow::Result<()> = loop {
        if shared.stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        if !said_waiting
            && started.elapsed() > WAITING_FOR_PARTITIONS
            && !shared.ready.load(Ordering::Relaxed)
        {
            said_waiting = true;
            tracing::info!(
                "No partitions assigned yet: waiting for the consumer group (a member that stopped without leaving, such as a killed process, keeps its partitions until its session times out, 45 s by default)."
            );
        }
        if options.stop_after_events.is_some_and(|n| total >= n) {
            break Ok(());
        }
        batch.clear();
        let wait = if capture_going_on {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(wait) {
            Some(Ok(m)) => batch.push(m),
            Some(Err(e)) => log_poll_error(&e, &consumer.context().status),
            None => {}
        }
        while batch.len() < 2048 && !batch.is_empty() {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => log_poll_error(&e, &consumer.context().status),
                None => break,
            }
        }
        if !batch.is_empty() && consumer.context().status.back() {
            tracing::info!("Kafka is reachable again; consuming.");
        }
        let mut w = worker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = w.fatal.take() {
            break Err(e);
        }
        match w.process(&batch) {
            Ok(n) => total += n,
            Err(e) => break Err(e),
        }
        if let Err(e) = w.finish_pending(&consumer, false) {
            break Err(e);
        }
        if let Err(e) = w.advance_capture(&consumer, SNAPSHOT_SLICE) {
            break Err(e);
        }
        if (w.last_checkpoint.elapsed() >= interval
            || w.parquet.as_ref().is_some_and(|p| p.log_is_full()))
            && let Err(e) = w.checkpoint(&consumer, false)
        {
            break Err(e);
        }
        capture_going_on = w.capturing.is_some();
    };
    drop(batch);
    let mut w = worker.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = result {
        tracing::error!("Stopping: {e:#}");
        // Nothing more is committed: the offsets of records that failed stay uncommitted.
        w.closing = true;
        w.abort_open_transaction();
        return Err(e);
    }
    tracing::info!("Stopping: finishing in-flight outputs, saving state and committing offsets.");
    let mut attempts = 0;
    let last = loop {
        match w.checkpoint(&consumer, true) {
            Ok(true) => break Ok(()),
            Ok(false) if attempts < 2 => attempts += 1,
            Ok(false) => {
                break Err(anyhow!(
                    "could not make the last outputs durable; offsets since the previous checkpoint stay uncommitted"
                ));
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = last {
        w.closing = true;
        w.abort_open_transaction();
        return Err(e);
    }
    let counters = &shared.counters;
    let report = RunReport {
        consumed: counters.consumed.load(Ordering::Relaxed),
        aggregated: counters.aggregated.load(Ordering::Relaxed),
        rejected: RejectReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| (r.as_str(), counters.rejected[i].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect(),
        late: counters.late.load(Ordering::Relaxed),
        dead_lettered: counters.dead_lettered.load(Ordering::Relaxed),
        produced: counters.produced.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        parquet_dir: w.parquet.as_ref().map(|p| p.root().to_path_buf()),
        last_snapshot: w
            .parquet
            .as_ref()
            .and_then(|p| p.last_snapshot_path.clone()),
        state_dir,
    };
    w.closing = true;
    drop(w);
    consumer.unsubscribe();
    tracing::info!(
        consumed = report.consumed,
        aggregated = report.aggregated,
        late = report.late,
        dead_lettered = report.dead_lettered,
        produced = report.produced,
        "Stopped cleanly after {:.1}s.",
        report.elapsed.as_secs_f64()
    );
    Ok(report)
}

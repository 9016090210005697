//! The state topic (`state.topic`): every partition checkpoint is also written to Kafka, so
//! that a partition's state follows it to an instance that does not have the state folder it
//! was written to (another machine, a container with a volume of its own).
//!
//! A checkpoint travels as the bytes of its file, cut into chunks well under Kafka's default
//! record size limit, in partition `p mod n` of the state topic for input partition `p` (any
//! partition count works, one included). Keys start with `<pipeline>/<group>/<input topic>-<p>/`
//! (pipeline names and topic names hold no `/`). Chunks are keyed `<id>/<index>` after it, so
//! no chunk ever replaces another's; once they are all acknowledged, a manifest keyed
//! `manifest` names the checkpoint id, its chunk count, length and CRC-32, and then the
//! previous checkpoint's chunks are deleted (tombstones). A compacted topic so keeps one
//! checkpoint per partition, and a checkpoint cut short by a crash never costs the one before
//! it: a reader takes the checkpoint of the newest manifest whose chunks it found in order and
//! whose length and CRC match. Checkpoints a reader finds left behind (cut short by a crash, or
//! replaced but not yet deleted) are deleted once the partition's next checkpoint is complete.
//! Partitions added to the topic change `p mod n`: a partition the group has read before whose
//! checkpoint is not where `p mod n` now points is looked for in every partition, and its next
//! checkpoint is written where it points (the one found is then deleted).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::{DeliveryContext, send_until};
use crate::config::{KafkaOptions, Pipeline};
use crate::connectors::kafka::{IDEMPOTENT_PRODUCER, LoggingContext, client_config, enforce};

/// Chunk size: half of Kafka's default largest record (1 MB), headroom for key and headers.
const CHUNK_BYTES: usize = 512 * 1024;
const ID_HEADER: &str = "featurestream.checkpoint";
const INDEX_HEADER: &str = "featurestream.chunk";
const COUNT_HEADER: &str = "featurestream.chunks";
const LENGTH_HEADER: &str = "featurestream.bytes";
const CRC_HEADER: &str = "featurestream.crc32";
const MANIFEST: &str = "manifest";
/// The most a reader reserves ahead for one checkpoint (beyond it, the bytes grow as read).
const MAX_RESERVE: usize = 1 << 30;
/// How long writing one checkpoint may take; a checkpoint that cannot be written leaves
/// the offsets uncommitted until a later one is.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long reading the topic at an assignment may take: well under the consumer's
/// `max.poll.interval.ms` (5 minutes by default), since it runs in the rebalance.
const READ_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum StateTopicError {
    #[error(
        "cannot write the checkpoint of partition {partition} to the state topic `{topic}`: {cause}"
    )]
    Write {
        topic: String,
        partition: i32,
        cause: String,
    },
    #[error("cannot read the state topic `{topic}`: {cause}")]
    Read { topic: String, cause: String },
}

/// A complete checkpoint read from the topic: its manifest and the bytes of its file.
type Found = (Manifest, Vec<u8>);

/// The checkpoint a manifest names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Manifest {
    id: String,
    chunks: usize,
    length: usize,
    crc: u32,
    /// The state-topic partition holding it: `p mod n` when it was written, which is not
    /// where it is looked for first once partitions have been added to the topic.
    state_partition: i32,
}

impl Manifest {
    /// When the checkpoint was written, by its writer's clock (ids start with nanoseconds).
    fn written_at(&self) -> u128 {
        self.id
            .split_once('-')
            .and_then(|(nanos, _)| u128::from_str_radix(nanos, 16).ok())
            .unwrap_or(0)
    }
}

pub struct StateTopic {
    topic: String,
    /// `<pipeline>/<group>/<input topic>-`: the partition number and `/` follow.
    key_prefix: String,
    /// The topic's partition count, asked again at every read and at most every
    /// [`RECOUNT_EVERY`] when writing: partitions added while instances run are then used by
    /// all of them alike.
    partitions: AtomicI32,
    counted: Mutex<Instant>,
    metadata: BaseConsumer<LoggingContext>,
    brokers: String,
    options: KafkaOptions,
    /// Its own, or (exactly-once) the service's transactional producer, so that checkpoints
    /// are part of the transaction that commits their offsets.
    producer: Arc<ThreadedProducer<DeliveryContext>>,
    /// Written inside the service's transactions: what a checkpoint writes becomes visible all
    /// at once when the transaction commits, so nothing is waited for in between.
    in_transaction: bool,
    /// The newest checkpoint of each partition in the topic, read or written by this
    /// instance: its chunks are deleted once a newer one is complete.
    newest: Mutex<HashMap<i32, Manifest>>,
    /// Chunks of checkpoints cut short (a crash while writing), found when reading: deleted
    /// with the previous checkpoint once the partition's next one is complete.
    orphans: Mutex<HashMap<i32, Vec<Manifest>>>,
}

impl std::fmt::Debug for StateTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTopic")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions.load(Ordering::Relaxed))
            .finish()
    }
}

/// A checkpoint id that differs between writers and between checkpoints of one writer.
fn new_checkpoint_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", std::process::id())
}

fn header<'a>(
    headers: Option<&'a rdkafka::message::BorrowedHeaders>,
    name: &str,
) -> Option<&'a str> {
    headers?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

impl StateTopic {
    /// Connects to the state topic of `pipeline` (known to exist): learns its partition count
    /// and creates the producer that writes checkpoints to it, unless it is given one
    /// (`transactional`: the service's, whose transactions the checkpoints are part of).
    pub(crate) fn connect(
        brokers: &str,
        pipeline: &Pipeline,
        topic: &str,
        transactional: Option<Arc<ThreadedProducer<DeliveryContext>>>,
    ) -> anyhow::Result<StateTopic> {
        let options = pipeline.source.kafka.options.clone();
        let client: BaseConsumer<LoggingContext> =
            client_config(brokers, &[], &options).create_with_context(LoggingContext::default())?;
        let partitions = count_partitions(&client, topic)?;
        anyhow::ensure!(
            partitions > 0,
            "the state topic `{topic}` has no partitions"
        );
        warn_unless_compacted(brokers, &options, topic);
        let in_transaction = transactional.is_some();
        let producer = match transactional {
            Some(producer) => producer,
            None => Arc::new(Self::producer(brokers, &options)?),
        };
        Ok(StateTopic {
            topic: topic.to_string(),
            key_prefix: format!(
                "{}/{}/{}-",
                pipeline.name, pipeline.source.kafka.group_id, pipeline.source.kafka.topic
            ),
            partitions: AtomicI32::new(partitions),
            counted: Mutex::new(Instant::now()),
            metadata: client,
            brokers: brokers.to_string(),
            options,
            producer,
            in_transaction,
            newest: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashMap::new()),
        })
    }

    /// Asks the topic's partition count again (`now`, or when last asked over
    /// [`RECOUNT_EVERY`] ago); keeps the last known one when Kafka does not answer.
    fn recount(&self, now: bool) {
        let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
        if !now && counted.elapsed() < RECOUNT_EVERY {
            return;
        }
        *counted = Instant::now();
        let count = count_partitions(&self.metadata, &self.topic);
        // Serves the client's queue (its log lines and errors), which nothing else polls.
        let _ = self.metadata.poll(Duration::ZERO);
        match count {
            Ok(n) if n > 0 => {
                let before = self.partitions.swap(n, Ordering::Relaxed);
                if before != n {
                    tracing::info!(
                        "The state topic `{}` has {n} partitions now ({before} before).",
                        self.topic
                    );
                }
            }
            _ => {}
        }
    }

    /// The producer of a state topic written outside transactions.
    fn producer(
        brokers: &str,
        options: &KafkaOptions,
    ) -> anyhow::Result<ThreadedProducer<DeliveryContext>> {
        let mut config = client_config(
            brokers,
            &[
                ("linger.ms", "5"),
                ("compression.type", "lz4"),
                ("message.timeout.ms", &DEADLINE.as_millis().to_string()),
            ],
            options,
        );
        enforce(&mut config, options, IDEMPOTENT_PRODUCER);
        Ok(config.create_with_context(DeliveryContext::default())?)
    }

    pub fn name(&self) -> &str {
        &self.topic
    }

    fn key_prefix_of(&self, partition: i32) -> String {
        format!("{}{partition}/", self.key_prefix)
    }

    fn state_partition(&self, partition: i32) -> i32 {
        partition.rem_euclid(self.partitions.load(Ordering::Relaxed).max(1))
    }

    /// Queues one record for partition `state_partition` of the topic; `payload` `None` is a
    /// tombstone.
    fn put(
        &self,
        state_partition: i32,
        key: &str,
        payload: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<(), String> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for &(key, value) in headers {
            owned = owned.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record = BaseRecord::to(&self.topic)
            .partition(state_partition)
            .key(key.as_bytes())
            .headers(owned);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        let started = Instant::now();
        send_until(&self.producer, record, || started.elapsed() >= DEADLINE)
            .map_err(|e| e.to_string())
    }

    /// Waits until everything queued is acknowledged; an error names what was refused since
    /// the count stood at `failed_before`. Inside a transaction there is nothing to wait for:
    /// its commit settles every record at once (and fails if one was refused).
    fn acknowledged(&self, failed_before: u64) -> Result<(), String> {
        if self.in_transaction {
            return Ok(());
        }
        let context = self.producer.context();
        self.producer
            .flush(DEADLINE)
            .map_err(|e| format!("not acknowledged ({e})"))?;
        let failed = context.failed.load(Ordering::Relaxed) - failed_before;
        if failed > 0 {
            let first = context
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_default();
            return Err(format!("{failed} records were refused (first: {first})"));
        }
        Ok(())
    }

    /// Writes one checkpoint (the bytes of its file), waits until Kafka has acknowledged it,
    /// then deletes the partition's previous one.
    pub fn write(&self, partition: i32, bytes: &[u8]) -> Result<(), StateTopicError> {
        self.recount(false);
        let fail = |cause: String| StateTopicError::Write {
            topic: self.topic.clone(),
            partition,
            cause,
        };
        // Refusals counted before this checkpoint are not its own.
        let context = self.producer.context();
        let failed_before = context.failed.load(Ordering::Relaxed);
        context
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let home = self.state_partition(partition);
        let manifest = Manifest {
            id: new_checkpoint_id(),
            // Never empty: a checkpoint file starts with its 32-byte header.
            chunks: bytes.len().div_ceil(CHUNK_BYTES),
            length: bytes.len(),
            crc: crc32(bytes),
            state_partition: home,
        };
        let prefix = self.key_prefix_of(partition);
        let (count, length) = (manifest.chunks.to_string(), manifest.length.to_string());
        for (index, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            let key = format!("{prefix}{}/{index}", manifest.id);
            let index = index.to_string();
            let headers = [
                // The whole length, so that a reader reserves it once.
                (LENGTH_HEADER, length.as_str()),
                (ID_HEADER, manifest.id.as_str()),
                (INDEX_HEADER, index.as_str()),
                (COUNT_HEADER, count.as_str()),
            ];
            self.put(home, &key, Some(chunk), &headers).map_err(fail)?;
        }
        self.acknowledged(failed_before).map_err(fail)?;
        let crc = manifest.crc.to_string();
        let headers = [
            (ID_HEADER, manifest.id.as_str()),
            (COUNT_HEADER, count.as_str()),
            (LENGTH_HEADER, length.as_str()),
            (CRC_HEADER, crc.as_str()),
        ];
        let text = format!(
            "featurestream checkpoint {} of partition {partition}: {} chunks, {} bytes",
            manifest.id, manifest.chunks, manifest.length
        );
        self.put(
            home,
            &format!("{prefix}{MANIFEST}"),
            Some(text.as_bytes()),
            &headers,
        )
        .map_err(fail)?;
        self.acknowledged(failed_before).map_err(fail)?;
        let previous = self
            .newest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition, manifest);
        let orphans = self
            .orphans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&partition)
            .unwrap_or_default();
        let replaced: Vec<Manifest> = previous.into_iter().chain(orphans).collect();
        if !replaced.is_empty() {
            for old in &replaced {
                self.delete(partition, old);
            }
            // A manifest in another partition of the topic (written before partitions were
            // added) is not replaced by the one just written: it is deleted too.
            let mut elsewhere: Vec<i32> = replaced
                .iter()
                .map(|old| old.state_partition)
                .filter(|&at| at != home)
                .collect();
            elsewhere.sort_unstable();
            elsewhere.dedup();
            for at in elsewhere {
                if let Err(e) = self.put(at, &format!("{prefix}{MANIFEST}"), None, &[]) {
                    tracing::debug!("Cannot delete an old checkpoint manifest ({e}).");
                }
            }
            // Settled here, so that a refused deletion is not taken for the next checkpoint's.
            if let Err(e) = self.acknowledged(context.failed.load(Ordering::Relaxed)) {
                tracing::debug!("Old checkpoint chunks not deleted ({e}).");
            }
        }
        Ok(())
    }

    /// Tombstones for a checkpoint that a newer one has replaced. Best effort: chunks left
    /// behind only take space.
    fn delete(&self, partition: i32, old: &Manifest) {
        let prefix = self.key_prefix_of(partition);
        for index in 0..old.chunks {
            let key = format!("{prefix}{}/{index}", old.id);
            if let Err(e) = self.put(old.state_partition, &key, None, &[]) {
                tracing::debug!("Cannot delete an old checkpoint chunk ({e}).");
                return;
            }
        }
    }

    /// The newest complete checkpoint (the bytes of its file) of each of `partitions` that
    /// has one in the topic. Each state-topic partition is read once, to its end.
    ///
    /// Those of `look_further` (partitions the group has read before, so that their state
    /// should exist) not found where `p mod n` says are then looked for in the topic's other
    /// partitions: partitions added to the topic move where `p mod n` points, but not the
    /// checkpoints written before.
    pub fn read(
        &self,
        partitions: &[i32],
        look_further: &[i32],
    ) -> Result<BTreeMap<i32, Vec<u8>>, StateTopicError> {
        self.recount(true);
        let mut by_state_partition: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for &p in partitions {
            by_state_partition
                .entry(self.state_partition(p))
                .or_default()
                .push(p);
        }
        let mut found = BTreeMap::new();
        for (state_partition, inputs) in by_state_partition {
            for (p, (manifest, bytes)) in self.assemble(state_partition, &inputs)? {
                self.note_newest(p, manifest);
                found.insert(p, bytes);
            }
        }
        let missing: Vec<i32> = look_further
            .iter()
            .copied()
            .filter(|p| partitions.contains(p) && !found.contains_key(p))
            .collect();
        let count = self.partitions.load(Ordering::Relaxed);
        if missing.is_empty() || count == 1 {
            return Ok(found);
        }
        tracing::info!(
            ?missing,
            "The state topic `{}` has no checkpoint of partitions {missing:?} where it keeps \
             them now, although the group has read them: looking in its other partitions \
             (written before partitions were added to it?).",
            self.topic
        );
        let mut elsewhere: BTreeMap<i32, Found> = BTreeMap::new();
        for state_partition in 0..count {
            let inputs: Vec<i32> = missing
                .iter()
                .copied()
                .filter(|&p| self.state_partition(p) != state_partition)
                .collect();
            if inputs.is_empty() {
                continue;
            }
            for (p, (manifest, bytes)) in self.assemble(state_partition, &inputs)? {
                // Found in more than one (partitions added twice): the newest is restored,
                // the other deleted after the next checkpoint.
                match elsewhere.entry(p) {
                    Entry::Vacant(slot) => {
                        slot.insert((manifest, bytes));
                    }
                    Entry::Occupied(mut seen) => {
                        let older = if seen.get().0.written_at() > manifest.written_at() {
                            manifest
                        } else {
                            seen.insert((manifest, bytes)).0
                        };
                        self.note_orphans(p, vec![older]);
                    }
                }
            }
        }
        for (p, (manifest, bytes)) in elsewhere {
            tracing::info!(
                partition = p,
                "Found partition {p}'s checkpoint in partition {} of the state topic `{}`; \
                 it is moved to partition {} with the next checkpoint.",
                manifest.state_partition,
                self.topic,
                self.state_partition(p)
            );
            self.note_newest(p, manifest);
            found.insert(p, bytes);
        }
        Ok(found)
    }

    /// Reads partition `state_partition` of the topic for the checkpoints of the input
    /// partitions `inputs`: the newest complete one of each that has one. Checkpoints found
    /// left behind are noted for deletion.
    fn assemble(
        &self,
        state_partition: i32,
        inputs: &[i32],
    ) -> Result<Vec<(i32, Found)>, StateTopicError> {
        let mut assemblers: Vec<(i32, Assembler)> = inputs
            .iter()
            .map(|&p| (p, Assembler::new(self.key_prefix_of(p), state_partition)))
            .collect();
        self.scan(state_partition, |key, headers, payload| {
            for (_, assembler) in &mut assemblers {
                assembler.push(key, headers, payload);
            }
        })
        .map_err(|cause| StateTopicError::Read {
            topic: self.topic.clone(),
            cause,
        })?;
        let mut complete = Vec::new();
        for (p, assembler) in assemblers {
            let (newest, orphans) = assembler.finish();
            self.note_orphans(p, orphans);
            if let Some(newest) = newest {
                complete.push((p, newest));
            }
        }
        Ok(complete)
    }

    /// Remembers the checkpoint of `p` in the topic that the next one replaces.
    fn note_newest(&self, p: i32, manifest: Manifest) {
        self.newest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(p, manifest);
    }

    /// Remembers checkpoints of `p` to delete once its next one is complete.
    fn note_orphans(&self, p: i32, orphans: Vec<Manifest>) {
        if !orphans.is_empty() {
            self.orphans
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(p)
                .or_default()
                .extend(orphans);
        }
    }

    /// Reads one partition of the topic from its start to its end.
    fn scan(
        &self,
        state_partition: i32,
        mut visit: impl FnMut(&[u8], Option<&rdkafka::message::BorrowedHeaders>, Option<&[u8]>),
    ) -> Result<(), String> {
        let consumer: BaseConsumer<LoggingContext> = client_config(
            &self.brokers,
            &[
                ("group.id", "featurestream-state-reader"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("enable.partition.eof", "true"),
            ],
            &self.options,
        )
        // Checkpoints of transactions that were aborted (exactly-once) are never restored,
        // whatever the options say.
        .set("isolation.level", "read_committed")
        .create_with_context(LoggingContext::default())
        .map_err(|e| e.to_string())?;
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, state_partition, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if high <= low {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, state_partition, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        consumer.assign(&list).map_err(|e| e.to_string())?;
        let started = Instant::now();
        loop {
            if started.elapsed() > READ_DEADLINE {
                return Err(format!(
                    "not read to its end within {} s",
                    READ_DEADLINE.as_secs()
                ));
            }
            match consumer.poll(Duration::from_millis(500)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
                // The client retries what fails (a broker restarting): so does the read,
                // until its deadline.
                Some(Err(e)) => tracing::warn!("Reading the state topic: {e}; retrying."),
                Some(Ok(message)) => {
                    visit(
                        message.key().unwrap_or_default(),
                        message.headers(),
                        message.payload(),
                    );
                    // Records written after the read began need not be waited for. (Written
                    // in transactions, the last offset is a commit marker, never delivered:
                    // the end-of-partition event ends the read then.)
                    if message.offset() >= high - 1 {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// How often a writer asks the state topic's partition count again.
const RECOUNT_EVERY: Duration = Duration::from_secs(30);

fn count_partitions(client: &BaseConsumer<LoggingContext>, topic: &str) -> anyhow::Result<i32> {
    let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len()) as i32)
}

/// Says so when the state topic deletes by age rather than compacting: a partition quiet for
/// longer than the topic's retention would lose its only checkpoint there. Best effort: a
/// broker that does not answer the question is not an error.
fn warn_unless_compacted(brokers: &str, options: &KafkaOptions, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let Ok(admin) = client_config(brokers, &[], options)
        .create_with_context::<_, AdminClient<LoggingContext>>(LoggingContext::default())
    else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let asked = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let resources = [ResourceSpecifier::Topic(topic)];
    let policy = runtime
        .block_on(admin.describe_configs(&resources, &asked))
        .ok()
        .and_then(|results| results.into_iter().next()?.ok())
        .and_then(|resource| {
            resource
                .entries
                .into_iter()
                .find(|e| e.name == "cleanup.policy")?
                .value
        });
    if let Some(policy) = policy
        && !policy.contains("compact")
    {
        tracing::warn!(
            "The state topic `{topic}` has cleanup.policy={policy}: a partition quiet for longer \
             than its retention loses its checkpoint there. Set cleanup.policy=compact."
        );
    }
}

/// CRC-32 (IEEE) of `bytes`: a checksum with a fixed definition, so that any build can check
/// any other's checkpoint; computed with the processor's carry-less multiply where there is one.
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Puts one input partition's checkpoints back together from the records of its state-topic
/// partition, in offset order, keeping the newest complete one.
struct Assembler {
    key_prefix: String,
    /// The state-topic partition being read.
    state_partition: i32,
    /// Checkpoints whose chunks are arriving, by id.
    partial: HashMap<String, Partial>,
    complete: Option<(Manifest, Vec<u8>)>,
    /// Every checkpoint whose chunks were seen, by id, with its chunk count.
    seen: HashMap<String, usize>,
    /// Checkpoints whose chunks have been deleted.
    deleted: std::collections::HashSet<String>,
}

struct Partial {
    next: usize,
    bytes: Vec<u8>,
}

impl Assembler {
    fn new(key_prefix: String, state_partition: i32) -> Assembler {
        Assembler {
            key_prefix,
            state_partition,
            partial: HashMap::new(),
            complete: None,
            seen: HashMap::new(),
            deleted: std::collections::HashSet::new(),
        }
    }

    fn push(
        &mut self,
        key: &[u8],
        headers: Option<&rdkafka::message::BorrowedHeaders>,
        payload: Option<&[u8]>,
    ) {
        let Some(rest) = key.strip_prefix(self.key_prefix.as_bytes()) else {
            return; // another partition, pipeline or group sharing the topic partition
        };
        let Some(payload) = payload else {
            if rest == MANIFEST.as_bytes() {
                // The manifest deleted: its checkpoint moved to another partition of the
                // topic (partitions were added), and this one is no longer the newest.
                self.complete = None;
                return;
            }
            // A deleted chunk: its checkpoint's id is the first part of the key.
            if let Some(id) = std::str::from_utf8(rest)
                .ok()
                .and_then(|r| r.split_once('/'))
                .map(|(id, _)| id)
            {
                if self.complete.as_ref().is_some_and(|(m, _)| m.id == id) {
                    self.complete = None;
                }
                self.deleted.insert(id.to_string());
            }
            return;
        };
        let id = header(headers, ID_HEADER).map(str::to_string);
        let count = header(headers, COUNT_HEADER).and_then(|v| v.parse().ok());
        if rest == MANIFEST.as_bytes() {
            let length = header(headers, LENGTH_HEADER).and_then(|v| v.parse().ok());
            let crc = header(headers, CRC_HEADER).and_then(|v| v.parse().ok());
            if let (Some(id), Some(chunks), Some(length), Some(crc)) = (id, count, length, crc) {
                self.manifest(Manifest {
                    id,
                    chunks,
                    length,
                    crc,
                    state_partition: self.state_partition,
                });
            }
            return;
        }
        let index = header(headers, INDEX_HEADER).and_then(|v| v.parse::<usize>().ok());
        let (Some(id), Some(index)) = (id, index) else {
            return;
        };
        if rest != format!("{id}/{index}").as_bytes() {
            return;
        }
        if let Some(count) = count {
            self.seen.insert(id.clone(), count);
        }
        if index == 0 {
            let length: usize = header(headers, LENGTH_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            self.partial.insert(
                id.clone(),
                Partial {
                    next: 0,
                    bytes: Vec::with_capacity(length.min(MAX_RESERVE)),
                },
            );
        }
        match self.partial.get_mut(&id) {
            Some(partial) if partial.next == index => {
                partial.bytes.extend_from_slice(payload);
                partial.next += 1;
            }
            // Out of order: that checkpoint cannot be put together.
            _ => {
                self.partial.remove(&id);
            }
        }
    }

    /// A manifest completes its checkpoint; checkpoints begun before it are older (or were
    /// cut short) and are dropped.
    fn manifest(&mut self, manifest: Manifest) {
        if let Some(partial) = self.partial.remove(&manifest.id)
            && partial.next == manifest.chunks
            && partial.bytes.len() == manifest.length
            && crc32(&partial.bytes) == manifest.crc
        {
            self.complete = Some((manifest, partial.bytes));
        }
        self.partial.clear();
    }

    /// The newest complete checkpoint, and the checkpoints whose chunks are still there
    /// without being it (cut short, or replaced without being deleted): to be deleted.
    fn finish(self) -> (Option<(Manifest, Vec<u8>)>, Vec<Manifest>) {
        let keep = self.complete.as_ref().map(|(m, _)| m.id.clone());
        let mut orphans: Vec<Manifest> = self
            .seen
            .into_iter()
            .filter(|(id, _)| Some(id) != keep.as_ref() && !self.deleted.contains(id))
            .map(|(id, chunks)| Manifest {
                id,
                chunks,
                length: 0,
                crc: 0,
                state_partition: self.state_partition,
            })
            .collect();
        orphans.sort_by(|a, b| a.id.cmp(&b.id));
        (self.complete, orphans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{BorrowedHeaders, ToBytes};

    const PREFIX: &str = "p/g/in-0/";

    /// A record of the state topic: key, headers, payload (`None`: a tombstone).
    #[derive(Clone)]
    struct Stored {
        key: String,
        headers: Vec<(&'static str, String)>,
        payload: Option<Vec<u8>>,
    }

    /// A deleted record: a tombstone for `key`.
    fn tombstone(key: String) -> Stored {
        Stored {
            key,
            headers: Vec::new(),
            payload: None,
        }
    }

    /// The records `StateTopic::write` produces for `bytes` in chunks of `size`.
    fn written(prefix: &str, id: &str, bytes: &[u8], size: usize) -> Vec<Stored> {
        let parts: Vec<&[u8]> = bytes.chunks(size).collect();
        let mut out: Vec<Stored> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| Stored {
                key: format!("{prefix}{id}/{i}"),
                headers: vec![
                    (ID_HEADER, id.to_string()),
                    (INDEX_HEADER, i.to_string()),
                    (COUNT_HEADER, parts.len().to_string()),
                ],
                payload: Some(part.to_vec()),
            })
            .collect();
        out.push(Stored {
            key: format!("{prefix}{MANIFEST}"),
            headers: vec![
                (ID_HEADER, id.to_string()),
                (COUNT_HEADER, parts.len().to_string()),
                (LENGTH_HEADER, bytes.len().to_string()),
                (CRC_HEADER, crc32(bytes).to_string()),
            ],
            payload: Some(b"manifest".to_vec()),
        });
        out
    }

    /// An assembler that has read `records` in order.
    fn fed(records: &[Stored]) -> Assembler {
        let mut assembler = Assembler::new(PREFIX.to_string(), 0);
        for r in records {
            let mut owned = OwnedHeaders::new();
            for (k, v) in &r.headers {
                owned = owned.insert(Header {
                    key: k,
                    value: Some(v.to_bytes()),
                });
            }
            let borrowed: &BorrowedHeaders = owned.as_borrowed();
            assembler.push(r.key.as_bytes(), Some(borrowed), r.payload.as_deref());
        }
        assembler
    }

    fn assemble(records: &[Stored]) -> Option<Vec<u8>> {
        fed(records).finish().0.map(|(_, bytes)| bytes)
    }

    fn orphans(records: &[Stored]) -> Vec<(String, usize)> {
        let (_, orphans) = fed(records).finish();
        orphans.into_iter().map(|m| (m.id, m.chunks)).collect()
    }

    #[test]
    fn checkpoints_left_behind_are_found_for_deletion() {
        let data: Vec<u8> = (0..100u8).collect();
        // a: complete, replaced by b without being deleted; c: cut short after two chunks;
        // d: replaced and deleted; b stays.
        let mut records = written(PREFIX, "d", &data, 30);
        for i in 0..4 {
            records.push(tombstone(format!("{PREFIX}d/{i}")));
        }
        records.extend(written(PREFIX, "a", &data, 30));
        records.extend(written(PREFIX, "b", &data, 30));
        records.extend(written(PREFIX, "c", &data, 30).into_iter().take(2));
        assert_eq!(
            orphans(&records),
            vec![("a".to_string(), 4), ("c".to_string(), 4)]
        );
        assert_eq!(orphans(&written(PREFIX, "a", &data, 30)), vec![]);
    }

    #[test]
    fn crc32_is_the_standard_one() {
        // The check value of CRC-32 (IEEE 802.3, as zlib computes it).
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn the_newest_complete_checkpoint_is_read() {
        let first: Vec<u8> = (0..100u8).collect();
        let second: Vec<u8> = (0..250u8).rev().collect();
        let mut records = written(PREFIX, "a", &first, 30);
        records.extend(written(PREFIX, "b", &second, 30));
        assert_eq!(assemble(&records), Some(second.clone()));
        assert_eq!(
            assemble(&written(PREFIX, "a", &first, 1000)),
            Some(first.clone())
        );
        assert_eq!(assemble(&[]), None);
    }

    #[test]
    fn a_checkpoint_cut_short_never_costs_the_one_before() {
        let first: Vec<u8> = (0..100u8).collect();
        let second: Vec<u8> = (100..200u8).collect();
        // Cut short by a crash before its manifest, or in its chunks.
        let mut records = written(PREFIX, "a", &first, 30);
        let cut = written(PREFIX, "b", &second, 30);
        records.extend_from_slice(&cut[..cut.len() - 1]);
        assert_eq!(assemble(&records), Some(first.clone()));
        records.truncate(records.len() - 2);
        assert_eq!(assemble(&records), Some(first.clone()));
        // Compacted afterwards: every record keeps its key, the first checkpoint is whole.
        let mut compacted = written(PREFIX, "a", &first, 30);
        compacted.extend_from_slice(&cut[..2]);
        compacted.retain(|r| !r.key.ends_with(MANIFEST));
        compacted.extend(written(PREFIX, "a", &first, 30).pop());
        assert_eq!(assemble(&compacted), Some(first.clone()));
        // A manifest whose chunks changed or went missing names nothing usable.
        let mut damaged = written(PREFIX, "a", &first, 30);
        if let Some(payload) = damaged[1].payload.as_mut() {
            payload[0] ^= 1;
        }
        assert_eq!(assemble(&damaged), None);
        let mut deleted = written(PREFIX, "a", &first, 30);
        deleted[2].payload = None;
        assert_eq!(assemble(&deleted), None);
    }

    #[test]
    fn a_deleted_checkpoint_is_not_read() {
        let data: Vec<u8> = (0..90u8).collect();
        let mut records = written(PREFIX, "a", &data, 30);
        records.push(tombstone(format!("{PREFIX}{MANIFEST}")));
        assert_eq!(assemble(&records), None);
        let mut records = written(PREFIX, "a", &data, 30);
        records.push(tombstone(format!("{PREFIX}a/1")));
        assert_eq!(assemble(&records), None);
    }

    #[test]
    fn deleted_old_chunks_and_other_partitions_are_passed_over() {
        let mine: Vec<u8> = (0..90u8).collect();
        let newer: Vec<u8> = (10..95u8).collect();
        let theirs: Vec<u8> = (0..50u8).collect();
        let mut records = Vec::new();
        // Interleaved with another input partition's checkpoint (`in-10/` is not `in-0/`).
        for (x, y) in
            written(PREFIX, "a", &mine, 30)
                .into_iter()
                .zip(written("p/g/in-10/", "z", &theirs, 17))
        {
            records.push(y);
            records.push(x);
        }
        assert_eq!(assemble(&records), Some(mine.clone()));
        // A newer one, then tombstones for the older one's chunks.
        records.extend(written(PREFIX, "b", &newer, 30));
        for i in 0..3 {
            records.push(tombstone(format!("{PREFIX}a/{i}")));
        }
        assert_eq!(assemble(&records), Some(newer));
    }
}

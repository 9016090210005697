//! The state topic (`state.topic`): every partition checkpoint is also written to Kafka, so
//! that a partition's state follows it to an instance that does not have the state folder it
//! was written to (another machine, a container with a volume of its own).
//!
//! A checkpoint travels as the bytes of its file, cut into chunks well under Kafka's default
//! record size limit. Chunk `i` of input partition `p` is keyed
//! `<pipeline>/<group>/<input topic>-<p>/<i>` and goes to partition `p mod n` of the state
//! topic (any partition count works, one included); its headers name the checkpoint, the
//! chunk count and a hash of the whole. Keys repeat from one checkpoint to the next, so a
//! compacted topic keeps about one checkpoint per partition. A reader takes the newest
//! checkpoint whose chunks all follow one another in order and whose hash matches: a
//! checkpoint cut short by a crash, or chunks interleaved with another writer's, is passed
//! over for the one before.

use std::hash::Hasher;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::DeliveryContext;
use crate::config::{KafkaOptions, Pipeline};
use crate::connectors::kafka::{LoggingContext, client_config};

/// Chunk size: half of Kafka's default largest record (1 MB), headroom for key and headers.
const CHUNK_BYTES: usize = 512 * 1024;
const ID_HEADER: &str = "featurestream.checkpoint";
const INDEX_HEADER: &str = "featurestream.chunk";
const COUNT_HEADER: &str = "featurestream.chunks";
const HASH_HEADER: &str = "featurestream.hash";
/// How long writing one checkpoint, or reading the topic for one partition, may take.
const DEADLINE: Duration = Duration::from_secs(120);

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
    #[error("cannot read the state topic `{topic}` for partition {partition}: {cause}")]
    Read {
        topic: String,
        partition: i32,
        cause: String,
    },
}

pub struct StateTopic {
    topic: String,
    /// `<pipeline>/<group>/<input topic>-`: the partition number and `/` follow.
    key_prefix: String,
    partitions: i32,
    brokers: String,
    options: KafkaOptions,
    producer: ThreadedProducer<DeliveryContext>,
}

impl std::fmt::Debug for StateTopic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTopic")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish()
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    h.write(bytes);
    h.write_usize(bytes.len());
    h.finish()
}

/// A checkpoint id that differs between writers and between checkpoints of one writer.
fn new_checkpoint_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = rustc_hash::FxHasher::default();
    h.write_u64(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

impl StateTopic {
    /// Connects to the state topic of `pipeline` (known to exist): learns its partition count
    /// and creates the producer that writes checkpoints to it.
    pub fn connect(brokers: &str, pipeline: &Pipeline, topic: &str) -> anyhow::Result<StateTopic> {
        let options = pipeline.source.kafka.options.clone();
        let client: BaseConsumer<LoggingContext> =
            client_config(brokers, &[], &options).create_with_context(LoggingContext::default())?;
        let metadata = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len()) as i32;
        anyhow::ensure!(
            partitions > 0,
            "the state topic `{topic}` has no partitions"
        );
        let producer = client_config(
            brokers,
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "5"),
                ("compression.type", "lz4"),
                ("message.timeout.ms", &DEADLINE.as_millis().to_string()),
            ],
            &options,
        )
        .create_with_context(DeliveryContext::default())?;
        Ok(StateTopic {
            topic: topic.to_string(),
            key_prefix: format!(
                "{}/{}/{}-",
                pipeline.name, pipeline.source.kafka.group_id, pipeline.source.kafka.topic
            ),
            partitions,
            brokers: brokers.to_string(),
            options,
            producer,
        })
    }

    pub fn name(&self) -> &str {
        &self.topic
    }

    fn key_prefix_of(&self, partition: i32) -> String {
        format!("{}{partition}/", self.key_prefix)
    }

    fn state_partition(&self, partition: i32) -> i32 {
        partition.rem_euclid(self.partitions)
    }

    /// Writes one checkpoint (the bytes of its file) and waits until Kafka has acknowledged
    /// every chunk of it.
    pub fn write(&self, partition: i32, bytes: &[u8]) -> Result<(), StateTopicError> {
        let fail = |cause: String| StateTopicError::Write {
            topic: self.topic.clone(),
            partition,
            cause,
        };
        let failed_before = self.producer.context().failed.load(Ordering::Relaxed);
        let id = format!("{:016x}", new_checkpoint_id());
        let hash = format!("{:016x}", hash_of(bytes));
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![bytes]
        } else {
            bytes.chunks(CHUNK_BYTES).collect()
        };
        let count = chunks.len().to_string();
        let prefix = self.key_prefix_of(partition);
        for (index, chunk) in chunks.iter().enumerate() {
            let key = format!("{prefix}{index}");
            let index = index.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: ID_HEADER,
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: INDEX_HEADER,
                    value: Some(index.as_str()),
                })
                .insert(Header {
                    key: COUNT_HEADER,
                    value: Some(count.as_str()),
                })
                .insert(Header {
                    key: HASH_HEADER,
                    value: Some(hash.as_str()),
                });
            let mut record = BaseRecord::to(&self.topic)
                .partition(self.state_partition(partition))
                .key(key.as_bytes())
                .payload(*chunk)
                .headers(headers);
            let started = Instant::now();
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((e, back)) if started.elapsed() < DEADLINE => {
                        tracing::debug!("State topic queue full ({e}); waiting.");
                        record = back;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(fail(e.to_string())),
                }
            }
        }
        self.producer
            .flush(DEADLINE)
            .map_err(|e| fail(format!("not acknowledged ({e})")))?;
        let failed = self.producer.context().failed.load(Ordering::Relaxed) - failed_before;
        if failed > 0 {
            let first = self
                .producer
                .context()
                .first_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(fail(format!(
                "{failed} chunks were refused (first: {first})"
            )));
        }
        Ok(())
    }

    /// The newest complete checkpoint of `partition` in the topic (the bytes of its file), if
    /// there is one.
    pub fn read(&self, partition: i32) -> Result<Option<Vec<u8>>, StateTopicError> {
        let fail = |cause: String| StateTopicError::Read {
            topic: self.topic.clone(),
            partition,
            cause,
        };
        let consumer: BaseConsumer<LoggingContext> = client_config(
            &self.brokers,
            &[
                ("group.id", "featurestream-state-reader"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
            ],
            &self.options,
        )
        .create_with_context(LoggingContext::default())
        .map_err(|e| fail(e.to_string()))?;
        let state_partition = self.state_partition(partition);
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, state_partition, Duration::from_secs(10))
            .map_err(|e| fail(e.to_string()))?;
        let mut assembler = Assembler::new(self.key_prefix_of(partition));
        if high <= low {
            return Ok(None);
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.topic, state_partition, Offset::Offset(low))
            .map_err(|e| fail(e.to_string()))?;
        consumer.assign(&list).map_err(|e| fail(e.to_string()))?;
        let started = Instant::now();
        loop {
            if started.elapsed() > DEADLINE {
                return Err(fail(format!(
                    "not read to its end within {} s",
                    DEADLINE.as_secs()
                )));
            }
            let Some(result) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = result.map_err(|e| fail(e.to_string()))?;
            let header = |name: &str| {
                message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == name)
                        .and_then(|h| std::str::from_utf8(h.value?).ok())
                        .map(str::to_string)
                })
            };
            let chunk = Chunk {
                key: message.key().unwrap_or_default(),
                id: header(ID_HEADER),
                index: header(INDEX_HEADER).and_then(|v| v.parse().ok()),
                count: header(COUNT_HEADER).and_then(|v| v.parse().ok()),
                hash: header(HASH_HEADER),
                payload: message.payload().unwrap_or_default(),
            };
            assembler.push(&chunk);
            if message.offset() >= high - 1 {
                return Ok(assembler.finish());
            }
        }
    }
}

/// One record of the state topic as the reader sees it.
struct Chunk<'a> {
    key: &'a [u8],
    id: Option<String>,
    index: Option<usize>,
    count: Option<usize>,
    hash: Option<String>,
    payload: &'a [u8],
}

/// Puts one partition's checkpoints back together from the records of its state-topic
/// partition, in offset order, keeping the newest complete one.
struct Assembler {
    key_prefix: String,
    partial: Option<Partial>,
    complete: Option<Vec<u8>>,
}

struct Partial {
    id: String,
    count: usize,
    hash: String,
    next: usize,
    bytes: Vec<u8>,
}

impl Assembler {
    fn new(key_prefix: String) -> Assembler {
        Assembler {
            key_prefix,
            partial: None,
            complete: None,
        }
    }

    fn push(&mut self, chunk: &Chunk<'_>) {
        // Other partitions, pipelines or groups sharing the topic partition.
        let Some(rest) = chunk.key.strip_prefix(self.key_prefix.as_bytes()) else {
            return;
        };
        let (Some(id), Some(index), Some(count), Some(hash)) =
            (&chunk.id, chunk.index, chunk.count, &chunk.hash)
        else {
            return;
        };
        if rest != index.to_string().as_bytes() {
            return;
        }
        if index == 0 {
            self.partial = Some(Partial {
                id: id.clone(),
                count,
                hash: hash.clone(),
                next: 0,
                bytes: Vec::new(),
            });
        }
        let continues = self
            .partial
            .as_ref()
            .is_some_and(|p| p.id == *id && p.next == index && p.count == count);
        if !continues {
            // A chunk out of sequence: whatever was being assembled is incomplete.
            self.partial = None;
            return;
        }
        let Some(partial) = self.partial.as_mut() else {
            return;
        };
        partial.bytes.extend_from_slice(chunk.payload);
        partial.next += 1;
        if partial.next == partial.count
            && let Some(done) = self.partial.take()
            && format!("{:016x}", hash_of(&done.bytes)) == done.hash
        {
            self.complete = Some(done.bytes);
        }
    }

    fn finish(self) -> Option<Vec<u8>> {
        self.complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "p/g/in-0/";

    /// A record as written: key, checkpoint id, chunk index and count, hash, payload.
    #[derive(Clone)]
    struct Stored {
        key: String,
        id: String,
        index: usize,
        count: usize,
        hash: String,
        payload: Vec<u8>,
    }

    fn chunks_of(id: &str, bytes: &[u8], size: usize) -> Vec<Stored> {
        let parts: Vec<&[u8]> = bytes.chunks(size).collect();
        let hash = format!("{:016x}", hash_of(bytes));
        parts
            .iter()
            .enumerate()
            .map(|(i, part)| Stored {
                key: format!("{PREFIX}{i}"),
                id: id.to_string(),
                index: i,
                count: parts.len(),
                hash: hash.clone(),
                payload: part.to_vec(),
            })
            .collect()
    }

    fn assemble(records: &[Stored]) -> Option<Vec<u8>> {
        let mut assembler = Assembler::new(PREFIX.to_string());
        for r in records {
            assembler.push(&Chunk {
                key: r.key.as_bytes(),
                id: Some(r.id.clone()),
                index: Some(r.index),
                count: Some(r.count),
                hash: Some(r.hash.clone()),
                payload: &r.payload,
            });
        }
        assembler.finish()
    }

    #[test]
    fn the_newest_complete_checkpoint_is_read() {
        let first: Vec<u8> = (0..100u8).collect();
        let second: Vec<u8> = (0..250u8).rev().collect();
        let mut records = chunks_of("a", &first, 30);
        records.extend(chunks_of("b", &second, 30));
        assert_eq!(assemble(&records), Some(second.clone()));
        assert_eq!(assemble(&chunks_of("a", &first, 1000)), Some(first.clone()));
        assert_eq!(assemble(&[]), None);
    }

    #[test]
    fn a_checkpoint_cut_short_or_interleaved_is_passed_over() {
        let first: Vec<u8> = (0..100u8).collect();
        let second: Vec<u8> = (100..200u8).collect();
        // Cut short by a crash: the one before stands.
        let mut records = chunks_of("a", &first, 30);
        let cut = chunks_of("b", &second, 30);
        records.extend_from_slice(&cut[..2]);
        assert_eq!(assemble(&records), Some(first.clone()));
        // Another writer's chunks in between: neither is complete in order.
        let mut mixed = Vec::new();
        for (x, y) in chunks_of("a", &first, 30)
            .into_iter()
            .zip(chunks_of("b", &second, 30))
        {
            mixed.push(x);
            mixed.push(y);
        }
        assert_eq!(assemble(&mixed), None);
        // A chunk whose bytes changed fails the hash.
        let mut damaged = chunks_of("a", &first, 30);
        damaged[1].payload[0] ^= 1;
        assert_eq!(assemble(&damaged), None);
    }

    #[test]
    fn other_partitions_and_pipelines_in_the_topic_partition_are_ignored() {
        let mine: Vec<u8> = (0..90u8).collect();
        let theirs: Vec<u8> = (0..50u8).collect();
        let mut records = Vec::new();
        for (x, mut y) in chunks_of("a", &mine, 30)
            .into_iter()
            .zip(chunks_of("z", &theirs, 17))
        {
            y.key = y.key.replace("in-0/", "in-10/");
            records.push(y);
            records.push(x);
        }
        assert_eq!(assemble(&records), Some(mine));
    }
}

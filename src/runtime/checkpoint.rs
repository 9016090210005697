//! Durable per-partition checkpoints in the state folder: the partition's engine state, the
//! next input offset it has not seen, and the pipeline watermark, written atomically.
//!
//! Order of work that makes at-least-once hold: outputs acknowledged, then the checkpoint file
//! synced, then the offset committed to Kafka. After a crash the consumer may restart from an
//! older committed offset; records below the checkpoint's offset are then skipped, because the
//! restored state already holds them. The service serialises the state on its processing
//! thread and hands the files to a background writer (one checkpoint in flight at a time);
//! the offsets are committed only after the writer has synced every file. With exactly-once
//! the checkpoint lives in the state topic alone, inside the transaction that commits its
//! offsets (`CheckpointStore::topic_only`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use super::state_topic::{StateTopic, StateTopicError};
use crate::config::Pipeline;

const MAGIC: &[u8; 8] = b"FSCKPT01";

#[derive(Debug, thiserror::Error)]
// The cause is part of each message and deliberately not a `source()`: messages are printed
// with their chain of sources, and it would appear twice.
pub enum CheckpointError {
    #[error("cannot write checkpoint {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write checkpoints in {path}: {cause}")]
    WriteDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot read checkpoint {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "checkpoint {path} was written by a different pipeline definition (features, windows or schema changed) \
         or by a build with another state layout; to rebuild the state from the input, move that folder away and \
         reset the consumer group's offsets to where the state should start (a new group_id starts with new \
         offsets and a new state folder of its own)"
    )]
    Incompatible { path: PathBuf },
    #[error("checkpoint {path} is damaged")]
    Damaged { path: PathBuf },
    #[error(
        "the checkpoint of partition {partition} in the state topic `{topic}` was written by a different pipeline \
         definition (features, windows or schema changed) or by a build with another state layout; to rebuild the \
         state from the input, use a new state topic (or delete this pipeline's records from it) and reset the \
         consumer group's offsets to where the state should start"
    )]
    IncompatibleInTopic { topic: String, partition: i32 },
    #[error("the checkpoint of partition {partition} in the state topic `{topic}` is damaged")]
    DamagedInTopic { topic: String, partition: i32 },
    /// The state topic could not be written or read: offsets stay uncommitted, and the next
    /// checkpoint tries again.
    #[error("{0}")]
    Topic(StateTopicError),
    #[error("cannot encode the state of partition {partition}: {cause}")]
    Encode {
        partition: i32,
        cause: crate::engine::SnapshotError,
    },
}

/// Why bytes are not a checkpoint this pipeline can use.
enum Decoded {
    Damaged,
    Incompatible,
}

pub struct Checkpoint {
    pub next_offset: i64,
    pub watermark: Option<i64>,
    pub state: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    topic: String,
    fingerprint: u64,
    /// Where checkpoints are also written, when `state.topic` is set.
    state_topic: Option<Arc<StateTopic>>,
    /// Exactly-once: checkpoints live only in the state topic, written inside the transaction
    /// that commits their offsets (a file written before the commit could be ahead of it).
    topic_only: bool,
}

/// Where a restored checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    StateDir,
    StateTopic,
}

impl CheckpointError {
    /// Whether the error is Kafka's (the state topic): worth retrying at the next checkpoint
    /// rather than stopping the service.
    pub fn is_state_topic(&self) -> bool {
        matches!(self, CheckpointError::Topic(_))
    }
}

/// Identifies what the state means: any change to features, windows, schema or time rules
/// makes old state unusable.
fn fingerprint(pipeline: &Pipeline) -> u64 {
    let definition = format!(
        "{:?}|{:?}|{}|{}|{}|{:?}|{:?}",
        pipeline.features,
        pipeline.source.schema,
        pipeline.source.entity,
        pipeline.source.event_time,
        pipeline.source.allowed_lateness_ms,
        pipeline.entity_ttl_ms,
        pipeline.emit()
    );
    fnv1a(definition.as_bytes())
}

/// FNV-1a: a hash with a fixed definition, so that every build (and machine) computes the same
/// value for the same bytes (a pipeline's fingerprint, an instance's transactional id).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl CheckpointStore {
    /// Checkpoints live in `root/<pipeline>/<group_id>/`: state goes with the offsets of the
    /// consumer group that built it, so a new group never starts from another group's state.
    pub fn new(root: &Path, pipeline: &Pipeline) -> CheckpointStore {
        let group: String = pipeline
            .source
            .kafka
            .group_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        CheckpointStore {
            dir: root.join(&pipeline.name).join(group),
            topic: pipeline.source.kafka.topic.clone(),
            fingerprint: fingerprint(pipeline),
            state_topic: None,
            topic_only: false,
        }
    }

    /// Also writes every checkpoint to `state_topic`, and restores from it when it holds a
    /// newer one than the state folder.
    pub fn with_state_topic(mut self, state_topic: StateTopic) -> CheckpointStore {
        self.state_topic = Some(Arc::new(state_topic));
        self
    }

    /// Keeps checkpoints in the state topic alone (exactly-once): no state-folder files are
    /// written or read.
    pub fn topic_only(mut self) -> CheckpointStore {
        self.topic_only = true;
        self
    }

    pub fn state_topic(&self) -> Option<&str> {
        self.state_topic.as_deref().map(StateTopic::name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, partition: i32) -> PathBuf {
        self.dir.join(format!("{}-{partition}.ckpt", self.topic))
    }

    /// The newest checkpoint of each of `partitions` that has one: the state folder's, or the
    /// state topic's when that one is further on (another instance had the partition since).
    /// `read_before` are the partitions the group has committed offsets for.
    pub fn load(
        &self,
        partitions: &[i32],
        read_before: &[i32],
    ) -> Result<BTreeMap<i32, (Checkpoint, Origin)>, CheckpointError> {
        let mut found = BTreeMap::new();
        let files: &[i32] = if self.topic_only { &[] } else { partitions };
        for &p in files {
            match self.load_file(p) {
                Ok(Some(checkpoint)) => {
                    found.insert(p, (checkpoint, Origin::StateDir));
                }
                Ok(None) => {}
                // With a state topic, a file that cannot be read is not the only copy.
                Err(e @ (CheckpointError::Damaged { .. } | CheckpointError::Read { .. }))
                    if self.state_topic.is_some() =>
                {
                    tracing::warn!("{e}; using the state topic's checkpoint instead.");
                }
                Err(e) => return Err(e),
            }
        }
        let Some(state_topic) = &self.state_topic else {
            return Ok(found);
        };
        // A partition the group has read before has state in the topic: if it is not where
        // it is looked for first, the topic looks in all of its partitions (a state-folder
        // file may be older).
        for (p, bytes) in state_topic
            .read(partitions, read_before)
            .map_err(CheckpointError::Topic)?
        {
            let checkpoint = self.decode(bytes).map_err(|e| match e {
                Decoded::Damaged => CheckpointError::DamagedInTopic {
                    topic: state_topic.name().to_string(),
                    partition: p,
                },
                Decoded::Incompatible => CheckpointError::IncompatibleInTopic {
                    topic: state_topic.name().to_string(),
                    partition: p,
                },
            })?;
            let newer = found
                .get(&p)
                .is_none_or(|(dir, _)| checkpoint.next_offset > dir.next_offset);
            if newer {
                found.insert(p, (checkpoint, Origin::StateTopic));
            }
        }
        Ok(found)
    }

    fn load_file(&self, partition: i32) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.path(partition);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(cause) => return Err(CheckpointError::Read { path, cause }),
        };
        self.decode(bytes).map(Some).map_err(|e| match e {
            Decoded::Damaged => CheckpointError::Damaged { path },
            Decoded::Incompatible => CheckpointError::Incompatible { path },
        })
    }

    /// A checkpoint from the bytes of its file.
    fn decode(&self, mut bytes: Vec<u8>) -> Result<Checkpoint, Decoded> {
        if bytes.len() < 32 || &bytes[..8] != MAGIC {
            return Err(Decoded::Damaged);
        }
        let word = |at: usize| -> Result<[u8; 8], Decoded> {
            bytes
                .get(at..at + 8)
                .and_then(|s| s.try_into().ok())
                .ok_or(Decoded::Damaged)
        };
        if u64::from_le_bytes(word(8)?) != self.fingerprint {
            return Err(Decoded::Incompatible);
        }
        let next_offset = i64::from_le_bytes(word(16)?);
        let watermark = i64::from_le_bytes(word(24)?);
        // The state is the rest: moved down in place rather than copied.
        bytes.drain(..32);
        Ok(Checkpoint {
            next_offset,
            watermark: (watermark != i64::MIN).then_some(watermark),
            state: bytes,
        })
    }

    /// The bytes of a checkpoint's file.
    fn encode(&self, checkpoint: &Checkpoint) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(32 + checkpoint.state.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.fingerprint.to_le_bytes());
        bytes.extend_from_slice(&checkpoint.next_offset.to_le_bytes());
        bytes.extend_from_slice(&checkpoint.watermark.unwrap_or(i64::MIN).to_le_bytes());
        bytes.extend_from_slice(&checkpoint.state);
        bytes
    }

    /// Checks at start-up that checkpoints can be written here, so that a wrong `state.dir`
    /// stops the service before it consumes anything rather than at its first checkpoint.
    pub fn check_writable(&self) -> Result<(), CheckpointError> {
        let probe = self
            .dir
            .join(format!(".write-check-{}.tmp", std::process::id()));
        let write = |cause| CheckpointError::WriteDir {
            path: self.dir.clone(),
            cause,
        };
        fs::create_dir_all(&self.dir).map_err(write)?;
        File::create(&probe)
            .and_then(|file| file.sync_all())
            .map_err(write)?;
        fs::remove_file(&probe).map_err(write)
    }

    pub fn save(&self, partition: i32, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        if self.topic_only
            && let Some(state_topic) = &self.state_topic
        {
            return state_topic
                .write(partition, &self.encode(checkpoint))
                .map_err(CheckpointError::Topic);
        }
        let path = self.path(partition);
        let write = |cause| CheckpointError::Write {
            path: path.clone(),
            cause,
        };
        fs::create_dir_all(&self.dir).map_err(write)?;
        let temp = self
            .dir
            .join(format!(".{}-{partition}.ckpt.tmp", self.topic));
        let bytes = self.encode(checkpoint);
        let mut file = File::create(&temp).map_err(write)?;
        file.write_all(&bytes).map_err(write)?;
        file.sync_all().map_err(write)?;
        fs::rename(&temp, &path).map_err(write)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
        if let Some(state_topic) = &self.state_topic {
            state_topic
                .write(partition, &bytes)
                .map_err(CheckpointError::Topic)?;
        }
        Ok(())
    }
}

//! Parquet outputs of the running service: periodic snapshots of every entity's features and,
//! with `feature_log: true`, every emitted update.
//!
//! Rule on failure: a snapshot or feature-log file that cannot be written keeps its data in
//! memory, is retried at the next checkpoint, and holds back the offset commit until it
//! succeeds. So the committed offsets never run ahead of what the Parquet files promise.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Pipeline;
use crate::engine::{Engine, FeatureValue};
use crate::io::parquet::{ParquetError, SnapshotBuilder, partition_dir, write_atomic};
use crate::telemetry;

pub struct ParquetOutputs {
    root: PathBuf,
    pipeline: String,
    every: Duration,
    last_snapshot: Option<Instant>,
    log: Option<SnapshotBuilder>,
    /// Feature-log batches not yet written (kept when a write fails).
    pending_log: Vec<arrow::record_batch::RecordBatch>,
    log_rows_limit: usize,
    pub files_written: u64,
    pub last_snapshot_path: Option<PathBuf>,
}

impl ParquetOutputs {
    pub fn new(pipeline: &Pipeline, root_override: Option<&Path>) -> Option<ParquetOutputs> {
        let sink = pipeline.sinks.parquet.as_ref()?;
        Some(ParquetOutputs {
            root: root_override.map_or_else(|| PathBuf::from(&sink.path), Path::to_path_buf),
            pipeline: pipeline.name.clone(),
            every: Duration::from_millis(sink.snapshot_every_ms.max(1) as u64),
            last_snapshot: None,
            log: sink.feature_log.then(|| SnapshotBuilder::new(pipeline)),
            pending_log: Vec::new(),
            log_rows_limit: 500_000,
            files_written: 0,
            last_snapshot_path: None,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Buffers one emitted update for the feature log.
    pub fn log_update(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]) {
        if let Some(log) = &mut self.log {
            log.push(entity, as_of, values);
        }
    }

    pub fn log_is_full(&self) -> bool {
        self.log
            .as_ref()
            .is_some_and(|l| l.rows() >= self.log_rows_limit)
    }

    pub fn snapshot_due(&self) -> bool {
        self.last_snapshot.is_none_or(|t| t.elapsed() >= self.every)
    }

    /// Writes the feature log (if any rows) and, when due or `force`, a snapshot. Returns
    /// false if anything failed; nothing is dropped in that case.
    pub fn flush(
        &mut self,
        pipeline: &Pipeline,
        engine: &Engine,
        now_ms: i64,
        force_snapshot: bool,
    ) -> bool {
        let mut ok = true;
        if let Some(log) = &mut self.log
            && log.rows() > 0
        {
            let full = std::mem::replace(log, SnapshotBuilder::new(pipeline));
            match full.finish(now_ms) {
                Ok(batch) => self.pending_log.push(batch),
                Err(e) => tracing::error!("Cannot assemble the feature log batch: {e}."),
            }
        }
        while let Some(batch) = self.pending_log.first() {
            let dir = partition_dir(&self.root, &format!("{}-updates", self.pipeline), now_ms);
            let name = format!("updates-{now_ms}-{}.parquet", self.files_written);
            match write_atomic(&dir, &name, batch) {
                Ok(_) => {
                    self.files_written += 1;
                    self.pending_log.remove(0);
                }
                Err(e) => {
                    tracing::error!(
                        "Cannot write the feature log: {e}. Keeping the rows and retrying at the next checkpoint."
                    );
                    metrics::counter!(telemetry::SNAPSHOT_FAILURES, "pipeline" => self.pipeline.clone()).increment(1);
                    ok = false;
                    break;
                }
            }
        }
        if force_snapshot || self.snapshot_due() {
            let started = Instant::now();
            let mut rows = SnapshotBuilder::new(pipeline);
            engine.for_each_entity(|entity, as_of, values| rows.push(entity, as_of, values));
            match self.write_snapshot(rows, now_ms) {
                Ok(path) => {
                    metrics::histogram!(telemetry::SNAPSHOT_DURATION, "pipeline" => self.pipeline.clone())
                        .record(started.elapsed().as_secs_f64());
                    if let Ok(meta) = std::fs::metadata(&path) {
                        metrics::gauge!(telemetry::SNAPSHOT_BYTES, "pipeline" => self.pipeline.clone()).set(meta.len() as f64);
                    }
                    tracing::info!(path = %path.display(), "Wrote a Parquet snapshot.");
                    self.last_snapshot = Some(Instant::now());
                    self.last_snapshot_path = Some(path);
                }
                Err(e) => {
                    tracing::error!(
                        "Cannot write a Parquet snapshot: {e}. Offsets are not committed until a snapshot succeeds."
                    );
                    metrics::counter!(telemetry::SNAPSHOT_FAILURES, "pipeline" => self.pipeline.clone()).increment(1);
                    ok = false;
                }
            }
        }
        ok
    }

    fn write_snapshot(
        &mut self,
        rows: SnapshotBuilder,
        now_ms: i64,
    ) -> Result<PathBuf, ParquetError> {
        let batch = rows.finish(now_ms).map_err(|e| ParquetError::Read {
            path: self.root.clone(),
            message: e.to_string(),
        })?;
        let dir = partition_dir(&self.root, &self.pipeline, now_ms);
        let path = write_atomic(&dir, &format!("snapshot-{now_ms}.parquet"), &batch)?;
        self.files_written += 1;
        Ok(path)
    }
}

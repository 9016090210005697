//! `featurestream replay`: the streaming operators over a file of historical events.
//!
//! Events are processed in file order as one input partition, so the records are exactly those
//! a stream of the same events in the same order produces. Outputs in the output folder:
//! `features.jsonl` (every emitted record), `rejected.jsonl` (every rejected or dead-lettered
//! late event with its reason), `summary.json`, a Parquet snapshot of every entity's final
//! features under `parquet/<pipeline>/date=.../hour=.../`, and, when the pipeline sets
//! `sinks.parquet.feature_log: true`, every update as Parquet under `parquet/<pipeline>-updates/`
//! (the layout the service writes, so the same readers work on both).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::config::{OnLate, Pipeline};
use crate::decode::json::JsonDecoder;
use crate::decode::{DecodedEvent, RejectReason, Rejection, check_not_future, finish_event};
use crate::engine::{Engine, FeatureValue, Outcome, RecordSink};
use crate::io::jsonl::LineReader;
use crate::io::parquet::{ParquetEvents, SnapshotBuilder, partition_dir, write_atomic};
use crate::output::{write_update, write_window_closed};

/// Rows per file of the Parquet feature log, as the service writes it.
const LOG_ROWS_PER_FILE: usize = 500_000;

/// The Parquet feature log of a replay: every emitted update, in files of at most
/// [`LOG_ROWS_PER_FILE`] rows, each partitioned by (and its `snapshot_time` set to) the newest
/// `as_of` it holds.
struct UpdateLog {
    pipeline: Arc<Pipeline>,
    root: PathBuf,
    rows: SnapshotBuilder,
    newest_as_of: i64,
    written: Vec<PathBuf>,
}

impl UpdateLog {
    fn push(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]) -> anyhow::Result<()> {
        self.rows.push(entity, as_of, values);
        self.newest_as_of = self.newest_as_of.max(as_of);
        if self.rows.rows() >= LOG_ROWS_PER_FILE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.rows.rows() == 0 {
            return Ok(());
        }
        let rows = std::mem::replace(&mut self.rows, SnapshotBuilder::new(&self.pipeline));
        let time = self.newest_as_of;
        let batch = rows.finish(time)?;
        let dir = partition_dir(&self.root, &format!("{}-updates", self.pipeline.name), time);
        let name = format!("updates-{time}-{}.parquet", self.written.len());
        self.written.push(write_atomic(&dir, &name, &batch)?);
        Ok(())
    }
}

/// Writes emitted records as JSON lines (and updates to the Parquet feature log, if any).
pub struct JsonlSink<W: Write> {
    pipeline: Arc<Pipeline>,
    out: W,
    line: String,
    log: Option<UpdateLog>,
    pub records: u64,
    pub error: Option<std::io::Error>,
    /// The first feature-log write that failed; the log stops there.
    log_error: Option<anyhow::Error>,
}

impl<W: Write> JsonlSink<W> {
    pub fn new(pipeline: Arc<Pipeline>, out: W) -> Self {
        JsonlSink {
            pipeline,
            out,
            line: String::with_capacity(256),
            log: None,
            records: 0,
            error: None,
            log_error: None,
        }
    }

    fn write_line(&mut self) {
        self.line.push('\n');
        if self.error.is_none()
            && let Err(e) = self.out.write_all(self.line.as_bytes())
        {
            self.error = Some(e);
        }
        self.records += 1;
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> RecordSink for JsonlSink<W> {
    fn update(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]) {
        self.line.clear();
        write_update(&mut self.line, &self.pipeline, entity, as_of, values);
        self.write_line();
        if self.log_error.is_none()
            && let Some(log) = &mut self.log
            && let Err(e) = log.push(entity, as_of, values)
        {
            self.log_error = Some(e);
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
        self.line.clear();
        write_window_closed(
            &mut self.line,
            &self.pipeline,
            entity,
            feature,
            start,
            end,
            value,
        );
        self.write_line();
    }
}

/// Counts that reconcile: `read = aggregated + rejected + late`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    pub read: u64,
    /// Empty or whitespace-only lines of a JSONL input: skipped, and not counted as read.
    pub blank_lines: u64,
    pub aggregated: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub late: u64,
    pub records: u64,
    pub entities: usize,
    pub state_bytes: usize,
    pub watermark: Option<String>,
    pub snapshot: Option<PathBuf>,
    /// The folder and number of files of the Parquet feature log
    /// (`sinks.parquet.feature_log: true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_log: Option<PathBuf>,
    pub feature_log_files: usize,
    /// The first rejected event: its line (or row) and why, to point at a wrong input quickly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_rejection: Option<String>,
    #[serde(skip)]
    pub elapsed: Duration,
}

impl ReplaySummary {
    pub fn reconciles(&self) -> bool {
        self.read == self.aggregated + self.rejected + self.late
    }

    /// True when events were read and not one of them could be decoded: almost always an
    /// input that is not this pipeline's events (another file, another schema, not JSON).
    pub fn all_rejected(&self) -> bool {
        self.read > 0 && self.rejected == self.read
    }
}

#[derive(Serialize)]
struct RejectedLine<'a> {
    line: u64,
    reason: &'static str,
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

struct Rejects {
    out: BufWriter<File>,
}

impl Rejects {
    fn write(&mut self, line: u64, rejection: &Rejection, payload: &[u8]) -> anyhow::Result<()> {
        let (text, b64) = match std::str::from_utf8(payload) {
            Ok(text) => (Some(text), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(payload)),
            ),
        };
        let record = RejectedLine {
            line,
            reason: rejection.reason.as_str(),
            error: &rejection.message,
            payload: text,
            payload_base64: b64,
        };
        serde_json::to_writer(&mut self.out, &record)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }
}

/// Where replayed events come from.
enum Input {
    Lines(LineReader),
    Parquet(ParquetEvents),
}

/// Runs the pipeline over `input` (JSONL, JSONL.gz or Parquet) and writes into `output`.
pub fn replay(
    pipeline: Arc<Pipeline>,
    input: &Path,
    output: &Path,
    progress: bool,
) -> anyhow::Result<ReplaySummary> {
    let started = Instant::now();
    if let Some(clash) = output_replacing(input, output, &pipeline.name) {
        anyhow::bail!(
            "the input {} is one of the files this replay writes ({}): it would be replaced before it is read; copy it elsewhere or choose another --output",
            input.display(),
            clash.display()
        );
    }
    let is_parquet = input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    // The input is opened before the output folder is touched: a wrong path changes nothing.
    let mut input_source = if is_parquet {
        Input::Parquet(ParquetEvents::open(input)?)
    } else {
        Input::Lines(
            LineReader::open(input)
                .with_context(|| format!("cannot open input {}", input.display()))?,
        )
    };
    fs::create_dir_all(output)
        .with_context(|| format!("cannot create output folder {}", output.display()))?;
    // An earlier run's summary goes first: if this run fails, no summary describes outputs it
    // has partly replaced.
    let summary_path = output.join("summary.json");
    match fs::remove_file(&summary_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(
                anyhow::Error::new(e).context(format!("cannot replace {}", summary_path.display()))
            );
        }
        _ => {}
    }
    let features_path = output.join("features.jsonl");
    let features_file = File::create(&features_path)
        .with_context(|| format!("cannot create {}", features_path.display()))?;
    let mut sink = JsonlSink::new(
        Arc::clone(&pipeline),
        BufWriter::with_capacity(1 << 20, features_file),
    );
    let parquet_root = output.join("parquet");
    if pipeline
        .sinks
        .parquet
        .as_ref()
        .is_some_and(|p| p.feature_log)
    {
        sink.log = Some(UpdateLog {
            pipeline: Arc::clone(&pipeline),
            root: parquet_root.clone(),
            rows: SnapshotBuilder::new(&pipeline),
            newest_as_of: i64::MIN,
            written: Vec::new(),
        });
    }
    let rejected_path = output.join("rejected.jsonl");
    let mut rejects = Rejects {
        out: BufWriter::new(
            File::create(&rejected_path)
                .with_context(|| format!("cannot create {}", rejected_path.display()))?,
        ),
    };
    let mut engine = Engine::new(Arc::clone(&pipeline));
    engine.assign(0, 0);
    let mut summary = ReplaySummary::default();
    let mut reasons: BTreeMap<RejectReason, u64> = BTreeMap::new();
    // History is in the past of the wall clock; an event after it has a wrong time.
    let clock = crate::runtime::now_ms();

    let mut handle = |summary: &mut ReplaySummary,
                      engine: &mut Engine,
                      sink: &mut JsonlSink<BufWriter<File>>,
                      line: u64,
                      decoded: Result<DecodedEvent<'_>, Rejection>,
                      payload: &[u8]|
     -> anyhow::Result<()> {
        summary.read += 1;
        let decoded = decoded.and_then(|event| {
            check_not_future(&pipeline.source, event.time_ms, clock).map(|()| event)
        });
        match decoded {
            Err(rejection) => {
                summary.rejected += 1;
                *reasons.entry(rejection.reason).or_default() += 1;
                if summary.first_rejection.is_none() {
                    summary.first_rejection = Some(format!(
                        "line {line}: {} ({})",
                        rejection.message,
                        rejection.reason.as_str()
                    ));
                }
                rejects.write(line, &rejection, payload)?;
            }
            Ok(event) => match engine.process(0, &event, 0, sink) {
                Outcome::Aggregated => summary.aggregated += 1,
                Outcome::Late { watermark } => {
                    summary.late += 1;
                    if pipeline.source.on_late == OnLate::Dlq {
                        let message = format!(
                            "event time {} is older than the watermark {} minus allowed lateness",
                            crate::decode::time::format_rfc3339_ms(event.time_ms),
                            crate::decode::time::format_rfc3339_ms(watermark)
                        );
                        rejects.write(
                            line,
                            &Rejection::new(RejectReason::Late, message),
                            payload,
                        )?;
                    }
                }
            },
        }
        if let Some(e) = sink.error.take() {
            return Err(
                anyhow::Error::new(e).context(format!("cannot write {}", features_path.display()))
            );
        }
        if let Some(e) = sink.log_error.take() {
            return Err(e.context("cannot write the Parquet feature log"));
        }
        Ok(())
    };

    match &mut input_source {
        Input::Parquet(rows) => {
            let mut line = 0u64;
            while let Some(row) = rows.next_row(&pipeline) {
                let row = row?;
                line += 1;
                let decoded = match row.values {
                    Ok(values) => finish_event(&pipeline.source, values),
                    Err(message) => Err(Rejection::new(RejectReason::Schema, message)),
                };
                handle(
                    &mut summary,
                    &mut engine,
                    &mut sink,
                    line,
                    decoded,
                    row.json.as_bytes(),
                )?;
            }
        }
        Input::Lines(reader) => {
            let decoder = JsonDecoder::new(&pipeline.source);
            let bar = progress.then(|| {
                let bar = ProgressBar::new(reader.total_bytes);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            });
            let mut buf = Vec::with_capacity(1024);
            let mut line = 0u64;
            // Enough of a line to know it is too large: longer ones are not held in memory.
            let max_bytes = pipeline.source.max_event_bytes;
            while let Some(length) = reader
            .next_line(&mut buf, max_bytes.saturating_add(1))
            .with_context(|| {
                format!(
                    "cannot read {} after line {line} (the lines before it were processed; its outputs are incomplete)",
                    input.display()
                )
            })?
        {
            line += 1;
            if length == buf.len() && buf.iter().all(u8::is_ascii_whitespace) {
                summary.blank_lines += 1;
                continue;
            }
            let decoded = if length > buf.len() {
                Err(Rejection::new(
                    RejectReason::TooLarge,
                    format!(
                        "event is {length} bytes, more than source.max_event_bytes ({max_bytes}); its first {} bytes are kept here",
                        buf.len()
                    ),
                ))
            } else {
                decoder.decode(&buf)
            };
            handle(&mut summary, &mut engine, &mut sink, line, decoded, &buf)?;
            if let Some(bar) = &bar
                && line.is_multiple_of(8192)
            {
                bar.set_position(reader.bytes_read());
                bar.set_message(format!("{} events", summary.read));
            }
        }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        }
    }

    summary.records = sink.records;
    let written_log = match sink.log.take() {
        Some(mut log) => {
            log.flush()
                .context("cannot write the Parquet feature log")?;
            log.written
        }
        None => Vec::new(),
    };
    summary.feature_log_files = written_log.len();
    if !written_log.is_empty() {
        summary.feature_log = Some(parquet_root.join(format!("{}-updates", pipeline.name)));
    }
    let mut out = sink.into_inner();
    out.flush()
        .with_context(|| format!("cannot write {}", features_path.display()))?;
    rejects
        .out
        .flush()
        .with_context(|| format!("cannot write {}", rejected_path.display()))?;
    summary.rejected_by_reason = reasons
        .into_iter()
        .map(|(r, n)| (r.as_str().to_string(), n))
        .collect();

    let stats = engine.state_stats();
    summary.entities = stats.entities;
    summary.state_bytes = stats.bytes;
    summary.watermark = engine
        .watermark()
        .map(crate::decode::time::format_rfc3339_ms);

    // The final snapshot: every entity as of the end of the history, which is the newest
    // `as_of` among them (the feature log's files are stamped the same way). None when no
    // entity is left (no event aggregated, or every entity expired).
    let mut newest_as_of: Option<i64> = None;
    let mut rows = SnapshotBuilder::new(&pipeline);
    engine.for_each_entity(|entity, as_of, values| {
        newest_as_of = Some(newest_as_of.map_or(as_of, |n| n.max(as_of)));
        rows.push(entity, as_of, values);
    });
    let snapshot = match newest_as_of {
        Some(snapshot_time) => {
            let batch = rows.finish(snapshot_time)?;
            let dir = partition_dir(&parquet_root, &pipeline.name, snapshot_time);
            Some(write_atomic(
                &dir,
                &format!("snapshot-{snapshot_time}.parquet"),
                &batch,
            )?)
        }
        None => None,
    };
    // Only now, with this replay's files written: a replay that fails earlier removes nothing.
    for (folder, prefix, keep) in [
        (pipeline.name.clone(), "snapshot-", snapshot.as_slice()),
        (
            format!("{}-updates", pipeline.name),
            "updates-",
            &written_log[..],
        ),
    ] {
        let root = parquet_root.join(folder);
        remove_earlier_outputs(&root, prefix, keep).with_context(|| {
            format!(
                "cannot remove an earlier replay's files under {}",
                root.display()
            )
        })?;
    }
    summary.snapshot = snapshot;
    summary.elapsed = started.elapsed();

    fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary)? + "\n",
    )
    .with_context(|| format!("cannot write {}", summary_path.display()))?;
    Ok(summary)
}

/// The output that `input` is, if it is one this replay would replace: `features.jsonl`,
/// `rejected.jsonl` or `summary.json` in `output`, or a Parquet file under the pipeline's
/// folders in `output/parquet/` (earlier outputs there are removed). Compared by file identity,
/// so another path to the same file (a link, `..`) is found too.
fn output_replacing(input: &Path, output: &Path, pipeline: &str) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let input_meta = fs::metadata(input).ok()?;
    let same_file = |candidate: &Path| {
        fs::metadata(candidate)
            .is_ok_and(|m| m.dev() == input_meta.dev() && m.ino() == input_meta.ino())
    };
    let replaced_files = ["features.jsonl", "rejected.jsonl", "summary.json"];
    if let Some(clash) = replaced_files
        .iter()
        .map(|name| output.join(name))
        .find(|path| same_file(path))
    {
        return Some(clash);
    }
    let input = fs::canonicalize(input).ok()?;
    let parquet = fs::canonicalize(output.join("parquet")).ok()?;
    [pipeline.to_string(), format!("{pipeline}-updates")]
        .iter()
        .map(|folder| parquet.join(folder))
        .find(|folder| input.starts_with(folder))
}

/// Removes what an earlier replay into the same folder wrote for this pipeline (files named
/// `<prefix>*.parquet` under `root/date=*/hour=*/` other than `keep`, and folders left empty),
/// so that the folder describes one replay. Nothing else is touched.
fn remove_earlier_outputs(root: &Path, prefix: &str, keep: &[PathBuf]) -> std::io::Result<()> {
    let partitions = |dir: &Path, prefix: &str| -> std::io::Result<Vec<PathBuf>> {
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir()
                && entry.file_name().to_string_lossy().starts_with(prefix)
            {
                found.push(entry.path());
            }
        }
        Ok(found)
    };
    for date in partitions(root, "date=")? {
        for hour in partitions(&date, "hour=")? {
            for entry in fs::read_dir(&hour)? {
                let entry = entry?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let path = entry.path();
                if name.starts_with(prefix) && name.ends_with(".parquet") && !keep.contains(&path) {
                    fs::remove_file(path)?;
                }
            }
            // Only succeeds when nothing else is in it.
            let _ = fs::remove_dir(&hour);
        }
        let _ = fs::remove_dir(&date);
    }
    Ok(())
}

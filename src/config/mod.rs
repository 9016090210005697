//! Pipeline files: the typed pipeline spec, and the compiler that turns a YAML file into it while
//! collecting every problem at once (`validate`). Nothing here depends on Kafka or Parquet.

mod compile;
pub mod duration;
pub mod expr;
pub mod yaml;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

pub use compile::compile_source;
pub use expr::{CmpOp, Expr, Literal, Operand};

/// A field type declared in `source.schema`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    String,
    Int,
    Float,
    Bool,
    Timestamp,
}

impl FieldType {
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
        }
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, FieldType::Int | FieldType::Float)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldDef {
    pub name: String,
    pub ty: FieldType,
    /// Required fields reject the event (`missing_field`) when absent or null.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub fields: Vec<FieldDef>,
}

impl Schema {
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Avro,
    AvroConfluent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOffset {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLate {
    Drop,
    Dlq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    OnUpdate,
    OnWindowClose,
}

/// A value that must never reach a log line (SASL passwords in librdkafka options).
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// librdkafka settings passed through untouched; values of keys that look secret are redacted
/// when printed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KafkaOptions(pub BTreeMap<String, Secret>);

impl KafkaOptions {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.0.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSource {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub start: StartOffset,
    pub options: KafkaOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Source {
    pub kafka: KafkaSource,
    pub format: Format,
    pub schema_registry: Option<String>,
    /// The Avro writer schema (JSON text) for `format: avro`.
    pub avro_schema: Option<String>,
    pub schema: Schema,
    /// Index into `schema.fields`.
    pub entity: usize,
    /// Index into `schema.fields`; always a timestamp field.
    pub event_time: usize,
    pub max_out_of_order_ms: i64,
    pub idle_timeout_ms: i64,
    /// Events stamped further than this ahead of the wall clock are rejected as `future`
    /// (`None`: never): one such event would carry the watermark ahead of every real event.
    pub max_future_ms: Option<i64>,
    pub allowed_lateness_ms: i64,
    pub on_late: OnLate,
    /// Events larger than this are rejected as `too_large` before decoding.
    pub max_event_bytes: usize,
}

/// The window a feature aggregates over, normalised: tumbling and sliding are hopping windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Windows `[s, s + size)` for every multiple `s` of `step`; `size % step == 0`.
    Hopping {
        size_ms: i64,
        step_ms: i64,
        written: WindowWritten,
    },
    Session {
        gap_ms: i64,
    },
    Lifetime,
}

/// How the user wrote a hopping window, for messages and docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowWritten {
    Tumbling,
    Hopping,
    Sliding,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Agg {
    Count,
    Sum,
    Mean,
    Min,
    Max,
    Stddev,
    Variance,
    StddevPop,
    VariancePop,
    DistinctCount,
    First,
    Last,
    Percentile(f64),
}

impl Agg {
    pub const NAMES: [&'static str; 13] = [
        "count",
        "sum",
        "mean",
        "min",
        "max",
        "stddev",
        "variance",
        "stddev_pop",
        "variance_pop",
        "distinct_count",
        "first",
        "last",
        "percentile",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Agg::Count => "count",
            Agg::Sum => "sum",
            Agg::Mean => "mean",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Stddev => "stddev",
            Agg::Variance => "variance",
            Agg::StddevPop => "stddev_pop",
            Agg::VariancePop => "variance_pop",
            Agg::DistinctCount => "distinct_count",
            Agg::First => "first",
            Agg::Last => "last",
            Agg::Percentile(_) => "percentile",
        }
    }
}

/// The type of a feature's value, as it appears in records and Parquet columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Int,
    Float,
    Bool,
    String,
    Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub name: String,
    pub agg: Agg,
    /// Index into the schema of the aggregated field.
    pub field: Option<usize>,
    pub filter: Option<Expr>,
    pub window: Window,
    pub value_type: ValueType,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSink {
    pub topic: String,
    pub format: Format,
    pub emit: Emit,
    pub options: KafkaOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParquetSink {
    pub path: String,
    pub snapshot_every_ms: i64,
    pub feature_log: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sinks {
    pub kafka: Option<KafkaSink>,
    pub parquet: Option<ParquetSink>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub name: String,
    pub source: Source,
    pub features: Vec<Feature>,
    pub sinks: Sinks,
    pub dead_letter_topic: Option<String>,
    /// `None` means entities never expire.
    pub entity_ttl_ms: Option<i64>,
    /// Where `run` keeps its per-partition checkpoints.
    pub state_dir: String,
    /// How often `run` makes outputs durable, saves state and commits input offsets.
    pub checkpoint_every_ms: i64,
    /// A Kafka topic that also holds every checkpoint, so that state follows a partition to an
    /// instance without the state folder it was written to.
    pub state_topic: Option<String>,
    /// What `run` promises about its outputs after a failure.
    pub guarantee: Guarantee,
}

/// Delivery guarantee of `run` (`guarantee:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// Offsets committed after outputs are acknowledged and state is durable: after a failure
    /// some outputs are sent again, with identical values.
    AtLeastOnce,
    /// Outputs, dead letters, state changes (in the state topic) and offsets of each
    /// checkpoint interval in one Kafka transaction: a `read_committed` consumer sees every
    /// output once.
    ExactlyOnce,
}

impl Pipeline {
    pub fn emit(&self) -> Emit {
        self.sinks.kafka.as_ref().map_or(Emit::OnUpdate, |k| k.emit)
    }

    /// Loads and compiles a pipeline file; every problem in it is reported at once.
    pub fn load(path: &Path) -> Result<Pipeline, ConfigErrors> {
        let file = path.display().to_string();
        let source = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: file.clone(),
            errors: vec![ConfigError {
                pos: yaml::Pos::default(),
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        compile_source(&file, &source)
    }
}

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub pos: yaml::Pos,
    /// Dotted path of the field, e.g. `features[2].window`.
    pub path: String,
    pub message: String,
}

/// Every problem found in one pipeline file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors {
    pub file: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if e.pos.line > 0 {
                write!(f, "{}:{}:{}: ", self.file, e.pos.line, e.pos.col)?;
            } else {
                write!(f, "{}: ", self.file)?;
            }
            if !e.path.is_empty() {
                write!(f, "{}: ", e.path)?;
            }
            write!(f, "{}", e.message)?;
        }
        Ok(())
    }
}

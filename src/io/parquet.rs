//! Parquet: feature snapshots (one row per entity, typed columns) written so that a reader never
//! sees a partial file, and event files read as replay input.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float32Array, Float64Array, Float64Builder,
    Int8Array, Int16Array, Int32Array, Int64Array, Int64Builder, LargeStringArray, StringArray,
    StringBuilder, TimestampMicrosecondArray, TimestampMillisecondArray,
    TimestampMillisecondBuilder, TimestampNanosecondArray, TimestampSecondArray, UInt8Array,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::config::{Pipeline, ValueType};
use crate::decode::time::date_and_hour;
use crate::decode::{Value, coerce};
use crate::engine::FeatureValue;

#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot encode Parquet for {path}: {source}")]
    Encode {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("cannot read Parquet file {path}: {message}")]
    Read { path: PathBuf, message: String },
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn arrow_type(ty: ValueType) -> DataType {
    match ty {
        ValueType::Int => DataType::Int64,
        ValueType::Float => DataType::Float64,
        ValueType::Bool => DataType::Boolean,
        ValueType::String => DataType::Utf8,
        ValueType::Timestamp => timestamp_type(),
    }
}

/// The snapshot columns: `entity`, one per feature, `as_of`, `snapshot_time`.
pub fn snapshot_schema(pipeline: &Pipeline) -> SchemaRef {
    let mut fields = vec![Field::new("entity", DataType::Utf8, false)];
    for feature in &pipeline.features {
        fields.push(Field::new(
            &feature.name,
            arrow_type(feature.value_type),
            true,
        ));
    }
    fields.push(Field::new("as_of", timestamp_type(), false));
    fields.push(Field::new("snapshot_time", timestamp_type(), false));
    Arc::new(Schema::new(fields))
}

enum Column {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
    Ts(TimestampMillisecondBuilder),
}

impl Column {
    fn new(ty: ValueType) -> Column {
        match ty {
            ValueType::Int => Column::Int(Int64Builder::new()),
            ValueType::Float => Column::Float(Float64Builder::new()),
            ValueType::Bool => Column::Bool(BooleanBuilder::new()),
            ValueType::String => Column::Str(StringBuilder::new()),
            ValueType::Timestamp => {
                Column::Ts(TimestampMillisecondBuilder::new().with_timezone("UTC"))
            }
        }
    }

    fn append(&mut self, value: &FeatureValue) {
        match (self, value) {
            (Column::Int(b), FeatureValue::Int(i)) => b.append_value(*i),
            (Column::Float(b), FeatureValue::Float(f)) => b.append_value(*f),
            (Column::Float(b), FeatureValue::Int(i)) => b.append_value(*i as f64),
            (Column::Bool(b), FeatureValue::Bool(v)) => b.append_value(*v),
            (Column::Str(b), FeatureValue::Str(s)) => b.append_value(s),
            (Column::Ts(b), FeatureValue::Ts(t) | FeatureValue::Int(t)) => b.append_value(*t),
            (Column::Int(b), _) => b.append_null(),
            (Column::Float(b), _) => b.append_null(),
            (Column::Bool(b), _) => b.append_null(),
            (Column::Str(b), _) => b.append_null(),
            (Column::Ts(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Int(b) => Arc::new(b.finish()),
            Column::Float(b) => Arc::new(b.finish()),
            Column::Bool(b) => Arc::new(b.finish()),
            Column::Str(b) => Arc::new(b.finish()),
            Column::Ts(b) => Arc::new(b.finish().with_timezone("UTC")),
        }
    }
}

/// Collects snapshot rows for one pipeline.
pub struct SnapshotBuilder {
    schema: SchemaRef,
    entity: StringBuilder,
    features: Vec<Column>,
    as_of: TimestampMillisecondBuilder,
    rows: usize,
}

impl SnapshotBuilder {
    pub fn new(pipeline: &Pipeline) -> Self {
        SnapshotBuilder {
            schema: snapshot_schema(pipeline),
            entity: StringBuilder::new(),
            features: pipeline
                .features
                .iter()
                .map(|f| Column::new(f.value_type))
                .collect(),
            as_of: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            rows: 0,
        }
    }

    pub fn push(&mut self, entity: &str, as_of: i64, values: &[FeatureValue]) {
        self.entity.append_value(entity);
        for (column, value) in self.features.iter_mut().zip(values) {
            column.append(value);
        }
        self.as_of.append_value(as_of);
        self.rows += 1;
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn finish(mut self, snapshot_time: i64) -> Result<RecordBatch, arrow::error::ArrowError> {
        let mut columns: Vec<ArrayRef> = vec![Arc::new(self.entity.finish())];
        columns.extend(self.features.iter_mut().map(Column::finish));
        columns.push(Arc::new(self.as_of.finish().with_timezone("UTC")));
        let times =
            TimestampMillisecondArray::from(vec![snapshot_time; self.rows]).with_timezone("UTC");
        columns.push(Arc::new(times));
        RecordBatch::try_new(self.schema, columns)
    }
}

/// The folder a snapshot taken at `time` goes to: `<root>/<pipeline>/date=YYYY-MM-DD/hour=HH`.
pub fn partition_dir(root: &Path, pipeline: &str, time: i64) -> PathBuf {
    let (date, hour) = date_and_hour(time);
    root.join(pipeline)
        .join(format!("date={date}"))
        .join(format!("hour={hour:02}"))
}

/// Writes `batch` to `dir/name` atomically: a hidden temporary file in the same folder is
/// written, synced and renamed, so readers see the whole file or nothing.
pub fn write_atomic(dir: &Path, name: &str, batch: &RecordBatch) -> Result<PathBuf, ParquetError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ParquetError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let final_path = dir.join(name);
    let temp_path = dir.join(format!(".{name}.tmp"));
    let file = File::create(&temp_path).map_err(io(&temp_path))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let encode = |source| ParquetError::Encode {
        path: final_path.clone(),
        source,
    };
    let result = (|| {
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(encode)?;
        writer.write(batch).map_err(encode)?;
        let file = writer.into_inner().map_err(encode)?;
        file.sync_all().map_err(io(&temp_path))?;
        fs::rename(&temp_path, &final_path).map_err(io(&final_path))?;
        // Make the rename itself durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(final_path.clone())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp_path);
    }
    result
}

/// Reads rows of events from a Parquet file: for each row, the declared fields by column name
/// (absent columns are null), already checked against the declared types.
pub struct ParquetEvents {
    batches: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    current: Option<RecordBatch>,
    /// For each declared field, its column in the current batch, in a type [`cell`] reads.
    columns: Vec<Option<ArrayRef>>,
    row: usize,
    path: PathBuf,
}

/// One row: its values, or the error of the first field that did not fit its type, and the
/// row rendered as JSON (the payload of a rejection).
pub struct ParquetRow<'a> {
    pub values: Result<Vec<Value<'a>>, String>,
    pub json: String,
}

impl ParquetEvents {
    pub fn open(path: &Path) -> Result<ParquetEvents, ParquetError> {
        let read_err = |message: String| ParquetError::Read {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| read_err(e.to_string()))?;
        let batches = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.with_batch_size(8192).build())
            .map_err(|e| read_err(e.to_string()))?;
        Ok(ParquetEvents {
            batches,
            current: None,
            columns: Vec::new(),
            row: 0,
            path: path.to_path_buf(),
        })
    }

    /// The next row, typed against `pipeline`'s schema; `None` at the end.
    pub fn next_row(
        &mut self,
        pipeline: &Pipeline,
    ) -> Option<Result<ParquetRow<'_>, ParquetError>> {
        loop {
            if let Some(batch) = &self.current
                && self.row < batch.num_rows()
            {
                break;
            }
            match self.batches.next()? {
                Err(e) => {
                    return Some(Err(ParquetError::Read {
                        path: self.path.clone(),
                        message: e.to_string(),
                    }));
                }
                Ok(batch) => {
                    let schema = batch.schema();
                    self.columns = pipeline
                        .source
                        .schema
                        .fields
                        .iter()
                        .map(|f| {
                            let index = schema.index_of(&f.name).ok()?;
                            Some(readable(batch.column(index)))
                        })
                        .collect();
                    self.current = Some(batch);
                    self.row = 0;
                }
            }
        }
        let row = self.row;
        self.row += 1;
        let mut values = Vec::with_capacity(self.columns.len());
        let mut error = None;
        let mut json = serde_json::Map::new();
        for (def, column) in pipeline.source.schema.fields.iter().zip(&self.columns) {
            let raw = column
                .as_ref()
                .map_or(Ok(Value::Null), |c| cell(c.as_ref(), row));
            let raw = match raw {
                Ok(v) => v,
                Err(found) => {
                    error.get_or_insert(format!(
                        "field `{}` has unsupported Parquet type {found}",
                        def.name
                    ));
                    Value::Null
                }
            };
            json.insert(def.name.clone(), to_json(&raw));
            match coerce(&def.name, def.ty, raw) {
                Ok(v) => values.push(v.into_owned()),
                Err(message) => {
                    error.get_or_insert(message);
                    values.push(Value::Null);
                }
            }
        }
        let json = serde_json::Value::Object(json).to_string();
        Some(Ok(ParquetRow {
            values: error.map_or(Ok(values), Err),
            json,
        }))
    }
}

fn to_json(value: &Value<'_>) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Str(s) => serde_json::Value::String(s.to_string()),
        Value::Int(i) | Value::Ts(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Value::from(*f),
        Value::Bool(b) => serde_json::Value::Bool(*b),
    }
}

/// A column in a type [`cell`] reads: dictionary-encoded columns (pandas categories) decoded,
/// decimals and half floats as float64, string views as strings, dates as timestamps. Any
/// other type, or a cast that fails, is left as it is (and its cells are reported).
fn readable(column: &ArrayRef) -> ArrayRef {
    let mut column = Arc::clone(column);
    // Twice at most: a dictionary of decimals becomes decimals, then floats.
    for _ in 0..2 {
        let target = match column.data_type() {
            DataType::Dictionary(_, values) => values.as_ref().clone(),
            DataType::Decimal32(..)
            | DataType::Decimal64(..)
            | DataType::Decimal128(..)
            | DataType::Decimal256(..)
            | DataType::Float16 => DataType::Float64,
            DataType::Utf8View => DataType::Utf8,
            DataType::Date32 | DataType::Date64 => DataType::Timestamp(TimeUnit::Millisecond, None),
            _ => break,
        };
        match arrow::compute::cast(&column, &target) {
            Ok(cast) => column = cast,
            Err(_) => break,
        }
    }
    column
}

/// One cell as a [`Value`]; `Err` names an Arrow type we do not read.
fn cell(array: &dyn Array, row: usize) -> Result<Value<'static>, String> {
    if array.is_null(row) {
        return Ok(Value::Null);
    }
    macro_rules! get {
        ($ty:ty) => {
            array.as_any().downcast_ref::<$ty>().map(|a| a.value(row))
        };
    }
    let value = match array.data_type() {
        DataType::Utf8 => get!(StringArray).map(|s| Value::Str(s.to_string().into())),
        DataType::LargeUtf8 => get!(LargeStringArray).map(|s| Value::Str(s.to_string().into())),
        DataType::Int8 => get!(Int8Array).map(|v| Value::Int(v.into())),
        DataType::Int16 => get!(Int16Array).map(|v| Value::Int(v.into())),
        DataType::Int32 => get!(Int32Array).map(|v| Value::Int(v.into())),
        DataType::Int64 => get!(Int64Array).map(Value::Int),
        DataType::UInt8 => get!(UInt8Array).map(|v| Value::Int(v.into())),
        DataType::UInt16 => get!(UInt16Array).map(|v| Value::Int(v.into())),
        DataType::UInt32 => get!(UInt32Array).map(|v| Value::Int(v.into())),
        DataType::UInt64 => {
            get!(UInt64Array).map(|v| i64::try_from(v).map_or(Value::Float(v as f64), Value::Int))
        }
        DataType::Float32 => get!(Float32Array).map(|v| Value::Float(v.into())),
        DataType::Float64 => get!(Float64Array).map(Value::Float),
        DataType::Boolean => get!(BooleanArray).map(Value::Bool),
        DataType::Timestamp(TimeUnit::Second, _) => {
            get!(TimestampSecondArray).map(|v| Value::Ts(v.saturating_mul(1000)))
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            get!(TimestampMillisecondArray).map(Value::Ts)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            get!(TimestampMicrosecondArray).map(|v| Value::Ts(v.div_euclid(1000)))
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            get!(TimestampNanosecondArray).map(|v| Value::Ts(v.div_euclid(1_000_000)))
        }
        other => return Err(other.to_string()),
    };
    value.ok_or_else(|| array.data_type().to_string())
}

//! Typed decoding of raw events against the pipeline's declared schema.
//!
//! A decoder turns bytes into a [`DecodedEvent`] (entity, event time, one [`Value`] per declared
//! field) or a [`Rejection`] that says why, in words a user can act on. Decoders never panic on
//! input and never stop the stream: every byte sequence maps to one of the two.

pub mod avro;
pub mod json;
pub mod registry;
pub mod time;

use std::borrow::Cow;
use std::fmt;

use crate::config::{FieldType, Schema, Source};

/// One declared field's value in one event. Strings borrow from the input when they can.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// Epoch milliseconds.
    Ts(i64),
}

impl Value<'_> {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as a float, for numeric aggregations (ints widen).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) | Value::Ts(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn into_owned(self) -> Value<'static> {
        match self {
            Value::Null => Value::Null,
            Value::Str(s) => Value::Str(Cow::Owned(s.into_owned())),
            Value::Int(i) => Value::Int(i),
            Value::Float(f) => Value::Float(f),
            Value::Bool(b) => Value::Bool(b),
            Value::Ts(t) => Value::Ts(t),
        }
    }
}

/// Why an event was not aggregated. The names are the dead-letter `reason` header values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not decodable at all: invalid UTF-8, not JSON, not an object, bad Avro bytes.
    Malformed,
    /// Larger than `source.max_event_bytes`.
    TooLarge,
    /// A declared field has a value of the wrong type or out of range.
    Schema,
    /// The entity, the event time or a required field is absent or null.
    MissingField,
    /// A Confluent-framed event names a schema id the registry does not know.
    UnknownSchema,
    /// Older than the watermark minus the allowed lateness.
    Late,
    /// Stamped further ahead of the wall clock than `source.watermark.max_future`.
    Future,
}

impl RejectReason {
    pub const ALL: [RejectReason; 7] = [
        RejectReason::Malformed,
        RejectReason::TooLarge,
        RejectReason::Schema,
        RejectReason::MissingField,
        RejectReason::UnknownSchema,
        RejectReason::Late,
        RejectReason::Future,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::TooLarge => "too_large",
            RejectReason::Schema => "schema",
            RejectReason::MissingField => "missing_field",
            RejectReason::UnknownSchema => "unknown_schema",
            RejectReason::Late => "late",
            RejectReason::Future => "future",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected event: the reason (a fixed set) and a sentence about this event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, message: impl Into<String>) -> Self {
        Rejection {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// An event that passed the schema: every declared field present with its declared type, or
/// null where the field is optional.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent<'a> {
    pub entity: Cow<'a, str>,
    pub time_ms: i64,
    /// One per `schema.fields`, in declaration order.
    pub fields: Vec<Value<'a>>,
}

/// The longest entity id, in bytes (UTF-8). Longer ids are rejected at ingest rather than kept
/// in state that the look-up API could never name.
pub const MAX_ENTITY_BYTES: usize = 1024;

/// Checks a row of values (from any decoder) against the schema's rules that apply after
/// parsing: required fields present, entity and event time extracted.
pub fn finish_event<'a>(
    source: &Source,
    fields: Vec<Value<'a>>,
) -> Result<DecodedEvent<'a>, Rejection> {
    check_required(&source.schema, &fields)?;
    let entity = match &fields[source.entity] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => Cow::Owned(i.to_string()),
        Value::Null => return Err(missing(&source.schema, source.entity)),
        other => {
            return Err(Rejection::new(
                RejectReason::Schema,
                format!("entity field has an unusable value {other:?}"),
            ));
        }
    };
    if entity.is_empty() {
        return Err(Rejection::new(
            RejectReason::MissingField,
            format!(
                "entity field `{}` is an empty string",
                source.schema.fields[source.entity].name
            ),
        ));
    }
    if entity.len() > MAX_ENTITY_BYTES {
        return Err(Rejection::new(
            RejectReason::Schema,
            format!(
                "entity field `{}` is {} bytes long; an entity id is at most {MAX_ENTITY_BYTES} bytes",
                source.schema.fields[source.entity].name,
                entity.len()
            ),
        ));
    }
    let time_ms = match fields[source.event_time] {
        Value::Ts(t) => t,
        _ => return Err(missing(&source.schema, source.event_time)),
    };
    if !(time::MIN_EVENT_TIME_MS..=time::MAX_EVENT_TIME_MS).contains(&time_ms) {
        // Epoch milliseconds can name instants no RFC 3339 time can; windows over them would
        // overflow, and one such event would carry the watermark thousands of years away.
        return Err(Rejection::new(
            RejectReason::Schema,
            format!(
                "event time field `{}` is {time_ms} ms since the epoch, outside the years 0000 to 9999",
                source.schema.fields[source.event_time].name
            ),
        ));
    }
    Ok(DecodedEvent {
        entity,
        time_ms,
        fields,
    })
}

fn missing(schema: &Schema, index: usize) -> Rejection {
    Rejection::new(
        RejectReason::MissingField,
        format!(
            "required field `{}` is missing or null",
            schema.fields[index].name
        ),
    )
}

fn check_required(schema: &Schema, fields: &[Value<'_>]) -> Result<(), Rejection> {
    for (index, def) in schema.fields.iter().enumerate() {
        if def.required && fields[index].is_null() {
            return Err(missing(schema, index));
        }
    }
    Ok(())
}

/// Rejects an event stamped more than `source.watermark.max_future` after `now_ms`, the wall
/// clock when it is read. Without this, one event with a wrong year would move the watermark
/// years ahead, and every correct event after it would be late.
pub fn check_not_future(source: &Source, time_ms: i64, now_ms: i64) -> Result<(), Rejection> {
    match source.max_future_ms {
        Some(max) if time_ms > now_ms.saturating_add(max) => Err(Rejection::new(
            RejectReason::Future,
            format!(
                "event time {} is more than {} ahead of the clock ({}); raise source.watermark.max_future if such events are expected",
                time::format_rfc3339_ms(time_ms),
                crate::config::duration::format_duration_ms(max),
                time::format_rfc3339_ms(now_ms)
            ),
        )),
        _ => Ok(()),
    }
}

/// Rejects an event larger than `source.max_event_bytes` before any decoding.
pub fn check_size(source: &Source, bytes: &[u8]) -> Result<(), Rejection> {
    if bytes.len() > source.max_event_bytes {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!(
                "event is {} bytes, more than source.max_event_bytes ({})",
                bytes.len(),
                source.max_event_bytes
            ),
        ));
    }
    Ok(())
}

/// Describes a declared type for error messages ("expected float").
pub fn expected(ty: FieldType) -> &'static str {
    match ty {
        FieldType::String => "a string",
        FieldType::Int => "an integer",
        FieldType::Float => "a number",
        FieldType::Bool => "true or false",
        FieldType::Timestamp => "an RFC 3339 string or epoch milliseconds",
    }
}

/// Checks a value that arrived already typed (Parquet, Avro) against the declared type, with
/// the same rules as JSON: ints widen to floats and timestamps; strings parse as timestamps;
/// nothing else converts.
pub fn coerce<'a>(name: &str, ty: FieldType, value: Value<'a>) -> Result<Value<'a>, String> {
    let wrong = |found: &str| format!("field `{name}` should be {}, found {found}", expected(ty));
    match (ty, value) {
        (_, Value::Null) => Ok(Value::Null),
        (FieldType::String, v @ Value::Str(_)) => Ok(v),
        (FieldType::Int, v @ Value::Int(_)) => Ok(v),
        // An Avro or Parquet timestamp read as an int is its epoch milliseconds.
        (FieldType::Int, Value::Ts(t)) => Ok(Value::Int(t)),
        (FieldType::Float, v @ Value::Float(f)) if f.is_finite() => Ok(v),
        (FieldType::Float, Value::Float(_)) => Err(wrong("a non-finite number")),
        (FieldType::Float, Value::Int(i)) => Ok(Value::Float(i as f64)),
        (FieldType::Bool, v @ Value::Bool(_)) => Ok(v),
        (FieldType::Timestamp, v @ Value::Ts(_)) => Ok(v),
        (FieldType::Timestamp, Value::Int(i)) => Ok(Value::Ts(i)),
        (FieldType::Timestamp, Value::Str(s)) => time::parse_rfc3339_ms(&s)
            .map(Value::Ts)
            .ok_or_else(|| wrong("a string that is not an RFC 3339 time")),
        (_, Value::Str(_)) => Err(wrong("a string")),
        (_, Value::Int(_)) => Err(wrong("an integer")),
        (_, Value::Float(_)) => Err(wrong("a number")),
        (_, Value::Bool(_)) => Err(wrong("a bool")),
        (_, Value::Ts(_)) => Err(wrong("a timestamp")),
    }
}

#[cfg(test)]
mod tests;

//! Avro events: plain binary datums with the writer schema given in the pipeline, or the
//! Confluent wire format (magic byte 0, 4-byte big-endian schema id, datum) with schemas fetched
//! from a registry and cached. Unknown schema ids and undecodable bytes are rejections, never
//! failures of the stream; an unreachable registry is an error the caller retries.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AvroValue;

use super::registry::{RegistryClient, RegistryError};
use super::{DecodedEvent, RejectReason, Rejection, Value, check_size, coerce, finish_event};
use crate::config::Source;

/// A parsed schema kept for the life of the process (schemas are few and never change for an
/// id), so that its datum reader can borrow it.
struct Reader {
    reader: GenericDatumReader<'static>,
}

impl Reader {
    fn new(schema_text: &str) -> Result<Reader, String> {
        let schema =
            Schema::parse_str(schema_text).map_err(|e| format!("invalid Avro schema: {e}"))?;
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let reader = GenericDatumReader::builder(schema)
            .build()
            .map_err(|e| format!("unusable Avro schema: {e}"))?;
        Ok(Reader { reader })
    }
}

/// Why an Avro event could not be decoded right now.
#[derive(Debug)]
pub enum AvroError {
    Rejected(Rejection),
    /// The registry is unreachable: not the event's fault; retry later.
    RegistryUnavailable(RegistryError),
}

impl From<Rejection> for AvroError {
    fn from(r: Rejection) -> Self {
        AvroError::Rejected(r)
    }
}

/// How long a schema id the registry did not know is remembered as unknown.
const UNKNOWN_ID_TTL: Duration = Duration::from_secs(60);

pub struct AvroDecoder {
    source: Source,
    plain: Option<Reader>,
    registry: Option<RegistryClient>,
    by_id: HashMap<u32, Reader>,
    unknown: HashMap<u32, Instant>,
}

impl AvroDecoder {
    /// A decoder for `format: avro` (plain datums) or `avro_confluent` (registry framing).
    pub fn new(source: &Source) -> Result<AvroDecoder, String> {
        let plain = match (&source.format, &source.avro_schema) {
            (crate::config::Format::Avro, Some(text)) => Some(Reader::new(text)?),
            (crate::config::Format::Avro, None) => {
                return Err("`format: avro` needs `avro_schema`".into());
            }
            _ => None,
        };
        let registry = source.schema_registry.as_deref().map(RegistryClient::new);
        Ok(AvroDecoder {
            source: source.clone(),
            plain,
            registry,
            by_id: HashMap::new(),
            unknown: HashMap::new(),
        })
    }

    pub fn decode<'a>(&mut self, bytes: &'a [u8]) -> Result<DecodedEvent<'a>, AvroError> {
        check_size(&self.source, bytes)?;
        let (reader, mut datum) = match &self.plain {
            Some(reader) => (reader, bytes),
            None => {
                let id = self.frame(bytes)?;
                (self.reader_for(id)?, &bytes[5..])
            }
        };
        let value = reader.reader.read_value(&mut datum).map_err(|e| {
            Rejection::new(RejectReason::Malformed, format!("undecodable Avro: {e}"))
        })?;
        if !datum.is_empty() {
            return Err(Rejection::new(
                RejectReason::Malformed,
                format!("{} bytes left after the Avro datum", datum.len()),
            )
            .into());
        }
        let fields = self.fields(value)?;
        Ok(finish_event(&self.source, fields)?)
    }

    fn frame(&self, bytes: &[u8]) -> Result<u32, Rejection> {
        match bytes {
            [0, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
            [0, ..] => Err(Rejection::new(
                RejectReason::Malformed,
                "event is shorter than the 5-byte schema registry header",
            )),
            [magic, ..] => Err(Rejection::new(
                RejectReason::Malformed,
                format!(
                    "event does not start with the schema registry magic byte 0 (found {magic})"
                ),
            )),
            [] => Err(Rejection::new(RejectReason::Malformed, "event is empty")),
        }
    }

    fn reader_for(&mut self, id: u32) -> Result<&Reader, AvroError> {
        if !self.by_id.contains_key(&id) {
            if self
                .unknown
                .get(&id)
                .is_some_and(|at| at.elapsed() < UNKNOWN_ID_TTL)
            {
                return Err(unknown_id(id).into());
            }
            let Some(registry) = &self.registry else {
                return Err(Rejection::new(
                    RejectReason::UnknownSchema,
                    "no schema_registry is configured",
                )
                .into());
            };
            match registry.schema_by_id(id) {
                Ok(text) => match Reader::new(&text) {
                    Ok(reader) => {
                        self.by_id.insert(id, reader);
                    }
                    Err(message) => {
                        return Err(Rejection::new(
                            RejectReason::UnknownSchema,
                            format!("schema id {id}: {message}"),
                        )
                        .into());
                    }
                },
                Err(RegistryError::UnknownId(_)) => {
                    self.unknown.insert(id, Instant::now());
                    return Err(unknown_id(id).into());
                }
                Err(e) => return Err(AvroError::RegistryUnavailable(e)),
            }
        }
        self.by_id.get(&id).ok_or_else(|| unknown_id(id).into())
    }

    fn fields(&self, value: AvroValue) -> Result<Vec<Value<'static>>, Rejection> {
        let AvroValue::Record(entries) = value else {
            return Err(Rejection::new(
                RejectReason::Schema,
                "the Avro datum is not a record",
            ));
        };
        let schema = &self.source.schema;
        let mut fields = vec![Value::Null; schema.fields.len()];
        for (name, value) in entries {
            if let Some(index) = schema.index_of(&name) {
                let def = &schema.fields[index];
                let raw = plain(value).map_err(|found| {
                    Rejection::new(
                        RejectReason::Schema,
                        format!("field `{name}` has the Avro type {found}, which is not read"),
                    )
                })?;
                fields[index] = coerce(&def.name, def.ty, raw)
                    .map_err(|m| Rejection::new(RejectReason::Schema, m))?;
            }
        }
        Ok(fields)
    }
}

/// What is wrong with `text` as the writer schema of events read against `declared`: not valid
/// Avro, not a record, a required field it lacks or that is always null, or a field none of
/// whose Avro types is read as the declared type. A union of which only some branches are
/// readable passes (the producer may never write the others; events that do are `schema`
/// rejections). Empty when the schema can be used.
pub fn writer_schema_problems(text: &str, declared: &crate::config::Schema) -> Vec<String> {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(text) {
        return vec![format!(
            "`avro_schema` is not JSON: {e} (line and column within the schema text)"
        )];
    }
    let schema = match Schema::parse_str(text) {
        Ok(schema) => schema,
        Err(e) => return vec![format!("`avro_schema` is not a valid Avro schema: {e}")],
    };
    // What `run` does with the schema at start, so that validate fails where it would.
    if let Err(e) = GenericDatumReader::builder(&schema).build() {
        return vec![format!("`avro_schema` is not a usable Avro schema: {e}")];
    }
    let names = match apache_avro::schema::ResolvedSchema::try_from(&schema) {
        Ok(resolved) => resolved.get_names().clone(),
        Err(e) => return vec![format!("`avro_schema` is not a valid Avro schema: {e}")],
    };
    let Schema::Record(record) = &schema else {
        return vec![format!(
            "`avro_schema` must be a record, not {}",
            avro_type_name(&schema)
        )];
    };
    let mut problems = Vec::new();
    for def in &declared.fields {
        let Some(field) = record.fields.iter().find(|f| f.name == def.name) else {
            if def.required {
                problems.push(format!(
                    "declared field `{}` is not in `avro_schema`; every event would be rejected as missing_field",
                    def.name
                ));
            }
            continue;
        };
        let branches = match &field.schema {
            Schema::Union(union) => union.variants(),
            other => std::slice::from_ref(other),
        };
        let values: Vec<&Schema> = branches
            .iter()
            .filter(|b| !matches!(b, Schema::Null))
            .collect();
        if values.is_empty() {
            if def.required {
                problems.push(format!(
                    "declared field `{}` is always null in `avro_schema`; every event would be rejected as missing_field",
                    def.name
                ));
            }
        } else if !values.iter().any(|v| readable_as(v, def.ty, &names)) {
            problems.push(format!(
                "declared field `{}` is {}, but `avro_schema` gives it the Avro type {}, which is not read as {}",
                def.name,
                def.ty.name(),
                avro_type_name(&field.schema),
                def.ty.name()
            ));
        }
    }
    problems
}

/// Whether values of the Avro type `schema` (not a union, not null) are read as declared type
/// `ty`; a reference to a named type is looked up in `names`.
fn readable_as(
    schema: &Schema,
    ty: crate::config::FieldType,
    names: &apache_avro::schema::NamesRef<'_>,
) -> bool {
    use crate::config::FieldType as T;
    match schema {
        Schema::Ref { name } => names.get(name).is_some_and(|named| {
            !matches!(named, Schema::Ref { .. }) && readable_as(named, ty, names)
        }),
        Schema::Boolean => ty == T::Bool,
        Schema::Int | Schema::Long => matches!(ty, T::Int | T::Float | T::Timestamp),
        Schema::Float | Schema::Double => ty == T::Float,
        Schema::String => matches!(ty, T::String | T::Timestamp),
        Schema::Enum(_) | Schema::Uuid(_) => ty == T::String,
        Schema::Date
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => matches!(ty, T::Timestamp | T::Int),
        _ => false,
    }
}

/// A short name of an Avro type for messages: `long`, `timestamp-millis`, `["null", "string"]`.
fn avro_type_name(schema: &Schema) -> String {
    let name = match schema {
        Schema::Null => "null",
        Schema::Boolean => "boolean",
        Schema::Int => "int",
        Schema::Long => "long",
        Schema::Float => "float",
        Schema::Double => "double",
        Schema::Bytes => "bytes",
        Schema::String => "string",
        Schema::Array(_) => "array",
        Schema::Map(_) => "map",
        Schema::Union(union) => {
            let names: Vec<String> = union
                .variants()
                .iter()
                .map(|v| format!("\"{}\"", avro_type_name(v)))
                .collect();
            return format!("[{}]", names.join(", "));
        }
        Schema::Record(_) => "record",
        Schema::Enum(_) => "enum",
        Schema::Fixed(_) => "fixed",
        Schema::Decimal(_) | Schema::BigDecimal => "decimal",
        Schema::Uuid(_) => "uuid",
        Schema::Date => "date",
        Schema::TimeMillis => "time-millis",
        Schema::TimeMicros => "time-micros",
        Schema::TimestampMillis => "timestamp-millis",
        Schema::TimestampMicros => "timestamp-micros",
        Schema::TimestampNanos => "timestamp-nanos",
        Schema::LocalTimestampMillis => "local-timestamp-millis",
        Schema::LocalTimestampMicros => "local-timestamp-micros",
        Schema::LocalTimestampNanos => "local-timestamp-nanos",
        Schema::Duration(_) => "duration",
        Schema::Ref { name } => return name.to_string(),
    };
    name.to_string()
}

fn unknown_id(id: u32) -> Rejection {
    Rejection::new(
        RejectReason::UnknownSchema,
        format!("schema id {id} is not known to the registry"),
    )
}

/// An Avro value as one of ours, before checking it against the declared type.
fn plain(value: AvroValue) -> Result<Value<'static>, String> {
    Ok(match value {
        AvroValue::Null => Value::Null,
        AvroValue::Boolean(b) => Value::Bool(b),
        AvroValue::Int(i) => Value::Int(i.into()),
        AvroValue::Long(i) => Value::Int(i),
        AvroValue::Float(f) => Value::Float(f.into()),
        AvroValue::Double(f) => Value::Float(f),
        AvroValue::String(s) | AvroValue::Enum(_, s) => Value::Str(Cow::Owned(s)),
        AvroValue::Union(_, inner) => return plain(*inner),
        AvroValue::TimestampMillis(t) | AvroValue::LocalTimestampMillis(t) => Value::Ts(t),
        AvroValue::TimestampMicros(t) | AvroValue::LocalTimestampMicros(t) => {
            Value::Ts(t.div_euclid(1000))
        }
        AvroValue::TimestampNanos(t) | AvroValue::LocalTimestampNanos(t) => {
            Value::Ts(t.div_euclid(1_000_000))
        }
        AvroValue::Date(days) => Value::Ts(i64::from(days) * 86_400_000),
        AvroValue::Uuid(u) => Value::Str(Cow::Owned(u.to_string())),
        other => return Err(format!("{other:?}").chars().take(40).collect()),
    })
}

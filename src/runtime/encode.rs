//! Output record encodings for the feature topic: JSON (the shapes in PRODUCT.md) or Avro in
//! the Confluent wire format, with the schema registered under `<topic>-value`.

use apache_avro::Schema;
use apache_avro::types::Value as AvroValue;

use crate::config::{Emit, Format, Pipeline, ValueType};
use crate::decode::registry::{RegistryClient, RegistryError};
use crate::decode::time::format_rfc3339_ms;
use crate::engine::FeatureValue;
use crate::output::{write_update, write_window_closed};

// One long-lived encoder per service: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Encoder {
    Json(String),
    Avro {
        schema: Schema,
        id: u32,
        pipeline: String,
        features: Vec<(String, ValueType)>,
        buf: Vec<u8>,
    },
}

fn avro_type(ty: ValueType) -> serde_json::Value {
    match ty {
        ValueType::Int => "long".into(),
        ValueType::Float => "double".into(),
        ValueType::Bool => "boolean".into(),
        ValueType::String => "string".into(),
        ValueType::Timestamp => {
            serde_json::json!({ "type": "long", "logicalType": "timestamp-millis" })
        }
    }
}

/// The Avro schema of the records a pipeline emits.
pub fn avro_schema(pipeline: &Pipeline) -> serde_json::Value {
    let millis = serde_json::json!({ "type": "long", "logicalType": "timestamp-millis" });
    match pipeline.emit() {
        Emit::OnUpdate => {
            let features: Vec<serde_json::Value> = pipeline
                .features
                .iter()
                .map(|f| serde_json::json!({ "name": f.name, "type": ["null", avro_type(f.value_type)], "default": null }))
                .collect();
            serde_json::json!({
                "type": "record", "name": "FeatureUpdate", "namespace": "featurestream",
                "fields": [
                    { "name": "pipeline", "type": "string" },
                    { "name": "entity", "type": "string" },
                    { "name": "as_of", "type": millis },
                    { "name": "features", "type": { "type": "record", "name": "Features", "fields": features } },
                ]
            })
        }
        Emit::OnWindowClose => serde_json::json!({
            "type": "record", "name": "WindowClosed", "namespace": "featurestream",
            "fields": [
                { "name": "pipeline", "type": "string" },
                { "name": "entity", "type": "string" },
                { "name": "feature", "type": "string" },
                { "name": "window_start", "type": millis },
                { "name": "window_end", "type": millis },
                { "name": "value", "type": ["null", "long", "double", "boolean", "string"], "default": null },
            ]
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("the output Avro schema is invalid: {0}")]
    Schema(String),
    #[error("`sinks.kafka.format: avro` needs `source.schema_registry`")]
    NoRegistry,
}

impl Encoder {
    pub fn new(pipeline: &Pipeline) -> Result<Encoder, EncoderError> {
        let Some(sink) = &pipeline.sinks.kafka else {
            return Ok(Encoder::Json(String::new()));
        };
        if sink.format != Format::Avro {
            return Ok(Encoder::Json(String::with_capacity(256)));
        }
        let registry = pipeline
            .source
            .schema_registry
            .as_deref()
            .map(RegistryClient::new)
            .ok_or(EncoderError::NoRegistry)?;
        let text = avro_schema(pipeline).to_string();
        let schema = Schema::parse_str(&text).map_err(|e| EncoderError::Schema(e.to_string()))?;
        let id = registry.register(&format!("{}-value", sink.topic), &text)?;
        Ok(Encoder::avro(pipeline, schema, id))
    }

    /// The Avro encoder for `pipeline`'s records, once `schema` is registered under `id`.
    fn avro(pipeline: &Pipeline, schema: Schema, id: u32) -> Encoder {
        Encoder::Avro {
            schema,
            id,
            pipeline: pipeline.name.clone(),
            buf: Vec::with_capacity(256),
            features: pipeline
                .features
                .iter()
                .map(|f| (f.name.clone(), f.value_type))
                .collect(),
        }
    }

    /// Frames an Avro record (magic byte, schema id, datum) into `buf`; `None` if the record
    /// does not fit the schema, which would be a bug in how records are built.
    fn framed<'b>(
        schema: &Schema,
        id: u32,
        value: AvroValue,
        buf: &'b mut Vec<u8>,
    ) -> Option<&'b [u8]> {
        #[allow(deprecated)]
        let datum = match apache_avro::to_avro_datum(schema, value) {
            Ok(datum) => datum,
            Err(e) => {
                tracing::error!("A feature record does not fit its own Avro schema: {e}");
                return None;
            }
        };
        buf.clear();
        buf.push(0);
        buf.extend_from_slice(&id.to_be_bytes());
        buf.extend_from_slice(&datum);
        Some(buf)
    }

    pub fn update(
        &mut self,
        pipeline: &Pipeline,
        entity: &str,
        as_of: i64,
        values: &[FeatureValue],
    ) -> Option<&[u8]> {
        match self {
            Encoder::Json(line) => {
                line.clear();
                write_update(line, pipeline, entity, as_of, values);
                Some(line.as_bytes())
            }
            Encoder::Avro {
                schema,
                id,
                pipeline: name,
                features,
                buf,
            } => {
                let fields = features
                    .iter()
                    .zip(values)
                    .map(|((fname, _), v)| (fname.clone(), union(v, true)))
                    .collect();
                let record = AvroValue::Record(vec![
                    ("pipeline".into(), AvroValue::String(name.clone())),
                    ("entity".into(), AvroValue::String(entity.to_string())),
                    ("as_of".into(), AvroValue::TimestampMillis(as_of)),
                    ("features".into(), AvroValue::Record(fields)),
                ]);
                Self::framed(schema, *id, record, buf)
            }
        }
    }

    pub fn window_closed(
        &mut self,
        pipeline: &Pipeline,
        entity: &str,
        feature: usize,
        (start, end): (i64, i64),
        value: &FeatureValue,
    ) -> Option<&[u8]> {
        match self {
            Encoder::Json(line) => {
                line.clear();
                write_window_closed(line, pipeline, entity, feature, start, end, value);
                Some(line.as_bytes())
            }
            Encoder::Avro {
                schema,
                id,
                pipeline: name,
                features,
                buf,
            } => {
                let record = AvroValue::Record(vec![
                    ("pipeline".into(), AvroValue::String(name.clone())),
                    ("entity".into(), AvroValue::String(entity.to_string())),
                    (
                        "feature".into(),
                        AvroValue::String(
                            features
                                .get(feature)
                                .map(|f| f.0.clone())
                                .unwrap_or_default(),
                        ),
                    ),
                    ("window_start".into(), AvroValue::TimestampMillis(start)),
                    ("window_end".into(), AvroValue::TimestampMillis(end)),
                    ("value".into(), union(value, false)),
                ]);
                Self::framed(schema, *id, record, buf)
            }
        }
    }
}

/// A feature value as an Avro union: `["null", T]` for updates (`typed`), or the shared
/// `["null","long","double","boolean","string"]` for window records, where a time is a string.
fn union(value: &FeatureValue, typed: bool) -> AvroValue {
    let (index, inner) = match value {
        FeatureValue::Null => return AvroValue::Union(0, Box::new(AvroValue::Null)),
        FeatureValue::Int(i) => (1, AvroValue::Long(*i)),
        FeatureValue::Float(f) => (2, AvroValue::Double(*f)),
        FeatureValue::Bool(b) => (3, AvroValue::Boolean(*b)),
        FeatureValue::Str(s) => (4, AvroValue::String(s.to_string())),
        FeatureValue::Ts(t) if typed => (1, AvroValue::TimestampMillis(*t)),
        // The shared union cannot also hold `timestamp-millis` (it is a `long` too, and a
        // union holds one branch per type), so a window record's time value is the RFC 3339
        // string its JSON form has.
        FeatureValue::Ts(t) => (4, AvroValue::String(format_rfc3339_ms(*t))),
    };
    AvroValue::Union(if typed { 1 } else { index }, Box::new(inner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile_source;

    /// An Avro encoder as `Encoder::new` builds it, without registering the schema.
    fn avro_encoder(pipeline: &Pipeline) -> Encoder {
        let schema = Schema::parse_str(&avro_schema(pipeline).to_string()).unwrap();
        Encoder::avro(pipeline, schema, 7)
    }

    fn pipeline(emit: &str) -> Pipeline {
        compile_source(
            "p.yaml",
            &format!(
                r#"
name: p
source:
  kafka: {{ brokers: "x:1", topic: t, group_id: g }}
  schema_registry: http://127.0.0.1:9
  schema: {{ id: string, paid: timestamp, ts: timestamp }}
  entity: id
  event_time: ts
features:
  - {{ name: n, agg: count, window: {{ tumbling: 1h }} }}
  - {{ name: last_paid, agg: last, field: paid, window: {{ tumbling: 1h }} }}
sinks:
  kafka: {{ topic: out, format: avro, emit: {emit} }}
"#
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The fields of the record `encoder` framed, read back with its schema.
    fn decode(encoder: &Encoder, framed: &[u8]) -> Vec<(String, AvroValue)> {
        let Encoder::Avro { schema, .. } = encoder else {
            panic!("an Avro encoder")
        };
        assert_eq!(&framed[..5], &[0, 0, 0, 0, 7], "magic byte and schema id");
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap();
        match reader.read_value(&mut &framed[5..]).unwrap() {
            AvroValue::Record(fields) => fields,
            other => panic!("a record, not {other:?}"),
        }
    }

    #[test]
    fn a_window_record_writes_a_time_value_as_its_json_string() {
        let pipeline = pipeline("on_window_close");
        let mut encoder = avro_encoder(&pipeline);
        let framed = encoder
            .window_closed(&pipeline, "a", 1, (0, 3_600_000), &FeatureValue::Ts(1_500))
            .unwrap()
            .to_vec();
        let fields = decode(&encoder, &framed);
        assert_eq!(fields[2].1, AvroValue::String("last_paid".into()));
        assert_eq!(fields[4].1, AvroValue::TimestampMillis(3_600_000));
        assert_eq!(
            fields[5].1,
            AvroValue::Union(
                4,
                Box::new(AvroValue::String("1970-01-01T00:00:01.500Z".into()))
            )
        );
        let framed = encoder
            .window_closed(&pipeline, "a", 0, (0, 3_600_000), &FeatureValue::Int(3))
            .unwrap()
            .to_vec();
        let fields = decode(&encoder, &framed);
        assert_eq!(
            fields[5].1,
            AvroValue::Union(1, Box::new(AvroValue::Long(3)))
        );
    }

    #[test]
    fn an_update_types_each_feature() {
        let pipeline = pipeline("on_update");
        let mut encoder = avro_encoder(&pipeline);
        let framed = encoder
            .update(
                &pipeline,
                "a",
                2_000,
                &[FeatureValue::Int(2), FeatureValue::Ts(1_500)],
            )
            .unwrap()
            .to_vec();
        let fields = decode(&encoder, &framed);
        assert_eq!(fields[2].1, AvroValue::TimestampMillis(2_000));
        assert_eq!(
            fields[3].1,
            AvroValue::Record(vec![
                (
                    "n".into(),
                    AvroValue::Union(1, Box::new(AvroValue::Long(2)))
                ),
                (
                    "last_paid".into(),
                    AvroValue::Union(1, Box::new(AvroValue::TimestampMillis(1_500)))
                ),
            ])
        );
    }
}

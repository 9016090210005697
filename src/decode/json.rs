//! JSON events: one object per event, declared fields typed on the way in, the rest skipped.
//!
//! The decoder drives serde_json with visitors that know each field's declared type, so a value
//! is checked where it is parsed and strings without escapes are borrowed from the input.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::time::parse_rfc3339_ms;
use super::{DecodedEvent, RejectReason, Rejection, Value, expected, finish_event};
use crate::config::{FieldType, Source};

/// Decodes JSON events for one pipeline source.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    source: Source,
}

impl JsonDecoder {
    pub fn new(source: &Source) -> Self {
        JsonDecoder {
            source: source.clone(),
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Decodes one event. Every input maps to an event or a rejection; nothing panics.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<DecodedEvent<'a>, Rejection> {
        if bytes.len() > self.source.max_event_bytes {
            return Err(Rejection::new(
                RejectReason::TooLarge,
                format!(
                    "event is {} bytes, more than source.max_event_bytes ({})",
                    bytes.len(),
                    self.source.max_event_bytes
                ),
            ));
        }
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => {}
            None => return Err(Rejection::new(RejectReason::Malformed, "event is empty")),
            Some(_) => {
                return Err(Rejection::new(
                    RejectReason::Malformed,
                    "event is not a JSON object".to_string(),
                ));
            }
        }
        let fields = self.decode_fields(bytes)?;
        finish_event(&self.source, fields)
    }

    fn decode_fields<'a>(&self, bytes: &'a [u8]) -> Result<Vec<Value<'a>>, Rejection> {
        let schema_error = RefCell::new(None);
        let mut fields = vec![Value::Null; self.source.schema.fields.len()];
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let seed = EventSeed {
            source: &self.source,
            fields: &mut fields,
            schema_error: &schema_error,
        };
        let parsed = de::Deserializer::deserialize_map(&mut deserializer, seed)
            .and_then(|()| deserializer.end());
        match (parsed, schema_error.into_inner()) {
            (Err(error), _) => Err(Rejection::new(
                RejectReason::Malformed,
                format!("invalid JSON: {error}"),
            )),
            (Ok(()), Some(rejection)) => Err(rejection),
            (Ok(()), None) => Ok(fields),
        }
    }
}

struct EventSeed<'s, 'f, 'a> {
    source: &'s Source,
    fields: &'f mut Vec<Value<'a>>,
    schema_error: &'s RefCell<Option<Rejection>>,
}

impl<'a> Visitor<'a> for EventSeed<'_, '_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'a>>(self, mut map: M) -> Result<(), M::Error> {
        let schema = &self.source.schema;
        while let Some(index) = map.next_key_seed(KeySeed {
            source: self.source,
        })? {
            match index {
                Some(index) => {
                    let def = &schema.fields[index];
                    let seed = FieldSeed {
                        name: &def.name,
                        ty: def.ty,
                    };
                    match map.next_value_seed(seed)? {
                        Ok(value) => self.fields[index] = value,
                        // Keep parsing: an event that is also not valid JSON is `malformed`.
                        Err(message) => {
                            let mut first = self.schema_error.borrow_mut();
                            if first.is_none() {
                                *first = Some(Rejection::new(RejectReason::Schema, message));
                            }
                        }
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

impl<'a> DeserializeSeed<'a> for EventSeed<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// Maps an object key to the index of the declared field, without allocating.
struct KeySeed<'s> {
    source: &'s Source,
}

impl<'a> DeserializeSeed<'a> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'a>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'a> Visitor<'a> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self
            .source
            .schema
            .fields
            .iter()
            .position(|field| field.name == key))
    }
}

/// Parses one declared field's value. The inner `Result` carries a schema error so that the
/// rest of the event is not mistaken for malformed JSON.
struct FieldSeed<'s> {
    name: &'s str,
    ty: FieldType,
}

type FieldResult<'a> = Result<Value<'a>, String>;

impl FieldSeed<'_> {
    fn wrong(&self, found: impl fmt::Display) -> String {
        format!(
            "field `{}` should be {}, found {found}",
            self.name,
            expected(self.ty)
        )
    }
}

impl<'a> DeserializeSeed<'a> for FieldSeed<'_> {
    type Value = FieldResult<'a>;
    fn deserialize<D: de::Deserializer<'a>>(self, d: D) -> Result<FieldResult<'a>, D::Error> {
        d.deserialize_any(self)
    }
}

fn quote_prefix(s: &str) -> String {
    const LIMIT: usize = 40;
    if s.len() <= LIMIT {
        format!("the string {s:?}")
    } else {
        let cut = (0..=LIMIT)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("the string {:?}... ({} bytes)", &s[..cut], s.len())
    }
}

impl<'a> FieldSeed<'_> {
    fn string(self, s: Cow<'a, str>) -> FieldResult<'a> {
        match self.ty {
            FieldType::String => Ok(Value::Str(s)),
            FieldType::Timestamp => match parse_rfc3339_ms(&s) {
                Some(ms) => Ok(Value::Ts(ms)),
                None => Err(format!(
                    "field `{}` should be {}, found {} which is not a valid RFC 3339 time",
                    self.name,
                    expected(self.ty),
                    quote_prefix(&s)
                )),
            },
            _ => Err(self.wrong(quote_prefix(&s))),
        }
    }

    fn integer(self, i: i64) -> FieldResult<'a> {
        match self.ty {
            FieldType::Int => Ok(Value::Int(i)),
            FieldType::Float => Ok(Value::Float(i as f64)),
            FieldType::Timestamp => Ok(Value::Ts(i)),
            _ => Err(self.wrong(format_args!("the number {i}"))),
        }
    }
}

impl<'a> Visitor<'a> for FieldSeed<'_> {
    type Value = FieldResult<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(expected(self.ty))
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<FieldResult<'a>, E> {
        Ok(match self.ty {
            FieldType::Bool => Ok(Value::Bool(b)),
            _ => Err(self.wrong(b)),
        })
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<FieldResult<'a>, E> {
        Ok(self.integer(i))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<FieldResult<'a>, E> {
        Ok(match i64::try_from(u) {
            Ok(i) => self.integer(i),
            Err(_) if self.ty == FieldType::Float => Ok(Value::Float(u as f64)),
            Err(_) => Err(self.wrong(format_args!("{u}, outside the 64-bit integer range"))),
        })
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<FieldResult<'a>, E> {
        Ok(match self.ty {
            FieldType::Float if f.is_finite() => Ok(Value::Float(f)),
            FieldType::Int | FieldType::Timestamp if f.fract() == 0.0 && f.abs() >= 9.2e18 => {
                Err(self.wrong(format_args!("{f}, outside the 64-bit integer range")))
            }
            _ => Err(self.wrong(format_args!("the number {f}"))),
        })
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'a str) -> Result<FieldResult<'a>, E> {
        Ok(self.string(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldResult<'a>, E> {
        Ok(self.string(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<FieldResult<'a>, E> {
        Ok(self.string(Cow::Owned(s)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<FieldResult<'a>, E> {
        Ok(Ok(Value::Null))
    }

    fn visit_map<M: MapAccess<'a>>(self, mut map: M) -> Result<FieldResult<'a>, M::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Err(self.wrong("an object")))
    }

    fn visit_seq<S: SeqAccess<'a>>(self, mut seq: S) -> Result<FieldResult<'a>, S::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(self.wrong("a list")))
    }
}

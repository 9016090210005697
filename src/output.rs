//! The JSON shapes of emitted records (PRODUCT.md "Records"), written without intermediate
//! allocations because every emitted update goes through here.

use crate::config::Pipeline;
use crate::decode::time::write_rfc3339_ms;
use crate::engine::FeatureValue;

/// Appends `s` as a JSON string literal.
pub fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    // Ids and feature names almost never need escaping: check in one vectorisable pass.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends a feature value as JSON: numbers, bools, strings, RFC 3339 times, or null.
pub fn write_value(out: &mut String, value: &FeatureValue) {
    match value {
        FeatureValue::Null => out.push_str("null"),
        FeatureValue::Int(i) => out.push_str(itoa::Buffer::new().format(*i)),
        FeatureValue::Float(f) if f.is_finite() => {
            out.push_str(ryu::Buffer::new().format_finite(*f))
        }
        FeatureValue::Float(_) => out.push_str("null"),
        FeatureValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        FeatureValue::Str(s) => write_json_str(out, s),
        FeatureValue::Ts(t) => {
            out.push('"');
            write_rfc3339_ms(out, *t);
            out.push('"');
        }
    }
}

/// `{"pipeline","entity","as_of","features":{...}}`
pub fn write_update(
    out: &mut String,
    pipeline: &Pipeline,
    entity: &str,
    as_of: i64,
    values: &[FeatureValue],
) {
    out.push_str("{\"pipeline\":");
    write_json_str(out, &pipeline.name);
    out.push(',');
    write_entity_fields(out, pipeline, entity, as_of, values);
}

/// `{"entity","as_of","features":{...}}`: one entity as the look-up API answers it.
pub fn write_lookup(
    out: &mut String,
    pipeline: &Pipeline,
    entity: &str,
    as_of: i64,
    values: &[FeatureValue],
) {
    out.push('{');
    write_entity_fields(out, pipeline, entity, as_of, values);
}

/// `{"entity","found":true,"as_of","features":{...}}`: a found entity in a batch look-up, whose
/// unknown entities are `{"entity","found":false}`.
pub fn write_batch_entry(
    out: &mut String,
    pipeline: &Pipeline,
    entity: &str,
    as_of: i64,
    values: &[FeatureValue],
) {
    out.push_str("{\"entity\":");
    write_json_str(out, entity);
    out.push_str(",\"found\":true,");
    write_time_and_features(out, pipeline, as_of, values);
}

/// `"entity":..,"as_of":..,"features":{...}}`, the end both shapes share.
fn write_entity_fields(
    out: &mut String,
    pipeline: &Pipeline,
    entity: &str,
    as_of: i64,
    values: &[FeatureValue],
) {
    out.push_str("\"entity\":");
    write_json_str(out, entity);
    out.push(',');
    write_time_and_features(out, pipeline, as_of, values);
}

/// `"as_of":..,"features":{...}}`.
fn write_time_and_features(
    out: &mut String,
    pipeline: &Pipeline,
    as_of: i64,
    values: &[FeatureValue],
) {
    out.push_str("\"as_of\":\"");
    write_rfc3339_ms(out, as_of);
    out.push_str("\",\"features\":");
    write_features(out, pipeline, values);
    out.push('}');
}

/// `{name: value, ...}` in the order the pipeline declares its features.
pub fn write_features(out: &mut String, pipeline: &Pipeline, values: &[FeatureValue]) {
    out.push('{');
    for (i, (feature, value)) in pipeline.features.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_json_str(out, &feature.name);
        out.push(':');
        write_value(out, value);
    }
    out.push('}');
}

/// `{"pipeline","entity","feature","window_start","window_end","value"}`
pub fn write_window_closed(
    out: &mut String,
    pipeline: &Pipeline,
    entity: &str,
    feature: usize,
    start: i64,
    end: i64,
    value: &FeatureValue,
) {
    out.push_str("{\"pipeline\":");
    write_json_str(out, &pipeline.name);
    out.push_str(",\"entity\":");
    write_json_str(out, entity);
    out.push_str(",\"feature\":");
    write_json_str(
        out,
        pipeline
            .features
            .get(feature)
            .map_or("", |f| f.name.as_str()),
    );
    out.push_str(",\"window_start\":\"");
    write_rfc3339_ms(out, start);
    out.push_str("\",\"window_end\":\"");
    write_rfc3339_ms(out, end);
    out.push_str("\",\"value\":");
    write_value(out, value);
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_strings_as_json_does() {
        for s in [
            "plain",
            "quote\"back\\slash",
            "line\nbreak\ttab",
            "\u{1}ctl",
            "ünï ☃",
        ] {
            let mut out = String::new();
            write_json_str(&mut out, s);
            let back: String = serde_json::from_str(&out).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn writes_values() {
        let cases = [
            (FeatureValue::Null, "null"),
            (FeatureValue::Int(-3), "-3"),
            (FeatureValue::Float(3.0), "3.0"),
            (FeatureValue::Float(0.1), "0.1"),
            (FeatureValue::Float(f64::NAN), "null"),
            (FeatureValue::Bool(true), "true"),
            (FeatureValue::Ts(0), "\"1970-01-01T00:00:00.000Z\""),
        ];
        for (value, want) in cases {
            let mut out = String::new();
            write_value(&mut out, &value);
            assert_eq!(out, want);
        }
    }
}

//! Decoders against hostile input: every byte sequence maps to an event or a rejection with a
//! reason, and nothing panics.

use proptest::prelude::*;

use super::avro::{AvroDecoder, AvroError};
use super::json::JsonDecoder;
use super::*;
use crate::config::compile_source;

fn source(format_lines: &str) -> Source {
    let text = format!(
        r#"
name: t
source:
  kafka: {{ brokers: "x:1", topic: t, group_id: g }}
{format_lines}
  schema: {{ id: string, n: int, x: float?, ok: bool?, ts: timestamp }}
  entity: id
  event_time: ts
features:
  - {{ name: c, agg: count, window: lifetime }}
"#
    );
    compile_source("t.yaml", &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .source
}

fn reason(bytes: &[u8]) -> RejectReason {
    JsonDecoder::new(&source(""))
        .decode(bytes)
        .expect_err("rejected")
        .reason
}

#[test]
fn valid_events_decode_with_their_types() {
    let decoder = JsonDecoder::new(&source(""));
    let e = decoder
        .decode(br#"{"id":"a","n":3,"x":2,"ok":true,"ts":"2026-03-01T00:00:00.5+01:00","extra":{"deep":[1,2]}}"#)
        .unwrap();
    assert_eq!(e.entity, "a");
    assert_eq!(e.time_ms, 1_772_319_600_500);
    assert_eq!(e.fields[1], Value::Int(3));
    assert_eq!(
        e.fields[2],
        Value::Float(2.0),
        "an int is accepted where a float is declared"
    );
    let e = decoder
        .decode(br#"{"id":"a\u00e9\n","n":-1,"ts":1700000000000}"#)
        .unwrap();
    assert_eq!(e.entity, "a\u{e9}\n");
    assert_eq!(e.fields[2], Value::Null, "optional field absent");
}

#[test]
fn a_byte_order_mark_is_named_in_the_rejection() {
    let decoder = JsonDecoder::new(&source(""));
    let rejection = decoder
        .decode("\u{feff}{\"id\":\"a\",\"n\":1,\"ts\":1}".as_bytes())
        .expect_err("JSON does not allow a byte-order mark");
    assert_eq!(rejection.reason, RejectReason::Malformed);
    assert!(
        rejection.message.contains("byte-order mark"),
        "{}",
        rejection.message
    );
    let other = decoder.decode(b"[1]").expect_err("not an object");
    assert!(
        other.message.contains("not a JSON object"),
        "{}",
        other.message
    );
}

#[test]
fn each_kind_of_bad_input_has_its_reason() {
    assert_eq!(reason(b"not json"), RejectReason::Malformed);
    assert_eq!(
        reason(br#"{"id":"a","n":1,"ts":17"#),
        RejectReason::Malformed,
        "truncated"
    );
    assert_eq!(reason(b"[1,2]"), RejectReason::Malformed, "not an object");
    for ts in [i64::MIN, -62_167_219_200_001, 253_402_300_800_000, i64::MAX] {
        let event = format!(r#"{{"id":"a","n":1,"ts":{ts}}}"#);
        assert_eq!(
            reason(event.as_bytes()),
            RejectReason::Schema,
            "event time {ts} outside the years 0000 to 9999"
        );
    }
    for ts in [-62_167_219_200_000i64, 253_402_300_799_999] {
        let event = format!(r#"{{"id":"a","n":1,"ts":{ts}}}"#);
        let decoded = JsonDecoder::new(&source(""))
            .decode(event.as_bytes())
            .expect("the first and last instants RFC 3339 can write are accepted");
        assert_eq!(decoded.time_ms, ts);
    }
    assert_eq!(reason(b""), RejectReason::Malformed);
    assert_eq!(
        reason(&[b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}']),
        RejectReason::Malformed,
        "invalid UTF-8"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":NaN,"ts":1}"#),
        RejectReason::Malformed,
        "NaN is not JSON"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":"3","ts":1}"#),
        RejectReason::Schema,
        "a string where a number is declared"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":{"v":3},"ts":1}"#),
        RejectReason::Schema,
        "an object where a number is declared"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":99999999999999999999,"ts":1}"#),
        RejectReason::Schema,
        "out of int64"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":1.5,"ts":1}"#),
        RejectReason::Schema,
        "a fraction in an int field"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":1,"x":1e400,"ts":1}"#),
        RejectReason::Malformed,
        "a number too large for a float"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":1,"ts":"yesterday"}"#),
        RejectReason::Schema
    );
    assert_eq!(
        reason(br#"{"id":"a","n":1,"ok":"yes","ts":1}"#),
        RejectReason::Schema
    );
    assert_eq!(
        reason(br#"{"n":1,"ts":1}"#),
        RejectReason::MissingField,
        "no entity"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":1}"#),
        RejectReason::MissingField,
        "no event time"
    );
    assert_eq!(
        reason(br#"{"id":"a","n":null,"ts":1}"#),
        RejectReason::MissingField,
        "null required field"
    );
    assert_eq!(
        reason(br#"{"id":"","n":1,"ts":1}"#),
        RejectReason::MissingField,
        "empty entity"
    );
    let long_entity = format!(
        r#"{{"id":"{}","n":1,"ts":1}}"#,
        "k".repeat(MAX_ENTITY_BYTES + 1)
    );
    assert_eq!(
        reason(long_entity.as_bytes()),
        RejectReason::Schema,
        "an entity id the look-up API could not name"
    );
    let longest_entity = format!(
        r#"{{"id":"{}","n":1,"ts":1}}"#,
        "k".repeat(MAX_ENTITY_BYTES)
    );
    JsonDecoder::new(&source(""))
        .decode(longest_entity.as_bytes())
        .expect("an entity id of exactly the limit is accepted");
    assert_eq!(
        reason(br#"{"id":5,"n":1,"ts":1}"#),
        RejectReason::Schema,
        "a number where a string is declared"
    );
    let huge = format!(
        r#"{{"id":"a","n":1,"ts":1,"note":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    assert_eq!(
        reason(huge.as_bytes()),
        RejectReason::TooLarge,
        "a 1 MB string"
    );
}

#[test]
fn messages_name_the_field_and_what_was_found() {
    let r = JsonDecoder::new(&source(""))
        .decode(br#"{"id":"a","n":"3","ts":1}"#)
        .unwrap_err();
    assert_eq!(
        r.message,
        "field `n` should be an integer, found the string \"3\""
    );
    let r = JsonDecoder::new(&source(""))
        .decode(br#"{"n":1,"ts":1}"#)
        .unwrap_err();
    assert_eq!(r.message, "required field `id` is missing or null");
}

#[test]
fn invalid_utf8_is_reported_where_it_starts() {
    // A Latin-1 "é" inside a key, and a truncated three-byte sequence at the end.
    for (bytes, at) in [
        (&b"{\"caf\xe9\":1}"[..], 5),
        (&b"{\"id\":\"a\xe2\x82"[..], 8),
    ] {
        let r = JsonDecoder::new(&source(""))
            .decode(bytes)
            .expect_err("invalid UTF-8 is rejected");
        assert_eq!(r.reason, RejectReason::Malformed);
        assert_eq!(r.message, format!("event is not valid UTF-8 (byte {at})"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Random bytes and mangled events: always a verdict, never a panic, and a verdict that
    /// agrees with serde_json on whether the text is JSON at all.
    #[test]
    fn any_bytes_get_a_verdict(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (0usize..80, prop::collection::vec(any::<u8>(), 0..6)).prop_map(|(cut, junk)| {
                let mut v = br#"{"id":"card","n":12,"x":-3.5e2,"ok":false,"ts":"2026-03-01T00:00:00Z","more":[{"a":null}]}"#.to_vec();
                let cut = cut.min(v.len());
                v.splice(cut..cut, junk);
                v
            }),
        ]
    ) {
        let decoder = JsonDecoder::new(&source(""));
        match decoder.decode(&bytes) {
            Ok(event) => {
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok());
                prop_assert!(!event.entity.is_empty());
            }
            Err(r) if r.reason == RejectReason::Malformed => {
                prop_assert!(!matches!(serde_json::from_slice::<serde_json::Value>(&bytes), Ok(serde_json::Value::Object(_))));
            }
            Err(_) => prop_assert!(serde_json::from_slice::<serde_json::Value>(&bytes).is_ok()),
        }
    }
}

#[test]
fn plain_avro_decodes_and_rejects_truncated_datums() {
    use apache_avro::types::Value as A;
    let writer = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"string"},{"name":"n","type":"long"},
        {"name":"x","type":["null","double"]},{"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    let src = source(&format!(
        "  format: avro\n  avro_schema: '{}'",
        writer.replace('\n', " ")
    ));
    let mut decoder = AvroDecoder::new(&src).unwrap();
    let schema = apache_avro::Schema::parse_str(writer).unwrap();
    let record = A::Record(vec![
        ("id".into(), A::String("a".into())),
        ("n".into(), A::Long(7)),
        ("x".into(), A::Union(1, Box::new(A::Double(1.5)))),
        ("ts".into(), A::TimestampMillis(1000)),
    ]);
    #[allow(deprecated)]
    let bytes = apache_avro::to_avro_datum(&schema, record).unwrap();
    let event = decoder.decode(&bytes).unwrap();
    assert_eq!((event.entity.as_ref(), event.time_ms), ("a", 1000));
    assert_eq!(event.fields[1], Value::Int(7));
    assert_eq!(event.fields[2], Value::Float(1.5));
    match decoder.decode(&bytes[..bytes.len() - 3]) {
        Err(AvroError::Rejected(r)) => assert_eq!(r.reason, RejectReason::Malformed),
        other => panic!("truncated Avro must be rejected, got {other:?}"),
    }
}

#[test]
fn confluent_framing_is_checked_before_any_lookup() {
    let src = source("  format: avro_confluent\n  schema_registry: http://127.0.0.1:9");
    let mut decoder = AvroDecoder::new(&src).unwrap();
    for (bytes, want) in [
        (&b""[..], "empty"),
        (&[1u8, 0, 0, 0, 1, 2][..], "magic byte"),
        (&[0u8, 0, 1][..], "shorter"),
    ] {
        match decoder.decode(bytes) {
            Err(AvroError::Rejected(r)) => {
                assert_eq!(r.reason, RejectReason::Malformed);
                assert!(r.message.contains(want), "{}", r.message);
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Edge cases of the JSON grammar: accepted exactly when serde_json accepts them.
#[test]
fn json_grammar_edges_agree_with_serde_json() {
    let deep = format!(
        r#"{{"id":"a","n":1,"ts":1,"deep":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let cases: Vec<String> = [
        r#" {"id":"a","n":1,"ts":1} "#,
        r#"{"id":"a","n":01,"ts":1}"#,
        r#"{"id":"a","n":-0,"ts":1}"#,
        r#"{"id":"a","n":1,"ts":1,}"#,
        r#"{"id":"\ud83d\ude00","n":1,"ts":1}"#,
        r#"{"id":"\ud83d","n":1,"ts":1}"#,
        r#"{"id":"a","n":1,"ts":1}{}"#,
        r#"{"id" : "a" , "n" : 1 , "ts" : 1 }"#,
        r#"{"id":"a","n":1,"ts":1,"x":1.}"#,
        r#"{"id":"a","n":1,"ts":1,"x":.5}"#,
        r#"{"id":"a","n":1,"ts":1,"x":1e}"#,
        r#"{"id":"a","n":1,"ts":1,"x":-}"#,
        r#"{"id":"a","n":1,"ts":1,"x":1E+2}"#,
        r#"{"id":"a\/b\"c\\","n":1,"ts":1,"o":{"a":[true,false,null,{}]}}"#,
        r#"{"id":"a","n":1,"ts":1,"bad":"\x"}"#,
        r#"{"id":"a","n":1,"ts":1,"t":tru}"#,
        "{\"id\":\"a\tb\",\"n\":1,\"ts\":1}",
        r#"{"id":"a","n":1,"ts":1,"k":"v" "l":2}"#,
        deep.as_str(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let decoder = JsonDecoder::new(&source(""));
    for case in &cases {
        let ours = decoder.decode(case.as_bytes());
        let theirs = serde_json::from_str::<serde_json::Value>(case).is_ok();
        assert_eq!(ours.is_ok(), theirs, "{case}: ours {ours:?}");
        if let Err(r) = ours {
            assert_eq!(r.reason, RejectReason::Malformed, "{case}");
        }
    }
}

#[test]
fn a_duplicate_key_takes_its_last_value_whatever_the_first_was() {
    let decoder = JsonDecoder::new(&source(""));
    let e = decoder
        .decode(br#"{"id":"a","n":"oops","ts":1700000000000,"n":7}"#)
        .expect("the last value of `n` is an int");
    assert_eq!(e.fields[1], Value::Int(7));
    let e = decoder
        .decode(br#"{"id":"a","n":1,"ts":"bad","ts":1700000000000}"#)
        .expect("the last value of `ts` is a time");
    assert_eq!(e.time_ms, 1_700_000_000_000);
    let e = decoder
        .decode(br#"{"id":"a","n":1,"x":{"deep":1},"ts":1700000000000,"x":2.5}"#)
        .expect("the last value of `x` is a number");
    assert_eq!(e.fields[2], Value::Float(2.5));
    // The other way round the last value is wrong, and that is what counts.
    let rejection = decoder
        .decode(br#"{"id":"a","n":7,"ts":1700000000000,"n":"oops"}"#)
        .expect_err("the last value of `n` is a string");
    assert_eq!(rejection.reason, RejectReason::Schema);
    assert!(rejection.message.contains("`n`"), "{}", rejection.message);
}

#[test]
fn events_far_ahead_of_the_clock_are_rejected_as_future() {
    let now = 1_800_000_000_000;
    let default = source("");
    assert_eq!(
        default.max_future_ms,
        Some(3_600_000),
        "default is one hour"
    );
    assert!(check_not_future(&default, now + 3_600_000, now).is_ok());
    let rejection = check_not_future(&default, now + 3_600_001, now).expect_err("too far ahead");
    assert_eq!(rejection.reason, RejectReason::Future);
    assert!(
        rejection.message.contains("max_future"),
        "{}",
        rejection.message
    );
    let off = source("  watermark: { max_future: never }");
    assert!(check_not_future(&off, i64::MAX, now).is_ok());
    let tight = source("  watermark: { max_future: 5s }");
    assert!(check_not_future(&tight, now + 6_000, now).is_err());
}

#[test]
fn a_number_of_the_wrong_kind_is_quoted_as_written() {
    let decoder = JsonDecoder::new(&source(""));
    let message = |bytes: &[u8]| decoder.decode(bytes).expect_err("rejected").message;
    let m = message(br#"{"id":"a","n":12.0,"ts":1700000000000}"#);
    assert!(m.contains("found the number 12.0"), "{m}");
    let m = message(br#"{"id":"a","n":1e3,"ts":1700000000000}"#);
    assert!(m.contains("found the number 1e3"), "{m}");
    let m = message(br#"{"id":"a","n":9223372036854775808,"ts":1700000000000}"#);
    assert!(
        m.contains("9223372036854775808, outside the 64-bit integer range"),
        "{m}"
    );
    let m = message(br#"{"id":"a","n":1,"ts":1772409560000.0}"#);
    assert!(m.contains("found the number 1772409560000.0"), "{m}");
}

#[test]
fn keys_are_matched_however_they_are_written() {
    let decoder = JsonDecoder::new(&source(""));
    // The declared order, recognised byte for byte; then escapes, other orders, look-alikes.
    let in_order = decoder
        .decode(br#"{"id":"a","n":1,"x":2.5,"ok":true,"ts":1700000000000}"#)
        .unwrap();
    let escaped = decoder
        .decode(br#"{"\u0069d":"a","\u006e":1,"x":2.5,"o\u006b":true,"t\u0073":1700000000000}"#)
        .unwrap();
    let shuffled = decoder
        .decode(br#"{"ts":1700000000000,"ok":true,"x":2.5,"n":1,"id":"a"}"#)
        .unwrap();
    assert_eq!(in_order, escaped);
    assert_eq!(in_order, shuffled);
    // Keys that start like a declared one are other keys, and are skipped.
    let e = decoder
        .decode(br#"{"id":"a","nn":"not n","n":1,"x2":"not x","ts":1700000000000}"#)
        .unwrap();
    assert_eq!(e.fields[1], Value::Int(1));
    assert_eq!(e.fields[2], Value::Null);
    // An unterminated key right where a declared one is expected is still malformed.
    assert_eq!(reason(br#"{"id":"a","n"#), RejectReason::Malformed);
    assert_eq!(reason(br#"{"id":"a","n""#), RejectReason::Malformed);
}

proptest! {
    /// Against the byte-by-byte definition, at every length and position of the first
    /// byte that needs attention.
    #[test]
    fn plain_run_finds_the_first_byte_that_needs_attention(
        bytes in proptest::collection::vec(
            prop_oneof![1 => Just(b'"'), 1 => Just(b'\\'), 1 => 0u8..0x20, 40 => 0x20u8..=0xff],
            0..80,
        )
    ) {
        let want = bytes
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .unwrap_or(bytes.len());
        prop_assert_eq!(super::json::plain_run(&bytes), want);
        prop_assert_eq!(super::json::plain_run_swar(&bytes), want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Numbers read without the general parser (short decimals, integers) come out bit for bit
    /// as the standard parser reads their text, at every digit count and sign, as floats and
    /// as ints.
    #[test]
    fn numbers_decode_exactly_as_their_text_parses(
        negative in any::<bool>(),
        int_part in prop_oneof![Just("0".to_string()), "[1-9][0-9]{0,19}"],
        fraction in proptest::option::of("[0-9]{1,24}"),
        exponent in proptest::option::of(-30i32..30),
    ) {
        let sign = if negative { "-" } else { "" };
        let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
        let exponent = exponent.map(|e| format!("e{e}")).unwrap_or_default();
        let number = format!("{sign}{int_part}{fraction}{exponent}");
        let decoder = JsonDecoder::new(&source(""));
        let as_float = format!(r#"{{"id":"a","n":1,"x":{number},"ts":1}}"#);
        let event = decoder
            .decode(as_float.as_bytes())
            .expect("a float field takes any finite number");
        // An integer where a float is declared is the integer converted (so `-0` is 0).
        let want = match number.parse::<i64>() {
            Ok(i) => i as f64,
            Err(_) => number.parse::<f64>().expect("a JSON number parses"),
        };
        prop_assert_eq!(&event.fields[2], &Value::Float(want));
        if let Value::Float(got) = event.fields[2] {
            prop_assert_eq!(got.to_bits(), want.to_bits(), "{}", number);
        }
        let int_text = format!(r#"{{"id":"a","n":{number},"ts":1}}"#);
        let as_int = decoder.decode(int_text.as_bytes());
        match number.parse::<i64>() {
            Ok(i) if fraction.is_empty() && exponent.is_empty() => {
                prop_assert_eq!(&as_int.expect("an integer").fields[1], &Value::Int(i));
            }
            _ => prop_assert_eq!(as_int.expect_err("not an i64").reason, RejectReason::Schema),
        }
    }
}

#[test]
fn typed_values_convert_only_where_documented() {
    assert_eq!(
        coerce("n", FieldType::Int, Value::Ts(1_500)),
        Ok(Value::Int(1_500)),
        "a timestamp read as an int is its epoch milliseconds"
    );
    assert_eq!(
        coerce("x", FieldType::Float, Value::Int(2)),
        Ok(Value::Float(2.0))
    );
    assert_eq!(
        coerce("ts", FieldType::Timestamp, Value::Int(7)),
        Ok(Value::Ts(7))
    );
    assert!(coerce("x", FieldType::Float, Value::Ts(1)).is_err());
    assert!(coerce("s", FieldType::String, Value::Int(1)).is_err());
    assert!(coerce("n", FieldType::Int, Value::Float(1.0)).is_err());
}

/// `validate`'s verdict on a writer schema agrees with what the decoder does with its datums:
/// for each Avro type and each declared type, the schema passes exactly when a value decodes.
#[test]
fn validate_accepts_an_avro_type_exactly_when_its_values_decode() {
    use apache_avro::types::Value as A;
    let enum_type = r#"{"type":"enum","name":"E","symbols":["a"]}"#;
    let cases: Vec<(&str, A)> = vec![
        (r#""string""#, A::String("2026-01-01T00:00:00Z".into())),
        (r#""long""#, A::Long(5)),
        (r#""int""#, A::Int(5)),
        (r#""double""#, A::Double(1.5)),
        (r#""float""#, A::Float(1.5)),
        (r#""boolean""#, A::Boolean(true)),
        (
            r#"{"type":"enum","name":"G","symbols":["a"]}"#,
            A::Enum(0, "a".into()),
        ),
        (
            r#"{"type":"string","logicalType":"uuid"}"#,
            A::Uuid(Default::default()),
        ),
        (r#"{"type":"int","logicalType":"date"}"#, A::Date(3)),
        (
            r#"{"type":"long","logicalType":"timestamp-millis"}"#,
            A::TimestampMillis(5),
        ),
        (
            r#"{"type":"long","logicalType":"timestamp-micros"}"#,
            A::TimestampMicros(5_000),
        ),
        (
            r#"{"type":"long","logicalType":"local-timestamp-millis"}"#,
            A::LocalTimestampMillis(5),
        ),
        (
            r#"{"type":"int","logicalType":"time-millis"}"#,
            A::TimeMillis(5),
        ),
        (r#""bytes""#, A::Bytes(vec![1])),
        (
            r#"{"type":"array","items":"long"}"#,
            A::Array(vec![A::Long(1)]),
        ),
        (
            r#"{"type":"fixed","name":"F","size":2}"#,
            A::Fixed(2, vec![1, 2]),
        ),
        // A named type used a second time is a reference to the first.
        (r#""E""#, A::Enum(0, "a".into())),
    ];
    for (avro_type, value) in cases {
        for declared in ["string", "int", "float", "bool", "timestamp"] {
            let writer = format!(
                r#"{{"type":"record","name":"T","fields":[{{"name":"first","type":{enum_type}}},{{"name":"id","type":"string"}},{{"name":"ts","type":"long"}},{{"name":"v","type":{avro_type}}}]}}"#
            );
            let pipeline = compile_source(
                "t.yaml",
                &format!(
                    r#"
name: t
source:
  kafka: {{ brokers: "x:1", topic: t, group_id: g }}
  schema: {{ id: string, ts: timestamp, v: {declared} }}
  entity: id
  event_time: ts
features:
  - {{ name: c, agg: count, window: lifetime }}
"#
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let mut source = pipeline.source;
            let validated = avro::writer_schema_problems(&writer, &source.schema).is_empty();
            source.format = crate::config::Format::Avro;
            source.avro_schema = Some(writer.clone());
            let mut decoder = AvroDecoder::new(&source).unwrap();
            let schema = apache_avro::Schema::parse_str(&writer).unwrap();
            let record = A::Record(vec![
                ("first".into(), A::Enum(0, "a".into())),
                ("id".into(), A::String("k".into())),
                ("ts".into(), A::Long(1_000)),
                ("v".into(), value.clone()),
            ]);
            #[allow(deprecated)]
            let bytes = apache_avro::to_avro_datum(&schema, record)
                .unwrap_or_else(|e| panic!("{avro_type}: {e}"));
            let decoded = decoder.decode(&bytes);
            assert_eq!(
                validated,
                decoded.is_ok(),
                "Avro {avro_type} as declared {declared}: validate says {validated}, the decoder {decoded:?}"
            );
        }
    }
}

#[test]
fn a_union_passes_validate_when_one_branch_is_readable() {
    let declared = source("").schema;
    let writer = |n_type: &str| {
        format!(
            r#"{{"type":"record","name":"T","fields":[{{"name":"id","type":"string"}},{{"name":"n","type":{n_type}}},{{"name":"ts","type":"long"}}]}}"#
        )
    };
    assert!(
        avro::writer_schema_problems(&writer(r#"["null","long","bytes"]"#), &declared).is_empty()
    );
    let problems = avro::writer_schema_problems(&writer(r#"["null","string","bytes"]"#), &declared);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(r#"["null", "string", "bytes"], which is not read as int"#),
        "{problems:?}"
    );
    let problems = avro::writer_schema_problems(&writer(r#""null""#), &declared);
    assert!(problems[0].contains("`n` is always null"), "{problems:?}");
}

/// A declared value is read straight into its type where it can be, and by the general parser
/// otherwise (escapes, a key read in full, other spellings): both must give the same event.
#[test]
fn plain_and_general_spellings_of_a_value_decode_alike() {
    let decoder = JsonDecoder::new(&source(""));
    let pairs = [
        (
            r#"{"id":"ab","n":12,"x":100,"ok":true,"ts":"2026-03-01T00:00:00Z"}"#,
            r#"{"id":"a\u0062","n":12,"x":1e2,"ok":true,"ts":1772323200000}"#,
        ),
        (
            r#"{"id":"a","n":-7,"x":-0.25,"ok":false,"ts":1772323200001}"#,
            r#"{ "id" : "\u0061" , "n" : -7 , "x" : -25e-2 , "ok" : false , "ts" : "2026-03-01T01:00:00.001+01:00" }"#,
        ),
        (
            r#"{"id":"a","n":0,"x":123456789012345,"ts":0}"#,
            r#"{"id":"a","n":-0,"x":123456789012345.0,"ts":"1970-01-01T00:00:00Z"}"#,
        ),
    ];
    for (plain, general) in pairs {
        let a = decoder.decode(plain.as_bytes()).expect(plain);
        let b = decoder.decode(general.as_bytes()).expect(general);
        assert_eq!(a, b, "{plain} / {general}");
    }
    // What the direct read declines is still judged by the general parser.
    for (text, want) in [
        (r#"{"id":"a","n":012,"ts":1}"#, RejectReason::Malformed),
        (r#"{"id":"a","n":1.0,"ts":1}"#, RejectReason::Schema),
        (
            r#"{"id":"a","n":1,"ts":"2026-02-30T00:00:00Z"}"#,
            RejectReason::Schema,
        ),
        (r#"{"id":"a","n":1,"ts":1.5}"#, RejectReason::Schema),
        (
            r#"{"id":"a","n":1,"ok":truth,"ts":1}"#,
            RejectReason::Malformed,
        ),
        (r#"{"id":"a","n":1,"x":2.,"ts":1}"#, RejectReason::Malformed),
        (r#"{"id":"a","n":1,"x":-,"ts":1}"#, RejectReason::Malformed),
        (r#"{"id":"a	b","n":1,"ts":1}"#, RejectReason::Malformed),
        (r#"{"id":7,"n":1,"ts":1}"#, RejectReason::Schema),
    ] {
        assert_eq!(reason(text.as_bytes()), want, "{text}");
    }
}

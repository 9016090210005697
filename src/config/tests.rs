//! Pipeline files: what compiles, and the exact problems reported for what does not.

use super::*;

const VALID: &str = r#"
name: card_fraud
source:
  kafka:
    brokers: 127.0.0.1:9092
    topic: card-transactions
    group_id: g
    options: { "sasl.password": "hunter2" }
  schema:
    card_id: string
    merchant_id: string
    amount: float
    status: string?
    ts: timestamp
  entity: card_id
  event_time: ts
  watermark: { max_out_of_order: 5s, idle_timeout: 30s }
  allowed_lateness: 30s
  on_late: dlq
features:
  - { name: txn_count_10m, agg: count, window: { sliding: 10m } }
  - { name: amount_sum_1h, agg: sum, field: amount, window: { hopping: 1h, step: 5m } }
  - { name: declined_1h, agg: count, where: 'status == "declined"', window: { sliding: 1h } }
  - { name: p90, agg: { percentile: 0.9 }, field: amount, window: lifetime }
  - { name: sess, agg: count, window: { session: 30m } }
sinks:
  kafka: { topic: card-features, format: json, emit: on_update }
  parquet: { path: data/features, snapshot_every: 5m, feature_log: true }
dead_letter: { topic: card-transactions-dlq }
state: { entity_ttl: 7d }
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    match compile_source("p.yaml", text) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.errors,
    }
}

fn has(errors: &[ConfigError], path: &str, needle: &str) -> bool {
    errors
        .iter()
        .any(|e| e.path == path && e.message.contains(needle))
}

#[test]
fn the_product_example_compiles() {
    let p = compile_source("p.yaml", VALID).unwrap();
    assert_eq!(p.name, "card_fraud");
    assert_eq!(p.features.len(), 5);
    assert_eq!(p.source.allowed_lateness_ms, 30_000);
    assert_eq!(p.source.on_late, OnLate::Dlq);
    assert_eq!(
        p.features[0].window,
        Window::Hopping {
            size_ms: 600_000,
            step_ms: 1,
            written: WindowWritten::Sliding
        }
    );
    assert_eq!(p.features[1].value_type, ValueType::Float);
    assert_eq!(p.features[3].agg, Agg::Percentile(0.9));
    assert!(!p.source.schema.fields[3].required);
    assert_eq!(p.entity_ttl_ms, Some(7 * 86_400_000));
    // Secrets in librdkafka options never print.
    assert!(!format!("{:?}", p.source.kafka.options).contains("hunter2"));
}

#[test]
fn every_problem_is_reported_at_once_with_positions() {
    let text = VALID
        .replace("sliding: 10m }", "sliding: 10 }")
        .replace("agg: sum, field: amount", "agg: summ, field: amount")
        .replace("{ name: sess, agg: count", "{ name: p90, agg: count")
        .replace("status == \"declined\"", "statuz == \"declined\"")
        .replace("  allowed_lateness: 30s", "  alowed_lateness: 30s");
    let errs = errors(&text);
    assert!(
        has(&errs, "features[0].window.sliding", "has no unit"),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "features[1].agg", "did you mean `sum`"),
        "{errs:#?}"
    );
    assert!(has(&errs, "features[4].name", "already used"), "{errs:#?}");
    assert!(
        has(&errs, "features[2].where", "did you mean `status`"),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            "source.alowed_lateness",
            "did you mean `allowed_lateness`"
        ),
        "{errs:#?}"
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
    let unknown = errs
        .iter()
        .find(|e| e.path == "source.alowed_lateness")
        .unwrap();
    assert_eq!((unknown.pos.line, unknown.pos.col), (18, 3));
    let bad_where = errs.iter().find(|e| e.path == "features[2].where").unwrap();
    assert_eq!(bad_where.pos.line, 23);
    // The where error points into the expression (after `where: '`).
    assert_eq!(bad_where.pos.col, 46, "{bad_where:?}");
}

#[test]
fn field_rules_are_checked() {
    let text = VALID
        .replace("agg: sum, field: amount", "agg: sum, field: status")
        .replace(
            "{ name: txn_count_10m, agg: count,",
            "{ name: txn_count_10m, agg: mean,",
        )
        .replace(
            "field: amount, window: lifetime",
            "field: amont, window: lifetime",
        );
    let errs = errors(&text);
    assert!(
        has(&errs, "features[1].field", "needs an int or float field"),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "features[0].field", "needs a `field`"),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "features[3].field", "did you mean `amount`"),
        "{errs:#?}"
    );
}

#[test]
fn entity_and_event_time_must_be_declared_and_typed() {
    let errs = errors(
        &VALID
            .replace("entity: card_id", "entity: card")
            .replace("event_time: ts", "event_time: amount"),
    );
    assert!(has(&errs, "source.entity", "not declared"), "{errs:#?}");
    assert!(
        has(&errs, "source.event_time", "must be declared as timestamp"),
        "{errs:#?}"
    );
}

#[test]
fn windows_are_checked() {
    let errs = errors(
        &VALID
            .replace("hopping: 1h, step: 5m", "hopping: 1h, step: 7m")
            .replace("session: 30m", "sesion: 30m"),
    );
    assert!(
        has(&errs, "features[1].window.step", "whole multiple"),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "features[4].window.sesion", "did you mean `session`"),
        "{errs:#?}"
    );
    let errs = errors(&VALID.replace("{ hopping: 1h, step: 5m }", "{ hopping: 1h }"));
    assert!(
        has(&errs, "features[1].window", "needs a `step`"),
        "{errs:#?}"
    );
    let errs = errors(&VALID.replace("emit: on_update", "emit: on_window_close"));
    assert!(
        has(
            &errs,
            "features[0].window",
            "1 ms step (exact, the default)"
        ),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "features[3].window", "never closes"),
        "{errs:#?}"
    );
    // A record per window: 300 days in 1-minute steps would be 432,000 records per event.
    let errs = errors(
        &VALID
            .replace("emit: on_update", "emit: on_window_close")
            .replace("{ hopping: 1h, step: 5m }", "{ sliding: 300d, step: 1m }"),
    );
    assert!(
        has(
            &errs,
            "features[1].window",
            "falls in 432000 windows of this feature and `emit: on_window_close` writes a record for every one; use a step of at least 5m"
        ),
        "{errs:#?}"
    );
    // No round step divides 1,000,001 ms (101 × 9,901): the suggestion still divides it.
    let errs = errors(
        &VALID
            .replace("emit: on_update", "emit: on_window_close")
            .replace(
                "{ hopping: 1h, step: 5m }",
                "{ hopping: 1000001ms, step: 1ms }",
            ),
    );
    assert!(
        has(&errs, "features[1].window", "use a step of at least 101ms"),
        "{errs:#?}"
    );
    let errs = errors(&VALID.replace("{ session: 30m }", "{ session: 300000000d }"));
    assert!(
        has(
            &errs,
            "features[4].window.session",
            "longer than the longest duration"
        ),
        "{errs:#?}"
    );
}

#[test]
fn cross_section_rules_are_checked() {
    let errs = errors(&VALID.replace("dead_letter: { topic: card-transactions-dlq }\n", ""));
    assert!(
        has(&errs, "source.on_late", "needs `dead_letter"),
        "{errs:#?}"
    );
    let errs = errors(&VALID.replace("  schema:\n", "  format: avro_confluent\n  schema:\n"));
    assert!(
        has(&errs, "source.schema_registry", "needs `schema_registry`"),
        "{errs:#?}"
    );
}

#[test]
fn schema_types_and_yaml_syntax() {
    let errs = errors(&VALID.replace("amount: float", "amount: double"));
    assert!(
        has(&errs, "source.schema.amount", "not a type"),
        "{errs:#?}"
    );
    let errs = errors("name: x\nsource: [unclosed\n");
    assert!(errs[0].message.starts_with("invalid YAML"), "{errs:#?}");
    assert!(errors("")[0].message.contains("empty"));
    let errs = errors("name: x\n");
    assert!(
        has(&errs, "source", "required") && has(&errs, "features", "required"),
        "{errs:#?}"
    );
}

#[test]
fn display_shows_file_line_column_and_path() {
    let err = compile_source(
        "pipes/x.yaml",
        &VALID.replace("on_late: dlq", "on_late: dql"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("pipes/x.yaml:19:12: source.on_late: `dql` is not one of: drop, dlq (did you mean `dlq`?)"), "{text}");
}

/// A source too broken to give a schema does not hide the features' own problems: one run
/// reports both.
#[test]
fn features_are_checked_even_when_the_source_is_not_usable() {
    let e = errors(
        r#"
name: p
source: kafka
features:
  - { name: a, agg: summ, field: amount, window: { sliding: 10m } }
  - { name: a, agg: count, window: { tumbling: 5x } }
"#,
    );
    assert!(has(&e, "source", "expected a mapping"), "{e:?}");
    assert!(has(&e, "features[0].agg", "summ"), "{e:?}");
    assert!(has(&e, "features[1].name", "already used"), "{e:?}");
    assert!(has(&e, "features[1].window.tumbling", ""), "{e:?}");
    // Field names cannot be checked without a schema, so none is reported as undeclared.
    assert!(
        !e.iter().any(|x| x.message.contains("not declared")),
        "{e:?}"
    );
}

#[test]
fn output_column_and_partition_names_are_reserved() {
    for reserved in ["entity", "as_of", "snapshot_time", "date", "hour"] {
        let errs = errors(&VALID.replacen("name: txn_count_10m", &format!("name: {reserved}"), 1));
        assert!(
            has(&errs, "features[0].name", "is a reserved column name"),
            "{reserved}: {errs:#?}"
        );
    }
}

#[test]
fn an_avro_writer_schema_is_checked_against_the_declared_one() {
    let with_writer = |schema: &str| {
        VALID.replace(
            "  schema:\n",
            &format!("  format: avro\n  avro_schema: '{schema}'\n  schema:\n"),
        )
    };
    let fields = r#"{"name":"card_id","type":"string"},{"name":"merchant_id","type":{"type":"enum","name":"M","symbols":["a"]}},{"name":"amount","type":["null","double","long"]},{"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}}"#;
    let good = with_writer(&format!(
        r#"{{"type":"record","name":"T","fields":[{fields}]}}"#
    ));
    compile_source("p.yaml", &good).unwrap_or_else(|e| panic!("{e}"));

    let errs = errors(&with_writer(r#"{"type":"record","name":"T","fields":["#));
    assert!(
        has(&errs, "source.avro_schema", "is not JSON: EOF"),
        "{errs:#?}"
    );
    let errs = errors(&with_writer(r#"{"type":"recrd","name":"T","fields":[]}"#));
    assert!(
        has(&errs, "source.avro_schema", "not a valid Avro schema"),
        "{errs:#?}"
    );
    let errs = errors(&with_writer(
        r#"{"type":"record","name":"T","fields":[{"name":"a","type":{"type":"enum","name":"E","symbols":["x"]}},{"name":"b","type":{"type":"enum","name":"E","symbols":["y"]}}]}"#,
    ));
    assert!(
        has(&errs, "source.avro_schema", "not a usable Avro schema"),
        "{errs:#?}"
    );
    let errs = errors(&with_writer(r#""string""#));
    assert!(
        has(&errs, "source.avro_schema", "must be a record, not string"),
        "{errs:#?}"
    );
    let errs = errors(&with_writer(
        r#"{"type":"record","name":"T","fields":[{"name":"card_id","type":"bytes"},{"name":"ts","type":"string"}]}"#,
    ));
    assert!(
        has(
            &errs,
            "source.avro_schema",
            "`card_id` is string, but `avro_schema` gives it the Avro type bytes"
        ),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            "source.avro_schema",
            "`merchant_id` is not in `avro_schema`"
        ),
        "{errs:#?}"
    );
    assert!(
        !errs.iter().any(|e| e.message.contains("`status`")),
        "an optional field may be absent from the writer schema: {errs:#?}"
    );
    assert!(
        !errs.iter().any(|e| e.message.contains("`ts`")),
        "an RFC 3339 string is read as a timestamp: {errs:#?}"
    );

    let errs = errors(&VALID.replace(
        "  schema:\n",
        "  avro_schema: '{\"type\":\"record\",\"name\":\"T\",\"fields\":[]}'\n  schema:\n",
    ));
    assert!(
        has(&errs, "source.avro_schema", "read only with `format: avro`"),
        "{errs:#?}"
    );
}

#[test]
fn a_state_topic_is_optional_and_named() {
    assert_eq!(compile_source("p.yaml", VALID).unwrap().state_topic, None);
    let with = VALID.replace(
        "state: { entity_ttl: 7d }",
        "state: { entity_ttl: 7d, topic: card-fraud-state }",
    );
    assert_eq!(
        compile_source("p.yaml", &with)
            .unwrap()
            .state_topic
            .as_deref(),
        Some("card-fraud-state")
    );
    let empty = VALID.replace("state: { entity_ttl: 7d }", "state: { topic: '' }");
    assert!(has(&errors(&empty), "state.topic", "non-empty string"));
    let typo = VALID.replace("state: { entity_ttl: 7d }", "state: { topik: x }");
    assert!(has(&errors(&typo), "state.topik", "topic"));
}

#[test]
fn exactly_once_is_chosen_by_name_and_needs_a_state_topic() {
    assert_eq!(
        compile_source("p.yaml", VALID).unwrap().guarantee,
        Guarantee::AtLeastOnce
    );
    let with_topic = VALID.replace(
        "state: { entity_ttl: 7d }",
        "state: { entity_ttl: 7d, topic: card-fraud-state }\nguarantee: exactly_once",
    );
    assert_eq!(
        compile_source("p.yaml", &with_topic).unwrap().guarantee,
        Guarantee::ExactlyOnce
    );
    let without = VALID.replace(
        "state: { entity_ttl: 7d }",
        "state: { entity_ttl: 7d }\nguarantee: exactly_once",
    );
    assert!(has(&errors(&without), "guarantee", "set `state.topic`"));
    let typo = VALID.replace(
        "state: { entity_ttl: 7d }",
        "state: { entity_ttl: 7d }\nguarantee: exactly_one",
    );
    assert!(has(&errors(&typo), "guarantee", "exactly_once"));
    let slow = VALID.replace(
        "state: { entity_ttl: 7d }",
        "state: { topic: s, checkpoint_every: 10m }\nguarantee: exactly_once",
    );
    assert!(has(&errors(&slow), "guarantee", "at most 5m"));
}

//! `featurestream run` against the real Kafka broker and schema registry that
//! `scripts/kafka.sh` starts (see `scripts/test.sh`). Topics and groups are unique per test.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The reference partitioner of the test above, against the values Kafka's own tests give.
#[test]
fn the_reference_murmur2_is_kafkas() {
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];
    for (key, want) in cases {
        assert_eq!(
            murmur2(key) as i32,
            want,
            "{}",
            String::from_utf8_lossy(key)
        );
    }
}

#[test]
fn stream_matches_replay_and_serves_lookups_parquet_and_metrics() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("stream", 3, "json", "json");
    let batch = events(3000, 0);
    produce(&input, &batch);

    let (service, http) = start_service(&pipeline, dir.path().join("run.log"));
    let base = format!("http://{http}");
    wait_until(Duration::from_secs(120), "all events consumed", || {
        consumed(&http) >= 3000
    });

    // Replay the same events (same per-entity order) and compare every event's own record.
    let records = consume_all(&output, None, Duration::from_secs(5));
    // Keyed by entity and partitioned as Kafka's Java clients partition keys.
    for record in &records {
        let key = record.key.as_deref().expect("feature records have a key");
        assert_eq!(
            record.partition,
            java_partition(key, 3),
            "{}",
            String::from_utf8_lossy(key)
        );
    }
    let streamed = parse(&records);
    assert_matches_replay(dir.path(), &pipeline, &batch, &streamed);
    assert!(streamed.len() >= 3000);

    // Look-ups equal the newest record of each entity on the output topic.
    let mut newest: BTreeMap<String, Value> = BTreeMap::new();
    for r in &streamed {
        newest.insert(
            r["entity"].as_str().unwrap().to_string(),
            r["features"].clone(),
        );
    }
    for (entity, features) in &newest {
        let (status, body) = http_get(&format!("{base}/v1/features/it_stream/{entity}"));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(&v["features"], features, "{entity}");
    }
    assert_eq!(
        http_get(&format!("{base}/v1/features/it_stream/no_such_card")).0,
        404
    );
    assert_eq!(
        http_get(&format!("{base}/v1/features/other_pipeline/card_001")).0,
        404
    );
    assert_eq!(
        http_post(
            &format!("{base}/v1/features/it_stream"),
            "{\"entities\": 5}"
        )
        .0,
        400
    );
    assert_eq!(
        http_post(&format!("{base}/v1/features/it_stream"), "not json").0,
        400
    );
    let (status, body) = http_post(
        &format!("{base}/v1/features/it_stream"),
        r#"{"entities":["card_001","nope"]}"#,
    );
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["results"][0]["features"], newest["card_001"]);
    assert_eq!(v["results"][0]["found"], true);
    assert_eq!(v["results"][1]["found"], false);
    assert_eq!(http_get(&format!("{base}/healthz")).0, 200);
    assert_eq!(http_get(&format!("{base}/readyz")).0, 200);

    // 1,000 concurrent look-ups while another 20,000 events are consumed.
    let totals: BTreeMap<String, u64> = newest
        .iter()
        .map(|(e, f)| (e.clone(), f["total"].as_u64().unwrap()))
        .collect();
    let more = events(20_000, 3000)
        .into_iter()
        .map(|(p, k, payload)| {
            (
                p,
                format!("x{k}"),
                String::from_utf8(payload)
                    .unwrap()
                    .replace("\"card_0", "\"xcard_0")
                    .into_bytes(),
            )
        })
        .collect::<Vec<_>>();
    let producer_thread = {
        let input = input.clone();
        std::thread::spawn(move || produce(&input, &more))
    };
    let handles: Vec<_> = (0..10)
        .map(|t| {
            let base = base.clone();
            let totals = totals.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let entity = format!("card_{:03}", (t * 100 + i) % CARDS);
                    let (status, body) =
                        http_get(&format!("{base}/v1/features/it_stream/{entity}"));
                    assert_eq!(status, 200, "{body}");
                    let v: Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(
                        v["features"]["total"].as_u64(),
                        totals.get(&entity).copied(),
                        "{entity}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("look-up thread");
    }
    producer_thread.join().unwrap();
    wait_until(
        Duration::from_secs(120),
        "the second batch consumed",
        || consumed(&http) >= 23_000,
    );

    // The first cards have been quiet while the watermark moved ~5 hours on: their sliding
    // and hopping values decayed (in look-ups and on the topic), their lifetime count did not.
    let latest = parse(&consume_all(&output, None, Duration::from_secs(5)));
    for entity in ["card_001", "card_017"] {
        let (status, body) = http_get(&format!("{base}/v1/features/it_stream/{entity}"));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["features"]["n_10m"], 0, "{body}");
        assert_eq!(v["features"]["sum_1h"], Value::Null, "{body}");
        assert_eq!(
            v["features"]["total"].as_u64(),
            Some(totals[entity]),
            "{body}"
        );
        let last = latest.iter().rev().find(|r| r["entity"] == entity).unwrap();
        assert_eq!(
            last["features"], v["features"],
            "the decay was also emitted to the topic"
        );
    }

    // Metrics exist and reconcile.
    let metrics = http_get(&format!("{base}/metrics")).1;
    for name in featurestream::telemetry::ALL
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| {
            ![
                "featurestream_consumer_lag_messages",
                "featurestream_partition_watermark_seconds",
            ]
            .contains(n)
        })
    {
        assert!(
            metrics.contains(name),
            "metric {name} missing from /metrics:\n{metrics}"
        );
    }
    // Every reason's counters are there at zero before any event is rejected, so that the
    // balance below has all its terms on a clean stream.
    for reason in featurestream::decode::RejectReason::ALL {
        let has = |name: &str| {
            metrics.lines().any(|l| {
                l.starts_with(name) && l.contains(&format!("reason=\"{}\"", reason.as_str()))
            })
        };
        assert!(
            has("featurestream_events_dead_lettered_total"),
            "{reason:?}:\n{metrics}"
        );
        assert_eq!(
            has("featurestream_events_rejected_total"),
            reason != featurestream::decode::RejectReason::Late,
            "{reason:?}:\n{metrics}"
        );
    }
    let consumed = metric(&metrics, "featurestream_events_consumed_total");
    let aggregated = metric(&metrics, "featurestream_events_aggregated_total");
    let rejected = metric(&metrics, "featurestream_events_rejected_total");
    let late = metric(&metrics, "featurestream_events_late_total");
    assert_eq!(consumed, aggregated + rejected + late, "{metrics}");
    assert_eq!((consumed, aggregated), (23_000, 23_000), "{metrics}");

    // Parquet snapshots read by pyarrow, polled while they are being written.
    let expected = dir.path().join("expected.json");
    std::fs::write(&expected, serde_json::to_string(&totals).unwrap()).unwrap();
    let check = std::process::Command::new(python())
        .args([
            "tests/python/check_parquet.py",
            dir.path().join("parquet").to_str().unwrap(),
            "it_stream",
            expected.to_str().unwrap(),
            "--poll",
            "3",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "pyarrow check failed: {}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let (status, log) = service.terminate();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(log.contains("Stopped cleanly"), "{log}");
}

#[test]
fn bad_and_late_events_are_dead_lettered_with_reasons() {
    let Setup {
        dir,
        input,
        output,
        dlq,
        pipeline,
    } = setup("dlq", 1, "json", "json");
    let good = |i: i64| {
        format!(
            r#"{{"card_id":"c{}","merchant_id":"m","amount":1.5,"status":"ok","ts":{}}}"#,
            i % 3,
            T0 + i * 1000
        )
    };
    let mut records: Vec<(&str, Vec<u8>)> = Vec::new();
    for i in 0..100 {
        records.push(("ok", good(i).into_bytes()));
    }
    records.push(("malformed", b"{not json".to_vec()));
    records.push(("malformed", vec![0xff, 0xfe, b'{']));
    records.push((
        "schema",
        br#"{"card_id":"c1","merchant_id":"m","amount":"12.50","status":"ok","ts":1772323300000}"#
            .to_vec(),
    ));
    records.push((
        "schema",
        br#"{"card_id":"c1","merchant_id":"m","amount":{"v":1},"status":"ok","ts":1772323300000}"#
            .to_vec(),
    ));
    records.push((
        "missing_field",
        br#"{"merchant_id":"m","amount":1.0,"status":"ok","ts":1772323300000}"#.to_vec(),
    ));
    records.push(("late", good(-1000).into_bytes()));
    // Larger than `max_event_bytes` and than a dead letter can be: it goes with its first
    // 64 KiB and its length.
    let mut oversized = good(99).into_bytes();
    oversized.truncate(oversized.len() - 1);
    oversized.extend(format!(r#","pad":"{}"}}"#, "x".repeat(1_020_000)).bytes());
    records.push(("too_large", oversized));
    for i in 100..110 {
        records.push(("ok", good(i).into_bytes()));
    }
    let to_send: Vec<(i32, String, Vec<u8>)> = records
        .iter()
        .enumerate()
        .map(|(i, (_, p))| (0, format!("k{i}"), p.clone()))
        .collect();
    produce(&input, &to_send);
    // The last one carries a header of its own, which its dead letter keeps after ours.
    let with_headers = records.len();
    records.push(("malformed", b"[1, 2".to_vec()));
    produce_with_header(
        &input,
        &format!("k{with_headers}"),
        b"[1, 2",
        ("trace-id", "abc123"),
    );
    let service = Service::start(
        &pipeline,
        &["--stop-after", &records.len().to_string()],
        dir.path().join("run.log"),
    );
    let (status, log) = service.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");

    let letters = consume_all(&dlq, Some(8), Duration::from_secs(10));
    let bad: Vec<(usize, &(&str, Vec<u8>))> = records
        .iter()
        .enumerate()
        .filter(|(_, (r, _))| *r != "ok")
        .collect();
    assert_eq!(
        letters.len(),
        bad.len(),
        "every bad or late event is dead-lettered exactly once"
    );
    for (letter, (index, (reason, payload))) in letters.iter().zip(&bad) {
        assert_eq!(letter.headers["reason"], *reason, "{:?}", letter.headers);
        if *reason == "too_large" {
            assert_eq!(letter.payload, payload[..64 * 1024], "the first 64 KiB");
            assert_eq!(
                letter.headers["payload.truncated.from"],
                payload.len().to_string()
            );
        } else {
            assert_eq!(&letter.payload, payload, "original bytes untouched");
        }
        assert_eq!(
            letter.key.as_deref(),
            Some(format!("k{index}").as_bytes()),
            "original key untouched"
        );
        assert_eq!(letter.headers["source.topic"], input);
        assert_eq!(letter.headers["source.offset"], index.to_string());
        assert_eq!(letter.headers["pipeline"], "it_dlq");
        assert!(!letter.headers["error"].is_empty());
        if *index == with_headers {
            assert_eq!(
                letter.headers.get("trace-id").map(String::as_str),
                Some("abc123"),
                "the event's own headers follow"
            );
        }
    }
    // consumed = aggregated + dead-lettered (late events are dead-lettered here), by counting topics.
    let out = parse(&consume_all(&output, None, Duration::from_secs(5)));
    let aggregated: Vec<(i32, String, Vec<u8>)> = records
        .iter()
        .filter(|(r, _)| *r == "ok")
        .map(|(_, p)| (0, String::new(), p.clone()))
        .collect();
    let with_keys: Vec<(i32, String, Vec<u8>)> = aggregated
        .iter()
        .map(|(_, _, p)| {
            let v: Value = serde_json::from_slice(p).unwrap();
            (0, v["card_id"].as_str().unwrap().to_string(), p.clone())
        })
        .collect();
    let own = event_records(&out, &with_keys);
    assert_eq!(own.len(), 110, "one record per aggregated event");
    assert_eq!(
        own.len() + letters.len(),
        records.len(),
        "consumed = aggregated + dead-lettered"
    );
}

#[test]
fn a_missing_input_topic_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = unique("missing");
    let (output, dlq) = (unique("features"), unique("dlq"));
    create_topics(&[(&output, 1), (&dlq, 1)]);
    let pipeline = write_pipeline(
        dir.path(),
        &pipeline_text(
            "it_missing",
            &missing,
            &output,
            &dlq,
            dir.path(),
            "json",
            "json",
        ),
    );
    let (status, log) =
        Service::start(&pipeline, &[], dir.path().join("run.log")).wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("topic `{missing}` does not exist")) && log.contains("input topic"),
        "{log}"
    );
}

#[test]
fn sigterm_midstream_and_restart_lose_nothing() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("restart", 3, "json", "json");
    let batch = events(30_000, 0);
    produce(&input, &batch);
    let (first, http) = start_service(&pipeline, dir.path().join("first.log"));
    wait_until(Duration::from_secs(120), "some events consumed", || {
        consumed(&http) >= 3000
    });
    let (status, log) = first.terminate();
    assert!(status.success(), "clean exit on SIGTERM:\n{log}");
    assert!(
        log.contains("Shutdown requested") && log.contains("Stopped cleanly"),
        "{log}"
    );

    // More events while it is down: the restarted service has these to consume even when the
    // first one got through the whole first batch before its stop took effect.
    let (batch, log) = restart_after_more_events(dir.path(), &pipeline, &input, &output, batch);
    assert_no_event_lost(&output, &batch, &log);
}

/// Produces 5,000 more events while the service is down, starts it again, waits until every
/// event (`batch` and those) has its record and stops it cleanly: all the events, and its log.
fn restart_after_more_events(
    dir: &std::path::Path,
    pipeline: &std::path::Path,
    input: &str,
    output: &str,
    mut batch: Vec<(i32, String, Vec<u8>)>,
) -> (Vec<(i32, String, Vec<u8>)>, String) {
    let later = events(5_000, 30_000);
    produce(input, &later);
    batch.extend(later);
    let (second, http) = start_service(pipeline, dir.join("second.log"));
    wait_until(
        Duration::from_secs(120),
        "the restarted service consuming",
        || consumed(&http) > 0,
    );
    wait_for_every_event_record(output, &batch);
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
    (batch, log)
}

#[test]
fn a_crash_resumes_from_the_last_periodic_checkpoint() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("crash", 3, "json", "json");
    let batch = events(30_000, 0);
    produce(&input, &batch);
    let (first, http) = start_service(&pipeline, dir.path().join("first.log"));
    wait_until(Duration::from_secs(120), "some events consumed", || {
        consumed(&http) >= 3000
    });
    // Checkpoints run every second here; their state is serialised between batches. Those
    // counted so far may have come before any event (nothing to commit yet); checkpoints do
    // not overlap, so the second one to complete from now on began after these events.
    let checkpoints = || {
        metric(
            &http_get(&format!("http://{http}/metrics")).1,
            "featurestream_checkpoints_total",
        )
    };
    let before = checkpoints();
    wait_until(
        Duration::from_secs(60),
        "two periodic checkpoints after those events",
        || checkpoints() >= before + 2,
    );
    let log = first.kill();
    // More events while it is down, computed on the state restored from those checkpoints.
    let (batch, second_log) =
        restart_after_more_events(dir.path(), &pipeline, &input, &output, batch);
    assert!(
        second_log.contains("Restored partition state from its checkpoint"),
        "the restarted service resumed from the crashed one's checkpoints:\n{log}\n{second_log}"
    );
    // Events after the last checkpoint, if any, are processed twice: the same values both
    // times, and every event's record equals what replay computes for it.
    let streamed = parse(&consume_all(&output, None, Duration::from_secs(5)));
    assert_matches_replay(dir.path(), &pipeline, &batch, &streamed);
}

#[test]
fn a_restored_partition_without_new_records_keeps_what_time_changed() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("quietpart", 3, "json", "json");
    // Partitions count as idle after a second without records, so that the watermark moves on
    // without partition 2.
    let text = std::fs::read_to_string(&pipeline)
        .unwrap()
        .replace("idle_timeout: 10m", "idle_timeout: 1s");
    std::fs::write(&pipeline, text).unwrap();
    let first = events(3_000, 0);
    produce(&input, &first);
    run_until_recorded(&pipeline, dir.path().join("a.log"), &output, &first);
    // Two hours later, records for partitions 0 and 1 only: the second run restores partition
    // 2 and, once it is idle, time alone moves its entities' windows (their records are sent).
    let second: Vec<_> = events(3_000, 7_200)
        .into_iter()
        .filter(|(p, _, _)| *p != 2)
        .collect();
    produce(&input, &second);
    let (b, http_b) = start_service(&pipeline, dir.path().join("b.log"));
    wait_for_every_event_record(&output, &second);
    let produced = |http: &str| {
        metric(
            &http_get(&format!("http://{http}/metrics")).1,
            "featurestream_records_produced_total",
        )
    };
    let settled = std::cell::Cell::new((0, std::time::Instant::now()));
    wait_until(
        Duration::from_secs(60),
        "the second run's records settled",
        || {
            let now = produced(&http_b);
            if now != settled.get().0 {
                settled.set((now, std::time::Instant::now()));
            }
            settled.get().1.elapsed() > Duration::from_secs(3)
        },
    );
    let (status, log_b) = b.terminate();
    assert!(status.success(), "{log_b}");
    // A third run has nothing new to read: what time changed in partition 2 was checkpointed
    // with it, so no record is sent again.
    let (c, http_c) = start_service(&pipeline, dir.path().join("c.log"));
    wait_until(
        Duration::from_secs(120),
        "the third run owning its partitions",
        || http_get(&format!("http://{http_c}/readyz")).0 == 200,
    );
    std::thread::sleep(Duration::from_secs(4));
    let again = produced(&http_c);
    let (status, log_c) = c.terminate();
    assert!(status.success(), "{log_c}");
    assert_eq!(
        again, 0,
        "records sent again after a restart:\n{log_b}\n{log_c}"
    );
}

#[test]
fn exactly_once_a_crash_neither_loses_nor_repeats_an_output() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("exactly", 3, "json", "json");
    let state_topic = use_exactly_once(&pipeline);
    let first_events = events(30_000, 0);
    produce(&input, &first_events);
    let (first, http) = start_service(&pipeline, dir.path().join("first.log"));
    let transactions = || {
        metric(
            &http_get(&format!("http://{http}/metrics")).1,
            "featurestream_checkpoints_total",
        )
    };
    wait_until(
        Duration::from_secs(120),
        "the first events consumed, two transactions committed",
        || consumed(&http) >= 30_000 && transactions() >= 2,
    );
    // More events arrive as a stream; the service is killed while it processes them, with a
    // transaction open: what it produced since the last commit must never be seen.
    let second = events(20_000, 40_000);
    let producing = {
        let (input, second) = (input.clone(), second.clone());
        std::thread::spawn(move || {
            for chunk in second.chunks(500) {
                produce(&input, chunk);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    wait_until(Duration::from_secs(60), "the stream half consumed", || {
        consumed(&http) >= 40_000
    });
    assert!(consumed(&http) < 50_000, "killed mid-stream");
    let log = first.kill();
    assert!(log.contains("Exactly-once"), "{log}");
    producing.join().unwrap();
    let all: Vec<_> = first_events.iter().chain(&second).cloned().collect();
    let second_log = run_until_recorded(&pipeline, dir.path().join("second.log"), &output, &all);
    assert!(
        second_log.contains(&format!(
            "Restored partition state from its checkpoint in the state topic `{state_topic}`"
        )),
        "the restarted service resumed from the committed state:\n{log}\n{second_log}"
    );
    let streamed = assert_every_record_once(&output, &all, &second_log);
    assert_matches_replay(dir.path(), &pipeline, &all, &streamed);
}

#[test]
fn exactly_once_partitions_move_between_instances_without_a_repeat() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("exactlymove", 3, "json", "json");
    let state_topic = use_exactly_once(&pipeline);
    // Another machine: a state folder of its own (and so a transactional id of its own).
    let pipeline_b = with_own_state_folder(dir.path(), &pipeline);
    let HandOver { all, log_b, .. } =
        hand_over(dir.path(), &input, &output, &pipeline, &pipeline_b);
    assert!(
        log_b.contains(&format!(
            "Restored partition state from its checkpoint in the state topic `{state_topic}`"
        )),
        "{log_b}"
    );
    // The transaction committed at the hand-over holds the outputs, state and offsets of the
    // partitions that moved: no record is sent twice, and all equal a single replay.
    let streamed = assert_every_record_once(&output, &all, &log_b);
    assert_matches_replay(dir.path(), &pipeline, &all, &streamed);
}

#[test]
fn avro_in_and_out_through_the_registry() {
    use apache_avro::types::Value as Avro;
    let Setup {
        dir,
        input,
        output,
        dlq,
        pipeline,
    } = setup("avro", 1, "avro_confluent", "avro");
    let schema_text = r#"{"type":"record","name":"Txn","fields":[
        {"name":"card_id","type":"string"},{"name":"merchant_id","type":"string"},
        {"name":"amount","type":"double"},{"name":"status","type":"string"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    let registry = featurestream::decode::registry::RegistryClient::new(&registry());
    let id = registry
        .register(&format!("{input}-value"), schema_text)
        .expect("register input schema");
    let schema = apache_avro::Schema::parse_str(schema_text).unwrap();
    let mut records = Vec::new();
    for i in 0..20i64 {
        let value = Avro::Record(vec![
            ("card_id".into(), Avro::String(format!("c{}", i % 2))),
            ("merchant_id".into(), Avro::String(format!("m{i}"))),
            ("amount".into(), Avro::Double(i as f64 + 0.5)),
            ("status".into(), Avro::String("ok".into())),
            ("ts".into(), Avro::TimestampMillis(T0 + i * 1000)),
        ]);
        #[allow(deprecated)]
        let datum = apache_avro::to_avro_datum(&schema, value).unwrap();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&id.to_be_bytes());
        framed.extend_from_slice(&datum);
        records.push((0, format!("c{}", i % 2), framed));
    }
    let mut unknown = vec![0u8];
    unknown.extend_from_slice(&999_999u32.to_be_bytes());
    unknown.extend_from_slice(&records[0].2[5..]);
    records.push((0, "bad".into(), unknown));
    let truncated = records[1].2[..8].to_vec();
    records.push((0, "bad".into(), truncated));
    produce(&input, &records);
    let service = Service::start(
        &pipeline,
        &["--stop-after", "22"],
        dir.path().join("run.log"),
    );
    let (status, log) = service.wait(Duration::from_secs(120));
    assert!(status.success(), "{log}");

    let letters = consume_all(&dlq, Some(2), Duration::from_secs(10));
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l.headers["reason"].as_str())
        .collect();
    assert_eq!(reasons, vec!["unknown_schema", "malformed"]);

    let read = std::process::Command::new(python())
        .args([
            "tests/python/read_avro.py",
            &brokers(),
            &output,
            &common::registry(),
            "20",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs");
    assert!(
        read.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&read.stdout),
        String::from_utf8_lossy(&read.stderr)
    );
    let decoded: Vec<Value> = String::from_utf8_lossy(&read.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decoded.len(), 20);
    let last_c1 = decoded.iter().rev().find(|r| r["entity"] == "c1").unwrap();
    assert_eq!(last_c1["features"]["total"], 10, "{last_c1}");
    assert_eq!(last_c1["_key"], "c1");
    assert_eq!(last_c1["pipeline"], "it_avro");
}

/// Every input event's own record in `streamed` equals the record `replay` computes for the
/// same events (duplicates included: at-least-once may repeat a record, never change it).
fn assert_matches_replay(
    dir: &std::path::Path,
    pipeline: &std::path::Path,
    batch: &[(i32, String, Vec<u8>)],
    streamed: &[Value],
) {
    assert_records_match_replay(dir, pipeline, batch, batch, streamed);
}

/// Every record of an event of `checked` in `streamed` equals the record `replay` computes
/// for it from all the events of `batch`, and each of them has one.
fn assert_records_match_replay(
    dir: &std::path::Path,
    pipeline: &std::path::Path,
    batch: &[(i32, String, Vec<u8>)],
    checked: &[(i32, String, Vec<u8>)],
    streamed: &[Value],
) {
    let jsonl = dir.join("events.jsonl");
    let lines: Vec<String> = batch
        .iter()
        .map(|(_, _, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let replay_dir = dir.join("replay");
    let status = std::process::Command::new(binary())
        .args([
            "replay",
            pipeline.to_str().unwrap(),
            "--input",
            jsonl.to_str().unwrap(),
            "--output",
            replay_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let replayed: Vec<Value> = std::fs::read_to_string(replay_dir.join("features.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (from_stream, from_replay) = (
        event_records(streamed, checked),
        event_records(&replayed, checked),
    );
    assert_eq!(
        from_replay.len(),
        checked.len(),
        "replay has one record per event"
    );
    assert_eq!(
        from_stream.keys().collect::<Vec<_>>(),
        from_replay.keys().collect::<Vec<_>>(),
        "an event record is missing"
    );
    for (key, values) in &from_stream {
        assert!(
            values.iter().all(|v| *v == from_replay[key][0]),
            "{key:?}: stream {values:?} vs replay {:?}",
            from_replay[key]
        );
    }
}

/// What [`hand_over`] leaves: every event produced, both instances' logs and how many records
/// the second consumed.
struct HandOver {
    all: Vec<(i32, String, Vec<u8>)>,
    log_a: String,
    log_b: String,
    consumed_by_b: u64,
}

/// Two members of one group: A (`pipeline_a`) reads the first events, B (`pipeline_b`) joins and
/// takes partitions over, then more events continue every card's history on whichever
/// instance owns it now. Waits for every event's record, stops both cleanly and checks that A
/// handed partitions over.
fn hand_over(
    dir: &std::path::Path,
    input: &str,
    output: &str,
    pipeline_a: &std::path::Path,
    pipeline_b: &std::path::Path,
) -> HandOver {
    let first_batch = events(12_000, 0);
    produce(input, &first_batch);
    let (a, http_a) = start_service(pipeline_a, dir.join("a.log"));
    wait_until(
        Duration::from_secs(120),
        "the first instance consuming",
        || consumed(&http_a) >= 1000,
    );
    let (b, http_b) = start_service(pipeline_b, dir.join("b.log"));
    wait_until(
        Duration::from_secs(120),
        "the second instance owning partitions",
        || http_get(&format!("http://{http_b}/readyz")).0 == 200,
    );
    let second_batch = events(6_000, 12_000);
    produce(input, &second_batch);
    let all: Vec<_> = first_batch.iter().chain(&second_batch).cloned().collect();
    wait_for_every_event_record(output, &all);
    let consumed_by_b = consumed(&http_b);
    let (status_a, log_a) = a.terminate();
    let (status_b, log_b) = b.terminate();
    assert!(status_a.success(), "{log_a}");
    assert!(status_b.success(), "{log_b}");
    assert!(
        log_a.contains("Partitions revoked"),
        "the first instance handed partitions over:\n{log_a}"
    );
    HandOver {
        all,
        log_a,
        log_b,
        consumed_by_b,
    }
}

#[test]
fn partitions_move_to_a_second_instance_with_their_state() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("move", 3, "json", "json");
    // A second member of the same group (same pipeline, same state folder): the group moves
    // some partitions to it, and their state must follow.
    let HandOver {
        all,
        log_a,
        log_b,
        consumed_by_b,
    } = hand_over(dir.path(), &input, &output, &pipeline, &pipeline);
    assert!(
        log_b.contains("Restored partition state from its checkpoint"),
        "the second instance restored what it took over:\n{log_b}"
    );
    assert!(
        !log_a.contains("has no checkpoint here") && !log_b.contains("has no checkpoint here"),
        "with a shared state.dir no partition continues without its state:\n{log_a}\n{log_b}"
    );
    assert!(
        consumed_by_b > 0,
        "the second instance processed events after the move"
    );
    // Lifetime counts and windows after the move equal a single replay of all events: the
    // state moved with its partitions.
    let streamed = parse(&consume_all(&output, None, Duration::from_secs(5)));
    assert_matches_replay(dir.path(), &pipeline, &all, &streamed);
}

#[test]
fn a_partition_that_continues_without_its_state_is_reported() {
    let Setup {
        dir,
        input,
        output: _,
        dlq: _,
        pipeline,
    } = setup("nostate", 3, "json", "json");
    let batch = events(3_000, 0);
    produce(&input, &batch);
    let log = run_until_consumed(&pipeline, dir.path().join("first.log"), 3_000);
    assert_eq!(
        log.matches("starts with empty state (no checkpoint, and no offset committed")
            .count(),
        3,
        "a new group starts each partition empty, quietly:\n{log}"
    );
    assert!(!log.contains("has no checkpoint here"), "{log}");

    // The state folder is lost (a new machine, a volume not kept) while the group's offsets
    // stay: the service goes on from them, and says that its features restart from nothing.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let (second, http) = start_service(&pipeline, dir.path().join("second.log"));
    wait_until(
        Duration::from_secs(120),
        "the second run owning its partitions",
        || http_get(&format!("http://{http}/readyz")).0 == 200,
    );
    let without_state = metric(
        &http_get(&format!("http://{http}/metrics")).1,
        "featurestream_partitions_without_state_total",
    );
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(without_state, 3, "{log}");
    for p in 0..3 {
        assert!(
            log.contains(&format!(
                "Partition {p} has no checkpoint here, but the group has read it before"
            )),
            "partition {p} reported:\n{log}"
        );
    }
}

#[test]
fn a_partition_back_on_an_instance_whose_state_is_behind_is_read_again() {
    // Two instances of one group with a state folder each, as on two machines.
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("back", 3, "json", "json");
    let pipeline_b = with_own_state_folder(dir.path(), &pipeline);
    // A processes the first events; B, which has none of A's state, the next ones; then the
    // partitions come back to A, whose checkpoints end where A stopped.
    let first = events(3_000, 0);
    produce(&input, &first);
    run_until_consumed(&pipeline, dir.path().join("a1.log"), 3_000);
    let second = events(2_000, 3_000);
    produce(&input, &second);
    let log_b = run_until_consumed(&pipeline_b, dir.path().join("b.log"), 2_000);
    assert!(log_b.contains("has no checkpoint here"), "{log_b}");
    let third = events(1_000, 5_000);
    produce(&input, &third);
    // A reads the second events again, then the third.
    let log_a = run_until_recorded(&pipeline, dir.path().join("a2.log"), &output, &third);
    for p in 0..3 {
        assert!(
            log_a.contains(&format!("Partition {p}'s checkpoint here ends at offset")),
            "partition {p} read again:\n{log_a}"
        );
    }
    assert!(!log_a.contains("lacks"), "{log_a}");

    // A's records for the third events are computed on a state that holds every event: they
    // equal a replay of all of them (B's records, computed without the first events, do not).
    let all: Vec<_> = first.iter().chain(&second).chain(&third).cloned().collect();
    let streamed = parse(&consume_all(&output, None, Duration::from_secs(5)));
    assert_records_match_replay(dir.path(), &pipeline, &all, &third, &streamed);
}

#[test]
fn state_follows_partitions_to_an_instance_without_the_state_folder_through_the_state_topic() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("statetopic", 3, "json", "json");
    // One partition for three input partitions: records of several share it.
    let state_topic = use_state_topic(&pipeline);
    let pipeline_b = with_own_state_folder(dir.path(), &pipeline);

    // A processes the first events and stops; B, on a state folder of its own, goes on.
    let first = events(3_000, 0);
    produce(&input, &first);
    run_until_consumed(&pipeline, dir.path().join("a.log"), 3_000);
    // Partitions are added to the state topic meanwhile: `p mod n` now points elsewhere for
    // input partitions 1 and 2, whose checkpoints are still in partition 0.
    add_partitions(&state_topic, 3);
    let second = events(2_000, 3_000);
    produce(&input, &second);
    let log_b = run_until_recorded(&pipeline_b, dir.path().join("b.log"), &output, &second);
    assert_eq!(
        log_b
            .matches(&format!(
                "Restored partition state from its checkpoint in the state topic `{state_topic}`"
            ))
            .count(),
        3,
        "{log_b}"
    );
    assert!(!log_b.contains("has no checkpoint here"), "{log_b}");
    for p in [1, 2] {
        assert!(
            log_b.contains(&format!(
                "Found partition {p}'s checkpoint in partition 0 of the state topic"
            )),
            "{log_b}"
        );
    }
    // The test's topic is not compacted, and the service says what that risks.
    assert!(
        log_b.contains(&format!(
            "The state topic `{state_topic}` has cleanup.policy=delete"
        )),
        "{log_b}"
    );
    // B's records are computed on A's state: they equal a replay of all the events.
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    let streamed = parse(&consume_all(&output, None, Duration::from_secs(5)));
    assert_records_match_replay(dir.path(), &pipeline, &all, &second, &streamed);
    // B's checkpoints of partitions 1 and 2 went where `p mod 3` points, and the ones found in
    // partition 0 were deleted: the last manifest record of each there is a tombstone.
    let state = consume_all(&state_topic, None, Duration::from_secs(5));
    let last_manifest = |p: i32, at: i32| {
        state
            .iter()
            .rfind(|r| {
                r.partition == at
                    && r.key
                        .as_deref()
                        .is_some_and(|k| k.ends_with(format!("-{p}/manifest").as_bytes()))
            })
            .map(|r| !r.payload.is_empty())
    };
    for p in [1, 2] {
        assert_eq!(
            last_manifest(p, 0),
            Some(false),
            "partition {p} deleted from 0"
        );
        assert_eq!(
            last_manifest(p, p),
            Some(true),
            "partition {p} written to {p}"
        );
    }
    assert_eq!(last_manifest(0, 0), Some(true));
}

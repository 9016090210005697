//! Decode + aggregate throughput on one core, and state size per entity.
//!
//! Card-fraud-like events (~200 bytes of JSON) over 100,000 entities with Zipf-skewed keys go
//! through the JSON decoder and a six-feature pipeline (exact sliding count, hopping sum,
//! tumbling sum, hopping distinct count, stepped sliding stddev, lifetime percentile). Records
//! are counted, not serialised: this measures the engine, not an output format.
//!
//! Run: `cargo bench --bench engine` (env: BENCH_EVENTS, BENCH_ENTITIES, BENCH_RATE = events
//! per second of event time, BENCH_SEED; BENCH_WARM=0 turns off warming upcoming entities).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use featurestream::config::compile_source;
use featurestream::decode::json::JsonDecoder;
use featurestream::engine::{CountingSink, Engine, Outcome};
use featurestream::sample::CardEvents;

const PIPELINE: &str = r#"
name: bench_card_fraud
source:
  kafka: { brokers: "127.0.0.1:9092", topic: card-transactions, group_id: bench }
  schema: { card_id: string, merchant_id: string, amount: float, currency: string, status: string, country: string, ts: timestamp }
  entity: card_id
  event_time: ts
  watermark: { max_out_of_order: 5s }
  allowed_lateness: 30s
features:
  - { name: txn_count_10m, agg: count, window: { sliding: 10m } }
  - { name: amount_sum_1h, agg: sum, field: amount, window: { hopping: 1h, step: 5m } }
  - { name: amount_today, agg: sum, field: amount, window: { tumbling: 1d } }
  - { name: merchants_24h, agg: distinct_count, field: merchant_id, window: { hopping: 24h, step: 1h } }
  - { name: amount_std_24h, agg: stddev, field: amount, window: { sliding: 24h, step: 10m } }
  - { name: amount_p90_all, agg: { percentile: 0.9 }, field: amount, window: lifetime }
state: { entity_ttl: 7d }
"#;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's resident set size (Linux), to check the state estimate against the allocator.
fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Decodes every payload; returns how many decoded. Not inlined, so that profilers can count
/// it on its own.
#[inline(never)]
fn decode_all(decoder: &JsonDecoder, payloads: &[Vec<u8>]) -> usize {
    payloads
        .iter()
        .filter(|p| black_box(decoder.decode(p)).is_ok())
        .count()
}

/// The measured path: decodes each payload and gives it to the engine; returns how many
/// events were late. Not inlined, so that profilers can count it on its own
/// (`--toggle-collect='*decode_and_aggregate*'`).
#[inline(never)]
fn decode_and_aggregate(
    decoder: &JsonDecoder,
    payloads: &[Vec<u8>],
    engine: &mut Engine,
    sink: &mut CountingSink,
    warm: bool,
) -> usize {
    let mut late = 0;
    // Events are decoded a few ahead so that the engine can warm their state (as `run` does
    // with the keys of the messages that follow in its batch).
    let mut upcoming = std::collections::VecDeque::with_capacity(4);
    let mut inputs = payloads.iter();
    loop {
        while upcoming.len() <= featurestream::engine::WARM_AHEAD {
            let Some(p) = inputs.next() else { break };
            match decoder.decode(p) {
                Ok(event) => upcoming.push_back(event),
                Err(e) => panic!("bench event rejected: {e}"),
            }
        }
        let Some(event) = upcoming.pop_front() else {
            break;
        };
        if warm {
            engine.warm(upcoming.iter().map(|e| (0, &*e.entity)));
        }
        if let Outcome::Late { .. } = engine.process(0, &event, 0, sink) {
            late += 1;
        }
    }
    late
}

fn main() {
    let events = env("BENCH_EVENTS", 3_000_000) as usize;
    let entities = env("BENCH_ENTITIES", 100_000) as usize;
    let rate = env("BENCH_RATE", 200).max(1);
    // Build the input first: generation is not part of what is measured.
    let start_ms = 1_772_323_200_000i64; // 2026-03-01T00:00:00Z
    let mut generator = CardEvents::new(env("BENCH_SEED", 42), entities, start_ms, rate as f64);
    let payloads: Vec<Vec<u8>> = (0..events)
        .map(|_| generator.next_event().1.into_bytes())
        .collect();
    let bytes: usize = payloads.iter().map(Vec::len).sum();

    // BENCH_PIPELINE=file.yaml measures another pipeline over the same events.
    let pipeline = match std::env::var("BENCH_PIPELINE") {
        Ok(path) => Arc::new(
            featurestream::config::Pipeline::load(std::path::Path::new(&path))
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        Err(_) => {
            Arc::new(compile_source("bench.yaml", PIPELINE).expect("bench pipeline compiles"))
        }
    };
    let decoder = JsonDecoder::new(&pipeline.source);

    // Decode alone, for reference.
    let t = Instant::now();
    let ok = decode_all(&decoder, &payloads);
    let decode_secs = t.elapsed().as_secs_f64();
    assert_eq!(ok, events);

    // Decode + aggregate: the measured path.
    let rss_before = resident_bytes();
    let mut engine = Engine::new(Arc::clone(&pipeline));
    engine.assign(0, 0);
    let mut sink = CountingSink::default();
    let warm = env("BENCH_WARM", 1) == 1;
    let t = Instant::now();
    let late = decode_and_aggregate(&decoder, &payloads, &mut engine, &mut sink, warm);
    let total_secs = t.elapsed().as_secs_f64();
    let stats = engine.state_stats();
    let rss_growth = resident_bytes()
        .zip(rss_before)
        .map(|(after, before)| after.saturating_sub(before));

    // All of a partition's state serialised at once, as a final checkpoint does (periodic
    // ones spread the same work over batches).
    let t = Instant::now();
    let snapshot = engine
        .snapshot_partition(0)
        .expect("partition snapshot encodes");
    let snapshot_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut restored = Engine::new(Arc::clone(&pipeline));
    restored
        .restore_partition(0, &snapshot, 0)
        .expect("partition snapshot decodes");
    let restore_secs = t.elapsed().as_secs_f64();

    println!("featurestream engine benchmark (one thread)");
    println!(
        "  events            {events} (avg {} bytes of JSON), {} entities seen of {entities}, Zipf keys",
        bytes / events,
        stats.entities
    );
    println!(
        "  event-time span   {:.1} h at {rate} events/s",
        events as f64 / rate as f64 / 3600.0
    );
    println!(
        "  decode only       {:>10.0} events/s",
        events as f64 / decode_secs
    );
    println!(
        "  decode+aggregate  {:>10.0} events/s  ({:.3} s, {:.0} ns/event)",
        events as f64 / total_secs,
        total_secs,
        total_secs * 1e9 / events as f64
    );
    println!(
        "  records emitted   {} updates, {} late events",
        sink.updates, late
    );
    println!(
        "  state             {} bytes total, {} bytes per entity",
        stats.bytes,
        stats.bytes / stats.entities.max(1)
    );
    let per_entity = |b: usize| b / stats.entities.max(1);
    let features: Vec<String> = pipeline
        .features
        .iter()
        .zip(engine.feature_bytes())
        .map(|(f, b)| format!("{} {}", f.name, per_entity(b)))
        .collect();
    println!("    by feature      {}", features.join(", "));
    if let Some(growth) = rss_growth {
        println!(
            "  process memory    resident set grew {} bytes while aggregating, {} per entity (allocator overhead included)",
            growth,
            growth / stats.entities.max(1)
        );
    }
    println!(
        "  snapshot          {} bytes serialised in {:.0} ms ({:.0} MB/s), restored in {:.0} ms",
        snapshot.len(),
        snapshot_secs * 1e3,
        snapshot.len() as f64 / snapshot_secs / 1e6,
        restore_secs * 1e3
    );
}

//! Decode + aggregate throughput on one core, and state size per entity.
//!
//! Card-fraud-like events (~200 bytes of JSON) over 100,000 entities with Zipf-skewed keys go
//! through the JSON decoder and a six-feature pipeline (exact sliding count, hopping sum,
//! tumbling sum, hopping distinct count, stepped sliding stddev, lifetime percentile). Records
//! are counted, not serialised: this measures the engine, not an output format.
//!
//! Run: `cargo bench --bench engine` (env: BENCH_EVENTS, BENCH_ENTITIES, BENCH_RATE = events
//! per second of event time, BENCH_SEED).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use featurestream::config::compile_source;
use featurestream::decode::json::JsonDecoder;
use featurestream::decode::time::format_rfc3339_ms;
use featurestream::engine::{CountingSink, Engine, Outcome};

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

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over `n` ranks by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|c| *c < u).min(self.0.len() - 1)
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let events = env("BENCH_EVENTS", 3_000_000) as usize;
    let entities = env("BENCH_ENTITIES", 100_000) as usize;
    let rate = env("BENCH_RATE", 200).max(1);
    let mut rng = Rng(env("BENCH_SEED", 42) | 1);
    let cards = Zipf::new(entities, 0.9);
    let merchants = Zipf::new(20_000, 1.1);
    let countries = ["US", "GB", "DE", "FR", "NL", "ES", "IT", "BR", "IN", "JP"];

    // Build the input first: generation is not part of what is measured.
    let start_ms = 1_772_323_200_000i64; // 2026-03-01T00:00:00Z
    let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(events);
    let mut bytes = 0usize;
    for i in 0..events {
        let card = cards.sample(&mut rng);
        let jitter = (rng.next() % 3000) as i64;
        let ts = start_ms + (i as i64 * 1000) / rate as i64 - jitter;
        let amount = ((rng.unit() * 4.0).exp() * 100.0).round() / 100.0;
        let status = if rng.next() % 25 == 0 {
            "declined"
        } else {
            "approved"
        };
        let line = format!(
            r#"{{"card_id":"card_{card:06}","merchant_id":"m_{:05}","amount":{amount},"currency":"EUR","status":"{status}","country":"{}","channel":"ecommerce","device_id":"dev_{:08x}","ts":"{}"}}"#,
            merchants.sample(&mut rng),
            countries[(rng.next() % 10) as usize],
            rng.next() as u32,
            format_rfc3339_ms(ts),
        );
        bytes += line.len();
        payloads.push(line.into_bytes());
    }

    let pipeline =
        Arc::new(compile_source("bench.yaml", PIPELINE).expect("bench pipeline compiles"));
    let decoder = JsonDecoder::new(&pipeline.source);

    // Decode alone, for reference.
    let t = Instant::now();
    let mut ok = 0usize;
    for p in &payloads {
        ok += usize::from(black_box(decoder.decode(p)).is_ok());
    }
    let decode_secs = t.elapsed().as_secs_f64();
    assert_eq!(ok, events);

    // Decode + aggregate: the measured path.
    let mut engine = Engine::new(Arc::clone(&pipeline));
    engine.assign(0, 0);
    let mut sink = CountingSink::default();
    let mut late = 0usize;
    let t = Instant::now();
    for p in &payloads {
        match decoder.decode(p) {
            Ok(event) => {
                if let Outcome::Late { .. } = engine.process(0, &event, 0, &mut sink) {
                    late += 1;
                }
            }
            Err(e) => panic!("bench event rejected: {e}"),
        }
    }
    let total_secs = t.elapsed().as_secs_f64();
    let stats = engine.state_stats();

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
}

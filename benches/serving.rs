//! Serving under load on a real broker: look-up latency while the service consumes at full
//! speed (1,000 look-ups per second), and what Parquet snapshots cost in throughput (the same
//! load with and without them).
//!
//! Needs the broker from `scripts/kafka.sh up` (`eval "$(scripts/kafka.sh env)"`), then:
//! `cargo bench --bench serving` (env: SERVING_EVENTS, default 2,000,000).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use featurestream::config::compile_source;
use featurestream::runtime::{RunOptions, Shared, now_ms, run_service};
use featurestream::sample::CardEvents;
use rdkafka::producer::Producer;

mod support;
use support::{brokers, create_topics, producer, send};

fn pipeline(name: &str, input: &str, output: &str, dir: &std::path::Path, parquet: bool) -> String {
    let parquet = if parquet {
        format!(
            "  parquet: {{ path: \"{}\", snapshot_every: 2s }}\n",
            dir.join("parquet").display()
        )
    } else {
        String::new()
    };
    format!(
        r#"
name: {name}
source:
  kafka: {{ brokers: "{b}", topic: {input}, group_id: {name}-group }}
  schema: {{ card_id: string, merchant_id: string, amount: float, status: string, ts: timestamp }}
  entity: card_id
  event_time: ts
  watermark: {{ max_out_of_order: 5s }}
features:
  - {{ name: txn_count_10m, agg: count, window: {{ sliding: 10m }} }}
  - {{ name: amount_sum_1h, agg: sum, field: amount, window: {{ hopping: 1h, step: 5m }} }}
  - {{ name: amount_today, agg: sum, field: amount, window: {{ tumbling: 1d }} }}
  - {{ name: merchants_24h, agg: distinct_count, field: merchant_id, window: {{ hopping: 24h, step: 1h }} }}
  - {{ name: amount_p90_all, agg: {{ percentile: 0.9 }}, field: amount, window: lifetime }}
sinks:
  kafka: {{ topic: {output}, format: json, emit: on_update }}
{parquet}state: {{ entity_ttl: 7d, dir: "{d}", checkpoint_every: 5s }}
"#,
        b = brokers(),
        d = dir.join(name).display()
    )
}

/// Runs the service over the loaded topic; with `lookups`, 1,000 look-ups per second are made
/// meanwhile. Returns events/s and the sorted look-up latencies in microseconds.
fn measure(
    name: &str,
    input: &str,
    output: &str,
    events: u64,
    parquet: bool,
    lookups: bool,
) -> (f64, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline(name, input, output, dir.path(), parquet);
    let pipe = Arc::new(compile_source("serving.yaml", &text).unwrap());
    let shared = Shared::new(Arc::clone(&pipe), Arc::new(AtomicBool::new(false)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let state = featurestream::serve::AppState {
        shared: Arc::clone(&shared),
        metrics: None,
    };
    runtime.spawn(async move { axum::serve(listener, featurestream::serve::router(state)).await });
    let done = Arc::new(AtomicBool::new(false));
    let client = lookups.then(|| {
        let done = Arc::clone(&done);
        let name = name.to_string();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut latencies = Vec::new();
            let start = Instant::now();
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                let due = start + Duration::from_millis(i);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let url = format!(
                    "http://{addr}/v1/features/{name}/card_{:06}",
                    (i * 7919) % 20_000
                );
                let t = Instant::now();
                if let Ok(mut r) = agent.get(&url).call() {
                    let _ = r.body_mut().read_to_string();
                    latencies.push(t.elapsed().as_micros() as u64);
                }
                i += 1;
            }
            latencies
        })
    });
    let watcher = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            while shared.counters.consumed.load(Ordering::Relaxed) == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            Instant::now()
        })
    };
    run_service(
        Arc::clone(&shared),
        &RunOptions {
            stop_after_events: Some(events),
            ..Default::default()
        },
    )
    .unwrap();
    let elapsed = watcher.join().unwrap().elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let mut latencies = client.map(|c| c.join().unwrap()).unwrap_or_default();
    latencies.sort_unstable();
    runtime.shutdown_timeout(Duration::from_secs(1));
    (events as f64 / elapsed, latencies)
}

fn main() {
    let events: u64 = std::env::var("SERVING_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let run = format!("serving-{}", now_ms());
    let topics = [
        format!("{run}-in"),
        format!("{run}-out1"),
        format!("{run}-out2"),
        format!("{run}-out3"),
    ];
    create_topics(&topics.iter().map(String::as_str).collect::<Vec<_>>());
    let producer = producer();
    let mut generator = CardEvents::new(11, 20_000, 1_772_323_200_000, 200.0);
    for _ in 0..events {
        let (key, payload, _) = generator.next_event();
        send(&producer, &topics[0], &key, &payload);
    }
    producer.flush(Duration::from_secs(120)).unwrap();

    let (plain, _) = measure(
        &format!("{run}-a"),
        &topics[0],
        &topics[1],
        events,
        false,
        false,
    );
    let (with_snapshots, _) = measure(
        &format!("{run}-b"),
        &topics[0],
        &topics[2],
        events,
        true,
        false,
    );
    let (_, latencies) = measure(
        &format!("{run}-c"),
        &topics[0],
        &topics[3],
        events,
        true,
        true,
    );
    let pct = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!("events                    {events} (20,000 cards)");
    println!("without Parquet snapshots {plain:>10.0} events/s");
    println!(
        "with snapshots every 2s   {with_snapshots:>10.0} events/s ({:+.1}%)",
        100.0 * (with_snapshots - plain) / plain
    );
    println!(
        "look-ups at 1,000/s while consuming: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} requests",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        latencies.len()
    );
}

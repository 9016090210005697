//! End to end on a real broker: `featurestream run` throughput against the ceiling of a bare
//! consumer on the same topic, and produce-to-feature latency at a fixed input rate.
//!
//! Needs the broker from `scripts/kafka.sh up` (`eval "$(scripts/kafka.sh env)"`), then:
//! `cargo bench --bench e2e` (env: E2E_EVENTS, default 2,000,000; E2E_RATE, default 50,000/s;
//! E2E_LATENCY_SECS, default 20; E2E_WARMUP_SECS, default 5, left out of the steady-state
//! latency; E2E_CHECKPOINT_EVERY, default 5s, the service's `state.checkpoint_every`;
//! E2E_SINK_OPTIONS, default `{}`, librdkafka settings for its producer as a YAML map;
//! E2E_QUIET_CARDS, default 0 = off: also load that many distinct cards, let the stream go
//! quiet, and report how often checkpoints complete then, with checkpoints every 3 s;
//! E2E_STATE_TOPIC, default 0: 1 also writes the throughput run's checkpoints to a state topic;
//! E2E_EXACTLY_ONCE, default 0: 1 runs the throughput run with `guarantee: exactly_once`, which
//! implies a state topic).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use featurestream::config::compile_source;
use featurestream::runtime::{RunOptions, Shared, now_ms, run_service};
use featurestream::sample::CardEvents;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;

mod support;
use support::{brokers, create_topics, producer, send};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pipeline(
    name: &str,
    input: &str,
    output: &str,
    dir: &std::path::Path,
    features: &str,
    checkpoint_every: &str,
    state_topic: Option<&str>,
) -> String {
    format!(
        r#"
name: {name}
source:
  kafka: {{ brokers: "{b}", topic: {input}, group_id: {name}-group }}
  schema: {{ card_id: string, merchant_id: string, amount: float, status: string, ts: timestamp }}
  entity: card_id
  event_time: ts
  watermark: {{ max_out_of_order: 5s }}
  allowed_lateness: 30s
features:
{features}
sinks:
  kafka: {{ topic: {output}, format: json, emit: on_update, options: {o} }}
state: {{ entity_ttl: 7d, dir: "{d}", checkpoint_every: {c}{t} }}
guarantee: {g}
"#,
        b = brokers(),
        d = dir.display(),
        c = checkpoint_every,
        t = state_topic.map_or(String::new(), |t| format!(", topic: {t}")),
        g = if state_topic.is_some() && env("E2E_EXACTLY_ONCE", 0) == 1 {
            "exactly_once"
        } else {
            "at_least_once"
        },
        o = std::env::var("E2E_SINK_OPTIONS").unwrap_or_else(|_| "{}".into())
    )
}

const CARD_FEATURES: &str = r#"  - { name: txn_count_10m, agg: count, window: { sliding: 10m } }
  - { name: amount_sum_1h, agg: sum, field: amount, window: { hopping: 1h, step: 5m } }
  - { name: amount_today, agg: sum, field: amount, window: { tumbling: 1d } }
  - { name: merchants_24h, agg: distinct_count, field: merchant_id, window: { hopping: 24h, step: 1h } }
  - { name: amount_std_24h, agg: stddev, field: amount, window: { sliding: 24h, step: 10m } }
  - { name: amount_p90_all, agg: { percentile: 0.9 }, field: amount, window: lifetime }"#;

fn main() {
    // RUST_LOG=featurestream=debug shows the service's checkpoint timings.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let events = env("E2E_EVENTS", 2_000_000);
    let checkpoint_every = std::env::var("E2E_CHECKPOINT_EVERY").unwrap_or_else(|_| "5s".into());
    let rate = env("E2E_RATE", 50_000);
    let latency_secs = env("E2E_LATENCY_SECS", 20);
    let run = format!("e2e-{}", now_ms());
    let (input, output) = (format!("{run}-in"), format!("{run}-out"));
    create_topics(&[&input, &output]);
    // E2E_STATE_TOPIC=1: the throughput run also writes every checkpoint to a state topic.
    let state_topic = (env("E2E_STATE_TOPIC", 0) == 1 || env("E2E_EXACTLY_ONCE", 0) == 1)
        .then(|| format!("{run}-state"));
    if let Some(topic) = &state_topic {
        create_topics(&[topic]);
    }
    let dir = tempfile::tempdir().unwrap();

    // Load the input topic.
    let p = producer();
    let mut generator = CardEvents::new(42, 100_000, 1_772_323_200_000, 200.0);
    let mut bytes = 0usize;
    for _ in 0..events {
        let (key, payload, _) = generator.next_event();
        bytes += payload.len();
        send(&p, &input, &key, &payload);
    }
    p.flush(Duration::from_secs(120)).unwrap();
    println!(
        "loaded {events} events (avg {} bytes) into {input}",
        bytes as u64 / events
    );

    // Ceiling: a bare consumer that only reads.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{run}-bare"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&input]).unwrap();
    let mut read = 0u64;
    let mut started = None;
    while read < events {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            started.get_or_insert_with(Instant::now);
            std::hint::black_box(m.payload());
            read += 1;
        }
    }
    let bare = started.unwrap().elapsed().as_secs_f64();
    drop(consumer);

    // featurestream run, from the first record fetched to the last output acknowledged.
    let text = pipeline(
        &format!("{run}-fs"),
        &input,
        &output,
        dir.path(),
        CARD_FEATURES,
        &checkpoint_every,
        state_topic.as_deref(),
    );
    let pipe = Arc::new(compile_source("e2e.yaml", &text).unwrap());
    let shared = Shared::new(Arc::clone(&pipe), Arc::new(AtomicBool::new(false)));
    let watcher_shared = Arc::clone(&shared);
    let first = std::thread::spawn(move || {
        while watcher_shared.counters.consumed.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        Instant::now()
    });
    let report = run_service(
        Arc::clone(&shared),
        &RunOptions {
            stop_after_events: Some(events),
            ..Default::default()
        },
    )
    .unwrap();
    let done = Instant::now();
    let fs = (done - first.join().unwrap()).as_secs_f64();
    println!(
        "bare consumer       {:>10.0} events/s",
        events as f64 / bare
    );
    println!(
        "featurestream run   {:>10.0} events/s  ({:.0}% of the bare consumer; {} feature records produced)",
        events as f64 / fs,
        100.0 * bare / fs,
        report.produced
    );

    // Latency at a fixed rate: events stamped with their produce time, features read back.
    let (lin, lout) = (format!("{run}-lat-in"), format!("{run}-lat-out"));
    let warmup = format!("{run}-lat-warmup");
    create_topics(&[&lin, &lout, &warmup]);
    let lat_features = r#"  - { name: txn_count_today, agg: count, window: { tumbling: 1d } }
  - { name: amount_sum_today, agg: sum, field: amount, window: { tumbling: 1d } }
  - { name: merchants_today, agg: distinct_count, field: merchant_id, window: { tumbling: 1d } }
  - { name: amount_p90_all, agg: { percentile: 0.9 }, field: amount, window: lifetime }"#;
    let text = pipeline(
        &format!("{run}-lat"),
        &lin,
        &lout,
        dir.path(),
        lat_features,
        &checkpoint_every,
        None,
    );
    let pipe = Arc::new(compile_source("lat.yaml", &text).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Shared::new(pipe, Arc::clone(&stop));
    let service = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || run_service(shared, &RunOptions::default()))
    };
    // Start the load once the service owns its partition (as /readyz reports it), so that the
    // group join is not counted as latency.
    let joined = Instant::now();
    while !shared.ready.load(Ordering::Relaxed) {
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "the service did not get its partition within 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{run}-lat-reader"))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    // Assigned, not subscribed: a group join would add seconds to the first records' latency.
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(&lout, 0, rdkafka::Offset::Beginning)
        .unwrap();
    reader.assign(&assignment).unwrap();
    let total = rate * latency_secs;
    let lin2 = lin.clone();
    let load = std::thread::spawn(move || {
        let p = producer();
        // Connected and initialised before the clock starts: events are stamped when made, so
        // a producer still starting up would count as latency.
        send(&p, &warmup, "warmup", "{}");
        p.flush(Duration::from_secs(30)).unwrap();
        let mut generator = CardEvents::new(7, 100_000, 0, 1.0);
        let start = Instant::now();
        for i in 0..total {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (key, payload, _) = generator.next_event();
            // Event time = produce time, so as_of of an event's record is its produce time.
            let now = featurestream::decode::time::format_rfc3339_ms(now_ms());
            let payload = match payload.rfind("\"ts\":\"") {
                Some(at) => format!("{}\"ts\":\"{now}\"}}", &payload[..at]),
                None => payload,
            };
            send(&p, &lin2, &key, &payload);
        }
        p.flush(Duration::from_secs(60)).unwrap();
    });
    let mut latencies = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + Duration::from_secs(latency_secs + 60);
    while (latencies.len() as u64) < total && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) {
            let received = now_ms();
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            if let Some(t) = v["as_of"]
                .as_str()
                .and_then(featurestream::decode::time::parse_rfc3339_ms)
            {
                latencies.push((t, received - t));
            }
        }
    }
    load.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    service.join().unwrap().unwrap();
    // Steady state leaves out the first E2E_WARMUP_SECS of events: the service's first fetch
    // and the reader's each come about a second after start-up, and the backlog built up
    // meanwhile drains at the start of the run.
    let warmup_ms = 1000 * env("E2E_WARMUP_SECS", 5) as i64;
    let first = latencies.iter().map(|(t, _)| *t).min().unwrap_or(0);
    let mut all: Vec<i64> = latencies.iter().map(|(_, l)| *l).collect();
    let mut steady: Vec<i64> = latencies
        .iter()
        .filter(|(t, _)| *t >= first + warmup_ms)
        .map(|(_, l)| *l)
        .collect();
    all.sort_unstable();
    steady.sort_unstable();
    assert!(
        !steady.is_empty(),
        "no record after the {} s warm-up: make E2E_LATENCY_SECS longer than E2E_WARMUP_SECS",
        warmup_ms / 1000
    );
    let pct = |v: &[i64], q: f64| v[((v.len() - 1) as f64 * q) as usize];
    println!(
        "latency at {rate}/s   steady state (after {} s): p50 {} ms, p99 {} ms, max {} ms over {} records",
        warmup_ms / 1000,
        pct(&steady, 0.5),
        pct(&steady, 0.99),
        steady.last().unwrap(),
        steady.len()
    );
    println!(
        "                     whole run with start-up: p50 {} ms, p99 {} ms, max {} ms over {} records (produce time to feature record read back)",
        pct(&all, 0.5),
        pct(&all, 0.99),
        all.last().unwrap(),
        all.len()
    );

    let cards = env("E2E_QUIET_CARDS", 0);
    if cards > 0 {
        quiet_checkpoints(&run, cards);
    }
}

/// Checkpoints on a quiet stream: `cards` distinct cards arrive, then nothing. With
/// checkpoints every 3 s, each should complete about 3 s after the previous one; a slow
/// serialisation of the state shows as longer gaps.
fn quiet_checkpoints(run: &str, cards: u64) {
    let (input, output) = (format!("{run}-quiet-in"), format!("{run}-quiet-out"));
    create_topics(&[&input, &output]);
    let p = producer();
    for i in 0..cards {
        let card = format!("card_{i:07}");
        let payload = format!(
            r#"{{"card_id":"{card}","merchant_id":"m_{}","amount":{}.5,"status":"approved","ts":{}}}"#,
            i % 5_000,
            10 + i % 300,
            1_772_323_200_000 + i as i64
        );
        send(&p, &input, &card, &payload);
    }
    p.flush(Duration::from_secs(120)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = pipeline(
        &format!("{run}-quiet"),
        &input,
        &output,
        dir.path(),
        CARD_FEATURES,
        "3s",
        None,
    );
    let pipe = Arc::new(compile_source("quiet.yaml", &text).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Shared::new(pipe, Arc::clone(&stop));
    let service = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || run_service(shared, &RunOptions::default()))
    };
    let began = Instant::now();
    while shared.counters.consumed.load(Ordering::Relaxed) < cards {
        assert!(
            began.elapsed() < Duration::from_secs(300),
            "the service did not consume the {cards} cards within 300 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Watch the checkpoint file while nothing arrives: each completed checkpoint replaces it.
    let watch = Duration::from_secs(30);
    let started = Instant::now();
    let mut last_written = checkpoint_written(dir.path());
    let mut completed = Vec::new();
    while started.elapsed() < watch {
        std::thread::sleep(Duration::from_millis(20));
        let written = checkpoint_written(dir.path());
        if written != last_written {
            completed.push(started.elapsed());
            last_written = written;
        }
    }
    stop.store(true, Ordering::Relaxed);
    service.join().unwrap().unwrap();
    let gaps: Vec<f64> = completed
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let longest = gaps.iter().copied().fold(0.0, f64::max);
    println!(
        "quiet stream         {cards} cards, checkpoints every 3 s: {} completed in {} s of quiet; longest gap between them {longest:.1} s",
        completed.len(),
        watch.as_secs()
    );
}

/// When the newest checkpoint file under `dir` was written (`None` before the first).
fn checkpoint_written(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "ckpt") {
                let modified = entry.metadata().and_then(|m| m.modified()).ok();
                newest = newest.max(modified);
            }
        }
    }
    newest
}

//! `featurestream demo`: the whole product on a fresh machine with nothing but cargo.
//!
//! Starts librdkafka's in-process mock cluster, streams realistic card transactions (with some
//! malformed and late ones) into it while running the quickstart pipeline (`pipelines/card_fraud.yaml`)
//! as the real service would — feature topic, dead letters, Parquet, HTTP API — and prints
//! what happened and where to look.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::config::compile_source;
use crate::runtime::{RunOptions, RunReport, Shared, now_ms, run_service};
use crate::sample::{CardEvents, Kind};

/// The quickstart pipeline, compiled into the binary so the demo runs from any folder.
pub const QUICKSTART: &str = include_str!("../pipelines/card_fraud.yaml");

pub struct DemoOptions {
    pub events: u64,
    pub cards: usize,
    pub out_dir: PathBuf,
    pub http: Option<SocketAddr>,
    /// Keep serving the HTTP API after the events are processed, until Ctrl-C.
    pub serve: bool,
    pub progress: bool,
}

pub struct DemoOutcome {
    pub report: RunReport,
    pub produced_bad: u64,
    pub produced_late: u64,
    pub sample_entity: Option<String>,
    pub shared: Arc<Shared>,
    pub http: Option<SocketAddr>,
    /// The HTTP API's runtime, kept running for `--serve`.
    server: Option<HttpServer>,
}

/// The demo's HTTP API: its runtime and the signal that stops it.
struct HttpServer {
    runtime: tokio::runtime::Runtime,
    stop: Arc<tokio::sync::Notify>,
}

impl HttpServer {
    fn shut_down(self) {
        self.stop.notify_waiters();
        self.runtime.shutdown_timeout(Duration::from_secs(2));
    }
}

impl DemoOutcome {
    /// With `--serve`, keeps the HTTP API up (on the state the demo built) until Ctrl-C.
    pub fn serve_until_ctrl_c(mut self) {
        if let Some(server) = self.server.take() {
            if self.http.is_some() {
                let _ = server.runtime.block_on(tokio::signal::ctrl_c());
            }
            server.shut_down();
        }
    }
}

/// Produces the demo events into the mock cluster and returns how many were bad and late.
/// Events written ahead of what the service has consumed. The mock cluster keeps only the
/// newest 5 MB of each partition, so the writer must not run too far ahead of the reader.
const AHEAD: u64 = 10_000;

/// Writes the demo events while the service consumes them, staying at most `AHEAD` events in
/// front of it. Returns how many were bad and late, and a busy card to look up.
fn produce_events(
    brokers: &str,
    topic: &str,
    options: &DemoOptions,
    consumed: &AtomicU64,
) -> anyhow::Result<(u64, u64, String)> {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the demo producer")?;
    // Event times end now, at 50 transactions per second.
    let rate = 50.0;
    let start = now_ms() - (options.events as f64 * 1000.0 / rate) as i64;
    let mut events = CardEvents::new(7, options.cards, start, rate);
    events.bad_fraction = 0.004;
    events.late_fraction = 0.002;
    let (mut bad, mut late) = (0u64, 0u64);
    let mut hottest = String::new();
    for i in 0..options.events {
        let (key, payload, kind) = events.next_event();
        match kind {
            Kind::Valid => {}
            Kind::Late => late += 1,
            _ => bad += 1,
        }
        if i == 0 || (kind == Kind::Valid && key == "card_000000") {
            hottest = key.clone();
        }
        let mut record = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(payload.as_bytes());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        while i > consumed.load(Ordering::Relaxed) + AHEAD {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("the demo events were not all written")?;
    Ok((bad, late, hottest))
}

pub fn run_demo(
    options: DemoOptions,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> anyhow::Result<DemoOutcome> {
    let cluster = MockCluster::new(1).context("cannot start the in-process Kafka mock cluster")?;
    let brokers = cluster.bootstrap_servers();
    let base = compile_source("pipelines/card_fraud.yaml", QUICKSTART)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pipeline = Arc::new(base);
    let input = pipeline.source.kafka.topic.clone();
    let mut topics = vec![(input.clone(), 3)];
    if let Some(k) = &pipeline.sinks.kafka {
        topics.push((k.topic.clone(), 3));
    }
    if let Some(d) = &pipeline.dead_letter_topic {
        topics.push((d.clone(), 1));
    }
    for (topic, partitions) in &topics {
        cluster
            .create_topic(topic, *partitions, 1)
            .with_context(|| format!("cannot create topic {topic}"))?;
    }

    let bar = options.progress.then(|| {
        let bar = ProgressBar::new(options.events);
        bar.set_style(
            ProgressStyle::with_template("{msg:<28} {bar:40} {pos}/{len} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    let _ = std::fs::remove_dir_all(options.out_dir.join("state"));
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Shared::new(Arc::clone(&pipeline), Arc::clone(&stop));
    let run_options = RunOptions {
        http: options.http,
        brokers: Some(brokers.clone()),
        state_dir: Some(options.out_dir.join("state")),
        parquet_dir: Some(options.out_dir.join("features")),
        stop_after_events: Some(options.events),
    };

    // The HTTP API, served from a small runtime of its own while the service runs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let http_stop = Arc::new(tokio::sync::Notify::new());
    let mut bound = None;
    if let Some(addr) = options.http {
        let state = crate::serve::AppState {
            shared: Arc::clone(&shared),
            metrics,
        };
        let listener = runtime.block_on(async {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Ok(l),
                // The usual port is taken: any free one will do for a demo.
                Err(_) => {
                    tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await
                }
            }
        })?;
        bound = Some(listener.local_addr()?);
        let notify = Arc::clone(&http_stop);
        runtime.spawn(async move {
            let _ = axum::serve(listener, crate::serve::router(state))
                .with_graceful_shutdown(async move { notify.notified().await })
                .await;
        });
    }

    let progress_done = Arc::new(AtomicBool::new(false));
    let progress_thread = bar.clone().map(|bar| {
        let shared = Arc::clone(&shared);
        let done = Arc::clone(&progress_done);
        bar.set_message("computing features");
        bar.set_position(0);
        bar.reset_eta();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(shared.counters.consumed.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        })
    });
    let started = Instant::now();
    let service = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || run_service(shared, &run_options))
    };
    let produced = produce_events(&brokers, &input, &options, &shared.counters.consumed);
    if produced.is_err() {
        stop.store(true, Ordering::Relaxed);
    }
    let report = service
        .join()
        .map_err(|_| anyhow::anyhow!("the processing thread panicked"))?;
    let (produced_bad, produced_late, sample_entity) = produced?;
    progress_done.store(true, Ordering::Relaxed);
    if let Some(t) = progress_thread {
        let _ = t.join();
    }
    let mut report = report?;
    report.elapsed = started.elapsed();

    drop(cluster);
    let server = HttpServer {
        runtime,
        stop: http_stop,
    };
    let server = if options.serve {
        Some(server)
    } else {
        server.shut_down();
        None
    };
    Ok(DemoOutcome {
        report,
        produced_bad,
        produced_late,
        sample_entity: Some(sample_entity),
        shared,
        http: bound,
        server,
    })
}

/// Prints what the demo did and where its outputs are.
pub fn print_outcome(outcome: &DemoOutcome, out_dir: &Path, events: u64) {
    let r = &outcome.report;
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    println!();
    println!("featurestream demo: the card-fraud quickstart pipeline on an in-process Kafka");
    println!(
        "  events in         {:>10}  (generated: {} malformed or mistyped, {} stamped an hour behind)",
        r.consumed, outcome.produced_bad, outcome.produced_late
    );
    println!("  aggregated        {:>10}", r.aggregated);
    let rejected: u64 = r.rejected.values().sum();
    println!(
        "  rejected          {:>10}  {}",
        rejected,
        r.rejected
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  late              {:>10}  (events stamped behind are late only once the watermark, the slowest partition's, has passed them)",
        r.late
    );
    println!(
        "  reconciles        {:>10}",
        if r.consumed == r.aggregated + rejected + r.late {
            "yes"
        } else {
            "NO"
        }
    );
    println!(
        "  dead letters      {:>10}  (topic card-transactions-dlq, with reason headers)",
        r.dead_lettered
    );
    println!(
        "  feature records   {:>10}  (topic card-features, keyed by card id)",
        r.produced
    );
    println!(
        "  throughput        {:>10.0} events/s ({:.1}s for {} events, all stages)",
        r.consumed as f64 / secs,
        secs,
        events
    );
    if cfg!(debug_assertions) {
        // `cargo run` builds without optimisation: say so next to the number it slows.
        println!(
            "                    an unoptimised build; `cargo run --release -- demo` shows the real speed"
        );
    }
    if let Some(entity) = &outcome.sample_entity
        && let Some((as_of, values)) = outcome.shared.engine_read().lookup(entity)
    {
        let mut line = String::new();
        crate::output::write_lookup(&mut line, &outcome.shared.pipeline, entity, as_of, &values);
        println!("  a look-up         {line}");
    }
    println!("Outputs:");
    if let Some(p) = &r.last_snapshot {
        println!("  Parquet snapshot  {}", p.display());
    }
    if let Some(p) = &r.parquet_dir {
        println!(
            "  Parquet folder    {}   (with pyarrow: python3 -c \"import pyarrow.dataset as d; print(d.dataset('{}/card_fraud', partitioning='hive').to_table().num_rows)\")",
            p.display(),
            p.display()
        );
    }
    println!("  state checkpoints {}", r.state_dir.display());
    println!("  demo folder       {}", out_dir.display());
    match (outcome.http, &outcome.server, &outcome.sample_entity) {
        (Some(addr), Some(_), Some(entity)) => println!(
            "  HTTP API          http://{addr} until Ctrl-C (try: curl http://{addr}/v1/features/{}/{entity})",
            outcome.shared.pipeline.name
        ),
        (Some(addr), _, _) => println!(
            "  HTTP API          was on http://{addr} (run `featurestream demo --serve` to keep it up)"
        ),
        _ => {}
    }
    println!(
        "Next: `featurestream validate pipelines/*.yaml`, `featurestream replay`, and README.md for a real Kafka."
    );
}

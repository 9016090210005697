//! The `featurestream` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use featurestream::config::duration::format_duration_ms;
use featurestream::config::{Emit, Pipeline, Window, WindowWritten};

#[derive(Parser)]
#[command(
    name = "featurestream",
    version,
    about = "Streaming feature pipelines: Kafka events in, windowed ML features out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check pipeline files; prints every problem with file:line:column.
    Validate {
        #[arg(required = true)]
        pipelines: Vec<PathBuf>,
    },
    /// Run a pipeline as a service: consume Kafka, emit features, serve look-ups.
    Run {
        pipeline: PathBuf,
        /// Serve the HTTP API (look-ups, /metrics, /healthz, /readyz) on this address.
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
        /// Override source.kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
        /// Override state.dir (where checkpoints live).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Stop cleanly after this many input records (benchmarks).
        #[arg(long, hide = true)]
        stop_after: Option<u64>,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// See everything run with nothing installed: in-process Kafka, generated events, the
    /// quickstart pipeline, features to a topic, Parquet and the HTTP API.
    Demo {
        /// How many card transactions to generate.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 20_000)]
        cards: usize,
        /// Where the demo writes Parquet and state.
        #[arg(long, default_value = "featurestream-demo")]
        out: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: std::net::SocketAddr,
        /// Keep serving the HTTP API after the run, until Ctrl-C.
        #[arg(long)]
        serve: bool,
    },
    /// Run a pipeline over a file of historical events (JSONL, JSONL.gz or Parquet).
    Replay {
        /// The pipeline file.
        pipeline: PathBuf,
        /// Historical events: JSONL (one object per line), gzip-compressed JSONL, or Parquet
        /// (by the `.parquet` extension); processed in file order.
        #[arg(long)]
        input: PathBuf,
        /// Folder for features.jsonl, rejected.jsonl, summary.json and parquet/ (created if
        /// needed; a replay's earlier outputs there are replaced).
        #[arg(long)]
        output: PathBuf,
        /// Never show a progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr: readable text, or one JSON object per line; `RUST_LOG` filters.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (stderr a pipe whose reader has gone) is dropped: the
    // default reports it with `eprintln!`, which panics on that same pipe and would take the
    // thread that logged (a signal handler, the processing loop) down with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Installs the Prometheus recorder; latency metrics become histograms.
fn init_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ])
        .ok()?;
    let handle = builder.install_recorder().ok()?;
    for (name, help) in featurestream::telemetry::ALL {
        metrics::describe_counter!(*name, *help);
    }
    Some(handle)
}

/// Sets `stop` on SIGINT or SIGTERM; a second signal exits at once.
async fn wait_for_signal(stop: Arc<std::sync::atomic::AtomicBool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("Cannot listen for SIGTERM: {e}");
            return;
        }
    };
    for round in 0..2 {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        if round == 0 {
            tracing::info!(
                "Shutdown requested: stopping fetches, finishing in-flight work, flushing and committing."
            );
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            tracing::warn!("Second shutdown signal: exiting now without a final checkpoint.");
            std::process::exit(130);
        }
    }
}

fn run_command(
    pipeline: Arc<Pipeline>,
    options: featurestream::runtime::RunOptions,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> ExitCode {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shared = featurestream::runtime::Shared::new(pipeline, Arc::clone(&stop));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Signals are awaited on a thread of their own, so that nothing the HTTP API's runtime
    // is busy with can delay a shutdown.
    let signal_stop = Arc::clone(&stop);
    let signals = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(signal_runtime) => signal_runtime.block_on(wait_for_signal(signal_stop)),
                Err(e) => tracing::error!("Cannot listen for shutdown signals: {e}"),
            }
        });
    if let Err(e) = signals {
        eprintln!("error: cannot start the signal thread: {e}");
        return ExitCode::from(1);
    }
    let http_stop = Arc::new(tokio::sync::Notify::new());
    if let Some(addr) = options.http {
        let state = featurestream::serve::AppState {
            shared: Arc::clone(&shared),
            metrics,
        };
        let notify = Arc::clone(&http_stop);
        let stop_on_error = Arc::clone(&stop);
        runtime.spawn(async move {
            let shutdown = async move { notify.notified().await };
            if let Err(e) = featurestream::serve::serve(addr, state, shutdown).await {
                tracing::error!("The HTTP API cannot serve on {addr}: {e}");
                stop_on_error.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let worker_shared = Arc::clone(&shared);
    let result = std::thread::Builder::new()
        .name("featurestream-engine".into())
        .spawn(move || featurestream::runtime::run_service(worker_shared, &options))
        .map_err(anyhow::Error::from)
        .and_then(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("the processing thread panicked"))?
        });
    http_stop.notify_waiters();
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("featurestream stopped with an error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn describe(pipeline: &Pipeline) -> String {
    let windows: Vec<String> = pipeline
        .features
        .iter()
        .map(|f| match f.window {
            Window::Hopping {
                size_ms,
                step_ms,
                written,
            } => {
                let (size, step) = (format_duration_ms(size_ms), format_duration_ms(step_ms));
                match written {
                    WindowWritten::Tumbling => format!("tumbling {size}"),
                    WindowWritten::Sliding if step_ms == 1 => format!("sliding {size}"),
                    WindowWritten::Sliding => format!("sliding {size} step {step}"),
                    WindowWritten::Hopping => format!("hopping {size} step {step}"),
                }
            }
            Window::Session { gap_ms } => format!("session {}", format_duration_ms(gap_ms)),
            Window::Lifetime => "lifetime".to_string(),
        })
        .collect();
    let mut kinds = windows.clone();
    kinds.sort();
    kinds.dedup();
    let emit = match pipeline.emit() {
        Emit::OnUpdate => "on_update",
        Emit::OnWindowClose => "on_window_close",
    };
    format!(
        "pipeline `{}`: {} feature{} ({}), topic {} keyed by `{}`, emit {}{}{}",
        pipeline.name,
        pipeline.features.len(),
        if pipeline.features.len() == 1 {
            ""
        } else {
            "s"
        },
        kinds.join(", "),
        pipeline.source.kafka.topic,
        pipeline.source.schema.fields[pipeline.source.entity].name,
        emit,
        pipeline
            .state_topic
            .as_ref()
            .map_or(String::new(), |t| format!(", state topic {t}")),
        match pipeline.guarantee {
            featurestream::config::Guarantee::ExactlyOnce => ", exactly-once",
            featurestream::config::Guarantee::AtLeastOnce => "",
        }
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            pipeline,
            http,
            brokers,
            state_dir,
            stop_after,
            log_format,
        } => {
            init_logging(log_format);
            let loaded = match Pipeline::load(&pipeline) {
                Ok(p) => Arc::new(p),
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(1);
                }
            };
            let metrics = init_metrics();
            let options = featurestream::runtime::RunOptions {
                http,
                brokers,
                state_dir,
                parquet_dir: None,
                stop_after_events: stop_after,
            };
            run_command(loaded, options, metrics)
        }
        Command::Demo {
            events,
            cards,
            out,
            http,
            serve,
        } => {
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging(LogFormat::Text);
            }
            let metrics = init_metrics();
            let options = featurestream::demo::DemoOptions {
                events,
                cards,
                out_dir: out.clone(),
                http: Some(http),
                serve,
                progress: std::io::stderr().is_terminal(),
            };
            match featurestream::demo::run_demo(options, metrics) {
                Ok(outcome) => {
                    featurestream::demo::print_outcome(&outcome, &out, events);
                    outcome.serve_until_ctrl_c();
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Validate { pipelines } => {
            let mut failed = false;
            for path in &pipelines {
                match Pipeline::load(path) {
                    Ok(p) => println!("ok {}: {}", path.display(), describe(&p)),
                    Err(errors) => {
                        failed = true;
                        eprintln!("{errors}");
                        let n = errors.errors.len();
                        eprintln!(
                            "{}: {n} problem{}",
                            path.display(),
                            if n == 1 { "" } else { "s" }
                        );
                    }
                }
            }
            if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Replay {
            pipeline,
            input,
            output,
            quiet,
        } => {
            let loaded = match Pipeline::load(&pipeline) {
                Ok(p) => Arc::new(p),
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(1);
                }
            };
            let progress = !quiet && std::io::stderr().is_terminal();
            match featurestream::replay::replay(loaded, &input, &output, progress) {
                Ok(summary) if summary.all_rejected() => {
                    print_replay_summary(&summary, &output);
                    eprintln!(
                        "error: all {} events in {} were rejected; is it this pipeline's input? \
                         The first: {} (every one is in {})",
                        summary.read,
                        input.display(),
                        summary.first_rejection.as_deref().unwrap_or("-"),
                        output.join("rejected.jsonl").display()
                    );
                    ExitCode::from(1)
                }
                Ok(summary) => {
                    print_replay_summary(&summary, &output);
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn print_replay_summary(summary: &featurestream::replay::ReplaySummary, output: &std::path::Path) {
    let secs = summary.elapsed.as_secs_f64().max(1e-9);
    println!("read        {:>12}", summary.read);
    println!("aggregated  {:>12}", summary.aggregated);
    println!("rejected    {:>12}", summary.rejected);
    for (reason, n) in &summary.rejected_by_reason {
        println!("  {reason:<14}{n:>8}");
    }
    println!("late        {:>12}", summary.late);
    println!(
        "reconciles  {:>12}",
        if summary.reconciles() {
            "yes (read = aggregated + rejected + late)"
        } else {
            "NO"
        }
    );
    println!("records     {:>12}", summary.records);
    println!("entities    {:>12}", summary.entities);
    if let Some(per_entity) = summary.state_bytes.checked_div(summary.entities) {
        println!(
            "state       {:>12} bytes ({per_entity} per entity)",
            summary.state_bytes
        );
    }
    if summary.blank_lines > 0 {
        println!(
            "blank lines {:>12} (skipped, not counted as read)",
            summary.blank_lines
        );
    }
    println!(
        "throughput  {:>12.0} events/s ({:.2}s)",
        summary.read as f64 / secs,
        secs
    );
    println!("outputs     {}", output.display());
    println!("  features.jsonl, rejected.jsonl, summary.json");
    match &summary.snapshot {
        Some(snapshot) => println!("  {}", snapshot.display()),
        None => println!("  no Parquet snapshot: no entity has state at the end"),
    }
    if let Some(log) = &summary.feature_log {
        println!(
            "  {}/ ({} feature-log files)",
            log.display(),
            summary.feature_log_files
        );
    }
}

//! The `featurestream` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use featurestream::config::duration::format_duration_ms;
use featurestream::config::{Emit, Pipeline, Window};

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
    /// Run a pipeline over a file of historical events (JSONL, JSONL.gz or Parquet).
    Replay {
        pipeline: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Never show a progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

fn describe(pipeline: &Pipeline) -> String {
    let windows: Vec<String> = pipeline
        .features
        .iter()
        .map(|f| match f.window {
            Window::Hopping {
                size_ms, step_ms, ..
            } if step_ms == size_ms => format!("tumbling {}", format_duration_ms(size_ms)),
            Window::Hopping {
                size_ms,
                step_ms: 1,
                ..
            } => format!("sliding {}", format_duration_ms(size_ms)),
            Window::Hopping {
                size_ms, step_ms, ..
            } => {
                format!(
                    "hopping {}/{}",
                    format_duration_ms(size_ms),
                    format_duration_ms(step_ms)
                )
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
        "pipeline `{}`: {} features ({}), topic {} keyed by `{}`, emit {}",
        pipeline.name,
        pipeline.features.len(),
        kinds.join(", "),
        pipeline.source.kafka.topic,
        pipeline.source.schema.fields[pipeline.source.entity].name,
        emit
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
        println!("  {reason:<10}{n:>12}");
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
    if summary.entities > 0 {
        println!(
            "state       {:>12} bytes ({} per entity)",
            summary.state_bytes,
            summary.state_bytes / summary.entities
        );
    }
    println!(
        "throughput  {:>12.0} events/s ({:.2}s)",
        summary.read as f64 / secs,
        secs
    );
    println!("outputs     {}", output.display());
    println!("  features.jsonl, rejected.jsonl, summary.json");
    if let Some(snapshot) = &summary.snapshot {
        println!("  {}", snapshot.display());
    }
}

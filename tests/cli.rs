//! The command line as a user runs it: `validate` on the shipped and the broken pipelines, and
//! `replay` on every shipped example with its sample events.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_featurestream"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("pipelines"))
        .expect("pipelines/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected at least three example pipelines"
    );
    files
}

#[test]
fn every_example_pipeline_validates() {
    let out = bin()
        .arg("validate")
        .args(examples())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        examples().len(),
        "{stdout}"
    );
}

/// Each broken pipeline names the errors it must produce in `# expect:` lines.
#[test]
fn broken_pipelines_report_the_documented_errors() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("tests/broken")).expect("tests/broken exists") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` lines",
            path.display()
        );
        let out = bin().arg("validate").arg(&path).output().expect("runs");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{} should fail validation",
            path.display()
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for want in &expected {
            assert!(
                stderr.contains(want),
                "{}: missing `{want}` in:\n{stderr}",
                path.display()
            );
        }
        let reported = stderr
            .lines()
            .filter(|l| {
                l.split_once(".yaml:")
                    .is_some_and(|(_, rest)| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        assert_eq!(
            reported,
            expected.len(),
            "{}: every problem, and only those:\n{stderr}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 3);
}

#[test]
fn replay_of_each_example_reconciles() {
    for pipeline in examples() {
        let name = pipeline.file_stem().unwrap().to_string_lossy().to_string();
        let sample = repo(&format!("pipelines/samples/{name}.jsonl"));
        let out = tempfile::tempdir().expect("temp dir");
        let run = replay(&pipeline, &sample, out.path());
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{name}: {stdout}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("summary.json")).unwrap(),
        )
        .unwrap();
        let n = |k: &str| summary[k].as_u64().unwrap();
        assert!(n("read") >= 1000, "{name}: {summary}");
        assert_eq!(
            n("read"),
            n("aggregated") + n("rejected") + n("late"),
            "{name}: {summary}"
        );
        assert!(
            n("rejected") > 0 && n("late") > 0,
            "{name}: samples hold bad and late events: {summary}"
        );
        assert!(n("records") > 0, "{name}: {summary}");
        let rejected = std::fs::read_to_string(out.path().join("rejected.jsonl")).unwrap();
        assert_eq!(
            rejected.lines().count() as u64,
            n("rejected") + if name == "clickstream" { 0 } else { n("late") },
            "{name}: every rejected (and dead-lettered late) event is in rejected.jsonl"
        );
        assert!(
            summary["snapshot"]
                .as_str()
                .is_some_and(|p| Path::new(p).exists()),
            "{name}: {summary}"
        );
        // With `feature_log: true` every update is also in the Parquet feature log.
        let text = std::fs::read_to_string(&pipeline).unwrap();
        let log_rows: i64 = parquet_files(&out.path().join(format!("parquet/{name}-updates")))
            .iter()
            .map(|p| {
                use parquet::file::reader::FileReader;
                parquet::file::reader::SerializedFileReader::new(std::fs::File::open(p).unwrap())
                    .unwrap()
                    .metadata()
                    .file_metadata()
                    .num_rows()
            })
            .sum();
        let updates = std::fs::read_to_string(out.path().join("features.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| !l.contains("\"window_start\""))
            .count() as i64;
        if text.contains("feature_log: true") {
            assert!(updates > 0, "{name}");
            assert_eq!(log_rows, updates, "{name}: one feature-log row per update");
        } else {
            assert_eq!(log_rows, 0, "{name}: no feature log unless asked for");
        }
    }
}

#[test]
fn replay_reports_a_missing_input_clearly() {
    let out = tempfile::tempdir().unwrap();
    let run = replay(
        &repo("pipelines/card_fraud.yaml"),
        Path::new("/nonexistent/events.jsonl"),
        out.path(),
    );
    assert_eq!(run.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&run.stderr)
            .contains("cannot open input /nonexistent/events.jsonl")
    );
}

/// An input that is one of the files replay writes (re-running over an earlier run's dead
/// letters, say) is refused before anything is touched, whatever path names it.
#[test]
fn replay_refuses_an_input_it_would_overwrite() {
    let out = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/card_fraud.yaml");
    let events = std::fs::read(repo("pipelines/samples/card_fraud.jsonl")).unwrap();
    let parquet_dir = out
        .path()
        .join("parquet/card_fraud/date=2026-03-01/hour=00");
    std::fs::create_dir_all(&parquet_dir).unwrap();
    let nested = out.path().join("nested");
    std::fs::create_dir_all(&nested).unwrap();
    for (input, named) in [
        (out.path().join("features.jsonl"), "features.jsonl"),
        (nested.join("../rejected.jsonl"), "rejected.jsonl"),
        (parquet_dir.join("snapshot-1.parquet"), "snapshot-1.parquet"),
    ] {
        std::fs::write(&input, &events).unwrap();
        let run = replay(&pipeline, &input, out.path());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{named}: {stderr}");
        assert!(
            stderr.contains("is one of the files this replay writes"),
            "{named}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&input).unwrap(),
            events,
            "{named} is untouched"
        );
    }
    assert!(!out.path().join("summary.json").exists());
}

/// An input that holds none of the pipeline's events (here, the pipeline file itself) is an
/// error that names the first rejection, not a quiet success; its rejects are still written.
#[test]
fn replay_of_a_file_that_is_not_events_fails_and_says_why() {
    let out = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/card_fraud.yaml");
    let run = replay(&pipeline, &pipeline, out.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("events in")
            && stderr.contains("were rejected")
            && stderr.contains("line 1:"),
        "{stderr}"
    );
    let lines = std::fs::read_to_string(pipeline)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let rejected = std::fs::read_to_string(out.path().join("rejected.jsonl")).unwrap();
    assert_eq!(rejected.lines().count(), lines);
}

/// Replaying into a folder used before leaves that replay's Parquet files only: one snapshot
/// and its own feature log, not one set per run.
#[test]
fn replay_into_a_used_folder_keeps_only_its_own_parquet_files() {
    let out = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/card_fraud.yaml");
    let full = repo("pipelines/samples/card_fraud.jsonl");
    let text = std::fs::read_to_string(&full).unwrap();
    let half = out.path().join("half.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&half, lines[..lines.len() / 2].join("\n")).unwrap();
    let results = out.path().join("results");
    let files_after = |run_input: &Path, folder: &str| {
        let run = replay(&pipeline, run_input, &results);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        parquet_files(&results.join("parquet").join(folder))
    };
    let first = files_after(&half, "card_fraud");
    assert_eq!(first.len(), 1, "{first:?}");
    let second = files_after(&full, "card_fraud");
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(first, second, "the two replays end at different watermarks");
    let log_after_half = files_after(&half, "card_fraud-updates");
    let log_after_full = files_after(&full, "card_fraud-updates");
    assert_eq!(log_after_half.len(), 1, "{log_after_half:?}");
    assert_eq!(log_after_full.len(), 1, "{log_after_full:?}");
    assert_ne!(log_after_half, log_after_full);
}

/// A replay that fails part-way leaves no summary describing outputs it has partly replaced,
/// and one with a wrong input path touches nothing.
#[test]
fn a_failed_replay_leaves_no_stale_summary() {
    use std::io::Write;

    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/card_fraud.yaml");
    let sample = repo("pipelines/samples/card_fraud.jsonl");
    let results = dir.path().join("results");
    assert!(replay(&pipeline, &sample, &results).status.success());
    let summary = results.join("summary.json");
    let before = std::fs::read_to_string(&summary).unwrap();

    let missing = replay(&pipeline, &dir.path().join("nope.jsonl"), &results);
    assert!(!missing.status.success());
    assert_eq!(
        std::fs::read_to_string(&summary).unwrap(),
        before,
        "a wrong input path changes nothing"
    );

    // A gzip file cut short: its first lines are replayed, then reading fails.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&std::fs::read(&sample).unwrap()).unwrap();
    let gz = encoder.finish().unwrap();
    let cut = dir.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let failed = replay(&pipeline, &cut, &results);
    assert!(!failed.status.success());
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("incomplete"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(!summary.exists(), "no summary of a replay that failed");
}

/// One event stamped decades ahead is rejected as `future` and changes nothing for the others
/// (without the check it carried the watermark to 2062 and made every later event late).
#[test]
fn an_event_from_the_future_does_not_make_the_rest_late() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/card_fraud.yaml");
    let sample = repo("pipelines/samples/card_fraud.jsonl");
    let text = std::fs::read_to_string(&sample).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let poison = lines[99].replace("\"ts\":\"2026-", "\"ts\":\"2062-");
    assert_ne!(poison, lines[99], "the sample's times are in 2026");
    lines.insert(100, poison);
    let poisoned = dir.path().join("poisoned.jsonl");
    std::fs::write(&poisoned, lines.join("\n") + "\n").unwrap();

    let summary = |input: &Path, out: &str| -> serde_json::Value {
        let out = dir.path().join(out);
        let run = replay(&pipeline, input, &out);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
    };
    let clean = summary(&sample, "clean");
    let with_poison = summary(&poisoned, "poisoned");
    assert_eq!(with_poison["rejected_by_reason"]["future"], 1);
    assert_eq!(with_poison["aggregated"], clean["aggregated"]);
    assert_eq!(with_poison["late"], clean["late"]);
    assert_eq!(with_poison["watermark"], clean["watermark"]);
}

/// The same events as JSONL, gzip-compressed JSONL and Parquet give the same records.
#[test]
fn replay_reads_gzip_and_parquet_inputs() {
    use std::io::Write;
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, Decimal128Array, DictionaryArray, Float64Array, StringArray,
        TimestampMillisecondArray,
    };
    use arrow::datatypes::{DataType, Field, Int8Type, Schema, TimeUnit};
    use arrow::record_batch::RecordBatch;

    let dir = tempfile::tempdir().unwrap();
    let pipeline = repo("pipelines/card_fraud.yaml");
    let cards = ["c1", "c2", "c1", "c3", "c1"];
    let amounts = [10.0, 20.5, 3.25, 7.0, 1.0];
    let times: Vec<i64> = (0..5).map(|i| 1_772_323_200_000 + i * 60_000).collect();
    let lines: Vec<String> = (0..5)
        .map(|i| {
            format!(
                r#"{{"card_id":"{}","merchant_id":"m{}","amount":{},"status":"approved","ts":{}}}"#,
                cards[i], i, amounts[i], times[i]
            )
        })
        .collect();
    let plain = dir.path().join("events.jsonl");
    std::fs::write(&plain, lines.join("\n") + "\n").unwrap();
    let gz = dir.path().join("events.jsonl.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    encoder
        .write_all((lines.join("\n") + "\n").as_bytes())
        .unwrap();
    encoder.finish().unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("card_id", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("amount", DataType::Float64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(cards.to_vec())),
        Arc::new(StringArray::from(
            (0..5).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(amounts.to_vec())),
        Arc::new(StringArray::from(vec!["approved"; 5])),
        Arc::new(TimestampMillisecondArray::from(times.clone()).with_timezone("UTC")),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let pq = dir.path().join("events.parquet");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&pq).unwrap(), schema, None)
            .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    // As pandas writes categories and databases write money: dictionary-encoded strings and
    // decimals.
    let typed_schema = Arc::new(Schema::new(vec![
        Field::new(
            "card_id",
            DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8)),
            false,
        ),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("amount", DataType::Decimal128(10, 2), false),
        Field::new(
            "status",
            DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8)),
            false,
        ),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]));
    let cents: Vec<i128> = amounts.iter().map(|a| (a * 100.0) as i128).collect();
    let typed_columns: Vec<ArrayRef> = vec![
        Arc::new(DictionaryArray::<Int8Type>::from_iter(
            cards.iter().copied(),
        )),
        Arc::new(StringArray::from(
            (0..5).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        )),
        Arc::new(
            Decimal128Array::from(cents)
                .with_precision_and_scale(10, 2)
                .unwrap(),
        ),
        Arc::new(DictionaryArray::<Int8Type>::from_iter(["approved"; 5])),
        Arc::new(TimestampMillisecondArray::from(times.clone()).with_timezone("UTC")),
    ];
    let typed = dir.path().join("typed.parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&typed).unwrap(),
        typed_schema.clone(),
        None,
    )
    .unwrap();
    writer
        .write(&RecordBatch::try_new(typed_schema, typed_columns).unwrap())
        .unwrap();
    writer.close().unwrap();

    let mut outputs = Vec::new();
    for input in [&plain, &gz, &pq, &typed] {
        let out = dir.path().join(
            input
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace('.', "_"),
        );
        let run = replay(&pipeline, input, &out);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        outputs.push(std::fs::read_to_string(out.join("features.jsonl")).unwrap());
    }
    assert_eq!(outputs[0].lines().count(), 5);
    assert_eq!(outputs[0], outputs[1], "gzip input");
    assert_eq!(outputs[0], outputs[2], "Parquet input");
    assert_eq!(
        outputs[0], outputs[3],
        "Parquet input with dictionary and decimal columns"
    );
}

/// The README's first command: the embedded demo, with more events than the mock cluster keeps
/// per partition (it keeps only the newest 5 MB), so the writer must pace itself.
#[test]
fn the_demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let mut child = bin()
        .args([
            "demo",
            "--events",
            "120000",
            "--http",
            "127.0.0.1:0",
            "--out",
        ])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 5 minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |label: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("events in").contains("120000"), "{stdout}");
    assert!(line("reconciles").ends_with("yes"), "{stdout}");
    assert!(line("a look-up").contains("\"features\""), "{stdout}");
    let snapshots = parquet_files(&out.join("features/card_fraud"));
    assert!(!snapshots.is_empty(), "{snapshots:?}");
}

/// A state folder that cannot take checkpoints stops the service at start, before it waits
/// for Kafka or consumes anything, with a message that names the folder.
#[test]
fn run_refuses_a_state_folder_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_folder = dir.path().join("a-file");
    std::fs::write(&not_a_folder, "").unwrap();
    let pipeline = dir.path().join("state.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: state_check\nsource:\n  kafka: {{ brokers: \"127.0.0.1:1\", topic: t, group_id: g }}\n  schema: {{ k: string, ts: timestamp }}\n  entity: k\n  event_time: ts\nfeatures:\n  - {{ name: n, agg: count, window: lifetime }}\nstate: {{ dir: \"{}\" }}\n",
            not_a_folder.join("state").display()
        ),
    )
    .unwrap();
    let out = bin().arg("run").arg(&pipeline).output().expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "the state folder (`state.dir`) must be writable: cannot write checkpoints in"
        ) && stderr.contains("a-file/state/state_check/g"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Cannot reach Kafka"),
        "checked first: {stderr}"
    );
    assert_eq!(
        stderr.matches("Not a directory").count(),
        1,
        "the cause once: {stderr}"
    );
}

/// A stop requested while the brokers have never answered ends the service at once with exit
/// 0, also when the reader of its log has gone (stderr a closed pipe: writing a log line must
/// not take down the thread that handles the signal).
#[test]
fn a_stop_before_kafka_is_reached_exits_at_once_even_with_nobody_reading_the_log() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("unreachable.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: unreachable\nsource:\n  kafka: {{ brokers: \"127.0.0.1:1\", topic: t, group_id: g }}\n  schema: {{ k: string, ts: timestamp }}\n  entity: k\n  event_time: ts\nfeatures:\n  - {{ name: n, agg: count, window: lifetime }}\nstate: {{ dir: \"{}\" }}\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    for close_log in [false, true] {
        let mut child = bin()
            .arg("run")
            .arg(&pipeline)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts");
        let mut log = BufReader::new(child.stderr.take().expect("piped"));
        let mut first = String::new();
        log.read_line(&mut first).expect("a log line");
        assert!(
            first.contains("Cannot reach Kafka at 127.0.0.1:1"),
            "{first}"
        );
        // Wait into the back-off, so that the stop has to cut a sleep short.
        std::thread::sleep(Duration::from_millis(1500));
        let reader = if close_log {
            drop(log);
            None
        } else {
            Some(std::thread::spawn(move || {
                let mut rest = String::new();
                let _ = std::io::Read::read_to_string(&mut log, &mut rest);
                rest
            }))
        };
        let asked = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = loop {
            if let Some(exit) = child.try_wait().expect("wait") {
                break exit;
            }
            if asked.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                panic!("closed log {close_log}: still running 15 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(exit.code(), Some(0), "closed log {close_log}");
        if let Some(reader) = reader {
            let rest = reader.join().expect("reader");
            assert!(rest.contains("Shutdown requested"), "{rest}");
            assert!(
                rest.rfind("retrying in") < rest.find("Shutdown requested"),
                "no retry after the stop:\n{rest}"
            );
        }
    }
}

/// Runs `featurestream replay PIPELINE --input INPUT --output OUTPUT`.
fn replay(pipeline: &Path, input: &Path, output: &Path) -> std::process::Output {
    bin()
        .arg("replay")
        .arg(pipeline)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .output()
        .expect("the binary runs")
}

/// The Parquet files anywhere under `dir`, sorted.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = walk(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    found.sort();
    found
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

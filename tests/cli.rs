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
        let run = bin()
            .args([
                "replay",
                pipeline.to_str().unwrap(),
                "--input",
                sample.to_str().unwrap(),
                "--output",
            ])
            .arg(out.path())
            .output()
            .expect("runs");
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
    }
}

#[test]
fn replay_reports_a_missing_input_clearly() {
    let out = tempfile::tempdir().unwrap();
    let run = bin()
        .args([
            "replay",
            repo("pipelines/card_fraud.yaml").to_str().unwrap(),
            "--input",
            "/nonexistent/events.jsonl",
            "--output",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&run.stderr)
            .contains("cannot open input /nonexistent/events.jsonl")
    );
}

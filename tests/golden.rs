//! Golden cases: `tests/pipelines/<case>/` holds a pipeline, its input and the records expected,
//! worked out by hand from docs/semantics.md. Each case runs through `replay` (checking records,
//! rejections and the summary) and again through the engine with a snapshot and restore midway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use featurestream::config::{Agg, Pipeline};
use featurestream::decode::json::JsonDecoder;
use featurestream::engine::{Engine, Outcome, Record};
use featurestream::output::{write_update, write_window_closed};
use serde_json::Value;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/pipelines exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("pipeline.yaml").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "golden cases are missing from {}",
        root.display()
    );
    dirs
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display()))
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Records grouped by entity (and feature for window records), each group in emission order.
fn grouped(records: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in records {
        let key = format!(
            "{}/{}",
            r["entity"],
            r.get("feature").map(|f| f.to_string()).unwrap_or_default()
        );
        groups.entry(key).or_default().push(r.clone());
    }
    groups
}

fn numbers_match(got: &Value, want: &Value, percentile: bool) -> bool {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (
                g.as_f64().unwrap_or(f64::NAN),
                w.as_f64().unwrap_or(f64::NAN),
            );
            let tolerance = if percentile {
                0.01 * w.abs() + 1e-9
            } else {
                1e-9 * w.abs().max(1.0)
            };
            (g - w).abs() <= tolerance
        }
        (Value::Object(g), Value::Object(w)) => {
            g.len() == w.len()
                && w.iter().all(|(k, wv)| {
                    g.get(k)
                        .is_some_and(|gv| numbers_match(gv, wv, percentile && k != "as_of"))
                })
        }
        _ => got == want,
    }
}

fn record_matches(got: &Value, want: &Value, percentiles: &[String]) -> bool {
    let (Value::Object(g), Value::Object(w)) = (got, want) else {
        return false;
    };
    if g.len() != w.len() {
        return false;
    }
    w.iter().all(|(key, wv)| {
        let Some(gv) = g.get(key) else { return false };
        match key.as_str() {
            "features" => {
                let (Value::Object(gf), Value::Object(wf)) = (gv, wv) else {
                    return false;
                };
                gf.keys().eq(wf.keys())
                    && wf
                        .iter()
                        .all(|(name, wv)| numbers_match(&gf[name], wv, percentiles.contains(name)))
            }
            "value" => {
                let feature = w.get("feature").and_then(Value::as_str).unwrap_or("");
                numbers_match(gv, wv, percentiles.iter().any(|p| p == feature))
            }
            _ => gv == wv,
        }
    })
}

fn compare_records(
    case: &str,
    how: &str,
    got: &[Value],
    want: &[Value],
    percentiles: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    if got.len() != want.len() {
        problems.push(format!(
            "{case} ({how}): {} records, expected {}",
            got.len(),
            want.len()
        ));
    }
    let (got, want) = (grouped(got), grouped(want));
    for key in got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let empty = Vec::new();
        let (g, w) = (
            got.get(key).unwrap_or(&empty),
            want.get(key).unwrap_or(&empty),
        );
        let same = g.len() == w.len()
            && g.iter()
                .zip(w)
                .all(|(a, b)| record_matches(a, b, percentiles));
        if !same {
            let show = |v: &Vec<Value>| {
                v.iter()
                    .map(|r| format!("    {r}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            problems.push(format!(
                "{case} ({how}) {key}:\n  got:\n{}\n  expected:\n{}",
                show(g),
                show(w)
            ));
        }
    }
    problems
}

fn percentile_features(pipeline: &Pipeline) -> Vec<String> {
    pipeline
        .features
        .iter()
        .filter(|f| matches!(f.agg, Agg::Percentile(_)))
        .map(|f| f.name.clone())
        .collect()
}

fn to_json_lines(pipeline: &Pipeline, records: &[Record]) -> Vec<Value> {
    records
        .iter()
        .map(|r| {
            let mut line = String::new();
            match r {
                Record::Update {
                    entity,
                    as_of,
                    values,
                } => write_update(&mut line, pipeline, entity, *as_of, values),
                Record::WindowClosed {
                    entity,
                    feature,
                    start,
                    end,
                    value,
                } => {
                    write_window_closed(&mut line, pipeline, entity, *feature, *start, *end, value)
                }
            }
            serde_json::from_str(&line).expect("records are valid JSON")
        })
        .collect()
}

/// The engine driven directly, with its partition snapshotted and restored at `cut`.
fn run_with_restore(pipeline: &Arc<Pipeline>, input: &Path, cut: usize) -> Vec<Record> {
    let decoder = JsonDecoder::new(&pipeline.source);
    let bytes = std::fs::read(input).expect("input readable");
    let mut engine = Engine::new(Arc::clone(pipeline));
    engine.assign(0, 0);
    let mut records = Vec::new();
    for (i, line) in bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .enumerate()
    {
        if i == cut {
            let snapshot = engine.snapshot_partition(0).expect("snapshot");
            let watermark = engine.watermark();
            engine = Engine::new(Arc::clone(pipeline));
            engine.restore_watermark(watermark);
            engine.restore_partition(0, &snapshot, 0).expect("restore");
        }
        if let Ok(event) = decoder.decode(line) {
            let _: Outcome = engine.process(0, &event, 0, &mut records);
        }
    }
    records
}

#[test]
fn golden_cases() {
    let mut problems = Vec::new();
    for dir in cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let pipeline = match Pipeline::load(&dir.join("pipeline.yaml")) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                problems.push(format!("{case}: pipeline does not compile:\n{e}"));
                continue;
            }
        };
        let percentiles = percentile_features(&pipeline);
        let input = dir.join("input.jsonl");
        let expected = read_jsonl(&dir.join("expected.jsonl"));
        let out = tempfile::tempdir().expect("temp dir");
        let summary =
            match featurestream::replay::replay(Arc::clone(&pipeline), &input, out.path(), false) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("{case}: replay failed: {e:#}"));
                    continue;
                }
            };
        let got = read_jsonl(&out.path().join("features.jsonl"));
        problems.extend(compare_records(
            &case,
            "replay",
            &got,
            &expected,
            &percentiles,
        ));

        let rejected: Vec<(u64, String)> = read_jsonl(&out.path().join("rejected.jsonl"))
            .iter()
            .map(|r| {
                (
                    r["line"].as_u64().unwrap_or(0),
                    r["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let want_rejected: Vec<(u64, String)> = read_jsonl(&dir.join("expected_rejected.jsonl"))
            .iter()
            .map(|r| {
                (
                    r["line"].as_u64().unwrap_or(0),
                    r["reason"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        if rejected != want_rejected {
            problems.push(format!(
                "{case}: rejected {rejected:?}, expected {want_rejected:?}"
            ));
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("expected_summary.json")) {
            let want: Value = serde_json::from_str(&text).expect("summary JSON");
            let got = serde_json::json!({
                "read": summary.read, "aggregated": summary.aggregated,
                "rejected": summary.rejected, "late": summary.late,
            });
            if got != want {
                problems.push(format!("{case}: summary {got}, expected {want}"));
            }
        }
        assert!(
            summary.reconciles(),
            "{case}: counts do not reconcile: {summary:?}"
        );

        let lines = std::fs::read(&input)
            .map(|b| b.iter().filter(|c| **c == b'\n').count())
            .unwrap_or(0);
        for cut in [lines / 3, lines / 2, (2 * lines) / 3] {
            let records = run_with_restore(&pipeline, &input, cut);
            let got = to_json_lines(&pipeline, &records);
            problems.extend(compare_records(
                &case,
                &format!("restored at event {cut}"),
                &got,
                &expected,
                &percentiles,
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

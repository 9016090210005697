//! `replay` against a second, independent implementation of the semantics: a reference model
//! in Python (`tests/reference/ref.py`) written from the product specification's Semantics and
//! Records sections, not from the engine's code. Random event streams (out-of-order times,
//! late events, gaps, ints where floats are declared, malformed lines) and hand-made edge cases
//! go through both; every `on_update` record of every entity, the rejections, the summary's
//! counts, the Parquet snapshot and the feature log must agree (`tests/reference/compare.py`).
//!
//! Needs Python 3 with pyarrow and PyYAML (`FEATURESTREAM_PYTHON`, as `scripts/test.sh` sets
//! it); without them the test fails, it never passes silently.

use std::path::Path;
use std::process::Command;

mod common;
use common::python;

fn reference_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference"))
}

/// Runs the comparison of `pipeline` over `events`; returns its report, failing on a mismatch.
fn compare(pipeline: &str, events: &Path, work: &Path) -> String {
    let dir = reference_dir();
    let out = Command::new(python())
        .arg(dir.join("compare.py"))
        .arg(dir.join("pipelines").join(pipeline))
        .arg(events)
        .arg(work)
        .env("FEATURESTREAM_BIN", env!("CARGO_BIN_EXE_featurestream"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set FEATURESTREAM_PYTHON): {e}", python()));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{pipeline} over {}: replay and the reference disagree\n{report}\n{}",
        events.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// The number after `label` in a report line, e.g. `compared-equal 1974`.
fn count_after(report: &str, label: &str) -> u64 {
    report
        .split(label)
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` count in the report:\n{report}"))
}

#[test]
fn random_streams_give_the_records_of_the_reference_model() {
    let work = tempfile::tempdir().expect("temporary folder");
    // (pipeline, seed, events, generator options): second-scale windows and sessions, the
    // defaults (no watermark bound, no lateness), and millisecond-scale windows whose
    // boundaries the events hit.
    let cases: [(&str, u64, u32, &[&str]); 4] = [
        ("windows.yaml", 11, 1500, &["--entities", "5"]),
        ("sessions.yaml", 12, 2000, &["--entities", "6"]),
        ("defaults.yaml", 13, 1500, &[]),
        (
            "fine.yaml",
            14,
            1500,
            &[
                "--mean-gap-ms",
                "40",
                "--out-of-order-ms",
                "15",
                "--late-ms",
                "40",
            ],
        ),
    ];
    for (pipeline, seed, n, options) in cases {
        let events = work.path().join(format!("{pipeline}-{seed}.jsonl"));
        let generated = Command::new(python())
            .arg(reference_dir().join("gen.py"))
            .arg(seed.to_string())
            .arg(n.to_string())
            .arg(&events)
            .args(options)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} (set FEATURESTREAM_PYTHON): {e}", python()));
        assert!(generated.success(), "gen.py failed for {pipeline}");
        let report = compare(pipeline, &events, &work.path().join(pipeline));
        println!("{report}");
        // The comparison must have had something to compare: records caused by events and
        // records caused by time alone (quiet keys decaying, sessions closing).
        assert!(count_after(&report, "compared-equal") > 1000, "{report}");
        assert!(count_after(&report, ", time") > 100, "{report}");
    }
}

#[test]
fn hand_made_edge_cases_give_the_records_of_the_reference_model() {
    let work = tempfile::tempdir().expect("temporary folder");
    // Boundary times (exactly at the lateness limit, TTL to the millisecond), int64 and f64
    // overflow and recovery, a byte-order mark, duplicate keys, a leap second, time offsets;
    // and percentiles of values up to the largest floats.
    for name in ["edge", "large_values"] {
        let events = reference_dir().join("events").join(format!("{name}.jsonl"));
        let report = compare(&format!("{name}.yaml"), &events, &work.path().join(name));
        println!("{report}");
        assert!(count_after(&report, "compared-equal") >= 15, "{report}");
    }
}

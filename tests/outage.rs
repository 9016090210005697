//! A broker outage in the middle of a stream: `featurestream run` keeps retrying while Kafka is
//! down, resumes when it is back, and no input event is missing from the output.
//!
//! In its own test binary because it stops the shared broker: cargo runs test binaries one
//! after another, so no other test sees the outage.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn broker_outage_midstream_loses_nothing() {
    let Setup {
        dir,
        input,
        output,
        dlq: _,
        pipeline,
    } = setup("outage", 3, "json", "json");
    // Checkpoints also go to a state topic: Kafka going away must not stop the service there
    // either, and the topic holds a whole checkpoint afterwards.
    let state_topic = use_state_topic(&pipeline);
    // Enough input that the service is still consuming when the broker goes away.
    let before = events(150_000, 0);
    produce(&input, &before);
    let (service, http) = start_service(&pipeline, dir.path().join("service.log"));
    wait_until(Duration::from_secs(120), "some events consumed", || {
        consumed(&http) >= 2000
    });
    let consumed_at_outage = consumed(&http);
    // Ten seconds without a broker, then the same broker (same storage) back.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka.sh");
    let bounce = Command::new(script)
        .args(["bounce", "10"])
        .output()
        .expect("run scripts/kafka.sh bounce");
    assert!(
        bounce.status.success(),
        "kafka.sh bounce failed:\n{}{}",
        String::from_utf8_lossy(&bounce.stdout),
        String::from_utf8_lossy(&bounce.stderr)
    );
    let (code, _) = http_get(&format!("http://{http}/healthz"));
    assert_eq!(code, 200, "the service is still alive after the outage");

    // Events produced after the outage are picked up too.
    let after = events(5_000, 150_000);
    produce(&input, &after);
    let all: Vec<_> = before.iter().chain(&after).cloned().collect();
    wait_for_every_event_record(&output, &all);
    let (status, log) = service.terminate();
    assert!(status.success(), "clean exit after the outage:\n{log}");
    assert!(
        consumed_at_outage < before.len() as u64,
        "the outage began mid-stream ({consumed_at_outage} of {} consumed)",
        before.len()
    );
    assert!(
        log.contains("No Kafka broker is reachable") && log.contains("Kafka is reachable again"),
        "the outage and the recovery are both in the log:\n{log}"
    );
    assert_no_event_lost(&output, &all, &log);

    // A second instance with a state folder of its own restores every partition from the topic.
    let other = with_own_state_folder(dir.path(), &pipeline);
    let (second, http) = start_service(&other, dir.path().join("second.log"));
    wait_until(
        Duration::from_secs(120),
        "the second instance owning its partitions",
        || http_get(&format!("http://{http}/readyz")).0 == 200,
    );
    let (status, log) = second.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(
        log.matches(&format!(
            "Restored partition state from its checkpoint in the state topic `{state_topic}`"
        ))
        .count(),
        3,
        "{log}"
    );
}

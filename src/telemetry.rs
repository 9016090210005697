//! Metric names, in one place. Counters end in `_total`; labels come from small fixed sets
//! (pipeline, partition, reason, route, status), never entity ids. Values are recorded through
//! the `metrics` facade, per batch rather than per event, and exported in Prometheus format.

pub const EVENTS_CONSUMED: &str = "featurestream_events_consumed_total";
pub const EVENTS_AGGREGATED: &str = "featurestream_events_aggregated_total";
pub const EVENTS_DEAD_LETTERED: &str = "featurestream_events_dead_lettered_total";
pub const EVENTS_REJECTED: &str = "featurestream_events_rejected_total";
pub const EVENTS_LATE: &str = "featurestream_events_late_total";
pub const RECORDS_PRODUCED: &str = "featurestream_records_produced_total";
pub const CONSUMER_LAG: &str = "featurestream_consumer_lag_messages";
pub const WATERMARK: &str = "featurestream_watermark_seconds";
pub const PARTITION_WATERMARK: &str = "featurestream_partition_watermark_seconds";
pub const OUTPUT_LATENCY: &str = "featurestream_event_to_output_latency_seconds";
pub const STATE_ENTITIES: &str = "featurestream_state_entities";
pub const STATE_BYTES: &str = "featurestream_state_bytes";
pub const SNAPSHOT_DURATION: &str = "featurestream_snapshot_duration_seconds";
pub const SNAPSHOT_BYTES: &str = "featurestream_snapshot_bytes";
pub const SNAPSHOT_FAILURES: &str = "featurestream_snapshot_failures_total";
pub const CHECKPOINTS: &str = "featurestream_checkpoints_total";
pub const PARTITIONS_WITHOUT_STATE: &str = "featurestream_partitions_without_state_total";
pub const HTTP_REQUESTS: &str = "featurestream_http_requests_total";
pub const HTTP_LATENCY: &str = "featurestream_http_request_duration_seconds";

/// Every metric with its help text, for `describe_*` at start-up and for the docs.
pub const ALL: &[(&str, &str)] = &[
    (EVENTS_CONSUMED, "Input records read from Kafka."),
    (
        EVENTS_AGGREGATED,
        "Input events that passed decoding and lateness and were aggregated.",
    ),
    (
        EVENTS_REJECTED,
        "Input events rejected by the decoder, by reason (dead-lettered when a dead-letter topic is set).",
    ),
    (
        EVENTS_DEAD_LETTERED,
        "Records written to the dead-letter topic, by reason.",
    ),
    (
        EVENTS_LATE,
        "Input events older than the watermark minus the allowed lateness.",
    ),
    (
        RECORDS_PRODUCED,
        "Feature records written to the output topic.",
    ),
    (
        CONSUMER_LAG,
        "High watermark minus the next offset to read, per input partition.",
    ),
    (
        WATERMARK,
        "The pipeline watermark (event time, Unix seconds).",
    ),
    (
        PARTITION_WATERMARK,
        "Each input partition's watermark (event time, Unix seconds).",
    ),
    (
        OUTPUT_LATENCY,
        "Wall-clock time from an event's Kafka timestamp to its feature record being sent.",
    ),
    (STATE_ENTITIES, "Entities held in state."),
    (
        STATE_BYTES,
        "Size of the feature state as last checkpointed (serialised bytes).",
    ),
    (SNAPSHOT_DURATION, "Time to write one Parquet snapshot."),
    (SNAPSHOT_BYTES, "Size of the last Parquet snapshot file."),
    (
        SNAPSHOT_FAILURES,
        "Parquet snapshots or feature-log files that could not be written.",
    ),
    (
        CHECKPOINTS,
        "Checkpoints completed (outputs acknowledged, state saved, offsets committed).",
    ),
    (
        PARTITIONS_WITHOUT_STATE,
        "Input partitions the group had read before that were assigned with no checkpoint (in state.dir or the state topic): they continue with empty state.",
    ),
    (HTTP_REQUESTS, "HTTP requests served, by route and status."),
    (HTTP_LATENCY, "HTTP request latency, by route."),
];

/// Registers the service's counters at zero, every reason included, so that a dashboard's
/// balance (`consumed = aggregated + rejected + late`) has every term from the start instead
/// of an empty series until the first bad event.
pub fn register_counters(pipeline: &str) {
    use crate::decode::RejectReason;
    for name in [
        EVENTS_CONSUMED,
        EVENTS_AGGREGATED,
        EVENTS_LATE,
        RECORDS_PRODUCED,
        SNAPSHOT_FAILURES,
        CHECKPOINTS,
        PARTITIONS_WITHOUT_STATE,
    ] {
        metrics::counter!(name, "pipeline" => pipeline.to_string()).increment(0);
    }
    for reason in RejectReason::ALL {
        // Late events have their own counter and are never counted as rejected.
        if reason != RejectReason::Late {
            metrics::counter!(EVENTS_REJECTED, "pipeline" => pipeline.to_string(), "reason" => reason.as_str())
                .increment(0);
        }
        metrics::counter!(EVENTS_DEAD_LETTERED, "pipeline" => pipeline.to_string(), "reason" => reason.as_str())
            .increment(0);
    }
}

//! Kafka clients: configuration (our defaults, then the pipeline's librdkafka `options`),
//! librdkafka's logs routed into `tracing`, and the start-up check that the topics exist,
//! retried while the brokers cannot be reached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaOptions;

/// Client settings: bootstrap servers, then our settings, then the user's `options` (which win).
pub fn client_config(brokers: &str, ours: &[(&str, &str)], options: &KafkaOptions) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    config.set("client.id", "featurestream");
    for (k, v) in ours {
        config.set(*k, *v);
    }
    for (k, v) in options.iter() {
        config.set(k, v);
    }
    config.set_log_level(RDKafkaLogLevel::Warning);
    config
}

/// What every producer of the service needs, whatever the options say: no record lost or
/// written twice by a retry (for [`enforce`]).
pub const IDEMPOTENT_PRODUCER: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

/// Sets, after the user's options, what the service's delivery guarantee depends on; an
/// option that asked for something else is ignored with a warning.
pub fn enforce(config: &mut ClientConfig, options: &KafkaOptions, required: &[(&str, &str)]) {
    for &(key, value) in required {
        if let Some((_, theirs)) = options.iter().find(|(k, _)| *k == key)
            && theirs != value
        {
            tracing::warn!(
                "The Kafka option `{key}: {theirs}` is ignored: the delivery guarantee needs `{key}: {value}`."
            );
        }
        config.set(key, value);
    }
}

/// Routes librdkafka's own log lines and errors into `tracing`.
#[derive(Default)]
pub struct LoggingContext {
    status: BrokerStatus,
}

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_line(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_error(&error, reason, "client", &self.status);
    }
}

impl rdkafka::consumer::ConsumerContext for LoggingContext {}

pub fn log_line(level: RDKafkaLogLevel, facility: &str, message: &str) {
    // A refused or dropped connection is retried by the client: a warning, not an error.
    if facility == "FAIL" {
        tracing::warn!(facility, "librdkafka: {message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

/// Whether one client has lost every broker, so that it can say when they are back. Each
/// client keeps its own: the input's brokers can be up while the output's are down.
#[derive(Debug, Default)]
pub struct BrokerStatus {
    down: AtomicBool,
}

impl BrokerStatus {
    /// True once after an outage reported by [`log_error`]: the client just heard from Kafka.
    pub fn back(&self) -> bool {
        self.down.swap(false, Ordering::Relaxed)
    }
}

/// Whether an error is a lost or refused connection, which the client retries by itself.
pub fn is_transient_transport(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
    )
}

/// Logs a client error; `client` names the client in words ("consumer", "producer") and
/// `status` remembers an outage so that its end can be reported.
pub fn log_error(error: &KafkaError, reason: &str, client: &str, status: &BrokerStatus) {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::AllBrokersDown) => {
            status.down.store(true, Ordering::Relaxed);
            tracing::warn!(
                "No Kafka broker is reachable for the {client}; retrying until one is ({reason})."
            )
        }
        Some(RDKafkaErrorCode::BrokerTransportFailure) => tracing::warn!(
            "The {client} lost its connection to a Kafka broker; reconnecting ({reason})."
        ),
        _ => tracing::warn!("Kafka {client} error: {error} ({reason})"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopicCheckError {
    #[error("topic `{topic}` does not exist on {brokers} (it is the {role}); create it first")]
    Missing {
        topic: String,
        role: &'static str,
        brokers: String,
    },
    #[error("cannot read metadata for topic `{topic}` on {brokers}: {error}")]
    Metadata {
        topic: String,
        brokers: String,
        error: String,
    },
    #[error("stopped before Kafka could be reached")]
    Stopped,
    #[error("cannot create a Kafka client: {0}")]
    Client(#[from] KafkaError),
}

/// Sleeps for `duration`, or less if `stop` is set meanwhile.
fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) {
    let until = Instant::now() + duration;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Waits until the brokers answer, then checks that every topic exists. While the brokers are
/// unreachable it logs and retries (until `stop` is set); a missing topic is an error at once.
pub fn check_topics(
    brokers: &str,
    options: &KafkaOptions,
    topics: &[(&str, &'static str)],
    stop: &Arc<AtomicBool>,
) -> Result<(), TopicCheckError> {
    let client: BaseConsumer<LoggingContext> =
        client_config(brokers, &[], options).create_with_context(LoggingContext::default())?;
    let started = Instant::now();
    let mut backoff = Duration::from_millis(250);
    for (topic, role) in topics {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(TopicCheckError::Stopped);
            }
            // A short timeout per attempt, so that a stop is seen within about a second.
            match client.fetch_metadata(Some(topic), Duration::from_secs(1)) {
                Ok(metadata) => {
                    let found = metadata.topics().iter().find(|t| t.name() == *topic);
                    match found.and_then(|t| t.error()) {
                        None if found.is_some_and(|t| !t.partitions().is_empty()) => break,
                        Some(
                            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                        )
                        | None => {
                            return Err(TopicCheckError::Missing {
                                topic: topic.to_string(),
                                role,
                                brokers: brokers.to_string(),
                            });
                        }
                        Some(code) => {
                            return Err(TopicCheckError::Metadata {
                                topic: topic.to_string(),
                                brokers: brokers.to_string(),
                                error: format!("{code:?}"),
                            });
                        }
                    }
                }
                Err(_) if stop.load(Ordering::Relaxed) => return Err(TopicCheckError::Stopped),
                Err(error) => {
                    tracing::warn!(
                        "Cannot reach Kafka at {brokers} ({error}); retrying in {:.1}s (waiting {:.0}s so far).",
                        backoff.as_secs_f64(),
                        started.elapsed().as_secs_f64()
                    );
                    sleep_unless_stopped(backoff, stop);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn options_cannot_undo_what_a_guarantee_needs() {
        let options = KafkaOptions(
            [("enable.auto.commit", "true"), ("fetch.wait.max.ms", "10")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), Secret(v.to_string())))
                .collect(),
        );
        let mut config = client_config(
            "127.0.0.1:9092",
            &[("enable.auto.commit", "false"), ("fetch.wait.max.ms", "50")],
            &options,
        );
        // Options win over our defaults...
        assert_eq!(config.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(config.get("enable.auto.commit"), Some("true"));
        // ...but not over what the delivery guarantee needs.
        enforce(&mut config, &options, &[("enable.auto.commit", "false")]);
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
        assert_eq!(config.get("fetch.wait.max.ms"), Some("10"));
    }
}

//! Connections to the outside world that the service uses: Kafka clients.

pub mod kafka;

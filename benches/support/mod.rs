//! What the Kafka benchmarks share: the broker address, topic creation and a fast producer.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};

pub fn brokers() -> String {
    std::env::var("FEATURESTREAM_KAFKA")
        .expect("start Kafka first: scripts/kafka.sh up && eval \"$(scripts/kafka.sh env)\"")
}

/// Creates single-partition topics.
pub fn create_topics(topics: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for result in runtime
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create topics")
    {
        result.expect("topic created");
    }
}

pub fn producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .expect("producer")
}

/// Sends one record, waiting while the producer's queue is full.
pub fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    payload: &str,
) {
    let mut record = BaseRecord::to(topic)
        .key(key.as_bytes())
        .payload(payload.as_bytes());
    while let Err((_, back)) = producer.send(record) {
        record = back;
        std::thread::sleep(Duration::from_millis(1));
    }
}

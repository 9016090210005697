//! Helpers for tests against the real Kafka broker and registry that `scripts/kafka.sh` starts.
//! A test that needs them and finds none fails with a message saying how to start them.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value;

pub fn brokers() -> String {
    std::env::var("FEATURESTREAM_KAFKA").unwrap_or_else(|_| {
        panic!(
            "This test needs a real Kafka broker: run `scripts/test.sh` (it starts one), or start one with \
             `scripts/kafka.sh up` and `eval \"$(scripts/kafka.sh env)\"`."
        )
    })
}

pub fn registry() -> String {
    std::env::var("FEATURESTREAM_SCHEMA_REGISTRY").unwrap_or_else(|_| {
        panic!("This test needs the schema registry: run `scripts/test.sh`, or `scripts/kafka.sh up` and `eval \"$(scripts/kafka.sh env)\"`.")
    })
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

pub fn create_topics(topics: &[(&str, i32)]) {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let admin = Admin::new();
    let results = admin
        .runtime
        .block_on(admin.client.create_topics(&new, &admin.options))
        .expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

/// Adds partitions to `topic` until it has `total`.
pub fn add_partitions(topic: &str, total: usize) {
    let admin = Admin::new();
    let results = admin
        .runtime
        .block_on(
            admin
                .client
                .create_partitions(&[NewPartitions::new(topic, total)], &admin.options),
        )
        .expect("add partitions");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot add partitions to {t}: {e}"));
    }
}

/// An admin client of the test broker, and a runtime to wait for its answers on.
struct Admin {
    client: AdminClient<DefaultClientContext>,
    options: AdminOptions,
    runtime: tokio::runtime::Runtime,
}

impl Admin {
    fn new() -> Admin {
        Admin {
            client: ClientConfig::new()
                .set("bootstrap.servers", brokers())
                .create()
                .expect("admin client"),
            options: AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }
}

pub fn producer() -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        // Tests send events just over a megabyte (the broker takes up to its default 1 MiB).
        .set("message.max.bytes", "1048000")
        .create()
        .expect("producer")
}

/// Produces `(partition, key, payload)` records and waits until all are acknowledged.
pub fn produce(topic: &str, records: &[(i32, String, Vec<u8>)]) {
    let producer = producer();
    for (partition, key, payload) in records {
        let mut record = BaseRecord::to(topic)
            .partition(*partition)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("all test records acknowledged");
}

/// Produces one record with one header to partition 0 and waits until it is acknowledged.
pub fn produce_with_header(topic: &str, key: &str, payload: &[u8], header: (&str, &str)) {
    let producer = producer();
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: header.0,
        value: Some(header.1),
    });
    producer
        .send(
            BaseRecord::to(topic)
                .partition(0)
                .key(key.as_bytes())
                .payload(payload)
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .expect("record queued");
    producer
        .flush(Duration::from_secs(60))
        .expect("the record acknowledged");
}

#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    pub partition: i32,
}

/// Reads a topic from the start until `expected` records arrived or nothing came for `idle`.
pub fn consume_all(topic: &str, expected: Option<usize>, idle: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // What consumers of an exactly-once service must read (librdkafka's default).
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle && expected.is_none_or(|n| out.len() < n) {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let m = message.expect("consume");
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Consumed {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
                partition: m.partition(),
            });
            last = Instant::now();
        }
    }
    out
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_featurestream")
}

/// Writes a pipeline file for the test's topics.
pub fn write_pipeline(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("pipeline.yaml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

pub struct Service {
    pub child: Child,
    pub log: PathBuf,
}

impl Service {
    pub fn start(pipeline: &Path, extra: &[&str], log: PathBuf) -> Service {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .arg("run")
            .arg(pipeline)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start featurestream run");
        Service { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "featurestream did not stop within 90s of SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process at once (SIGKILL), as a crash or an out-of-memory kill would.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }

    pub fn wait(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "featurestream did not finish within {limit:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Waits until `check` holds, polling; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    match agent.get(url).call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

pub fn http_post(url: &str, body: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    match agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
    {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// The pipeline, events and checks shared by the tests that run the service.

pub const CARDS: usize = 40;
pub const T0: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z

pub fn pipeline_text(
    name: &str,
    input: &str,
    output: &str,
    dlq: &str,
    dir: &Path,
    format: &str,
    sink_format: &str,
) -> String {
    let registry = std::env::var("FEATURESTREAM_SCHEMA_REGISTRY").unwrap_or_default();
    format!(
        r#"
name: {name}
source:
  kafka: {{ brokers: "{brokers}", topic: {input}, group_id: {group} }}
  format: {format}
  schema_registry: "{registry}"
  schema: {{ card_id: string, merchant_id: string, amount: float, status: string, ts: timestamp }}
  entity: card_id
  event_time: ts
  # 5001 ms keeps the watermark off the whole seconds that events use.
  watermark: {{ max_out_of_order: 5001ms, idle_timeout: 10m }}
  allowed_lateness: 10s
  on_late: dlq
features:
  - {{ name: n_10m, agg: count, window: {{ sliding: 10m }} }}
  - {{ name: sum_1h, agg: sum, field: amount, window: {{ hopping: 1h, step: 5m }} }}
  - {{ name: declined_1h, agg: count, where: 'status == "declined"', window: {{ sliding: 1h }} }}
  - {{ name: merchants_1d, agg: distinct_count, field: merchant_id, window: {{ tumbling: 1d }} }}
  - {{ name: total, agg: count, window: lifetime }}
sinks:
  kafka: {{ topic: {output}, format: {sink_format}, emit: on_update }}
  parquet: {{ path: "{parquet}", snapshot_every: 1s }}
dead_letter: {{ topic: {dlq} }}
state: {{ entity_ttl: never, dir: "{state}", checkpoint_every: 1s }}
"#,
        brokers = brokers(),
        group = unique("group"),
        parquet = dir.join("parquet").display(),
        state = dir.join("state").display(),
    )
}

/// `count` events in time order (whole seconds), cycling over cards; partition = card % 3.
pub fn events(count: usize, first_second: i64) -> Vec<(i32, String, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let card = (i * 7 + i / 3) % CARDS;
            let ts = T0 + (first_second + i as i64) * 1000;
            let status = if i % 11 == 0 { "declined" } else { "approved" };
            let payload = format!(
                r#"{{"card_id":"card_{card:03}","merchant_id":"m_{}","amount":{}.25,"status":"{status}","ts":{ts}}}"#,
                i % 13,
                (i % 50) + 1
            );
            ((card % 3) as i32, format!("card_{card:03}"), payload.into_bytes())
        })
        .collect()
}

pub fn parse(records: &[Consumed]) -> Vec<Value> {
    records
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).expect("output is JSON"))
        .collect()
}

/// Records an event caused directly (as_of equals one of the entity's event times).
pub fn event_records(
    records: &[Value],
    input: &[(i32, String, Vec<u8>)],
) -> BTreeMap<(String, String), Vec<Value>> {
    let mut times: BTreeSet<(String, String)> = BTreeSet::new();
    for (_, key, payload) in input {
        let v: Value = serde_json::from_slice(payload).unwrap();
        let ts = featurestream::decode::time::format_rfc3339_ms(v["ts"].as_i64().unwrap());
        times.insert((key.clone(), ts));
    }
    let mut out: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for r in records {
        let k = (
            r["entity"].as_str().unwrap().to_string(),
            r["as_of"].as_str().unwrap().to_string(),
        );
        if times.contains(&k) {
            out.entry(k).or_default().push(r["features"].clone());
        }
    }
    out
}

pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

pub fn python() -> String {
    std::env::var("FEATURESTREAM_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A test's own topics (input, output, dead letters), folder and pipeline file.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub pipeline: std::path::PathBuf,
}

/// Creates fresh topics (the input and output with `partitions`) and writes the pipeline.
pub fn setup(name: &str, partitions: i32, format: &str, sink_format: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (input, output, dlq) = (unique(name), unique("features"), unique("dlq"));
    create_topics(&[(&input, partitions), (&output, partitions), (&dlq, 1)]);
    let text = pipeline_text(
        &format!("it_{name}"),
        &input,
        &output,
        &dlq,
        dir.path(),
        format,
        sink_format,
    );
    let pipeline = write_pipeline(dir.path(), &text);
    Setup {
        dir,
        input,
        output,
        dlq,
        pipeline,
    }
}

/// `featurestream_events_consumed_total` as the service at `http` reports it now.
pub fn consumed(http: &str) -> u64 {
    metric(
        &http_get(&format!("http://{http}/metrics")).1,
        "featurestream_events_consumed_total",
    )
}

/// Starts `featurestream run` with its HTTP API on a free port; returns it and the address.
pub fn start_service(pipeline: &Path, log: PathBuf) -> (Service, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let service = Service::start(pipeline, &["--http", &http], log);
    (service, http)
}

/// Runs the service until it has consumed `at_least` records, stops it with SIGTERM and
/// checks that it exited cleanly; returns its log.
pub fn run_until_consumed(pipeline: &Path, log: PathBuf, at_least: u64) -> String {
    let (service, http) = start_service(pipeline, log);
    wait_until(Duration::from_secs(120), "the records consumed", || {
        consumed(&http) >= at_least
    });
    let (status, log) = service.terminate();
    assert!(status.success(), "clean exit on SIGTERM:\n{log}");
    log
}

/// Runs the service until every event of `input` has its record on `output`, then stops it
/// cleanly; returns its log.
pub fn run_until_recorded(
    pipeline: &Path,
    log: PathBuf,
    output: &str,
    input: &[(i32, String, Vec<u8>)],
) -> String {
    let (service, _) = start_service(pipeline, log);
    wait_for_every_event_record(output, input);
    let (status, log) = service.terminate();
    assert!(status.success(), "clean exit on SIGTERM:\n{log}");
    log
}

/// Creates a state topic of one partition and sets it as the pipeline file's `state.topic`;
/// returns its name.
pub fn use_state_topic(pipeline: &Path) -> String {
    let topic = unique("state");
    create_topics(&[(&topic, 1)]);
    let text = std::fs::read_to_string(pipeline).unwrap().replace(
        "checkpoint_every: 1s }",
        &format!("checkpoint_every: 1s, topic: {topic} }}"),
    );
    assert!(text.contains(&topic), "the pipeline has a state section");
    std::fs::write(pipeline, text).unwrap();
    topic
}

/// Makes the pipeline file exactly-once, with a new state topic of one partition; returns the
/// topic's name.
pub fn use_exactly_once(pipeline: &Path) -> String {
    let topic = use_state_topic(pipeline);
    let text = std::fs::read_to_string(pipeline).unwrap() + "guarantee: exactly_once\n";
    std::fs::write(pipeline, text).unwrap();
    topic
}

/// Reads `output` as a `read_committed` consumer does and checks exactly-once: every event of
/// `input` has its own record once, and no record at all is there twice. Returns the records.
pub fn assert_every_record_once(
    output: &str,
    input: &[(i32, String, Vec<u8>)],
    log: &str,
) -> Vec<Value> {
    let streamed = parse(&consume_all(output, None, Duration::from_secs(5)));
    let own = event_records(&streamed, input);
    assert_eq!(own.len(), input.len(), "no event is missing:\n{log}");
    for (key, copies) in &own {
        assert_eq!(
            copies.len(),
            1,
            "the record of {key:?} was sent more than once"
        );
    }
    let mut seen = BTreeSet::new();
    for record in &streamed {
        assert!(seen.insert(record.to_string()), "sent twice: {record}");
    }
    streamed
}

/// The same pipeline file for a second instance of the group, with a state folder of its own
/// (`dir/state-b`), as on another machine.
pub fn with_own_state_folder(dir: &Path, pipeline: &Path) -> PathBuf {
    let text = std::fs::read_to_string(pipeline).unwrap();
    let state = dir.join("state").display().to_string();
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let text = text.replace(&state, &dir.join("state-b").display().to_string());
    assert!(
        text.contains("state-b"),
        "the pipeline names its state folder"
    );
    write_pipeline(&other, &text)
}

/// Waits until every input event's own record is on `output`.
pub fn wait_for_every_event_record(output: &str, input: &[(i32, String, Vec<u8>)]) {
    wait_until(
        Duration::from_secs(180),
        "every event's record on the output topic",
        || {
            let out = consume_all(output, None, Duration::from_secs(2));
            event_records(&parse(&out), input).len() == input.len()
        },
    );
}

/// No input event is missing from `output`, and the copies of one event's record (at-least-once
/// may repeat it) are identical.
pub fn assert_no_event_lost(output: &str, input: &[(i32, String, Vec<u8>)], log: &str) {
    let streamed = parse(&consume_all(output, None, Duration::from_secs(5)));
    let own = event_records(&streamed, input);
    assert_eq!(own.len(), input.len(), "no input event is missing:\n{log}");
    for (key, copies) in &own {
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "duplicates of {key:?} differ: {copies:?}"
        );
    }
}

/// The partition Kafka's Java producer picks for `key` among `partitions`: murmur2 of the key
/// bytes, made positive, modulo the partition count (`Utils.murmur2`, `Utils.toPositive`).
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) as i32 % partitions
}

/// MurmurHash2 with Kafka's seed, as Kafka's `Utils.murmur2` computes it.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        for (i, &b) in tail.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

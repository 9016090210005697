//! The look-up API over a real socket: answers and errors as a model-serving client sees them,
//! including requests no well-behaved client sends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::*;
use crate::config::compile_source;
use crate::decode::json::JsonDecoder;

/// A served pipeline whose entity field is `entity_type`, holding events for `entities`.
fn serve_pipeline(entity_type: &str, entities: &[&str]) -> (SocketAddr, tokio::runtime::Runtime) {
    let text = format!(
        r#"
name: p
source:
  kafka: {{ brokers: "x:1", topic: t, group_id: g }}
  schema: {{ id: {entity_type}, amount: float, ts: timestamp }}
  entity: id
  event_time: ts
features:
  - {{ name: n, agg: count, window: lifetime }}
  - {{ name: total, agg: sum, field: amount, window: lifetime }}
"#
    );
    let pipeline = Arc::new(compile_source("p.yaml", &text).unwrap_or_else(|e| panic!("{e}")));
    let shared = Shared::new(Arc::clone(&pipeline), Arc::new(AtomicBool::new(false)));
    {
        let decoder = JsonDecoder::new(&pipeline.source);
        let mut engine = shared.engine();
        engine.assign(0, 0);
        let mut records = Vec::new();
        for (i, id) in entities.iter().enumerate() {
            let line = format!(r#"{{"id":{id},"amount":2.5,"ts":{}}}"#, 1_000 + i);
            let event = decoder.decode(line.as_bytes()).unwrap();
            engine.process(0, &event, 0, &mut records);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState {
        shared,
        metrics: None,
    };
    runtime.spawn(async move { axum::serve(listener, router(state)).await });
    (addr, runtime)
}

struct Answer {
    status: u16,
    content_type: String,
    body: serde_json::Value,
}

/// Sends `head` (request line and headers, without the blank line) and `body` as raw bytes,
/// so that requests a client library would refuse to build can be sent too.
fn request(addr: SocketAddr, head: &[u8], body: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.write_all(head).unwrap();
    let framing = format!(
        "\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(framing.as_bytes()).unwrap();
    // A server refusing a large body may answer before reading it all and close the socket.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_string();
    let body = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {body:?}"));
    Answer {
        status,
        content_type,
        body,
    }
}

fn get(addr: SocketAddr, path: &[u8]) -> Answer {
    request(addr, &[b"GET ", path, b" HTTP/1.1"].concat(), b"")
}

fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Answer {
    request(
        addr,
        format!("POST {path} HTTP/1.1\r\nContent-Type: application/json").as_bytes(),
        body,
    )
}

#[test]
fn a_batch_says_found_for_every_entity() {
    let (addr, _runtime) = serve_pipeline("string", &[r#""a""#, r#""a""#]);
    let answer = post(addr, "/v1/features/p", br#"{"entities":["a","b"]}"#);
    assert_eq!(answer.status, 200);
    let results = &answer.body["results"];
    assert_eq!(results[0]["entity"], "a");
    assert_eq!(results[0]["found"], true);
    assert_eq!(results[0]["features"]["n"], 2);
    assert_eq!(results[0]["features"]["total"], 5.0);
    assert_eq!(
        results[1],
        serde_json::json!({ "entity": "b", "found": false })
    );
    let one = get(addr, b"/v1/features/p/a");
    assert_eq!(one.status, 200);
    assert_eq!(one.body["features"], results[0]["features"]);
    assert!(one.body.get("found").is_none(), "{:?}", one.body);
}

#[test]
fn int_entities_are_found_by_any_spelling_of_their_number() {
    let (addr, _runtime) = serve_pipeline("int", &["7", "-12", "0"]);
    for path in [
        "/v1/features/p/7",
        "/v1/features/p/007",
        "/v1/features/p/+7",
    ] {
        let answer = get(addr, path.as_bytes());
        assert_eq!(
            (answer.status, &answer.body["entity"]),
            (200, &"7".into()),
            "{path}"
        );
    }
    let answer = post(
        addr,
        "/v1/features/p",
        br#"{"entities":[7,"-12","0012",8,-0]}"#,
    );
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let found: Vec<_> = answer.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["entity"].as_str().unwrap(), r["found"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        found,
        [
            ("7", true),
            ("-12", true),
            ("12", false),
            ("8", false),
            ("0", true)
        ]
    );
    let answer = get(addr, b"/v1/features/p/seven");
    assert_eq!(answer.status, 400);
    assert!(
        answer.body["error"].as_str().unwrap().contains("is an int"),
        "{:?}",
        answer.body
    );
    for (body, says) in [
        (&br#"{"entities":[7.5]}"#[..], "not an integer"),
        // Ingest refuses these for an int field: a look-up must not find entity 0 or 100.
        (br#"{"entities":[0.0]}"#, "not an integer"),
        (br#"{"entities":[-0.0]}"#, "not an integer"),
        (br#"{"entities":[1e2]}"#, "not an integer"),
        (
            br#"{"entities":[-9223372036854775809]}"#,
            "outside the 64-bit integer range",
        ),
        (
            br#"{"entities":[9223372036854775808]}"#,
            "outside the 64-bit integer range",
        ),
        (br#"{"entities":[true]}"#, "a string or an integer"),
    ] {
        let answer = post(addr, "/v1/features/p", body);
        assert_eq!(answer.status, 400, "{:?}", answer.body);
        let message = answer.body["error"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
}

#[test]
fn every_error_is_json_with_a_message() {
    let (addr, _runtime) = serve_pipeline("string", &[r#""a""#]);
    let long_id = format!("/v1/features/p/{}", "k".repeat(MAX_ENTITY_BYTES + 1));
    // Just over the 2 MB limit, so that little of it is left unread when the server answers.
    let too_big = format!(r#"{{"entities":["{}"]}}"#, "x".repeat((2 << 20) + 100));
    let long_in_batch = format!(
        r#"{{"entities":["a","{}"]}}"#,
        "k".repeat(MAX_ENTITY_BYTES + 1)
    );
    let cases: Vec<(&str, Answer, u16)> = vec![
        ("unknown entity", get(addr, b"/v1/features/p/zzz"), 404),
        ("unknown pipeline", get(addr, b"/v1/features/q/a"), 404),
        ("no such route", get(addr, b"/v1/features/p/a/b"), 404),
        ("empty entity", get(addr, b"/v1/features/p/"), 404),
        ("path not UTF-8", get(addr, b"/v1/features/p/%FF%FE"), 400),
        ("entity too long", get(addr, long_id.as_bytes()), 400),
        (
            "wrong method",
            request(addr, b"DELETE /v1/features/p/a HTTP/1.1", b""),
            405,
        ),
        ("not JSON", post(addr, "/v1/features/p", b"not json"), 400),
        (
            "unknown key",
            post(addr, "/v1/features/p", br#"{"ids":["a"]}"#),
            400,
        ),
        (
            "empty id in a batch",
            post(addr, "/v1/features/p", br#"{"entities":[""]}"#),
            400,
        ),
        (
            "long id in a batch",
            post(addr, "/v1/features/p", long_in_batch.as_bytes()),
            400,
        ),
        (
            "a number for a string entity",
            post(addr, "/v1/features/p", br#"{"entities":[7]}"#),
            400,
        ),
        (
            "body too large",
            post(addr, "/v1/features/p", too_big.as_bytes()),
            413,
        ),
    ];
    for (what, answer, status) in cases {
        assert_eq!(answer.status, status, "{what}: {:?}", answer.body);
        assert_eq!(answer.content_type, "application/json", "{what}");
        let message = answer.body["error"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{what}: {:?}", answer.body);
    }
}

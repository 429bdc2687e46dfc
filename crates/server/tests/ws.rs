//! WebSocket sessions over a real socket (tokio-tungstenite client): every action with
//! request-id matching, pushed events with seq and resume from a seq, bad messages answered
//! while the socket stays usable, unknown library refused at the handshake, and a stalled
//! client that does not slow another.

use futures::{SinkExt, StreamExt};
mod common;

use quiver_engine::EngineConfig;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Server {
    addr: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (base, _engine) = common::spawn(EngineConfig::new(dir.path())).await;
    let addr = base.trim_start_matches("http://").to_string();
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/libraries"))
        .json(&json!({"name": "docs", "dimension": 2, "metric": "l2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    Server { addr, _dir: dir }
}

async fn connect(s: &Server) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/libraries/docs/ws", s.addr))
        .await
        .unwrap();
    ws
}

/// Next JSON text message (skipping pings), within a deadline.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message in time")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn request(ws: &mut Ws, id: &str, action: &str, data: Value) -> Value {
    ws.send(Message::Text(
        json!({"action": action, "request_id": id, "data": data})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    // Events may interleave with the reply; return the reply, and keep nothing else.
    loop {
        let v = next_json(ws).await;
        if v["type"] == "response" {
            assert_eq!(v["request_id"], id, "replies carry their request id");
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_and_request_ids() {
    let s = start().await;
    let mut ws = connect(&s).await;
    let v = request(&mut ws, "p1", "ping", Value::Null).await;
    assert_eq!(v["success"], true);
    assert_eq!(v["data"]["pong"], true);

    let v = request(
        &mut ws,
        "a1",
        "add",
        json!({"id": "d1", "title": "One", "chunks": [{"text": "x", "embedding": [1, 0]}]}),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["data"]["created"], true);
    assert_eq!(v["data"]["seq"], 2);

    let v = request(&mut ws, "g1", "get", json!({"document_id": "d1"})).await;
    assert_eq!(v["data"]["document"]["title"], "One");

    let v = request(
        &mut ws,
        "s1",
        "search",
        json!({"embedding": [1, 0.1], "k": 3}),
    )
    .await;
    assert_eq!(v["data"]["results"][0]["document_id"], "d1");
    assert_eq!(v["data"]["total_results"], 1);

    let v = request(&mut ws, "d1", "delete", json!({"document_id": "d1"})).await;
    assert_eq!(v["success"], true);
    assert_eq!(v["data"]["seq"], 3);
    let v = request(&mut ws, "g2", "get", json!({"document_id": "d1"})).await;
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], "document_not_found");

    // Bad messages: an error reply each, and the socket stays usable.
    ws.send(Message::Text("{not json".into())).await.unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], "malformed_json");
    let v = request(&mut ws, "u1", "fly", Value::Null).await;
    assert_eq!(v["error"]["code"], "unknown_action");
    let v = request(
        &mut ws,
        "b1",
        "add",
        json!({"title": "bad", "chunks": [{"embedding": [1, 2, 3]}]}),
    )
    .await;
    assert_eq!(v["error"]["code"], "dimension_mismatch");
    let v = request(
        &mut ws,
        "b2",
        "search",
        json!({"embedding": [1, 0], "k": 0}),
    )
    .await;
    assert_eq!(v["error"]["code"], "invalid_k");
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    let v = next_json(&mut ws).await;
    assert_eq!(v["error"]["code"], "unsupported_message");
    let v = request(&mut ws, "p2", "ping", Value::Null).await;
    assert_eq!(v["success"], true, "still usable after bad messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_library_is_refused_at_the_handshake() {
    let s = start().await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/v1/libraries/nope/ws", s.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 404),
        other => panic!("expected an HTTP 404 at the handshake, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_with_seq_and_resume() {
    let s = start().await;
    let mut ws = connect(&s).await;
    let v = request(&mut ws, "sub", "subscribe", json!({"types": "document.*"})).await;
    assert_eq!(v["data"]["subscribed"], true);
    let mut writer = connect(&s).await;
    for i in 0..5 {
        let v = request(
            &mut writer,
            &format!("w{i}"),
            "add",
            json!({"id": format!("d{i}"), "chunks": [{"embedding": [i, 0]}]}),
        )
        .await;
        assert_eq!(v["success"], true);
    }
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let v = next_json(&mut ws).await;
        assert_eq!(v["type"], "event");
        assert_eq!(v["event_type"], "document.added");
        assert!(v["library_id"].is_string());
        seqs.push(v["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![2, 3, 4, 5, 6]);
    drop(ws);

    // Writes while disconnected; the reconnecting client resumes from its last seq + 1.
    for i in 5..8 {
        request(
            &mut writer,
            &format!("w{i}"),
            "add",
            json!({"id": format!("d{i}"), "chunks": [{"embedding": [i, 0]}]}),
        )
        .await;
    }
    let mut ws = connect(&s).await;
    let v = request(&mut ws, "sub", "subscribe", json!({"from_seq": 7})).await;
    assert_eq!(v["data"]["from_seq"], 7);
    let mut got = Vec::new();
    while got.len() < 3 {
        let v = next_json(&mut ws).await;
        got.push((
            v["seq"].as_u64().unwrap(),
            v["data"]["document_id"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (7, "d5".to_string()),
            (8, "d6".to_string()),
            (9, "d7".to_string())
        ]
    );
    let v = request(&mut ws, "un", "unsubscribe", Value::Null).await;
    assert_eq!(v["data"]["unsubscribed"], true);
}

/// A client that subscribes and then never reads must not slow another client down; once it
/// reads again it gets every event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_does_not_slow_another() {
    let s = start().await;
    let mut stalled = connect(&s).await;
    request(&mut stalled, "sub", "subscribe", json!({})).await;
    let mut active = connect(&s).await;
    request(&mut active, "sub", "subscribe", json!({})).await;
    let mut writer = connect(&s).await;
    let big_title = "t".repeat(900);
    let n = 1500;
    let started = std::time::Instant::now();
    for i in 0..n {
        let v = request(&mut writer, &format!("w{i}"), "add",
            json!({"id": format!("d{i}"), "title": big_title, "metadata": {"pad": "p".repeat(12_000)}, "chunks": [{"embedding": [i, 0]}]})).await;
        assert_eq!(v["success"], true);
        // The active client keeps up as the writes happen.
        let e = next_json(&mut active).await;
        assert_eq!(e["seq"], 2 + i);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(60),
        "writes and the active client's events took {elapsed:?}"
    );
    // The stalled client really is stalled (its queue and socket buffers are full): its
    // subscription sits behind the head while the other one is at it.
    let stats: Value = reqwest::get(format!("http://{}/v1/events/statistics", s.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lags: Vec<u64> = stats["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["lag"].as_u64().unwrap())
        .collect();
    assert!(
        lags.iter().any(|&l| l > 100) && lags.contains(&0),
        "{stats}"
    );
    // The stalled client now reads: everything, once, in order.
    let mut expect = 2u64;
    while expect < 2 + n {
        let v = next_json(&mut stalled).await;
        if v["type"] == "event" {
            assert_eq!(v["seq"], expect);
            expect += 1;
        }
    }
}

/// A semantic subscription over the socket: `subscribe {near: {embedding, max_distance,
/// filter}}` pushes only the document/chunk events with a chunk within the distance that
/// passes the filter, each with its `near` match; a bad `near` is an error reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_subscription_pushes_only_close_matching_chunks() {
    let s = start().await;
    let mut ws = connect(&s).await;
    let near = json!({"embedding": [1.0, 0.0], "max_distance": 0.5, "filter": {"lang": "fr"}});
    let v = request(&mut ws, "sub", "subscribe", json!({"near": near})).await;
    assert_eq!(v["data"]["subscribed"], true, "{v}");
    let add = |id: &str, x: f32, lang: &str| json!({"id": id, "title": id, "chunks": [{"id": format!("{id}-1"), "text": "t", "embedding": [x, 0.0], "metadata": {"lang": lang}}]});
    // Far; near but English; near and French (the one to arrive). The event may come before
    // or after its add's reply, so every message is read here (`request` skips events).
    for (id, x, lang) in [("far", -1.0, "fr"), ("en", 1.0, "en"), ("fr", 0.9, "fr")] {
        let msg = json!({"action": "add", "request_id": id, "data": add(id, x, lang)});
        ws.send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
    }
    let (mut replies, mut events) = (Vec::new(), Vec::new());
    while replies.len() < 3 || events.is_empty() {
        let v = next_json(&mut ws).await;
        match v["type"].as_str() {
            Some("response") => {
                assert_eq!(v["success"], true, "{v}");
                replies.push(v);
            }
            Some("event") => events.push(v),
            _ => panic!("unexpected message {v}"),
        }
    }
    // Events come in seq order and "fr" was written last: had "far" or "en" been pushed,
    // it would have come before, so exactly one event means they were passed over.
    assert_eq!(events.len(), 1, "{events:?}");
    let event = events.remove(0);
    assert_eq!(event["event_type"], "document.added");
    assert_eq!(event["data"]["document_id"], "fr", "{event}");
    assert_eq!(event["near"]["chunk_id"], "fr-1");
    assert!((event["near"]["distance"].as_f64().unwrap() - 0.1).abs() < 1e-5);

    let v = request(
        &mut ws,
        "bad",
        "subscribe",
        json!({"near": {"embedding": [1.0, 0.0, 0.0], "max_distance": 1}}),
    )
    .await;
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], "dimension_mismatch", "{v}");
    let v = request(
        &mut ws,
        "bad2",
        "subscribe",
        json!({"near": {"max_distance": 1}}),
    )
    .await;
    assert_eq!(v["error"]["code"], "invalid_near", "{v}");
    // The socket stays usable.
    let v = request(&mut ws, "p", "ping", Value::Null).await;
    assert_eq!(v["success"], true);
}

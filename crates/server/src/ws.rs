//! WebSocket sessions on `GET /v1/libraries/{id}/ws`: one socket to search, add, delete and
//! get documents, and to receive the library's change events live.
//!
//! Protocol: requests `{action, request_id, data}` with actions `search`, `add`, `delete`,
//! `get`, `subscribe {types?, from_seq?, near?: {embedding | embedding_b64 | query,
//! max_distance, filter?}}`, `unsubscribe`, `ping`; replies
//! `{type:"response", request_id, success, data | error:{code, detail}}`; pushed events
//! `{type:"event", event_type, seq, library_id, timestamp, data, source, trace_id}` — resume
//! after a reconnect with `subscribe {from_seq: last seq + 1}`.
//!
//! Isolation: everything sent to a client goes through one bounded queue
//! ([`WS_OUTBOUND_MESSAGES_LIMIT`]). When a client reads slowly the queue fills and its
//! subscription simply stops pulling events — it falls behind the bus's live tail and later
//! catches up from the log, losing nothing and costing no other client anything. A client
//! that reads nothing for [`WS_SLOW_CLIENT_TIMEOUT`] is disconnected (it resumes by seq).
//! A bad message gets an error reply and the socket stays usable. It must never let one
//! connection's backlog grow without bound or stall the bus.

use crate::bus::{BusError, EventFilter, SubscriberKind};
use crate::error::ApiError;
use crate::render;
use crate::slots::{Slot, Slots};
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use quiver_engine::input::{DocumentInput, SearchInput};
use quiver_engine::{EngineError, WriteCtx};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Largest message a client may send, in bytes.
pub const WS_MESSAGE_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Most WebSocket sessions open at once (per process).
pub const WS_CONNECTIONS_LIMIT: usize = 1024;
/// Messages queued for one client before its subscription stops pulling events.
pub const WS_OUTBOUND_MESSAGES_LIMIT: usize = 256;
/// A client that takes nothing off its queue for this long is disconnected.
pub const WS_SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the server pings; a client silent for [`WS_IDLE_TIMEOUT`] is closed.
pub const WS_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const WS_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

static SESSIONS: Slots = Slots::new(WS_CONNECTIONS_LIMIT);

pub async fn upgrade(
    State(s): State<AppState>,
    Path(lib): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    // An unknown library is refused at the handshake, before any upgrade.
    let library_id = match s.engine.library(&lib) {
        Ok((info, _)) => info.library.id,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "not_a_websocket", e.body_text())
                .into_response()
        }
    };
    let Some(slot) = SESSIONS.try_acquire() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!("this server holds its limit of {WS_CONNECTIONS_LIMIT} WebSocket sessions"),
        )
        .into_response();
    };
    ws.max_message_size(WS_MESSAGE_BYTES_LIMIT)
        .max_frame_size(WS_MESSAGE_BYTES_LIMIT)
        .on_upgrade(move |socket| session(s, library_id, socket, slot))
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

async fn session(s: AppState, library_id: String, socket: WebSocket, _slot: Slot) {
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(WS_OUTBOUND_MESSAGES_LIMIT);
    let mut writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let closing = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let (slow_tx, mut slow_rx) = mpsc::channel::<()>(1);
    let mut subscription: Option<tokio::task::JoinHandle<()>> = None;
    let mut ping = tokio::time::interval(WS_PING_INTERVAL);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let ctx = WriteCtx {
        trace_id: None,
        source: Some("websocket".into()),
    };
    let mut writer_done = false;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = match msg {
                    None | Some(Err(_)) => break,
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                let reply = match msg {
                    Message::Text(text) => {
                        handle(&s, &library_id, &ctx, text.as_str(), &mut subscription, &out_tx, &slow_tx).await
                    }
                    Message::Binary(_) => error_reply(Value::Null, "unsupported_message", "send requests as JSON text messages"),
                    Message::Ping(_) | Message::Pong(_) => continue,
                    Message::Close(_) => break,
                };
                if out_tx.send(Message::Text(reply.to_string().into())).await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > WS_IDLE_TIMEOUT {
                    let _ = out_tx.try_send(close(1001, "idle timeout: no message or pong received"));
                    break;
                }
                let _ = out_tx.try_send(Message::Ping(Default::default()));
            }
            _ = slow_rx.recv() => {
                // The client has not read for too long; it resumes by seq when it reconnects.
                writer.abort();
                break;
            }
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        }
    }
    if let Some(t) = subscription.take() {
        t.abort();
    }
    drop(out_tx);
    if !writer_done {
        // Let queued replies (and a close frame) go out, but never wait on a stalled peer.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut writer).await;
        writer.abort();
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    action: String,
    #[serde(default)]
    request_id: Value,
    #[serde(default)]
    data: Value,
}

fn ok_reply(request_id: Value, data: Value) -> Value {
    json!({"type": "response", "request_id": request_id, "success": true, "data": data})
}

fn error_reply(request_id: Value, code: &str, detail: impl Into<String>) -> Value {
    json!({"type": "response", "request_id": request_id, "success": false,
           "error": {"code": code, "detail": detail.into()}})
}

fn api_error_reply(request_id: Value, e: ApiError) -> Value {
    let mut v = error_reply(request_id, &e.code, e.detail);
    v["error"]["status"] = json!(e.status.as_u16());
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DocRef {
    document_id: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SubscribeData {
    types: Option<String>,
    from_seq: Option<u64>,
    near: Option<Value>,
}

fn data_of<T: serde::de::DeserializeOwned>(data: Value) -> Result<T, ApiError> {
    serde_json::from_value(data)
        .map_err(|e| ApiError::unprocessable("invalid_request", e.to_string()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(ApiError::from)
}

async fn handle(
    s: &AppState,
    library_id: &str,
    ctx: &WriteCtx,
    text: &str,
    subscription: &mut Option<tokio::task::JoinHandle<()>>,
    out_tx: &mpsc::Sender<Message>,
    slow_tx: &mpsc::Sender<()>,
) -> Value {
    let req: Request = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let code = if e.classify() == serde_json::error::Category::Data {
                "invalid_request"
            } else {
                "malformed_json"
            };
            // Echo the request id when the message was JSON with one, so the client can match it.
            let request_id = serde_json::from_str::<Value>(text)
                .ok()
                .and_then(|v| v.get("request_id").cloned())
                .unwrap_or(Value::Null);
            return error_reply(request_id, code, e.to_string());
        }
    };
    let rid = req.request_id.clone();
    let result = run(s, library_id, ctx, req, subscription, out_tx, slow_tx).await;
    match result {
        Ok(data) => ok_reply(rid, data),
        Err(e) => api_error_reply(rid, e),
    }
}

async fn run(
    s: &AppState,
    library_id: &str,
    ctx: &WriteCtx,
    req: Request,
    subscription: &mut Option<tokio::task::JoinHandle<()>>,
    out_tx: &mpsc::Sender<Message>,
    slow_tx: &mpsc::Sender<()>,
) -> Result<Value, ApiError> {
    let engine = s.engine.clone();
    let lib = library_id.to_string();
    match req.action.as_str() {
        "ping" => Ok(json!({"pong": true, "seq": s.engine.applied_seq()})),
        "search" => {
            let q: SearchInput = data_of(req.data)?;
            let include = q.include_embeddings;
            let t = Instant::now();
            let (hits, seq) = blocking(move || engine.search(&lib, &q)).await?;
            Ok(json!({
                "results": hits.iter().map(|h| render::hit(h, include)).collect::<Vec<_>>(),
                "total_results": hits.len(),
                "query_time_ms": t.elapsed().as_secs_f64() * 1000.0,
                "seq": seq,
            }))
        }
        "add" => {
            let doc: DocumentInput = data_of(req.data)?;
            let ctx = ctx.clone();
            let c = blocking(move || engine.upsert_document(&ctx, &lib, doc)).await?;
            s.engine.wait_durable(c.seq).await?;
            let (doc, created) = c.value;
            Ok(json!({"document": render::document(&doc, false), "created": created, "seq": c.seq}))
        }
        "delete" => {
            let r: DocRef = data_of(req.data)?;
            let ctx = ctx.clone();
            let id = r.document_id.clone();
            let c = blocking(move || engine.delete_document(&ctx, &lib, &id)).await?;
            s.engine.wait_durable(c.seq).await?;
            Ok(json!({"document_id": r.document_id, "deleted": true, "seq": c.seq}))
        }
        "get" => {
            let r: DocRef = data_of(req.data)?;
            let (doc, seq) = s.engine.document(library_id, &r.document_id)?;
            Ok(json!({"document": render::document(&doc, false), "seq": seq}))
        }
        "subscribe" => {
            let d: SubscribeData = if req.data.is_null() { SubscribeData::default() } else { data_of(req.data)? };
            // A semantic subscription: only chunk/document events with a chunk within
            // `max_distance` of the vector (or of the embedded `query`), passing `filter`.
            let near = match d.near {
                None | Some(Value::Null) => None,
                Some(v) => {
                    let input: crate::consumers::NearInput = serde_json::from_value(v)
                        .map_err(|e| ApiError::unprocessable("invalid_near", e.to_string()))?;
                    let engine = s.engine.clone();
                    let lib = library_id.to_string();
                    let spec = tokio::task::spawn_blocking(move || {
                        crate::consumers::near_spec(&engine, Some(&lib), input)
                    })
                    .await
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
                    Some((std::sync::Arc::new(spec), std::sync::Arc::clone(s.bus.log())))
                }
            };
            let filter = EventFilter::parse(d.types.as_deref(), Some(library_id.to_string()))
                .map_err(|e| ApiError::unprocessable("invalid_types", e))?;
            let mut sub = match s.bus.subscribe(SubscriberKind::WebSocket, d.from_seq, filter) {
                Ok(sub) => sub,
                Err(BusError::Expired { requested, first_seq }) => {
                    return Err(ApiError::new(
                        StatusCode::GONE,
                        "events_expired",
                        format!("seq {requested} is older than the retained log, which starts at seq {first_seq}"),
                    ))
                }
                Err(e) => return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", e.to_string())),
            };
            let from_seq = sub.position() + 1;
            if let Some(t) = subscription.take() {
                t.abort();
            }
            let out = out_tx.clone();
            let slow = slow_tx.clone();
            *subscription = Some(tokio::spawn(async move {
                loop {
                    let frame = match sub.next().await {
                        Ok(Some(f)) => f,
                        Ok(None) => return,
                        Err(e) => {
                            let msg = json!({"type": "error", "error": {"code": "stream_failed", "detail": e.to_string()}, "position": sub.position()});
                            let _ = out.send(Message::Text(msg.to_string().into())).await;
                            return;
                        }
                    };
                    let text = match &near {
                        None => frame.websocket().to_string(),
                        Some((spec, log)) => {
                            match crate::consumers::near_check_frame(log, spec, &frame).await {
                                None => continue,
                                Some(m) => crate::consumers::with_members(
                                    frame.websocket(),
                                    &[("near", m.json())],
                                ),
                            }
                        }
                    };
                    let msg = Message::Text(text.into());
                    match tokio::time::timeout(WS_SLOW_CLIENT_TIMEOUT, out.send(msg)).await {
                        Ok(Ok(())) => sub.delivered(&frame),
                        Ok(Err(_)) => return,
                        Err(_) => {
                            let _ = slow.try_send(());
                            return;
                        }
                    }
                }
            }));
            Ok(json!({"subscribed": true, "from_seq": from_seq}))
        }
        "unsubscribe" => {
            let was = subscription.take().map(|t| t.abort()).is_some();
            Ok(json!({"unsubscribed": was}))
        }
        other => Err(ApiError::unprocessable(
            "unknown_action",
            format!("unknown action {other:?}; use search, add, delete, get, subscribe, unsubscribe or ping"),
        )),
    }
}

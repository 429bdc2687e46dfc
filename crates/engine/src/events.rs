//! The public face of a log record: [`Event`], its JSON envelope and its CloudEvents 1.0
//! rendering.
//!
//! This module owns the mapping from every [`Change`] to an event type and a data shape (the
//! contract in DESIGN.md), so every transport (SSE, pull, WebSocket, webhooks) shows the same
//! event the same way. An event is a pure function of `(seq, record)`: it must never read the
//! engine's state, a clock or anything else, because a replay years later has to produce the
//! exact same event that was streamed live. It must never carry vectors or chunk texts unless a
//! future option asks for them (events stay small enough to fan out to thousands of
//! subscribers).

use quiver_log::Seq;
use quiver_model::record::Change;
use quiver_model::time::rfc3339_ms;
use quiver_model::Record;
use serde::Serialize;
use serde_json::{json, Value};

/// The CloudEvents `source` of events that belong to no library.
pub const CLOUDEVENTS_SOURCE: &str = "quiver";
/// The CloudEvents spec version this module renders.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";

/// One event: a committed log record seen through the public envelope. Its id is its `seq`.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub seq: Seq,
    pub event_type: String,
    pub library_id: Option<String>,
    pub timestamp_ms: u64,
    pub data: Value,
    pub source: Option<String>,
    pub trace_id: Option<String>,
}

/// The event of the record at `seq`, taking the record (an application event's data moves into
/// the event instead of being copied: the bus decodes every record once just for this).
pub fn into_event(seq: Seq, record: Record) -> Event {
    match record.change {
        Change::AppEvent {
            event_type,
            library_id,
            data,
        } => Event {
            seq,
            event_type,
            library_id,
            timestamp_ms: record.meta.timestamp_ms,
            data,
            source: record.meta.source,
            trace_id: record.meta.trace_id,
        },
        // Other types build their data from the change's fields anyway.
        _ => event_of(seq, &record),
    }
}

/// The event of the record at `seq`.
pub fn event_of(seq: Seq, record: &Record) -> Event {
    let (event_type, data) = type_and_data(&record.change);
    Event {
        seq,
        event_type,
        library_id: record.change.library_id().map(str::to_string),
        timestamp_ms: record.meta.timestamp_ms,
        data,
        source: record.meta.source.clone(),
        trace_id: record.meta.trace_id.clone(),
    }
}

fn type_and_data(change: &Change) -> (String, Value) {
    let event_type = change.event_type().to_string();
    let data = match change {
        Change::LibraryCreated(l) => json!({
            "library_id": l.id,
            "name": l.name,
            "index_type": l.index_type.as_str(),
            "metric": l.metric.as_str(),
            "embedding_dimension": l.dimension,
        }),
        Change::LibraryUpdated(l) => json!({
            "library_id": l.id,
            "name": l.name,
            "description": l.description,
            "metadata": l.metadata,
        }),
        Change::LibraryDeleted { library_id, name } => json!({
            "library_id": library_id,
            "name": name,
        }),
        Change::DocumentUpserted { document, .. } => json!({
            "document_id": document.id,
            "title": document.title,
            "num_chunks": document.chunks.len(),
            "metadata": document.metadata,
            "chunk_ids": document.chunks.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        }),
        Change::DocumentDeleted { document_id, .. } => json!({ "document_id": document_id }),
        Change::ChunksAdded {
            document_id,
            chunks,
            ..
        } => json!({
            "document_id": document_id,
            "chunk_ids": chunks.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            "num_chunks": chunks.len(),
        }),
        Change::ChunkDeleted {
            document_id,
            chunk_id,
            ..
        } => json!({ "document_id": document_id, "chunk_id": chunk_id }),
        Change::ReembedStarted {
            library_id,
            model,
            dimension,
        } => json!({
            "library_id": library_id,
            "embedding_model": model,
            "embedding_dimension": dimension,
        }),
        Change::ReembedStaged {
            document_id,
            chunk_ids,
            ..
        } => json!({
            "document_id": document_id,
            "num_chunks": chunk_ids.len(),
        }),
        Change::Reembedded(l) => json!({
            "library_id": l.id,
            "name": l.name,
            "embedding_model": l.embedding_model,
            "embedding_dimension": l.dimension,
        }),
        Change::ReembedDiscarded { library_id } => json!({ "library_id": library_id }),
        Change::AppEvent { data, .. } => data.clone(),
    };
    (event_type, data)
}

#[derive(Serialize)]
struct Envelope<'a> {
    seq: Seq,
    #[serde(rename = "type")]
    event_type: &'a str,
    library_id: Option<&'a str>,
    timestamp: String,
    data: &'a Value,
    source: Option<&'a str>,
    trace_id: Option<&'a str>,
}

#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    datacontenttype: &'static str,
    data: &'a Value,
    /// Extension attribute: the log position (also the `id`, as a number).
    seq: Seq,
    /// Extension attribute (CloudEvents names are lowercase alphanumerics only).
    #[serde(skip_serializing_if = "Option::is_none")]
    traceid: Option<&'a str>,
}

impl Event {
    /// The document this event is about, if any (the CloudEvents `subject`).
    pub fn subject(&self) -> Option<&str> {
        if !self.event_type.starts_with("document.") && !self.event_type.starts_with("chunk.") {
            return None;
        }
        self.data.get("document_id").and_then(Value::as_str)
    }

    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            seq: self.seq,
            event_type: &self.event_type,
            library_id: self.library_id.as_deref(),
            timestamp: rfc3339_ms(self.timestamp_ms),
            data: &self.data,
            source: self.source.as_deref(),
            trace_id: self.trace_id.as_deref(),
        }
    }

    fn cloud_event(&self) -> CloudEvent<'_> {
        CloudEvent {
            specversion: CLOUDEVENTS_SPEC_VERSION,
            id: self.seq.to_string(),
            source: match &self.library_id {
                Some(id) => format!("/libraries/{id}"),
                None => CLOUDEVENTS_SOURCE.to_string(),
            },
            event_type: &self.event_type,
            time: rfc3339_ms(self.timestamp_ms),
            subject: self.subject(),
            datacontenttype: "application/json",
            data: &self.data,
            seq: self.seq,
            traceid: self.trace_id.as_deref(),
        }
    }

    /// The envelope `{seq, type, library_id, timestamp, data, source, trace_id}` as a value.
    pub fn envelope_json(&self) -> Value {
        serde_json::to_value(self.envelope()).unwrap_or(Value::Null)
    }

    /// The envelope as compact JSON bytes (no newline inside, so it is one SSE `data:` line).
    pub fn envelope_bytes(&self) -> Vec<u8> {
        // Sized for a typical envelope up front, so it is not regrown byte by byte.
        let mut out = Vec::with_capacity(512);
        // Serialising borrowed strings and a `Value` cannot fail.
        match serde_json::to_writer(&mut out, &self.envelope()) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }

    /// The CloudEvents 1.0 structured rendering as a value.
    pub fn cloudevent_json(&self) -> Value {
        serde_json::to_value(self.cloud_event()).unwrap_or(Value::Null)
    }

    /// The CloudEvents 1.0 structured rendering as compact JSON bytes.
    pub fn cloudevent_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.cloud_event()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_model::{Chunk, Document, IndexType, Library, Metric, RecordMeta};

    fn meta() -> RecordMeta {
        RecordMeta {
            timestamp_ms: 1_790_000_000_123,
            trace_id: Some("t1".into()),
            source: Some("api".into()),
        }
    }

    fn library() -> Library {
        Library {
            id: "lib1".into(),
            name: "docs".into(),
            description: "d".into(),
            dimension: 3,
            metric: Metric::Cosine,
            index_type: IndexType::Flat,
            embedding_model: None,
            created_at_ms: 1,
            updated_at_ms: 1,
            metadata: Default::default(),
        }
    }

    fn document() -> Document {
        Document {
            id: "d1".into(),
            library_id: "lib1".into(),
            title: "T".into(),
            metadata: Default::default(),
            created_at_ms: 1,
            updated_at_ms: 1,
            chunks: vec![Chunk {
                id: "c1".into(),
                document_id: "d1".into(),
                text: "secret text".into(),
                embedding: vec![1.0, 2.0, 3.0],
                metadata: Default::default(),
            }],
        }
    }

    #[test]
    fn every_change_maps_to_its_type_and_shape() {
        let cases = vec![
            (
                Change::LibraryCreated(library()),
                "library.created",
                json!({"library_id":"lib1","name":"docs","index_type":"flat","metric":"cosine","embedding_dimension":3}),
            ),
            (
                Change::LibraryUpdated(library()),
                "library.updated",
                json!({"library_id":"lib1","name":"docs","description":"d","metadata":{}}),
            ),
            (
                Change::LibraryDeleted {
                    library_id: "lib1".into(),
                    name: "docs".into(),
                },
                "library.deleted",
                json!({"library_id":"lib1","name":"docs"}),
            ),
            (
                Change::DocumentUpserted {
                    document: document(),
                    replaced: false,
                },
                "document.added",
                json!({"document_id":"d1","title":"T","num_chunks":1,"metadata":{},"chunk_ids":["c1"]}),
            ),
            (
                Change::DocumentUpserted {
                    document: document(),
                    replaced: true,
                },
                "document.updated",
                json!({"document_id":"d1","title":"T","num_chunks":1,"metadata":{},"chunk_ids":["c1"]}),
            ),
            (
                Change::DocumentDeleted {
                    library_id: "lib1".into(),
                    document_id: "d1".into(),
                },
                "document.deleted",
                json!({"document_id":"d1"}),
            ),
            (
                Change::ChunksAdded {
                    library_id: "lib1".into(),
                    document_id: "d1".into(),
                    chunks: document().chunks,
                },
                "chunk.added",
                json!({"document_id":"d1","chunk_ids":["c1"],"num_chunks":1}),
            ),
            (
                Change::ChunkDeleted {
                    library_id: "lib1".into(),
                    document_id: "d1".into(),
                    chunk_id: "c1".into(),
                },
                "chunk.deleted",
                json!({"document_id":"d1","chunk_id":"c1"}),
            ),
            (
                Change::AppEvent {
                    event_type: "app.x".into(),
                    library_id: None,
                    data: json!({"k": 1}),
                },
                "app.x",
                json!({"k": 1}),
            ),
        ];
        for (change, event_type, data) in cases {
            let record = Record::new(meta(), change);
            let event = event_of(7, &record);
            assert_eq!(event.event_type, event_type);
            assert_eq!(event.data, data, "{event_type}");
            assert_eq!(record.change.event_type(), event_type);
            let envelope: Value = serde_json::from_slice(&event.envelope_bytes()).unwrap();
            assert_eq!(envelope, event.envelope_json());
            assert_eq!(envelope["seq"], 7);
            assert_eq!(envelope["type"], event_type);
            assert_eq!(envelope["timestamp"], "2026-09-21T14:13:20.123Z");
            assert_eq!(envelope["trace_id"], "t1");
            assert_eq!(envelope["source"], "api");
            assert!(!String::from_utf8(event.envelope_bytes())
                .unwrap()
                .contains("secret text"));
        }
    }

    #[test]
    fn cloudevents_rendering() {
        let record = Record::new(
            meta(),
            Change::DocumentDeleted {
                library_id: "lib1".into(),
                document_id: "d1".into(),
            },
        );
        let ce = event_of(42, &record).cloudevent_json();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "42");
        assert_eq!(ce["seq"], 42);
        assert_eq!(ce["source"], "/libraries/lib1");
        assert_eq!(ce["type"], "document.deleted");
        assert_eq!(ce["subject"], "d1");
        assert_eq!(ce["traceid"], "t1");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["data"], json!({"document_id": "d1"}));
        let app = Record::new(
            RecordMeta::default(),
            Change::AppEvent {
                event_type: "app.x".into(),
                library_id: None,
                data: json!({"document_id": "not-a-subject"}),
            },
        );
        let ce = event_of(1, &app).cloudevent_json();
        assert_eq!(ce["source"], "quiver");
        assert!(ce.get("subject").is_none());
        assert!(ce.get("traceid").is_none());
    }
}

//! Semantic subscriptions: does a record carry a chunk vector within `max_distance` of a
//! subscription's vector, under the library's metric?
//!
//! This module owns that one test and the [`NearSpec`] a stream or consumer stores. It must
//! never embed text (the server turns `near.query` into a vector through the engine's
//! embedder before it builds a spec), never read the log or the engine's state (a record
//! carries its chunks' embeddings), and never match a record without vectors: only
//! `document.added`/`document.updated` and `chunk.added` can be near anything. Why: the test
//! must be a pure function of the record, so a replay delivers exactly what the live stream
//! delivered.

use quiver_model::record::Change;
use quiver_model::{Chunk, Metric, Record};
use serde::{Deserialize, Serialize};

/// A subscription's vector (already validated: the library's dimension, finite, normalised
/// for cosine), its threshold and the metric of its library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NearSpec {
    pub embedding: Vec<f32>,
    pub max_distance: f32,
    pub metric: Metric,
    /// The text the vector was embedded from, when it came from `near.query`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// The closest chunk of a record that is within the distance.
#[derive(Clone, Debug, PartialEq)]
pub struct NearMatch {
    pub chunk_id: String,
    pub distance: f32,
}

impl NearMatch {
    /// `"near":{"chunk_id":…,"distance":…}` members to splice into an envelope.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"chunk_id": self.chunk_id, "distance": self.distance})
    }
}

/// Distance as search reports it (smaller is closer): cosine `1 − dot` (both normalised),
/// dot `−dot`, l2 Euclidean. Scalar on purpose: one subscription tests a few chunks per
/// event, far from the index's scan, and this crate stays off the index's kernels.
pub fn distance(metric: Metric, query: &[f32], v: &[f32]) -> f32 {
    let dot = || -> f32 { query.iter().zip(v).map(|(a, b)| a * b).sum() };
    match metric {
        Metric::Cosine => 1.0 - dot(),
        Metric::Dot => -dot(),
        Metric::L2 => query
            .iter()
            .zip(v)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt(),
    }
}

/// The chunks a record adds or replaces (the only ones that can be near anything).
pub fn chunks_of(record: &Record) -> Option<&[Chunk]> {
    match &record.change {
        Change::DocumentUpserted { document, .. } => Some(&document.chunks),
        Change::ChunksAdded { chunks, .. } => Some(chunks),
        _ => None,
    }
}

impl NearSpec {
    /// The closest chunk of `record` within `max_distance`, if any. Chunks of another
    /// dimension (another library's vectors) never match.
    pub fn check(&self, record: &Record) -> Option<NearMatch> {
        let chunks = chunks_of(record)?;
        let mut best: Option<NearMatch> = None;
        for chunk in chunks {
            if chunk.embedding.len() != self.embedding.len() {
                continue;
            }
            let d = distance(self.metric, &self.embedding, &chunk.embedding);
            if d.is_finite()
                && d <= self.max_distance
                && best.as_ref().is_none_or(|b| d < b.distance)
            {
                best = Some(NearMatch {
                    chunk_id: chunk.id.clone(),
                    distance: d,
                });
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_model::{Document, RecordMeta};

    fn chunk(id: &str, v: Vec<f32>) -> Chunk {
        Chunk {
            id: id.into(),
            document_id: "d".into(),
            text: String::new(),
            embedding: v,
            metadata: Default::default(),
        }
    }

    #[test]
    fn picks_the_closest_chunk_within_distance() {
        let record = Record::new(
            RecordMeta::default(),
            Change::ChunksAdded {
                library_id: "l".into(),
                document_id: "d".into(),
                chunks: vec![chunk("far", vec![10.0, 0.0]), chunk("near", vec![1.0, 0.5])],
            },
        );
        let spec = NearSpec {
            embedding: vec![1.0, 0.0],
            max_distance: 1.0,
            metric: Metric::L2,
            query: None,
        };
        let m = spec.check(&record).unwrap();
        assert_eq!(m.chunk_id, "near");
        assert!((m.distance - 0.5).abs() < 1e-6);
        let tight = NearSpec {
            max_distance: 0.1,
            ..spec.clone()
        };
        assert!(tight.check(&record).is_none());
        let deleted = Record::new(
            RecordMeta::default(),
            Change::DocumentDeleted {
                library_id: "l".into(),
                document_id: "d".into(),
            },
        );
        assert!(spec.check(&deleted).is_none());
        let doc = Record::new(
            RecordMeta::default(),
            Change::DocumentUpserted {
                document: Document {
                    id: "d".into(),
                    library_id: "l".into(),
                    title: "t".into(),
                    metadata: Default::default(),
                    created_at_ms: 0,
                    updated_at_ms: 0,
                    chunks: vec![chunk("c", vec![1.0, 0.0, 0.0])],
                },
                replaced: false,
            },
        );
        assert!(
            spec.check(&doc).is_none(),
            "another dimension never matches"
        );
    }
}

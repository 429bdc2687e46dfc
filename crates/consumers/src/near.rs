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

use quiver_engine::filter::Filter;
use quiver_model::record::Change;
use quiver_model::{Chunk, Document, Metric, Record};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// A subscription's vector (already validated: the library's dimension, finite, normalised
/// for cosine), its threshold, the metric of its library, and an optional metadata filter
/// that a chunk must also pass (the search filter language, [`quiver_engine::filter`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NearSpec {
    pub embedding: Vec<f32>,
    pub max_distance: f32,
    pub metric: Metric,
    /// The text the vector was embedded from, when it came from `near.query`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The metadata filter as the client gave it (validated when the spec was built); stored
    /// as JSON so a consumer's state file keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<serde_json::Value>,
    /// `filter`, parsed on first use.
    #[serde(skip)]
    compiled: OnceLock<Option<Filter>>,
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

/// The document a filter sees for `record`'s chunks: the whole document of an upsert; for
/// `chunk.added` the record holds only the document's id and library, so conditions on the
/// document's title or metadata do not match there (the test stays a function of the
/// record alone, so a replay delivers what the live stream delivered).
fn document_of(record: &Record) -> Option<std::borrow::Cow<'_, Document>> {
    match &record.change {
        Change::DocumentUpserted { document, .. } => Some(std::borrow::Cow::Borrowed(document)),
        Change::ChunksAdded {
            library_id,
            document_id,
            ..
        } => Some(std::borrow::Cow::Owned(Document {
            id: document_id.clone(),
            library_id: library_id.clone(),
            title: String::new(),
            metadata: Default::default(),
            created_at_ms: 0,
            updated_at_ms: 0,
            chunks: Vec::new(),
        })),
        _ => None,
    }
}

/// A filter no chunk passes: `must_not` of the filter every chunk passes.
fn match_nothing() -> Filter {
    let everything = Filter::Bool {
        must: vec![],
        should: vec![],
        must_not: vec![],
    };
    Filter::Bool {
        must: vec![],
        should: vec![],
        must_not: vec![everything],
    }
}

impl NearSpec {
    pub fn new(
        embedding: Vec<f32>,
        max_distance: f32,
        metric: Metric,
        query: Option<String>,
    ) -> Self {
        NearSpec {
            embedding,
            max_distance,
            metric,
            query,
            filter: None,
            compiled: OnceLock::new(),
        }
    }

    /// Adds a metadata filter, checked now: an invalid one is refused with the reason.
    pub fn with_filter(
        mut self,
        filter: Option<serde_json::Value>,
    ) -> Result<Self, quiver_model::validate::Invalid> {
        let parsed = match &filter {
            None => None,
            Some(v) => Filter::parse(v)?,
        };
        self.filter = filter;
        self.compiled = OnceLock::from(parsed);
        Ok(self)
    }

    fn compiled_filter(&self) -> Option<&Filter> {
        self.compiled
            .get_or_init(|| {
                // Validated when the spec was built; a stored filter that no longer parses
                // (it cannot, short of a hand-edited state file) matches nothing.
                let v = self.filter.as_ref()?;
                match Filter::parse(v) {
                    Ok(f) => f,
                    Err(_) => Some(match_nothing()),
                }
            })
            .as_ref()
    }

    /// The closest chunk of `record` within `max_distance` that passes the filter, if any.
    /// Chunks of another dimension (another library's vectors) never match.
    pub fn check(&self, record: &Record) -> Option<NearMatch> {
        let chunks = chunks_of(record)?;
        let filter = self.compiled_filter();
        let document = match filter {
            Some(_) => document_of(record),
            None => None,
        };
        let mut best: Option<NearMatch> = None;
        for chunk in chunks {
            if chunk.embedding.len() != self.embedding.len() {
                continue;
            }
            if let (Some(f), Some(doc)) = (filter, document.as_deref()) {
                if !f.matches(doc, chunk) {
                    continue;
                }
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
        let spec = NearSpec::new(vec![1.0, 0.0], 1.0, Metric::L2, None);
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

    fn tagged(id: &str, v: Vec<f32>, lang: &str) -> Chunk {
        let mut c = chunk(id, v);
        c.metadata
            .insert("lang".into(), serde_json::Value::String(lang.into()));
        c
    }

    #[test]
    fn a_metadata_filter_narrows_the_chunks_that_can_match() {
        let record = Record::new(
            RecordMeta::default(),
            Change::ChunksAdded {
                library_id: "l".into(),
                document_id: "d".into(),
                chunks: vec![
                    tagged("en", vec![1.0, 0.1], "en"),
                    tagged("fr", vec![1.0, 0.3], "fr"),
                ],
            },
        );
        let any = NearSpec::new(vec![1.0, 0.0], 1.0, Metric::L2, None);
        assert_eq!(any.check(&record).unwrap().chunk_id, "en");
        let fr = any
            .clone()
            .with_filter(Some(serde_json::json!({"lang": "fr"})))
            .unwrap();
        assert_eq!(fr.check(&record).unwrap().chunk_id, "fr");
        let de = any
            .clone()
            .with_filter(Some(serde_json::json!({"lang": "de"})))
            .unwrap();
        assert!(de.check(&record).is_none());
        // Stored and read back (a consumer's state file): the filter still applies.
        let back: NearSpec = serde_json::from_str(&serde_json::to_string(&fr).unwrap()).unwrap();
        assert_eq!(back.check(&record).unwrap().chunk_id, "fr");
        let bad = any.with_filter(Some(
            serde_json::json!({"field": "x", "op": "nope", "value": 1}),
        ));
        assert_eq!(bad.unwrap_err().code, "invalid_filter");
    }
}

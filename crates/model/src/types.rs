//! The domain types. They are plain values: the engine keeps them behind `Arc` and replaces
//! them whole on change, so a reader never sees half of an update.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How distance is measured in a library. Results are always ordered by ascending distance:
/// cosine → 1 − cosine similarity, l2 → Euclidean distance, dot → −dot product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    #[default]
    Cosine,
    Dot,
    L2,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::Dot => "dot",
            Metric::L2 => "l2",
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Metric::Cosine => 0,
            Metric::Dot => 1,
            Metric::L2 => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<Metric> {
        match c {
            0 => Some(Metric::Cosine),
            1 => Some(Metric::Dot),
            2 => Some(Metric::L2),
            _ => None,
        }
    }
    pub fn parse(s: &str) -> Option<Metric> {
        match s.to_ascii_lowercase().as_str() {
            "cosine" => Some(Metric::Cosine),
            "dot" | "ip" | "inner_product" => Some(Metric::Dot),
            "l2" | "euclidean" => Some(Metric::L2),
            _ => None,
        }
    }
}

/// Which index serves a library's searches. `flat` is exact; approximate indexes arrive with
/// their own issue and will be added here (the wire name is stable: `flat`, alias
/// `brute_force` as the seeds spell it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IndexType {
    #[default]
    Flat,
}

impl IndexType {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexType::Flat => "flat",
        }
    }
    pub fn code(self) -> u8 {
        0
    }
    pub fn from_code(c: u8) -> Option<IndexType> {
        (c == 0).then_some(IndexType::Flat)
    }
    pub fn parse(s: &str) -> Option<IndexType> {
        match s.to_ascii_lowercase().as_str() {
            "flat" | "brute_force" | "bruteforce" | "exact" => Some(IndexType::Flat),
            _ => None,
        }
    }
}

/// A collection of documents whose chunks share one vector space.
#[derive(Clone, Debug, PartialEq)]
pub struct Library {
    pub id: String,
    pub name: String,
    pub description: String,
    pub dimension: u32,
    pub metric: Metric,
    pub index_type: IndexType,
    /// `None` until a library is given an embedding model (the embeddings issue); until then
    /// chunks must carry their vectors.
    pub embedding_model: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub metadata: Map<String, Value>,
}

/// One document: a title, metadata, and the chunks it was split into.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub id: String,
    pub library_id: String,
    pub title: String,
    pub metadata: Map<String, Value>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub chunks: Vec<Chunk>,
}

/// One embedded piece of a document. `embedding` is stored normalised when the library's
/// metric is cosine.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub id: String,
    pub document_id: String,
    pub text: String,
    pub embedding: Vec<f32>,
    pub metadata: Map<String, Value>,
}

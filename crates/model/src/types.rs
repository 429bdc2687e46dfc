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

/// Which index serves a library's searches. `flat` is exact (alias `brute_force`, as the
/// seeds spell it); `hnsw` is the approximate graph index with its parameters. The choice is
/// part of the library's record in the log, so a restart serves searches the same way.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum IndexType {
    #[default]
    Flat,
    Hnsw(HnswConfig),
}

/// Limits on HNSW parameters: they bound memory per vector (`m`) and work per insert and
/// per query (`ef_*`).
pub const HNSW_M_LIMIT: u32 = 128;
pub const HNSW_EF_LIMIT: u32 = 4096;
pub const OVERSAMPLING_LIMIT: f32 = 16.0;

/// HNSW parameters as stored with the library: `m` neighbours per node on the upper layers,
/// `m0` on the bottom layer (`None`: 2·m, the paper's choice; fewer saves memory per vector
/// at some search speed), the candidate list size while building, and the default candidate
/// list size per query (a search may override it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HnswConfig {
    pub m: u32,
    pub m0: Option<u32>,
    pub ef_construction: u32,
    pub ef_search: u32,
    pub quantization: Quantization,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig {
            m: 16,
            m0: None,
            ef_construction: 200,
            ef_search: 64,
            quantization: Quantization::None,
        }
    }
}

impl HnswConfig {
    /// Neighbours per node on the bottom layer.
    pub fn level0_degree(&self) -> u32 {
        self.m0.unwrap_or(2 * self.m)
    }

    /// Checks every field against its limit; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(2..=HNSW_M_LIMIT).contains(&self.m) {
            return Err(format!(
                "index_params.m must be 2..={HNSW_M_LIMIT}, got {}",
                self.m
            ));
        }
        if let Some(m0) = self.m0 {
            // Sparser than the upper layers would defeat the bottom layer's purpose; denser
            // than 2·m outgrows the per-node link bound HNSW_M_LIMIT sets.
            if !(self.m..=2 * self.m).contains(&m0) {
                return Err(format!(
                    "index_params.m0 must be m..=2·m ({}..={}), got {m0}",
                    self.m,
                    2 * self.m
                ));
            }
        }
        for (name, v) in [
            ("ef_construction", self.ef_construction),
            ("ef_search", self.ef_search),
        ] {
            if !(1..=HNSW_EF_LIMIT).contains(&v) {
                return Err(format!(
                    "index_params.{name} must be 1..={HNSW_EF_LIMIT}, got {v}"
                ));
            }
        }
        if let Quantization::Int8 { oversampling, .. } = self.quantization {
            if !(oversampling.is_finite() && (1.0..=OVERSAMPLING_LIMIT).contains(&oversampling)) {
                return Err(format!(
                    "quantization.oversampling must be 1..={OVERSAMPLING_LIMIT}, got {oversampling}"
                ));
            }
        }
        Ok(())
    }
}

/// How an approximate index stores its vectors: as given (`None`) or as int8 codes, with
/// optional rescoring of `oversampling × k` candidates on the original vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantization {
    None,
    Int8 { rescore: bool, oversampling: f32 },
}

impl Quantization {
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8 { .. } => "int8",
        }
    }
}

impl IndexType {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexType::Flat => "flat",
            IndexType::Hnsw(_) => "hnsw",
        }
    }
    pub fn code(self) -> u8 {
        match self {
            IndexType::Flat => 0,
            IndexType::Hnsw(_) => 1,
        }
    }
    /// The index kind named by `s`, with default parameters.
    pub fn parse(s: &str) -> Option<IndexType> {
        match s.to_ascii_lowercase().as_str() {
            "flat" | "brute_force" | "bruteforce" | "exact" => Some(IndexType::Flat),
            "hnsw" => Some(IndexType::Hnsw(HnswConfig::default())),
            _ => None,
        }
    }
    pub fn hnsw(self) -> Option<HnswConfig> {
        match self {
            IndexType::Flat => None,
            IndexType::Hnsw(c) => Some(c),
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

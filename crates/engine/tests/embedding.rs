//! Text in, vectors out, through the engine's `Embedder` seam (a deterministic test embedder
//! stands in for the real models, which `quiver-embed`'s own tests check against
//! sentence-transformers): libraries get the default model when created with neither
//! dimension nor model, text-only chunks of a whole batch are embedded in one call, queries
//! are embedded as queries, and a failing provider changes nothing and says why.

use quiver_embed::{EmbedError, Embedder, Purpose};
use quiver_engine::input::{CreateLibrary, DocumentInput, SearchInput};
use quiver_engine::{Engine, EngineConfig, EngineError, ItemOutcome, WriteCtx};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const DIM: u32 = 16;

/// Bag-of-words hashing: texts sharing words are close. Counts calls and records purposes.
#[derive(Debug, Default)]
struct TestEmbedder {
    calls: AtomicUsize,
    fail: AtomicBool,
    purposes: Mutex<Vec<Purpose>>,
}

impl Embedder for TestEmbedder {
    fn embed(
        &self,
        model: Option<&str>,
        texts: &[String],
        purpose: Purpose,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.purposes.lock().expect("lock").push(purpose);
        if model != Some(quiver_engine::engine::DEFAULT_EMBEDDING_MODEL) {
            return Err(EmbedError::Unavailable(format!("no model {model:?}")));
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(EmbedError::Provider(
                "upstream returned 500: overloaded".into(),
            ));
        }
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0.0f32; DIM as usize];
                for w in t.split_whitespace() {
                    let h = w
                        .bytes()
                        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                    v[(h % DIM as u64) as usize] += 1.0;
                }
                v
            })
            .collect())
    }
    fn dimension(&self, model: &str) -> Option<u32> {
        (model == quiver_engine::engine::DEFAULT_EMBEDDING_MODEL).then_some(DIM)
    }
}

fn texts_doc(id: &str, texts: &[&str]) -> DocumentInput {
    DocumentInput {
        id: Some(id.into()),
        title: id.into(),
        texts: Some(texts.iter().map(|t| t.to_string()).collect()),
        ..Default::default()
    }
}

fn query(q: &str) -> SearchInput {
    SearchInput {
        query: Some(q.into()),
        embedding: None,
        embedding_b64: None,
        k: 3,
        filter: serde_json::Value::Null,
        distance_threshold: None,
        include_embeddings: false,
        ef_search: None,
    }
}

#[test]
fn text_in_semantic_search_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let embedder = Arc::new(TestEmbedder::default());
    let engine = Engine::open_with(EngineConfig::new(dir.path()), embedder.clone()).expect("open");
    let ctx = WriteCtx::default();
    let lib = engine
        .create_library(
            &ctx,
            CreateLibrary {
                name: "notes".into(),
                ..Default::default()
            },
        )
        .expect("a library without dimension gets the default model")
        .value
        .library;
    assert_eq!(
        lib.embedding_model.as_deref(),
        Some(quiver_engine::engine::DEFAULT_EMBEDDING_MODEL)
    );
    assert_eq!(lib.dimension, DIM);

    // A batch of text-only documents: one embedding call for all of them.
    let before = embedder.calls.load(Ordering::SeqCst);
    let items = vec![
        Ok(texts_doc("cats", &["cats purr and sleep all day"])),
        Ok(texts_doc(
            "rust",
            &["rust compiles fast code", "the borrow checker"],
        )),
        Ok(texts_doc("tea", &["green tea in the morning"])),
        Err(EngineError::invalid(
            "malformed",
            "a bad item keeps its own error",
        )),
    ];
    let out = engine
        .upsert_documents(&ctx, &lib.id, items)
        .expect("batch")
        .value;
    assert_eq!(
        embedder.calls.load(Ordering::SeqCst) - before,
        1,
        "one call per batch"
    );
    assert!(matches!(
        out[0],
        ItemOutcome::Committed { num_chunks: 1, .. }
    ));
    assert!(matches!(
        out[1],
        ItemOutcome::Committed { num_chunks: 2, .. }
    ));
    assert!(matches!(out[3], ItemOutcome::Failed(_)));

    let (hits, _) = engine
        .search(&lib.id, &query("do cats sleep"))
        .expect("search");
    assert_eq!(hits[0].document.id, "cats");
    assert_eq!(
        embedder.purposes.lock().expect("lock").last(),
        Some(&Purpose::Query)
    );

    // The provider fails: 503-class error with its reason, nothing committed.
    embedder.fail.store(true, Ordering::SeqCst);
    let seq = engine.applied_seq();
    let err = engine
        .upsert_document(&ctx, &lib.id, texts_doc("x", &["anything"]))
        .expect_err("provider down");
    assert!(
        matches!(&err, EngineError::Unavailable { code: "embedding_failed", detail } if detail.contains("overloaded")),
        "{err:?}"
    );
    let out = engine
        .upsert_documents(&ctx, &lib.id, vec![Ok(texts_doc("y", &["more"]))])
        .expect("batch")
        .value;
    assert!(matches!(
        &out[0],
        ItemOutcome::Failed(EngineError::Unavailable { .. })
    ));
    assert_eq!(engine.applied_seq(), seq, "nothing was committed");
    assert!(engine.search(&lib.id, &query("cats")).is_err());
    embedder.fail.store(false, Ordering::SeqCst);

    // A library with vectors only (explicit dimension, no model) refuses text clearly.
    let plain = engine
        .create_library(
            &ctx,
            CreateLibrary {
                name: "plain".into(),
                dimension: Some(4),
                ..Default::default()
            },
        )
        .expect("create")
        .value
        .library;
    assert!(plain.embedding_model.is_none());
    let err = engine
        .upsert_document(&ctx, &plain.id, texts_doc("z", &["text"]))
        .expect_err("no model");
    assert!(
        matches!(&err, EngineError::Invalid(i) if i.code == "embedding_unavailable"),
        "{err:?}"
    );
    engine.close().expect("close");
}

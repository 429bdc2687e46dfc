//! MiniLM equals sentence-transformers: the stored outputs of `bench/embed_reference.py
//! fixture` (16 sentences, including empty, unicode and over-256-token texts) against ours.
//! Runs only when the model is installed (see `common::installed`).

mod common;

use quiver_embed::minilm::MiniLm;
use quiver_embed::models::{self, MINILM};

#[derive(serde::Deserialize)]
struct Fixture {
    sentences: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = common::installed(MINILM) else {
        return;
    };
    let spec = models::spec(MINILM).unwrap();
    let m = MiniLm::load(&models::model_path(spec, &dir), true).unwrap();
    let f: Fixture = serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    assert_eq!(f.sentences.len(), 16);
    // Once as one batch, once one by one (different padding): both must match.
    let batch = m.embed(&f.sentences).unwrap();
    for (i, (got, want)) in batch.iter().zip(&f.vectors).enumerate() {
        assert_eq!(got.len(), 384);
        let c = common::cosine(got, want);
        assert!(c >= 0.999, "sentence {i} {:?}: cosine {c}", f.sentences[i]);
        let single = m.embed(std::slice::from_ref(&f.sentences[i])).unwrap();
        let c1 = common::cosine(&single[0], want);
        assert!(c1 >= 0.999, "sentence {i} alone: cosine {c1}");
    }
}

//! MiniLM equals sentence-transformers: the stored outputs of `bench/embed_reference.py
//! fixture` (16 sentences, including empty, unicode and over-256-token texts) against ours.
//! Runs only when the model is installed (see `common::installed`).

mod common;

use quiver_embed::minilm::{Backend, MiniLm};
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

/// Every forward pass this machine can run matches the stored sentence-transformers output,
/// and the packed f32 forward equals candle's (same arithmetic, different batching).
#[test]
fn every_backend_matches_sentence_transformers() {
    let Some(dir) = common::installed(MINILM) else {
        return;
    };
    let spec = models::spec(MINILM).unwrap();
    let path = models::model_path(spec, &dir);
    let f: Fixture = serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let mut backends = vec![Backend::Candle, Backend::PackedF32];
    if quiver_embed::amx::available() {
        backends.push(Backend::PackedAmx);
    } else {
        eprintln!("no AMX-BF16 here: the AMX forward is not checked");
        assert!(MiniLm::load_with(&path, true, Backend::PackedAmx).is_err());
    }
    let candle = MiniLm::load_with(&path, true, Backend::Candle)
        .unwrap()
        .embed(&f.sentences)
        .unwrap();
    for b in backends {
        let m = MiniLm::load_with(&path, true, b).unwrap();
        let got = m.embed(&f.sentences).unwrap();
        for (i, (g, want)) in got.iter().zip(&f.vectors).enumerate() {
            let c = common::cosine(g, want);
            assert!(c >= 0.999, "{b:?} sentence {i}: cosine {c}");
            if b == Backend::PackedF32 {
                let c = common::cosine(g, &candle[i]);
                assert!(
                    c >= 0.99999,
                    "packed f32 vs candle, sentence {i}: cosine {c}"
                );
            }
        }
    }
}

/// Many texts of mixed lengths (several packed runs on several threads) come back in the
/// caller's order, each equal to that text embedded alone by candle.
#[test]
fn packed_batches_keep_order_across_runs_and_threads() {
    let Some(dir) = common::installed(MINILM) else {
        return;
    };
    let spec = models::spec(MINILM).unwrap();
    let path = models::model_path(spec, &dir);
    let backend = if quiver_embed::amx::available() {
        Backend::PackedAmx
    } else {
        Backend::PackedF32
    };
    let fast = MiniLm::load_with(&path, true, backend).unwrap();
    let candle = MiniLm::load_with(&path, true, Backend::Candle).unwrap();
    let words = [
        "river", "market", "vector", "garden", "ocean", "library", "energy", "night",
    ];
    let texts: Vec<String> = (0..120)
        .map(|i| {
            let n = 1 + (i * 37) % 90;
            (0..n)
                .map(|j| words[(i + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let got = fast.embed(&texts).unwrap();
    assert_eq!(got.len(), texts.len());
    for (i, t) in texts.iter().enumerate().step_by(7) {
        let want = candle.embed(std::slice::from_ref(t)).unwrap();
        let c = common::cosine(&got[i], &want[0]);
        assert!(c >= 0.999, "text {i} ({backend:?}): cosine {c}");
    }
}

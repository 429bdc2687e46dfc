//! Semantic sanity through the `Embedder` a server uses (the registry): paraphrases are closer
//! than unrelated texts, for both local models; a missing model names its install command.

mod common;

use quiver_embed::{EmbedError, Embedder, Purpose, Registry, RegistryConfig};

fn check(model: &str) {
    let Some(dir) = common::installed(model) else {
        return;
    };
    let reg = Registry::new(RegistryConfig::new(dir)).unwrap();
    let docs: Vec<String> = [
        "The cat sat on the mat.",
        "Quarterly revenue rose twelve percent.",
        "How do I reset my password?",
        "The train to Paris leaves at nine in the morning.",
    ]
    .map(String::from)
    .to_vec();
    let queries: Vec<String> = [
        "A cat is sitting on a rug.",
        "Sales grew 12% this quarter.",
        "I forgot my login and need to change it.",
        "When does the Paris train depart?",
    ]
    .map(String::from)
    .to_vec();
    let d = reg.embed(Some(model), &docs, Purpose::Document).unwrap();
    let q = reg.embed(Some(model), &queries, Purpose::Query).unwrap();
    assert_eq!(d[0].len() as u32, reg.dimension(model).unwrap());
    for (i, qv) in q.iter().enumerate() {
        let own = common::cosine(qv, &d[i]);
        for (j, dv) in d.iter().enumerate() {
            if j != i {
                let other = common::cosine(qv, dv);
                assert!(
                    own > other,
                    "{model}: query {i} closer to doc {j} ({other}) than its paraphrase ({own})"
                );
            }
        }
        let norm: f32 = qv.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-4,
            "{model}: not normalised ({norm})"
        );
    }
    // Cached query gives the same vector.
    let again = reg
        .embed(Some(model), &queries[..1], Purpose::Query)
        .unwrap();
    assert_eq!(again[0], q[0]);
}

#[test]
fn minilm_ranks_paraphrases_first() {
    check("local:all-minilm-l6-v2");
}

#[test]
fn potion_ranks_paraphrases_first() {
    check("local:potion-base-8m");
}

#[test]
fn missing_model_names_the_install_command() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::new(RegistryConfig::new(dir.path())).unwrap();
    for model in ["local:all-minilm-l6-v2", "local:potion-base-8m"] {
        let e = reg
            .embed(Some(model), &["hi".into()], Purpose::Document)
            .unwrap_err();
        assert!(matches!(e, EmbedError::Unavailable(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains(&format!("quiver models install {model}")),
            "{e}"
        );
    }
    let e = reg
        .embed(Some("nonsense"), &["hi".into()], Purpose::Document)
        .unwrap_err();
    assert!(matches!(e, EmbedError::InvalidInput(_)));
    let e = reg
        .embed(None, &["hi".into()], Purpose::Document)
        .unwrap_err();
    assert!(matches!(e, EmbedError::Unavailable(_)));
}

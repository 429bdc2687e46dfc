//! The chunking helper: budgets, overlap, order, determinism.

mod common;

use quiver_embed::chunk::{chunk, chunk_with, ChunkConfig};

fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

fn cfg(max: usize, overlap: usize) -> ChunkConfig {
    ChunkConfig {
        max_tokens: max,
        overlap_tokens: overlap,
    }
}

#[test]
fn short_text_is_one_chunk_and_blank_is_none() {
    assert_eq!(
        chunk("Hello there.\n\nSecond paragraph.", &cfg(100, 10)),
        vec!["Hello there.\n\nSecond paragraph."]
    );
    assert!(chunk("  \n\n  ", &cfg(100, 10)).is_empty());
    assert!(chunk("", &ChunkConfig::default()).is_empty());
}

#[test]
fn cuts_at_sentences_with_sentence_overlap() {
    let text =
        "One two three four. Five six seven eight. Nine ten eleven twelve. Thirteen fourteen.";
    let out = chunk(text, &cfg(8, 4));
    assert_eq!(
        out,
        vec![
            "One two three four. Five six seven eight.",
            "Five six seven eight. Nine ten eleven twelve.",
            "Nine ten eleven twelve. Thirteen fourteen.",
        ]
    );
}

#[test]
fn no_overlap_partitions_the_words() {
    let mut text = String::new();
    for i in 0..500 {
        text.push_str(&format!("Sentence {i} has a few words in it. "));
        if i % 9 == 0 {
            text.push_str("\n\n");
        }
    }
    let out = chunk(&text, &cfg(50, 0));
    assert!(out.iter().all(|c| !c.is_empty() && words(c).len() <= 50));
    let joined: Vec<&str> = out.iter().flat_map(|c| words(c)).collect();
    assert_eq!(joined, words(&text));
}

#[test]
fn budget_holds_with_overlap_and_long_sentences_are_windowed() {
    let long = (0..1000)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let text = format!("Intro sentence here.\n\n{long}.\n\nOutro sentence.");
    let out = chunk(&text, &cfg(100, 20));
    assert!(
        out.iter().all(|c| words(c).len() <= 100),
        "{:?}",
        out.iter().map(|c| words(c).len()).collect::<Vec<_>>()
    );
    // Every word appears, in order, allowing the overlap's repeats.
    let mut want = words(&text).into_iter();
    let mut next = want.next();
    for w in out.iter().flat_map(|c| words(c)) {
        if Some(w) == next {
            next = want.next();
        }
    }
    assert_eq!(next, None, "a word was lost");
    // Consecutive chunks overlap.
    for pair in out.windows(2) {
        let a = words(&pair[0]);
        let b = words(&pair[1]);
        assert!(
            a.contains(&b[0]),
            "no overlap between {:?}… and {:?}…",
            &a[..3],
            &b[..3]
        );
    }
}

#[test]
fn deterministic_and_custom_token_counter() {
    let text = "Alpha beta gamma. Delta epsilon zeta. Eta theta iota. Kappa lambda mu.";
    assert_eq!(chunk(text, &cfg(6, 3)), chunk(text, &cfg(6, 3)));
    // Count characters instead of words.
    let by_chars = chunk_with(text, &cfg(40, 0), &|s: &str| s.chars().count());
    assert!(
        by_chars.iter().all(|c| c.chars().count() <= 40),
        "{by_chars:?}"
    );
    assert!(by_chars.len() >= 2);
}

#[test]
fn a_single_overlong_word_is_kept_whole() {
    let w = "x".repeat(5000);
    let out = chunk_with(&w, &cfg(10, 2), &|s: &str| s.len() / 4);
    assert_eq!(out, vec![w]);
}

mod with_the_model {
    //! Token budgets that count the model's word pieces (needs the installed MiniLM; skipped
    //! otherwise, like the other model tests).
    use super::cfg;
    use super::common;
    use quiver_embed::chunk::chunk;
    use quiver_embed::minilm::MiniLm;
    use quiver_embed::models::{self, MINILM};
    use quiver_embed::{Registry, RegistryConfig};

    /// Words that are several word pieces each: a word budget undercounts them badly.
    fn piece_heavy_text() -> String {
        let sentence = "Pneumonoultramicroscopic silicovolcanoconiosis afflicts 1234567 \
                        quarrymen near Llanfairpwllgwyngyll.";
        [sentence; 12].join(" ")
    }

    #[test]
    fn minilm_chunks_fit_the_budget_in_word_pieces() {
        let Some(dir) = common::installed(MINILM) else {
            return;
        };
        let m = MiniLm::load(
            &models::model_path(models::spec(MINILM).unwrap(), &dir),
            true,
        )
        .unwrap();
        let text = piece_heavy_text();
        let budget = cfg(40, 8);
        // The word budget lets chunks overflow 40 word pieces …
        let by_words = chunk(&text, &budget);
        assert!(
            by_words.iter().any(|c| m.count_tokens(c) > 40),
            "{by_words:?}"
        );
        // … the tokenizer's budget never does, and loses no text.
        let by_pieces = m.chunk(&text, &budget);
        assert!(by_pieces.len() > by_words.len());
        for c in &by_pieces {
            assert!(
                m.count_tokens(c) <= 40,
                "{} pieces: {c:?}",
                m.count_tokens(c)
            );
        }
        let joined = by_pieces.join(" ");
        for w in text.split_whitespace() {
            assert!(joined.contains(w), "{w} lost");
        }
        // Budgets above the model's window are lowered to it (256 less [CLS]/[SEP]).
        let long = [text.as_str(); 10].join("\n\n");
        for c in m.chunk(&long, &cfg(5000, 0)) {
            assert!(m.count_tokens(&c) <= 254);
        }
    }

    #[test]
    fn the_registry_uses_the_tokenizer_when_it_has_one_and_words_otherwise() {
        let text = piece_heavy_text();
        let budget = cfg(40, 8);
        // No model, a remote model: words (and nothing is loaded or fetched).
        let empty = tempfile::tempdir().unwrap();
        let r = Registry::new(RegistryConfig::new(empty.path())).unwrap();
        assert_eq!(r.chunk(None, &text, &budget), chunk(&text, &budget));
        assert_eq!(
            r.chunk(Some("cohere:embed-english-v3.0"), &text, &budget),
            chunk(&text, &budget)
        );
        // MiniLM not installed (and no auto-install): words, no error.
        assert_eq!(r.chunk(Some(MINILM), &text, &budget), chunk(&text, &budget));
        let Some(dir) = common::installed(MINILM) else {
            return;
        };
        let r = Registry::new(RegistryConfig::new(&dir)).unwrap();
        let m = MiniLm::load(
            &models::model_path(models::spec(MINILM).unwrap(), &dir),
            true,
        )
        .unwrap();
        assert_eq!(
            r.chunk(Some(MINILM), &text, &budget),
            m.chunk(&text, &budget)
        );
    }
}

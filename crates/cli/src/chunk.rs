//! # Splitting text files into chunks
//!
//! Owns the rule that turns a `.txt`/`.md` file's text into the `texts` of one document:
//! pieces of at most [`CHUNK_CHARS`] characters, cut at paragraph boundaries (blank lines)
//! when possible, else at sentence ends, else between words, and only as a last resort inside
//! a word. Adjacent small pieces are packed together up to the limit, so a file of short
//! paragraphs does not become hundreds of tiny chunks.
//!
//! It must never lose or reorder text (other than folding the whitespace at a cut) and never
//! return an empty chunk; it does no I/O, so it is tested on strings alone.

use quiver_embed::chunk::{paragraphs, sentences};

/// Target upper bound of one chunk, in characters.
pub const CHUNK_CHARS: usize = 1000;

/// Splits `text` into chunks of at most `max` characters (see the module docs).
pub fn chunk_text(text: &str, max: usize) -> Vec<String> {
    let max = max.max(1);
    // (separator before the piece, piece)
    let mut pieces: Vec<(&'static str, String)> = Vec::new();
    for para in paragraphs(text) {
        if chars(para) <= max {
            pieces.push(("\n\n", para.to_string()));
            continue;
        }
        let mut sep = "\n\n";
        for sentence in sentences(para) {
            if chars(sentence) <= max {
                pieces.push((sep, sentence.to_string()));
            } else {
                for part in split_words(sentence, max) {
                    pieces.push((sep, part));
                    sep = " ";
                }
            }
            sep = " ";
        }
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut cur_chars = 0usize;
    for (sep, piece) in pieces {
        let n = chars(&piece);
        if cur.is_empty() {
            cur = piece;
            cur_chars = n;
        } else if cur_chars + sep.len() + n <= max {
            cur.push_str(sep);
            cur.push_str(&piece);
            cur_chars += sep.len() + n;
        } else {
            out.push(std::mem::replace(&mut cur, piece));
            cur_chars = n;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// Packs the words of `s` into parts of at most `max` characters; a word longer than `max`
/// is cut into `max`-character pieces.
fn split_words(s: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut cur_chars = 0usize;
    for word in s.split_whitespace() {
        let n = chars(word);
        if n > max {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                cur_chars = 0;
            }
            let cs: Vec<char> = word.chars().collect();
            for piece in cs.chunks(max) {
                out.push(piece.iter().collect());
            }
            continue;
        }
        if cur.is_empty() {
            cur.push_str(word);
            cur_chars = n;
        } else if cur_chars + 1 + n <= max {
            cur.push(' ');
            cur.push_str(word);
            cur_chars += 1 + n;
        } else {
            out.push(std::mem::replace(&mut cur, word.to_string()));
            cur_chars = n;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn small_text_is_one_chunk() {
        assert_eq!(
            chunk_text("Hello.\n\nWorld.\n", 1000),
            vec!["Hello.\n\nWorld."]
        );
        assert!(chunk_text("  \n\n \n", 1000).is_empty());
        assert!(chunk_text("", 1000).is_empty());
    }

    #[test]
    fn cuts_at_paragraphs_first() {
        let a = "a".repeat(600);
        let b = "b".repeat(600);
        let text = format!("{a}\n\n{b}\n");
        assert_eq!(chunk_text(&text, 1000), vec![a, b]);
    }

    #[test]
    fn long_paragraph_cuts_at_sentences() {
        let s1 = format!("{}.", "x".repeat(500));
        let s2 = format!("{}!", "y".repeat(500));
        let s3 = format!("{}?", "z".repeat(20));
        let text = format!("{s1} {s2}\n{s3}");
        let chunks = chunk_text(&text, 1000);
        assert_eq!(chunks, vec![s1, format!("{s2} {s3}")]);
    }

    #[test]
    fn bounds_hold_and_no_text_is_lost() {
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(&format!(
                "Sentence number {i} says something fairly ordinary. "
            ));
            if i % 7 == 0 {
                text.push_str("\n\n");
            }
            if i % 50 == 0 {
                text.push_str(&"w".repeat(2500));
                text.push(' ');
            }
        }
        let chunks = chunk_text(&text, 1000);
        assert!(chunks
            .iter()
            .all(|c| !c.is_empty() && c.chars().count() <= 1000));
        // The words come back in order; only an over-long word may have been cut.
        let joined: String = chunks.join(" ");
        let got: String = words(&joined).concat();
        let want: String = words(&text).concat();
        assert_eq!(got, want);
        // Packing keeps the count near the minimum.
        assert!(
            chunks.len() < text.len() / 1000 + 20,
            "{} chunks",
            chunks.len()
        );
    }

    #[test]
    fn multibyte_text_counts_chars() {
        let text = "é".repeat(2500);
        let chunks = chunk_text(&text, 1000);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.chars().count() <= 1000));
    }
}

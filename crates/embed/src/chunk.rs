//! # Chunking: long text → pieces a model can embed whole
//!
//! Owns the rule that splits a text into chunks under a token budget, with overlap between
//! neighbours so a sentence cut at a boundary is still seen whole by one of them. It cuts at
//! paragraph boundaries (blank lines) first, else at sentence ends (`.`, `!`, `?` followed by
//! whitespace), else between words; small pieces are packed together up to the budget. The
//! overlap is made of the previous chunk's last whole sentences (or, when even one is longer
//! than the overlap, its last words).
//!
//! Tokens are counted by a function the caller passes ([`chunk_with`]) or approximated as
//! whitespace-separated words ([`chunk`]). Words undercount a BERT model's word pieces (a
//! rare or long word, a number or a URL is several pieces), so a word budget can overflow the
//! model's window and the model silently truncates the chunk: callers that know the library's
//! model use its tokenizer — [`crate::minilm::MiniLm::chunk`], or
//! [`crate::registry::Registry::chunk`], which falls back to words when there is no local
//! tokenizer.
//!
//! It must never return an empty chunk, never reorder text, and always give the same chunks
//! for the same input and settings; it does no I/O. A single word longer than the budget is
//! kept whole (the model truncates it).

/// Largest `max_tokens` accepted (larger values are clamped).
pub const MAX_TOKENS_LIMIT: usize = 8192;

/// Chunking settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkConfig {
    /// Budget per chunk, in tokens (clamped to 1..=[`MAX_TOKENS_LIMIT`]).
    pub max_tokens: usize,
    /// Tokens repeated from the end of one chunk at the start of the next (clamped to half
    /// of `max_tokens`).
    pub overlap_tokens: usize,
}

impl Default for ChunkConfig {
    /// 200 words with 30 of overlap: about 260 word pieces, MiniLM's 256-token window.
    fn default() -> Self {
        ChunkConfig {
            max_tokens: 200,
            overlap_tokens: 30,
        }
    }
}

/// Splits `text`, counting whitespace-separated words as tokens.
pub fn chunk(text: &str, cfg: &ChunkConfig) -> Vec<String> {
    chunk_with(text, cfg, &|s: &str| s.split_whitespace().count())
}

/// A piece of text that is never cut further unless it is over budget.
#[derive(Clone, Debug)]
struct Unit {
    text: String,
    tokens: usize,
    /// First unit of a paragraph: joined with a blank line rather than a space.
    para_start: bool,
}

/// Splits `text`, counting tokens with `count`.
pub fn chunk_with(text: &str, cfg: &ChunkConfig, count: &dyn Fn(&str) -> usize) -> Vec<String> {
    let max = cfg.max_tokens.clamp(1, MAX_TOKENS_LIMIT);
    let overlap = cfg.overlap_tokens.min(max / 2);
    let units = units(text, max, overlap, count);
    let mut out: Vec<String> = Vec::new();
    let mut cur: Vec<Unit> = Vec::new();
    let mut cur_tokens = 0usize;
    // Units of `cur` that came from the previous chunk's overlap: a chunk made only of them
    // is never emitted (it would repeat text).
    let mut carried = 0usize;
    for u in units {
        if !cur.is_empty() && cur_tokens + u.tokens > max {
            out.push(join(&cur));
            let mut tail = tail(&cur, overlap, count);
            let mut tail_tokens: usize = tail.iter().map(|t| t.tokens).sum();
            while !tail.is_empty() && tail_tokens + u.tokens > max {
                tail_tokens -= tail.remove(0).tokens;
            }
            carried = tail.len();
            cur = tail;
            cur_tokens = tail_tokens;
        }
        cur_tokens += u.tokens;
        cur.push(u);
    }
    if cur.len() > carried {
        out.push(join(&cur));
    }
    out
}

fn join(units: &[Unit]) -> String {
    let mut s = String::new();
    for (i, u) in units.iter().enumerate() {
        if i > 0 {
            s.push_str(if u.para_start { "\n\n" } else { " " });
        }
        s.push_str(&u.text);
    }
    s
}

/// The last whole units of `cur` within `overlap` tokens; else the last words of its last
/// unit within `overlap`.
fn tail(cur: &[Unit], overlap: usize, count: &dyn Fn(&str) -> usize) -> Vec<Unit> {
    if overlap == 0 {
        return Vec::new();
    }
    let mut out: Vec<Unit> = Vec::new();
    let mut n = 0usize;
    for u in cur.iter().rev() {
        if n + u.tokens > overlap {
            break;
        }
        n += u.tokens;
        out.insert(0, u.clone());
    }
    if out.is_empty() {
        if let Some(last) = cur.last() {
            let words: Vec<&str> = last.text.split_whitespace().collect();
            let mut start = words.len();
            while start > 0 && count(&words[start - 1..].join(" ")) <= overlap {
                start -= 1;
            }
            if start < words.len() {
                let text = words[start..].join(" ");
                out.push(Unit {
                    tokens: count(&text),
                    text,
                    para_start: false,
                });
            }
        }
    }
    if let Some(first) = out.first_mut() {
        first.para_start = false;
    }
    out
}

/// Paragraphs → sentences → word windows, each within `max` tokens where possible. Windows
/// of an over-long sentence hold `max - overlap` tokens, so the overlap still fits beside one.
fn units(text: &str, max: usize, overlap: usize, count: &dyn Fn(&str) -> usize) -> Vec<Unit> {
    let window = max.saturating_sub(overlap).max(1);
    let mut out = Vec::new();
    for para in paragraphs(text) {
        let mut first = true;
        for sentence in sentences(para) {
            let n = count(sentence);
            if n <= max {
                out.push(Unit {
                    text: sentence.to_string(),
                    tokens: n,
                    para_start: first,
                });
                first = false;
                continue;
            }
            // Over budget: windows of words.
            let mut words: Vec<&str> = Vec::new();
            let mut words_tokens = 0usize;
            for w in sentence.split_whitespace() {
                let wn = count(w).max(1);
                if !words.is_empty() && words_tokens + wn > window {
                    let text = words.join(" ");
                    out.push(Unit {
                        tokens: count(&text),
                        text,
                        para_start: first,
                    });
                    first = false;
                    words.clear();
                    words_tokens = 0;
                }
                words.push(w);
                words_tokens += wn;
            }
            if !words.is_empty() {
                let text = words.join(" ");
                out.push(Unit {
                    tokens: count(&text),
                    text,
                    para_start: first,
                });
                first = false;
            }
        }
    }
    out
}

/// Non-empty, trimmed paragraphs: text between blank lines. (Also the CLI's character-budget
/// chunker's first cut, so both split text the same way.)
pub fn paragraphs(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut end = 0usize;
    let mut offset = 0usize;
    for line in text.split_inclusive('\n') {
        if line.trim().is_empty() {
            if let Some(s) = start.take() {
                out.push(text[s..end].trim());
            }
        } else {
            if start.is_none() {
                start = Some(offset);
            }
            end = offset + line.len();
        }
        offset += line.len();
    }
    if let Some(s) = start {
        out.push(text[s..end].trim());
    }
    out.retain(|p| !p.is_empty());
    out
}

/// Sentences of a paragraph: cut after `.`, `!` or `?` followed by whitespace.
pub fn sentences(para: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0usize;
    let mut prev_end = false;
    for (i, c) in para.char_indices() {
        if prev_end && c.is_whitespace() {
            let s = para[start..i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i;
        }
        prev_end = matches!(c, '.' | '!' | '?');
    }
    let s = para[start..].trim();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

//! # A Server-Sent Events parser
//!
//! Owns the wire format of `text/event-stream` as the WHATWG spec defines it: lines end in
//! `\n`, `\r\n` or `\r` (possibly split across reads); `field: value` lines set `id`, `event`,
//! `data` (several `data` lines join with `\n`) and `retry`; lines starting with `:` are
//! comments (heartbeats); a blank line ends a frame, which is dispatched only if it carried
//! data. Bytes go in as they arrive from the socket; whole frames come out.
//!
//! It must never block, do I/O or interpret the data (the caller parses the JSON), and never
//! grow without bound: a line or a frame past [`FRAME_BYTES_LIMIT`] is an error.

use anyhow::{bail, Result};

/// Largest line or frame accepted, in bytes.
pub const FRAME_BYTES_LIMIT: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

#[derive(Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The previous byte was `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    /// The last `retry:` hint, in milliseconds.
    pub retry_ms: Option<u64>,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Feeds bytes; returns the frames they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Frame>> {
        let mut out = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(f) = self.line_done(&line)? {
                        out.push(f);
                    }
                }
                _ => {
                    if self.line.len() >= FRAME_BYTES_LIMIT {
                        bail!("an event-stream line is longer than {FRAME_BYTES_LIMIT} bytes");
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(out)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<Frame>> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return Ok(data.map(|data| Frame {
                id: self.id.clone(),
                event,
                data,
            }));
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            // An id with NUL is ignored, as the spec says.
            "id" if !value.contains('\0') => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "data" => {
                let first = self.data.is_none();
                let d = self.data.get_or_insert_with(String::new);
                if d.len() + value.len() > FRAME_BYTES_LIMIT {
                    bail!("an event-stream frame is larger than {FRAME_BYTES_LIMIT} bytes");
                }
                if !first {
                    d.push('\n');
                }
                d.push_str(value);
            }
            "retry" => {
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut Parser, chunks: &[&[u8]]) -> Vec<Frame> {
        chunks
            .iter()
            .flat_map(|c| p.push(c).expect("parses"))
            .collect()
    }

    #[test]
    fn frames_comments_and_retry() {
        let mut p = Parser::new();
        let s = b"retry: 2000\n\n: heartbeat\n\nid: 5\nevent: document.upserted\ndata: {\"seq\":5}\n\nid: 6\nevent: x\ndata: a\ndata: b\n\n";
        let f = all(&mut p, &[s]);
        assert_eq!(p.retry_ms, Some(2000));
        assert_eq!(
            f,
            vec![
                Frame {
                    id: Some("5".into()),
                    event: Some("document.upserted".into()),
                    data: "{\"seq\":5}".into()
                },
                Frame {
                    id: Some("6".into()),
                    event: Some("x".into()),
                    data: "a\nb".into()
                },
            ]
        );
    }

    #[test]
    fn split_reads_and_crlf() {
        let s: &[u8] = b"id: 1\r\nevent: t\r\ndata: {\"a\":1}\r\n\r\nid: 2\rdata: z\r\r";
        // Every split point gives the same frames.
        let whole = all(&mut Parser::new(), &[s]);
        assert_eq!(whole.len(), 2);
        for i in 0..s.len() {
            let mut p = Parser::new();
            let f = all(&mut p, &[&s[..i], &s[i..]]);
            assert_eq!(f, whole, "split at {i}");
        }
        assert_eq!(whole[1].id.as_deref(), Some("2"));
        assert_eq!(whole[1].event, None);
        assert_eq!(whole[1].data, "z");
    }

    #[test]
    fn blank_frames_are_not_dispatched_and_event_resets() {
        let mut p = Parser::new();
        let f = all(&mut p, &[b"event: a\n\ndata: x\n\n"]);
        assert_eq!(
            f,
            vec![Frame {
                id: None,
                event: None,
                data: "x".into()
            }]
        );
    }
}

//! A small, bounds-checked binary codec: little-endian integers, length-prefixed strings and
//! byte runs, raw f32 vectors.
//!
//! The reader never trusts a length: every length is checked against the bytes that remain
//! before anything is allocated, so a corrupt or hostile payload costs at most its own size
//! and yields a [`DecodeError`], never a panic. (The log's CRC catches corruption first; this
//! is the second line of defence.)

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot decode record at byte {offset}: {reason}")]
pub struct DecodeError {
    pub offset: usize,
    pub reason: String,
}

#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(n: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    pub fn bytes(&mut self, b: &[u8]) {
        assert!(b.len() <= u32::MAX as usize, "field larger than 4 GiB");
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
    pub fn json(&mut self, v: &Value) {
        // Serialised straight into the buffer behind a length placeholder (no temporary copy:
        // application events are mostly this field). Serialising a `Value` cannot fail (no
        // non-string keys, no custom Serialize); if it did, the field would be `null`.
        let at = self.buf.len();
        self.u32(0);
        if serde_json::to_writer(&mut self.buf, v).is_err() {
            self.buf.truncate(at + 4);
            self.buf.extend_from_slice(b"null");
        }
        let len = self.buf.len() - at - 4;
        assert!(len <= u32::MAX as usize, "field larger than 4 GiB");
        self.buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
    }
    pub fn map(&mut self, m: &Map<String, Value>) {
        let s = serde_json::to_vec(m).unwrap_or_else(|_| b"{}".to_vec());
        self.bytes(&s);
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.u32(v.len() as u32);
        #[cfg(target_endian = "little")]
        {
            // SAFETY: an f32 slice is `len * 4` initialised bytes with no padding, and on a
            // little-endian target its in-memory bytes are exactly its little-endian encoding.
            // (One memcpy instead of a loop: vectors are most of a record's bytes.)
            let bytes = unsafe {
                std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
            };
            self.buf.extend_from_slice(bytes);
        }
        #[cfg(not(target_endian = "little"))]
        {
            self.buf.reserve(v.len() * 4);
            for x in v {
                self.buf.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }
    pub fn err(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError {
            offset: self.pos,
            reason: reason.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(self.err(format!("needs {n} bytes, {} remain", self.remaining())));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("bad bool byte {b}"))),
        }
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    pub fn opt_string(&mut self) -> Result<Option<String>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            b => Err(self.err(format!("bad option tag {b}"))),
        }
    }
    pub fn json(&mut self) -> Result<Value, DecodeError> {
        let b = self.bytes()?;
        serde_json::from_slice(b).map_err(|e| self.err(format!("bad JSON: {e}")))
    }
    pub fn map(&mut self) -> Result<Map<String, Value>, DecodeError> {
        match self.json()? {
            Value::Object(m) => Ok(m),
            _ => Err(self.err("expected a JSON object")),
        }
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>, DecodeError> {
        let n = self.u32()? as usize;
        let b = self.take(
            n.checked_mul(4)
                .ok_or_else(|| self.err("vector length overflows"))?,
        )?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    /// Bounds a count read from the payload by the bytes that remain, assuming each item
    /// takes at least `min_item_bytes`; refuses counts that could not possibly fit.
    pub fn count(&mut self, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes.max(1)) > self.remaining() {
            return Err(self.err(format!(
                "count {n} cannot fit in {} bytes",
                self.remaining()
            )));
        }
        Ok(n)
    }
}

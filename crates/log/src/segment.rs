//! One segment file: its name, header, sparse in-memory index, cached read
//! handle, and the chunked reader used both by live reads and by recovery.
//!
//! A segment is shared (`Arc`) by the writer thread, readers and retention.
//! Only the writer thread (or recovery, before the writer exists) ever writes
//! a segment's bytes or index; readers must never trust bytes beyond the
//! durable seq, and must never return a frame that fails its checksum or
//! breaks seq contiguity: they report corruption instead.

use crate::error::LogError;
use crate::frame::{self, DecodeResult};
use crate::Seq;
use parking_lot::{Mutex, RwLock};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"QVRLOG01";
/// Length of [`SEGMENT_MAGIC`], as a file offset.
pub const SEGMENT_HEADER_BYTES: u64 = SEGMENT_MAGIC.len() as u64;
/// File name suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".qlog";

/// A sparse index entry is added at least every this many bytes...
const INDEX_INTERVAL_BYTES: u64 = 1 << 20;
/// ...and at least every this many records.
const INDEX_INTERVAL_RECORDS: u64 = 1024;
/// Default read-ahead of the chunked reader.
pub(crate) const READ_CHUNK_BYTES: usize = 256 * 1024;

/// `{first_seq:020}.qlog`.
pub fn segment_file_name(first_seq: Seq) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Inverse of [`segment_file_name`]; `None` for any other name.
pub fn parse_segment_file_name(name: &str) -> Option<Seq> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq: Seq = digits.parse().ok()?;
    (seq > 0).then_some(seq)
}

/// Decides where sparse index entries go as frames are appended.
#[derive(Debug, Default)]
pub(crate) struct IndexBuilder {
    last: Option<(Seq, u64)>,
}

impl IndexBuilder {
    /// True when the frame `(seq, offset)` should get an index entry.
    pub(crate) fn observe(&mut self, seq: Seq, offset: u64) -> bool {
        let due = match self.last {
            None => true,
            Some((last_seq, last_offset)) => {
                assert!(seq > last_seq && offset > last_offset);
                seq - last_seq >= INDEX_INTERVAL_RECORDS
                    || offset - last_offset >= INDEX_INTERVAL_BYTES
            }
        };
        if due {
            self.last = Some((seq, offset));
        }
        due
    }
}

pub(crate) struct Segment {
    pub(crate) first_seq: Seq,
    pub(crate) path: PathBuf,
    size_bytes: AtomicU64,
    /// `(seq, byte offset)` of some frames, ascending.
    index: RwLock<Vec<(Seq, u64)>>,
    reader: Mutex<Option<Arc<File>>>,
}

/// Why a segment read stopped.
pub(crate) enum ReadEnd {
    /// A limit (records, bytes, or the durable seq) was reached.
    Limit,
    /// The file has no more frames; the next seq is in the next segment.
    EndOfSegment { next_seq: Seq, offset: u64 },
}

pub(crate) enum ReadError {
    /// The file was deleted by retention before we opened it.
    Gone,
    Log(LogError),
}

/// Caller-side limits of one `read_from`.
pub(crate) struct ReadLimits {
    pub(crate) durable_seq: Seq,
    pub(crate) max_records: usize,
    pub(crate) max_bytes: usize,
    pub(crate) payload_bytes_limit: usize,
}

impl Segment {
    pub(crate) fn new(dir: &Path, first_seq: Seq, size_bytes: u64) -> Segment {
        assert!(first_seq > 0);
        assert!(size_bytes >= SEGMENT_HEADER_BYTES);
        Segment {
            first_seq,
            path: dir.join(segment_file_name(first_seq)),
            size_bytes: AtomicU64::new(size_bytes),
            index: RwLock::new(Vec::new()),
            reader: Mutex::new(None),
        }
    }

    /// Creates a new, empty segment file (header only), durable on return:
    /// file and directory entry are fsynced. Returns the segment and its
    /// write handle, positioned at the end.
    pub(crate) fn create(dir: &Path, first_seq: Seq) -> Result<(Segment, File), LogError> {
        let segment = Segment::new(dir, first_seq, SEGMENT_HEADER_BYTES);
        let path = &segment.path;
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        file.write_all(SEGMENT_MAGIC)
            .map_err(|e| LogError::io(path, e))?;
        file.sync_all().map_err(|e| LogError::io(path, e))?;
        crate::atomic::fsync_dir(dir)?;
        Ok((segment, file))
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn set_size_bytes(&self, size_bytes: u64) {
        assert!(size_bytes >= SEGMENT_HEADER_BYTES);
        self.size_bytes.store(size_bytes, Ordering::Release);
    }

    pub(crate) fn push_index(&self, seq: Seq, offset: u64) {
        assert!(seq >= self.first_seq && offset >= SEGMENT_HEADER_BYTES);
        let mut index = self.index.write();
        if let Some(&(last_seq, last_offset)) = index.last() {
            assert!(seq > last_seq && offset > last_offset, "index must ascend");
        }
        index.push((seq, offset));
    }

    pub(crate) fn last_index_entry(&self) -> Option<(Seq, u64)> {
        self.index.read().last().copied()
    }

    /// The indexed frame at or before `seq`: where a scan for `seq` starts.
    fn lookup(&self, seq: Seq) -> (Seq, u64) {
        let index = self.index.read();
        let after = index.partition_point(|&(entry_seq, _)| entry_seq <= seq);
        match after.checked_sub(1) {
            Some(i) => index[i],
            None => (self.first_seq, SEGMENT_HEADER_BYTES),
        }
    }

    fn read_handle(&self) -> Result<Arc<File>, ReadError> {
        let mut cached = self.reader.lock();
        if let Some(file) = cached.as_ref() {
            return Ok(Arc::clone(file));
        }
        match File::open(&self.path) {
            Ok(file) => {
                let file = Arc::new(file);
                *cached = Some(Arc::clone(&file));
                Ok(file)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ReadError::Gone),
            Err(e) => Err(ReadError::Log(LogError::io(&self.path, e))),
        }
    }

    /// Appends records with seq >= `from` to `out` until a limit is reached
    /// or the segment ends. `bytes_total` carries the payload bytes already
    /// in `out` across segments.
    pub(crate) fn read_into(
        &self,
        from: Seq,
        limits: &ReadLimits,
        out: &mut Vec<(Seq, Vec<u8>)>,
        bytes_total: &mut usize,
    ) -> Result<ReadEnd, ReadError> {
        assert!(from >= self.first_seq);
        let file = self.read_handle()?;
        let chunk_bytes = limits
            .max_bytes
            .saturating_add(frame::HEADER_BYTES)
            .clamp(4096, READ_CHUNK_BYTES);
        let mut reader = ChunkReader::new(&file, chunk_bytes);
        let (mut expected, mut offset) = self.lookup(from);
        loop {
            if expected > limits.durable_seq || out.len() >= limits.max_records {
                return Ok(ReadEnd::Limit);
            }
            let corrupt = |offset: u64, reason: String| {
                ReadError::Log(LogError::corrupt(&self.path, offset, reason))
            };
            let decoded = reader
                .frame_at(offset, limits.payload_bytes_limit)
                .map_err(|e| ReadError::Log(LogError::io(&self.path, e)))?;
            match decoded {
                DecodeResult::Ok {
                    seq,
                    payload,
                    frame_len,
                } => {
                    if seq != expected {
                        return Err(corrupt(
                            offset,
                            format!("expected seq {expected} but found seq {seq}"),
                        ));
                    }
                    if seq >= from {
                        let payload_len = payload.len();
                        if !out.is_empty()
                            && bytes_total.saturating_add(payload_len) > limits.max_bytes
                        {
                            return Ok(ReadEnd::Limit);
                        }
                        let frame_bytes = reader
                            .bytes_at(offset, frame_len)
                            .map_err(|e| ReadError::Log(LogError::io(&self.path, e)))?;
                        assert_eq!(frame_bytes.len(), frame_len);
                        out.push((seq, frame_bytes[payload].to_vec()));
                        *bytes_total += payload_len;
                    }
                    expected += 1;
                    offset += frame_len as u64;
                }
                DecodeResult::Incomplete { .. } => {
                    return Ok(ReadEnd::EndOfSegment {
                        next_seq: expected,
                        offset,
                    });
                }
                DecodeResult::Bad(reason) => return Err(corrupt(offset, reason)),
            }
        }
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Positioned, buffered reads over a file (pread; no shared cursor, so many
/// readers may share one handle).
pub(crate) struct ChunkReader<'a> {
    file: &'a File,
    chunk_bytes: usize,
    buf: Vec<u8>,
    buf_offset: u64,
}

impl<'a> ChunkReader<'a> {
    pub(crate) fn new(file: &'a File, chunk_bytes: usize) -> Self {
        assert!(chunk_bytes >= frame::HEADER_BYTES);
        ChunkReader {
            file,
            chunk_bytes,
            buf: Vec::new(),
            buf_offset: 0,
        }
    }

    /// Up to `len` bytes at `offset`; fewer only at end of file.
    pub(crate) fn bytes_at(&mut self, offset: u64, len: usize) -> std::io::Result<&[u8]> {
        let buffered = offset >= self.buf_offset
            && offset + len as u64 <= self.buf_offset + self.buf.len() as u64;
        if !buffered {
            let want = len.max(self.chunk_bytes);
            self.buf.clear();
            self.buf.resize(want, 0);
            let got = read_full_at(self.file, &mut self.buf, offset)?;
            self.buf.truncate(got);
            self.buf_offset = offset;
        }
        let start = (offset - self.buf_offset) as usize;
        let end = (start + len).min(self.buf.len());
        Ok(&self.buf[start.min(end)..end])
    }

    /// Decodes the frame at `offset`, reading as much as it needs.
    /// `Incomplete` means the file ends before the frame does.
    pub(crate) fn frame_at(
        &mut self,
        offset: u64,
        payload_bytes_limit: usize,
    ) -> std::io::Result<DecodeResult> {
        let mut want = frame::HEADER_BYTES;
        loop {
            let bytes = self.bytes_at(offset, want)?;
            let got = bytes.len();
            match frame::decode_limited(bytes, payload_bytes_limit) {
                DecodeResult::Incomplete { needed_bytes } if got >= want && needed_bytes > want => {
                    want = needed_bytes;
                }
                decoded => return Ok(decoded),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(segment_file_name(1), "00000000000000000001.qlog");
        assert_eq!(
            parse_segment_file_name("00000000000000000001.qlog"),
            Some(1)
        );
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "00000000000000000000.qlog",
            "1.qlog",
            "0000000000000000000a.qlog",
            "00000000000000000001.qlo",
            "LOCK",
            "+0000000000000000001.qlog",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn index_builder_spacing() {
        let mut builder = IndexBuilder::default();
        let mut entries = 0;
        for i in 0..5000u64 {
            if builder.observe(i + 1, 8 + i * 20) {
                entries += 1;
            }
        }
        assert_eq!(entries, 5);
    }
}

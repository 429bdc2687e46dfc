//! Recovery at open: find the segments, validate every frame, rebuild the
//! sparse indexes, and repair a torn tail of the last segment.
//!
//! This module owns the decision "torn tail or corruption". It must never
//! silently skip or drop data: the only bytes it may remove are an invalid
//! suffix of the LAST segment after which no valid frame exists (what a crash
//! mid-write leaves behind). Anything else is reported as `Corrupt` with the
//! file and byte offset, because continuing would lose acknowledged records
//! or break seq contiguity.

use crate::config::LogConfig;
use crate::error::LogError;
use crate::frame::{self, DecodeResult};
use crate::segment::{
    parse_segment_file_name, ChunkReader, IndexBuilder, Segment, READ_CHUNK_BYTES,
    SEGMENT_HEADER_BYTES, SEGMENT_MAGIC,
};
use crate::Seq;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Upper bound on segment files in one log directory.
pub(crate) const SEGMENTS_COUNT_MAX: usize = 1 << 20;

pub(crate) struct Recovered {
    /// Ascending by first seq; never empty.
    pub(crate) segments: Vec<Segment>,
    /// The seq the next append gets.
    pub(crate) next_seq: Seq,
    pub(crate) truncated_bytes: u64,
}

/// Scans `config.dir` (creating it if missing) and returns the validated
/// segments. Creates the first segment of a brand-new log.
pub(crate) fn recover(config: &LogConfig) -> Result<Recovered, LogError> {
    let dir = config.dir.as_path();
    let mut firsts = list_segments(dir)?;
    if firsts.is_empty() {
        let (segment, _file) = Segment::create(dir, 1)?;
        tracing::info!(dir = %dir.display(), "created a new log");
        return Ok(Recovered {
            segments: vec![segment],
            next_seq: 1,
            truncated_bytes: 0,
        });
    }
    firsts.sort_unstable();
    let payload_bytes_limit = config.record_size_bytes_limit as usize;
    let mut segments = Vec::with_capacity(firsts.len());
    let mut next_seq: Seq = firsts[0];
    let mut truncated_bytes = 0;
    for (i, &first_seq) in firsts.iter().enumerate() {
        let is_last = i + 1 == firsts.len();
        let segment = Segment::new(dir, first_seq, SEGMENT_HEADER_BYTES);
        if first_seq != next_seq {
            return Err(LogError::corrupt(
                &segment.path,
                0,
                format!(
                    "the file name says the segment starts at seq {first_seq}, \
                     but the previous segment ends at seq {}",
                    next_seq - 1
                ),
            ));
        }
        let scanned = scan_segment(&segment, is_last, payload_bytes_limit)?;
        assert!(scanned.next_seq >= first_seq);
        truncated_bytes += scanned.truncated_bytes;
        segment.set_size_bytes(scanned.size_bytes);
        next_seq = scanned.next_seq;
        segments.push(segment);
    }
    assert_eq!(segments.len(), firsts.len());
    Ok(Recovered {
        segments,
        next_seq,
        truncated_bytes,
    })
}

fn list_segments(dir: &Path) -> Result<Vec<Seq>, LogError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        if let Some(parent) = dir.parent() {
            crate::atomic::fsync_dir(parent)?;
        }
    }
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io(dir, e))?;
    let mut firsts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        match parse_segment_file_name(name) {
            Some(first_seq) => firsts.push(first_seq),
            None if name.ends_with(crate::segment::SEGMENT_SUFFIX) => {
                tracing::warn!(file = %entry.path().display(), "ignoring a file that looks like a segment but is not named like one");
            }
            None => {}
        }
        if firsts.len() > SEGMENTS_COUNT_MAX {
            return Err(LogError::InvalidConfig(format!(
                "{} holds more than {SEGMENTS_COUNT_MAX} segment files",
                dir.display()
            )));
        }
    }
    Ok(firsts)
}

struct Scanned {
    next_seq: Seq,
    size_bytes: u64,
    truncated_bytes: u64,
}

fn scan_segment(
    segment: &Segment,
    is_last: bool,
    payload_bytes_limit: usize,
) -> Result<Scanned, LogError> {
    let path = &segment.path;
    let io = |e| LogError::io(path, e);
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut reader = ChunkReader::new(&file, READ_CHUNK_BYTES);

    if file_len < SEGMENT_HEADER_BYTES {
        if !is_last {
            return Err(LogError::corrupt(
                path,
                0,
                format!("the file is {file_len} bytes, shorter than the segment header"),
            ));
        }
        let magic_prefix = reader.bytes_at(0, file_len as usize).map_err(io)?;
        if !SEGMENT_MAGIC.starts_with(magic_prefix) {
            return Err(LogError::corrupt(
                path,
                0,
                "the segment header is not QVRLOG01",
            ));
        }
        rewrite_header(path)?;
        tracing::warn!(file = %path.display(), "rewrote a torn segment header");
        return Ok(Scanned {
            next_seq: segment.first_seq,
            size_bytes: SEGMENT_HEADER_BYTES,
            truncated_bytes: file_len,
        });
    }
    let magic = reader.bytes_at(0, SEGMENT_MAGIC.len()).map_err(io)?;
    if magic != SEGMENT_MAGIC {
        return Err(LogError::corrupt(
            path,
            0,
            "the segment header is not QVRLOG01",
        ));
    }

    let mut expected = segment.first_seq;
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut index = IndexBuilder::default();
    while offset < file_len {
        let reason = match reader.frame_at(offset, payload_bytes_limit).map_err(io)? {
            DecodeResult::Ok { seq, frame_len, .. } => {
                if seq != expected {
                    return Err(LogError::corrupt(
                        path,
                        offset,
                        format!("expected seq {expected} but found a valid frame with seq {seq}"),
                    ));
                }
                if index.observe(seq, offset) {
                    segment.push_index(seq, offset);
                }
                expected += 1;
                offset += frame_len as u64;
                continue;
            }
            DecodeResult::Incomplete { .. } => "the file ends in the middle of a frame".to_string(),
            DecodeResult::Bad(reason) => reason,
        };
        if !is_last {
            return Err(LogError::corrupt(path, offset, reason));
        }
        let next_valid = find_valid_frame_after(
            &mut reader,
            offset + 1,
            file_len,
            expected - 1,
            payload_bytes_limit,
        )
        .map_err(io)?;
        if let Some((seq, valid_offset)) = next_valid {
            return Err(LogError::corrupt(
                path,
                offset,
                format!(
                    "{reason}; a valid frame with seq {seq} follows at byte offset {valid_offset}, \
                     so this is not a torn tail"
                ),
            ));
        }
        let truncated_bytes = file_len - offset;
        truncate_file(path, offset)?;
        tracing::warn!(
            file = %path.display(),
            offset,
            truncated_bytes,
            reason = %reason,
            "truncated a torn tail"
        );
        return Ok(Scanned {
            next_seq: expected,
            size_bytes: offset,
            truncated_bytes,
        });
    }
    assert_eq!(offset, file_len);
    Ok(Scanned {
        next_seq: expected,
        size_bytes: file_len,
        truncated_bytes: 0,
    })
}

/// Scans byte by byte from `start` for a checksum-valid frame whose seq could
/// follow `last_good_seq` (greater, and no further than the remaining bytes
/// could hold frames for). Returns its `(seq, offset)`.
fn find_valid_frame_after(
    reader: &mut ChunkReader<'_>,
    start: u64,
    file_len: u64,
    last_good_seq: Seq,
    payload_bytes_limit: usize,
) -> std::io::Result<Option<(Seq, u64)>> {
    let header_bytes = frame::HEADER_BYTES as u64;
    let mut offset = start;
    while offset + header_bytes <= file_len {
        let header = reader.bytes_at(offset, frame::HEADER_BYTES)?;
        assert_eq!(header.len(), frame::HEADER_BYTES);
        let mut len_bytes = [0u8; 4];
        len_bytes.copy_from_slice(&header[0..4]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&header[8..16]);
        let payload_len = u64::from(u32::from_le_bytes(len_bytes));
        let seq = u64::from_le_bytes(seq_bytes);
        let seq_max = last_good_seq.saturating_add((file_len - offset) / header_bytes + 1);
        let plausible = seq > last_good_seq
            && seq <= seq_max
            && payload_len <= payload_bytes_limit as u64
            && offset + header_bytes + payload_len <= file_len;
        if plausible {
            if let DecodeResult::Ok { seq, .. } = reader.frame_at(offset, payload_bytes_limit)? {
                return Ok(Some((seq, offset)));
            }
        }
        offset += 1;
    }
    Ok(None)
}

fn truncate_file(path: &Path, len_bytes: u64) -> Result<(), LogError> {
    assert!(len_bytes >= SEGMENT_HEADER_BYTES);
    let io = |e| LogError::io(path, e);
    let file = OpenOptions::new().write(true).open(path).map_err(io)?;
    file.set_len(len_bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

fn rewrite_header(path: &Path) -> Result<(), LogError> {
    let io = |e| LogError::io(path, e);
    let mut file = OpenOptions::new().write(true).open(path).map_err(io)?;
    file.set_len(0).map_err(io)?;
    file.write_all(SEGMENT_MAGIC).map_err(io)?;
    file.sync_all().map_err(io)
}

//! The single writer thread: group commit, segment rolls, fsync policy, and
//! publishing the durable seq.
//!
//! Only this thread writes segment bytes after open. It must never retry a
//! failed write or fsync (after a failed fsync the page cache state is
//! unknown, so a retry could report lost data as durable): the first I/O
//! error puts the log in the Failed state and the thread exits. It must never
//! publish a durable seq before the policy's condition holds for every record
//! at or below it.

use crate::config::FsyncPolicy;
use crate::error::LogError;
use crate::frame;
use crate::log::Shared;
use crate::segment::{IndexBuilder, Segment, SEGMENT_HEADER_BYTES};
use crate::Seq;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

/// A group commit stops taking more batches past this many payload bytes...
const GROUP_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// ...or this many records.
const GROUP_RECORDS_LIMIT: usize = 65_536;

/// The records of one `append` call, seqs `first_seq..first_seq+len`.
pub(crate) struct Batch {
    pub(crate) first_seq: Seq,
    pub(crate) payloads: Vec<Vec<u8>>,
}

pub(crate) struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) receiver: Receiver<Batch>,
    pub(crate) active: Arc<Segment>,
    pub(crate) file: File,
    pub(crate) index: IndexBuilder,
    /// The seq the next frame gets.
    pub(crate) next_seq: Seq,
    /// Bytes written since the last fsync of the active file.
    pub(crate) unsynced: bool,
    pub(crate) last_sync: Instant,
    pub(crate) buf: Vec<u8>,
}

/// Marks the log failed if the writer thread unwinds (an assertion fired),
/// so that waiters get an error instead of hanging.
struct PanicGuard<'a>(&'a Shared);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail("the writer thread panicked".to_string());
        }
    }
}

impl Writer {
    pub(crate) fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let _guard = PanicGuard(&shared);
        if let Err(error) = self.run_until_closed() {
            tracing::error!(%error, "log writer failed; the log is now unusable");
            shared.fail(error.to_string());
        }
    }

    fn run_until_closed(&mut self) -> Result<(), LogError> {
        let mut group: Vec<Batch> = Vec::new();
        loop {
            let first = match self.shared.config.fsync {
                FsyncPolicy::Interval(interval) if self.unsynced => {
                    let due = self.last_sync + interval;
                    let wait = due.saturating_duration_since(Instant::now());
                    match self.receiver.recv_timeout(wait) {
                        Ok(batch) => Some(batch),
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync()?;
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => None,
                    }
                }
                _ => self.receiver.recv().ok(),
            };
            let Some(first) = first else { break };
            let mut group_records = first.payloads.len();
            let mut group_bytes: usize = first.payloads.iter().map(Vec::len).sum();
            group.push(first);
            while group_records < GROUP_RECORDS_LIMIT && group_bytes < GROUP_BYTES_LIMIT {
                match self.receiver.try_recv() {
                    Ok(batch) => {
                        group_records += batch.payloads.len();
                        group_bytes += batch.payloads.iter().map(Vec::len).sum::<usize>();
                        group.push(batch);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.shared.release_queue(group_records);
            self.write_group(&mut group)?;
            assert!(group.is_empty(), "write_group takes every batch");
        }
        // Closing: every sender is gone and the queue is drained.
        if self.unsynced {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes (and syncs, per policy) every batch of `group`, hands the payloads to the
    /// recent-records ring, then publishes the new durable seq. Empties `group`.
    fn write_group(&mut self, group: &mut Vec<Batch>) -> Result<(), LogError> {
        let segment_limit = self.shared.config.segment_size_bytes_limit;
        let record_limit = self.shared.config.record_size_bytes_limit as usize;
        let fsync = self.shared.config.fsync;
        assert!(self.buf.is_empty());
        let mut records: u64 = 0;
        for batch in group.iter() {
            assert_eq!(
                batch.first_seq, self.next_seq,
                "batches arrive in seq order"
            );
            assert!(!batch.payloads.is_empty());
            for payload in &batch.payloads {
                assert!(
                    payload.len() <= record_limit,
                    "append checks the record limit"
                );
                let frame_bytes = (frame::HEADER_BYTES + payload.len()) as u64;
                let pending_bytes = self.active.size_bytes() + self.buf.len() as u64;
                if pending_bytes + frame_bytes > segment_limit
                    && pending_bytes > SEGMENT_HEADER_BYTES
                {
                    self.flush()?;
                    self.roll()?;
                }
                let offset = self.active.size_bytes() + self.buf.len() as u64;
                let seq = self.next_seq;
                if self.index.observe(seq, offset) {
                    self.active.push_index(seq, offset);
                }
                frame::encode(seq, payload, &mut self.buf);
                self.next_seq += 1;
                records += 1;
            }
        }
        self.flush()?;
        match fsync {
            FsyncPolicy::Always => self.sync()?,
            FsyncPolicy::Interval(interval) => {
                if self.last_sync.elapsed() >= interval {
                    self.sync()?;
                }
            }
            FsyncPolicy::Never => {}
        }
        let stats = &self.shared.stats;
        stats.appended_records.fetch_add(records, Ordering::Relaxed);
        stats.groups.fetch_add(1, Ordering::Relaxed);
        // Into the ring before the durable seq moves, so a reader that sees the new durable
        // seq finds every record up to it in the ring (or older ones in the files).
        {
            let mut recent = self.shared.recent.lock();
            for batch in group.drain(..) {
                for (i, payload) in batch.payloads.into_iter().enumerate() {
                    recent.push(batch.first_seq + i as u64, payload);
                }
            }
        }
        self.shared.publish_durable(self.next_seq - 1);
        if self.buf.capacity() > 2 * GROUP_BYTES_LIMIT {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Writes the buffered frames to the active segment with one write call.
    fn flush(&mut self) -> Result<(), LogError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = &self.active.path;
        self.file
            .write_all(&self.buf)
            .map_err(|e| LogError::io(path, e))?;
        let written = self.buf.len() as u64;
        self.active
            .set_size_bytes(self.active.size_bytes() + written);
        self.shared
            .stats
            .written_bytes
            .fetch_add(written, Ordering::Relaxed);
        self.unsynced = true;
        self.buf.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), LogError> {
        self.file
            .sync_data()
            .map_err(|e| LogError::io(&self.active.path, e))?;
        self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Seals the active segment (fsynced under every policy, so that a later
    /// segment never survives a crash that an earlier one's tail did not) and
    /// starts a new one named after the next seq.
    fn roll(&mut self) -> Result<(), LogError> {
        assert!(self.buf.is_empty());
        self.sync()?;
        let dir = self.shared.config.dir.as_path();
        let (segment, file) = Segment::create(dir, self.next_seq)?;
        let segment = Arc::new(segment);
        self.shared.push_segment(Arc::clone(&segment));
        self.active = segment;
        self.file = file;
        self.index = IndexBuilder::default();
        tracing::debug!(first_seq = self.next_seq, "rolled to a new segment");
        Ok(())
    }
}

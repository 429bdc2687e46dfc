//! `FileLog`: the public handle. Owns seq assignment, the bounded queue to the
//! writer thread, durability waiting, reads, retention and shutdown.
//!
//! It must never let a reader see a record above the durable seq, never hand
//! out a seq twice or skip one, and never delete the active segment or a
//! segment holding records the caller's snapshot does not cover: the log is
//! the database, so every one of those would lose or invent data.

use crate::config::{FsyncPolicy, LogConfig, Retention};
use crate::error::LogError;
use crate::recent::Recent;
use crate::recovery;
use crate::segment::{IndexBuilder, ReadEnd, ReadError, ReadLimits, Segment};
use crate::writer::{Batch, Writer};
use crate::Seq;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// Name of the lock file that keeps a second process out of the directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// What recovery found at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Oldest readable seq (the first segment's first seq).
    pub first_seq: Seq,
    /// Highest seq in the log; `first_seq - 1` when it holds no records (so 0
    /// for a brand-new log). The next append gets `last_seq + 1`.
    pub last_seq: Seq,
    /// Bytes cut from a torn tail of the last segment.
    pub truncated_bytes: u64,
    /// Segment files found (or created).
    pub segments: usize,
}

/// Counters since open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    pub fsyncs: u64,
    pub appended_records: u64,
    pub written_bytes: u64,
    /// Group commits: one write call (plus one per segment roll) each.
    pub groups: u64,
}

#[derive(Default)]
pub(crate) struct StatsCounters {
    pub(crate) fsyncs: AtomicU64,
    pub(crate) appended_records: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) groups: AtomicU64,
}

#[derive(Default)]
struct Status {
    failed: Option<String>,
    closed: bool,
}

struct AppendState {
    next_seq: Seq,
    sender: Option<SyncSender<Batch>>,
}

/// State shared by handles, readers and the writer thread.
pub(crate) struct Shared {
    pub(crate) config: LogConfig,
    pub(crate) stats: StatsCounters,
    segments: RwLock<VecDeque<Arc<Segment>>>,
    first_seq: AtomicU64,
    durable_seq: AtomicU64,
    last_assigned_seq: AtomicU64,
    failed: AtomicBool,
    status: Mutex<Status>,
    durable_changed: Condvar,
    queued_records: Mutex<usize>,
    queue_space: Condvar,
    watch_sender: Mutex<Option<watch::Sender<Seq>>>,
    watch_receiver: watch::Receiver<Seq>,
    /// The newest written records, for readers near the tail.
    pub(crate) recent: Mutex<Recent>,
}

impl Shared {
    pub(crate) fn publish_durable(&self, seq: Seq) {
        let previous = self.durable_seq.load(Ordering::Acquire);
        assert!(seq >= previous, "durable seq never goes backwards");
        assert!(seq <= self.last_assigned_seq.load(Ordering::Acquire));
        if seq == previous {
            return;
        }
        self.durable_seq.store(seq, Ordering::Release);
        drop(self.status.lock());
        self.durable_changed.notify_all();
        if let Some(sender) = self.watch_sender.lock().as_ref() {
            sender.send_replace(seq);
        }
    }

    pub(crate) fn fail(&self, reason: String) {
        {
            let mut status = self.status.lock();
            if status.failed.is_none() {
                status.failed = Some(reason);
            }
            self.failed.store(true, Ordering::Release);
        }
        self.durable_changed.notify_all();
        drop(self.queued_records.lock());
        self.queue_space.notify_all();
        // Dropping the sender makes async waiters' `wait_for` return Err.
        self.watch_sender.lock().take();
    }

    pub(crate) fn release_queue(&self, records: usize) {
        let mut queued = self.queued_records.lock();
        assert!(*queued >= records);
        *queued -= records;
        drop(queued);
        self.queue_space.notify_all();
    }

    pub(crate) fn push_segment(&self, segment: Arc<Segment>) {
        let mut segments = self.segments.write();
        if let Some(last) = segments.back() {
            assert!(segment.first_seq > last.first_seq);
        }
        segments.push_back(segment);
    }

    fn failed_error(&self) -> LogError {
        let status = self.status.lock();
        LogError::Failed(
            status
                .failed
                .clone()
                .unwrap_or_else(|| "unknown writer failure".to_string()),
        )
    }
}

/// An append-only, segmented, checksummed log with a single writer thread and
/// group commit. `Send + Sync`; share it through an `Arc`.
pub struct FileLog {
    shared: Arc<Shared>,
    append_state: Mutex<AppendState>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    truncate_lock: Mutex<()>,
    _lock_file: File,
}

fn lock_directory(config: &LogConfig) -> Result<File, LogError> {
    let dir = &config.dir;
    std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
    let path = dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| LogError::io(&path, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid, owned descriptor; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            return Err(LogError::Locked { dir: dir.clone() });
        }
        return Err(LogError::io(&path, error));
    }
    Ok(file)
}

impl FileLog {
    /// Opens (or creates) the log in `config.dir`, recovering and validating
    /// every segment, and starts the writer thread.
    pub fn open(config: LogConfig) -> Result<(FileLog, Recovery), LogError> {
        config.validate()?;
        let lock_file = lock_directory(&config)?;
        let recovered = recovery::recover(&config)?;
        let segments: VecDeque<Arc<Segment>> =
            recovered.segments.into_iter().map(Arc::new).collect();
        let (Some(first), Some(active)) = (segments.front(), segments.back()) else {
            unreachable!("recovery always returns at least one segment");
        };
        let first_seq = first.first_seq;
        let active = Arc::clone(active);
        let next_seq = recovered.next_seq;
        let last_seq = next_seq - 1;
        assert!(next_seq >= first_seq && next_seq >= active.first_seq);
        let recovery = Recovery {
            first_seq,
            last_seq,
            truncated_bytes: recovered.truncated_bytes,
            segments: segments.len(),
        };

        let file = OpenOptions::new()
            .append(true)
            .open(&active.path)
            .map_err(|e| LogError::io(&active.path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| LogError::io(&active.path, e))?
            .len();
        assert_eq!(
            file_len,
            active.size_bytes(),
            "recovery sized the active segment"
        );

        let (watch_sender, watch_receiver) = watch::channel(last_seq);
        let shared = Arc::new(Shared {
            stats: StatsCounters::default(),
            segments: RwLock::new(segments),
            first_seq: AtomicU64::new(first_seq),
            durable_seq: AtomicU64::new(last_seq),
            last_assigned_seq: AtomicU64::new(last_seq),
            failed: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
            durable_changed: Condvar::new(),
            queued_records: Mutex::new(0),
            queue_space: Condvar::new(),
            watch_sender: Mutex::new(Some(watch_sender)),
            watch_receiver,
            recent: Mutex::new(Recent::new(config.recent_bytes_limit)),
            config,
        });
        // Each batch holds at least one record and queued records are
        // bounded, so the channel itself never blocks a sender.
        let (sender, receiver) = sync_channel(shared.config.queue_records_limit + 1);
        // Resume indexing the active segment after its last indexed frame.
        let mut index = IndexBuilder::default();
        if let Some((seq, offset)) = active.last_index_entry() {
            index.observe(seq, offset);
        }
        let writer = Writer {
            shared: Arc::clone(&shared),
            receiver,
            active,
            file,
            index,
            next_seq,
            unsynced: false,
            last_sync: Instant::now(),
            buf: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("quiver-log-writer".to_string())
            .spawn(move || writer.run())
            .map_err(|e| LogError::io(&shared.config.dir, e))?;
        tracing::info!(
            dir = %shared.config.dir.display(),
            first_seq,
            last_seq,
            segments = recovery.segments,
            truncated_bytes = recovery.truncated_bytes,
            "opened log"
        );
        let log = FileLog {
            shared,
            append_state: Mutex::new(AppendState {
                next_seq,
                sender: Some(sender),
            }),
            writer_thread: Mutex::new(Some(thread)),
            truncate_lock: Mutex::new(()),
            _lock_file: lock_file,
        };
        Ok((log, recovery))
    }

    /// Assigns the next contiguous seqs to `payloads` in order, enqueues them
    /// for the writer thread and returns the seq of the first one, before it
    /// is durable. Blocks only while the queue is full. Concurrent calls never
    /// interleave: each call's seqs are contiguous. Nothing is enqueued if any
    /// payload is too large.
    pub fn append(&self, payloads: Vec<Vec<u8>>) -> Result<Seq, LogError> {
        if payloads.is_empty() {
            return Err(LogError::EmptyAppend);
        }
        let limit_bytes = self.shared.config.record_size_bytes_limit;
        if let Some(payload) = payloads.iter().find(|p| p.len() > limit_bytes as usize) {
            return Err(LogError::RecordTooLarge {
                size_bytes: payload.len(),
                limit_bytes,
            });
        }
        let records = payloads.len();
        let queue_limit = self.shared.config.queue_records_limit;
        let mut state = self.append_state.lock();
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.shared.failed_error());
        }
        if state.sender.is_none() {
            return Err(LogError::Closed);
        }
        {
            let mut queued = self.shared.queued_records.lock();
            // A call larger than the whole queue goes alone into an empty one.
            while *queued > 0 && *queued + records > queue_limit {
                if self.shared.failed.load(Ordering::Acquire) {
                    drop(queued);
                    return Err(self.shared.failed_error());
                }
                self.shared.queue_space.wait(&mut queued);
            }
            *queued += records;
        }
        let first_seq = state.next_seq;
        assert_eq!(
            first_seq,
            self.shared.last_assigned_seq.load(Ordering::Acquire) + 1
        );
        // Published before the send so the writer never sees a durable seq
        // above the last assigned one.
        state.next_seq = first_seq + records as u64;
        self.shared
            .last_assigned_seq
            .store(state.next_seq - 1, Ordering::Release);
        let Some(sender) = state.sender.as_ref() else {
            unreachable!("checked above under the same lock");
        };
        if sender
            .send(Batch {
                first_seq,
                payloads,
            })
            .is_err()
        {
            // The writer thread has exited, which it only does on failure
            // while a sender exists. The seqs are burnt; the log is unusable.
            return Err(self.shared.failed_error());
        }
        Ok(first_seq)
    }

    /// Highest seq acknowledged as durable under the fsync policy (Always:
    /// fsynced; Interval/Never: handed to the OS). Reads never go beyond it.
    pub fn durable_seq(&self) -> Seq {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    pub fn last_assigned_seq(&self) -> Seq {
        self.shared.last_assigned_seq.load(Ordering::Acquire)
    }

    /// Oldest seq still readable.
    pub fn first_seq(&self) -> Seq {
        self.shared.first_seq.load(Ordering::Acquire)
    }

    /// A receiver of the durable seq. Use `rx.wait_for(|d| *d >= seq)`; it
    /// returns `Err` once the log has failed or closed without reaching `seq`.
    pub fn watch_durable(&self) -> watch::Receiver<Seq> {
        self.shared.watch_receiver.clone()
    }

    /// Blocks until `seq` is durable. Errors if the writer failed, the log
    /// closed first, or `seq` was never assigned (it would wait forever).
    pub fn wait_durable(&self, seq: Seq) -> Result<(), LogError> {
        let last_assigned = self.last_assigned_seq();
        if seq > last_assigned {
            return Err(LogError::Unassigned {
                requested: seq,
                last_assigned,
            });
        }
        let mut status = self.shared.status.lock();
        loop {
            if self.durable_seq() >= seq {
                return Ok(());
            }
            if let Some(reason) = &status.failed {
                return Err(LogError::Failed(reason.clone()));
            }
            if status.closed {
                return Err(LogError::Closed);
            }
            self.shared.durable_changed.wait(&mut status);
        }
    }

    /// Records with seq >= `from`, in order: at most `max_records`, about
    /// `max_bytes` of payload (at least one record if any is available), never
    /// beyond the durable seq. `from` below the first seq is `Compacted`;
    /// above the durable seq, an empty vec.
    pub fn read_from(
        &self,
        from: Seq,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Seq, Vec<u8>)>, LogError> {
        let limits = ReadLimits {
            durable_seq: self.durable_seq(),
            max_records,
            max_bytes,
            payload_bytes_limit: self.shared.config.record_size_bytes_limit as usize,
        };
        let first_available = self.first_seq();
        if from < first_available {
            return Err(LogError::Compacted {
                requested: from,
                first_available,
            });
        }
        if from > limits.durable_seq || max_records == 0 {
            return Ok(Vec::new());
        }
        if let Some(out) =
            self.shared
                .recent
                .lock()
                .read(from, limits.durable_seq, max_records, max_bytes)
        {
            debug_assert!(out.first().is_some_and(|(s, _)| *s == from));
            return Ok(out);
        }
        let mut out = Vec::new();
        let mut bytes_total = 0usize;
        let mut next = from;
        let mut previous_end: Option<(Arc<Segment>, u64)> = None;
        loop {
            let segment = {
                let segments = self.shared.segments.read();
                let after = segments.partition_point(|s| s.first_seq <= next);
                after.checked_sub(1).map(|i| Arc::clone(&segments[i]))
            };
            let Some(segment) = segment else {
                return self.compacted_or_partial(from, out);
            };
            if let Some((previous, end_offset)) = previous_end.take() {
                if segment.first_seq != next {
                    return Err(LogError::corrupt(
                        &previous.path,
                        end_offset,
                        format!(
                            "the segment ends before seq {next}, but the next segment starts at seq {}",
                            segment.first_seq
                        ),
                    ));
                }
            }
            match segment.read_into(next, &limits, &mut out, &mut bytes_total) {
                Ok(ReadEnd::Limit) => return Ok(out),
                Ok(ReadEnd::EndOfSegment { next_seq, offset }) => {
                    assert!(next_seq > limits.durable_seq || next_seq >= next);
                    if next_seq > limits.durable_seq {
                        return Ok(out);
                    }
                    next = next_seq;
                    previous_end = Some((segment, offset));
                }
                Err(ReadError::Gone) => return self.compacted_or_partial(from, out),
                Err(ReadError::Log(error)) => return Err(error),
            }
        }
    }

    /// Like [`FileLog::read_from`], but only from the in-memory ring of the newest records:
    /// `None` when `from` is not there (older, or the ring is off), so the caller can read the
    /// files off its async threads. Never blocks on I/O.
    pub fn read_recent(
        &self,
        from: Seq,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Vec<(Seq, Vec<u8>)>> {
        let durable_seq = self.durable_seq();
        if from < self.first_seq() {
            return None;
        }
        if from > durable_seq || max_records == 0 {
            return Some(Vec::new());
        }
        self.shared
            .recent
            .lock()
            .read(from, durable_seq, max_records, max_bytes)
    }

    /// A reader raced a retention delete: what it already read is valid;
    /// with nothing read, the start is gone.
    fn compacted_or_partial(
        &self,
        from: Seq,
        out: Vec<(Seq, Vec<u8>)>,
    ) -> Result<Vec<(Seq, Vec<u8>)>, LogError> {
        if !out.is_empty() {
            return Ok(out);
        }
        Err(LogError::Compacted {
            requested: from,
            first_available: self.first_seq(),
        })
    }

    /// Deletes the oldest whole segments whose records all have seq below
    /// `covered_below` and that are outside `retention`; stops at the first
    /// segment that must stay, and never deletes the active segment. Returns
    /// how many were deleted.
    pub fn truncate_before(
        &self,
        covered_below: Seq,
        retention: &Retention,
    ) -> Result<usize, LogError> {
        self.truncate_before_held(covered_below, retention, None)
    }

    /// As [`FileLog::truncate_before`], but a segment holding any record at or after
    /// `hold.0` (the oldest seq a durable reader still needs) is also kept — unless it is
    /// outside `hold.1`, the most history readers may hold back (then the reader loses those
    /// records and must report it).
    pub fn truncate_before_held(
        &self,
        covered_below: Seq,
        retention: &Retention,
        hold: Option<(Seq, &Retention)>,
    ) -> Result<usize, LogError> {
        let _serialized = self.truncate_lock.lock();
        let durable_seq = self.durable_seq();
        let snapshot: Vec<Arc<Segment>> = self.shared.segments.read().iter().cloned().collect();
        if snapshot.len() < 2 {
            return Ok(0);
        }
        let sizes: Vec<u64> = snapshot.iter().map(|s| s.size_bytes()).collect();
        let now = SystemTime::now();
        let mut delete_count = 0;
        for i in 0..snapshot.len() - 1 {
            let last_seq = snapshot[i + 1].first_seq - 1;
            let covered = last_seq < covered_below && last_seq <= durable_seq;
            if !covered {
                break;
            }
            let bytes_from_newest: u64 = sizes[i..].iter().sum();
            let age = || -> Result<Duration, LogError> {
                let path = &snapshot[i].path;
                let modified = std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .map_err(|e| LogError::io(path, e))?;
                Ok(now.duration_since(modified).unwrap_or_default())
            };
            let outside = |r: &Retention| -> Result<bool, LogError> {
                let beyond_bytes = r.max_bytes.is_some_and(|max| bytes_from_newest > max);
                let too_old = match r.max_age {
                    None => false,
                    Some(max_age) => age()? >= max_age,
                };
                Ok(beyond_bytes || too_old)
            };
            if !outside(retention)? {
                break;
            }
            if let Some((needed, limit)) = hold {
                // A durable reader has not read this segment's newest records yet.
                if last_seq >= needed && !outside(limit)? {
                    break;
                }
            }
            delete_count += 1;
        }
        if delete_count == 0 {
            return Ok(0);
        }
        let deleted: Vec<Arc<Segment>> = {
            let mut segments = self.shared.segments.write();
            assert!(segments.len() > delete_count, "the active segment stays");
            assert!(
                Arc::ptr_eq(&segments[0], &snapshot[0]),
                "only this call removes segments"
            );
            let deleted: Vec<_> = segments.drain(..delete_count).collect();
            self.shared
                .first_seq
                .store(segments[0].first_seq, Ordering::Release);
            deleted
        };
        // Oldest first, so a crash part way leaves a contiguous log.
        for segment in &deleted {
            std::fs::remove_file(&segment.path).map_err(|e| LogError::io(&segment.path, e))?;
            tracing::info!(file = %segment.path.display(), "deleted a segment outside retention");
        }
        crate::atomic::fsync_dir(&self.shared.config.dir)?;
        Ok(delete_count)
    }

    /// Bytes of all segment files, headers included.
    /// Makes every record up to `seq` durable on disk whatever the fsync policy: waits until
    /// the writer has handed it to the OS, then fsyncs the segment holding it (fsync acts on
    /// the file, through any descriptor). Segments before the active one were fsynced when
    /// they were sealed. Used before writing a snapshot, which must never cover a record that
    /// a power loss could still take back.
    pub fn sync_through(&self, seq: Seq) -> Result<(), LogError> {
        self.wait_durable(seq)?;
        if self.shared.config.fsync == FsyncPolicy::Always {
            return Ok(());
        }
        let segment = {
            let segments = self.shared.segments.read();
            let after = segments.partition_point(|s| s.first_seq <= seq);
            after.checked_sub(1).map(|i| Arc::clone(&segments[i]))
        };
        if let Some(segment) = segment {
            let file =
                std::fs::File::open(&segment.path).map_err(|e| LogError::io(&segment.path, e))?;
            file.sync_data()
                .map_err(|e| LogError::io(&segment.path, e))?;
            self.shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn size_bytes(&self) -> u64 {
        self.shared
            .segments
            .read()
            .iter()
            .map(|s| s.size_bytes())
            .sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.segments.read().len()
    }

    pub fn stats(&self) -> LogStats {
        let counters = &self.shared.stats;
        LogStats {
            fsyncs: counters.fsyncs.load(Ordering::Relaxed),
            appended_records: counters.appended_records.load(Ordering::Relaxed),
            written_bytes: counters.written_bytes.load(Ordering::Relaxed),
            groups: counters.groups.load(Ordering::Relaxed),
        }
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Writes and fsyncs everything queued, then stops the writer thread.
    /// Idempotent; also runs on drop. Reads keep working afterwards.
    pub fn close(&self) -> Result<(), LogError> {
        let thread = {
            let mut state = self.append_state.lock();
            state.sender.take();
            self.writer_thread.lock().take()
        };
        if let Some(thread) = thread {
            if thread.join().is_err() {
                self.shared.fail("the writer thread panicked".to_string());
            }
        }
        {
            let mut status = self.shared.status.lock();
            status.closed = true;
        }
        self.shared.durable_changed.notify_all();
        self.shared.watch_sender.lock().take();
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(self.shared.failed_error());
        }
        assert_eq!(
            self.durable_seq(),
            self.last_assigned_seq(),
            "close drains the queue"
        );
        Ok(())
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            tracing::error!(%error, "closing the log failed");
        }
    }
}

//! One durable consumer group: its config, its state machine and its file.
//!
//! A consumer walks the log in seq order (`scan_pos`: every seq at or below it has been
//! considered) and keeps each matching event *pending* until a worker acks it. `lease` hands
//! pending events that are due to one caller and makes them invisible to every other caller
//! for `ack_wait_ms`; an unacked lease simply falls due again (redelivery); an event already
//! delivered `max_deliver` times is moved to the bounded *parked* list instead. The whole
//! state is one JSON file, `<data_dir>/consumers/<name>.json`, replaced atomically (temp
//! file, fsync, rename, fsync dir); concurrent callers that need it on disk share one write
//! (group commit: whoever takes the write lock writes the newest state for everyone).
//!
//! It must never hand one seq to two callers while a lease on it is live, never forget an ack
//! that was answered (callers persist before they reply, and a persisted ack is never
//! redelivered after a restart), never grow past [`crate::limits`], and never skip an event
//! without counting it (retention that deletes events first is reported in
//! `expired_unread`/`expired_pending` and `last_error`). Why: "acked" must mean done forever,
//! and at-least-once must mean at least once.

use crate::error::ConsumerError;
use crate::limits::*;
use crate::near::NearSpec;
use quiver_log::{write_atomic, Seq};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The version tag of a consumer file.
pub const FILE_FORMAT: &str = "quiver-consumer/1";

/// What a consumer wants and how it redelivers. Immutable once created.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsumerConfig {
    pub name: String,
    /// Type patterns (globs like `document.*`); empty means every type.
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default)]
    pub library_id: Option<String>,
    #[serde(default)]
    pub near: Option<NearSpec>,
    pub ack_wait_ms: u64,
    pub max_deliver: u32,
    /// The first seq this consumer considers.
    pub start_seq: Seq,
    pub created_at_ms: u64,
}

impl ConsumerConfig {
    /// Checks the name and the numbers against the limits.
    pub fn validate(&self) -> Result<(), ConsumerError> {
        validate_name(&self.name)?;
        if !(ACK_WAIT_MS_MIN..=ACK_WAIT_MS_LIMIT).contains(&self.ack_wait_ms) {
            return Err(ConsumerError::invalid(
                "invalid_ack_wait_ms",
                format!(
                    "ack_wait_ms must be between {ACK_WAIT_MS_MIN} and {ACK_WAIT_MS_LIMIT}, got {}",
                    self.ack_wait_ms
                ),
            ));
        }
        if self.max_deliver == 0 || self.max_deliver > MAX_DELIVER_LIMIT {
            return Err(ConsumerError::invalid(
                "invalid_max_deliver",
                format!(
                    "max_deliver must be between 1 and {MAX_DELIVER_LIMIT}, got {}",
                    self.max_deliver
                ),
            ));
        }
        if self.start_seq == 0 {
            return Err(ConsumerError::invalid(
                "invalid_start",
                "start seq must be at least 1 (seqs start at 1)",
            ));
        }
        Ok(())
    }
}

/// Names are file names: 1 to [`NAME_BYTES_LIMIT`] bytes of `[A-Za-z0-9_.-]`, not starting
/// with `.` (temp files do).
pub fn validate_name(name: &str) -> Result<(), ConsumerError> {
    if name.is_empty() || name.len() > NAME_BYTES_LIMIT {
        return Err(ConsumerError::invalid(
            "invalid_name",
            format!(
                "a consumer name must be 1 to {NAME_BYTES_LIMIT} bytes, got {}",
                name.len()
            ),
        ));
    }
    if name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(ConsumerError::invalid(
            "invalid_name",
            format!(
                "consumer name {name:?} may only use letters, digits, '_', '-' and '.' (not first)"
            ),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PendingEntry {
    /// Times this event was handed out.
    deliveries: u32,
    /// Not deliverable before this wall-clock time: the end of a live lease, or of a nack
    /// delay. 0: deliverable now.
    not_before_ms: u64,
    /// Handed out and neither acked nor nacked since.
    leased: bool,
}

/// An event that reached `max_deliver` without an ack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParkedEntry {
    pub deliveries: u32,
    pub parked_at_ms: u64,
}

/// Lifetime counters of a consumer (persisted with it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub nacked: u64,
    pub parked: u64,
    /// Seqs retention deleted before this consumer read them.
    pub expired_unread: u64,
    /// Pending events retention deleted before they were acked.
    pub expired_pending: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct State {
    scan_pos: Seq,
    pending: BTreeMap<Seq, PendingEntry>,
    parked: BTreeMap<Seq, ParkedEntry>,
    counters: Counters,
    #[serde(default)]
    last_error: Option<String>,
    /// Bumped by every change; not persisted.
    #[serde(skip)]
    version: u64,
}

#[derive(Serialize, Deserialize)]
struct FileImage {
    format: String,
    config: ConsumerConfig,
    state: State,
}

struct PersistState {
    persisted_version: u64,
    deleted: bool,
}

/// One event handed to a caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub seq: Seq,
    /// This delivery's number (1 for the first).
    pub deliveries: u32,
}

/// Which seqs of an ack or nack took effect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AckOutcome {
    /// Seqs that were pending (or parked, for an ack) and now are not.
    pub done: Vec<Seq>,
    /// Seqs that were not outstanding: already acked, never delivered, or never matched.
    pub not_pending: Vec<Seq>,
}

/// A consumer as inspection shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub filter: serde_json::Value,
    pub start_seq: Seq,
    pub ack_wait_ms: u64,
    pub max_deliver: u32,
    pub created_at_ms: u64,
    /// Every matching event at or below it is acked (or parked).
    pub ack_floor: Seq,
    /// The next seq this consumer reads from the log.
    pub next_seq: Seq,
    pub last_seq: Seq,
    /// `last_seq − ack_floor`.
    pub lag: u64,
    /// Events read but not yet acked (leased, waiting or held).
    pub pending: usize,
    /// Pending events whose lease is live right now.
    pub leased: usize,
    pub parked: usize,
    pub parked_full: bool,
    pub pending_full: bool,
    pub counters: Counters,
    pub last_error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One consumer group, shared by every request that uses it.
pub struct Consumer {
    config: ConsumerConfig,
    path: PathBuf,
    state: Mutex<State>,
    persist: Mutex<PersistState>,
    notify: tokio::sync::Notify,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.config.name)
            .finish()
    }
}

impl Consumer {
    /// A new consumer at `start_seq`, written to `path` before it is returned.
    pub fn create(path: PathBuf, config: ConsumerConfig) -> Result<Consumer, ConsumerError> {
        config.validate()?;
        let state = State {
            scan_pos: config.start_seq - 1,
            ..State::default()
        };
        let consumer = Consumer {
            config,
            path,
            state: Mutex::new(state),
            persist: Mutex::new(PersistState {
                persisted_version: 0,
                deleted: false,
            }),
            notify: tokio::sync::Notify::new(),
        };
        consumer.write_file(&lock(&consumer.state).clone())?;
        Ok(consumer)
    }

    /// Loads a consumer file.
    pub fn load(path: &Path) -> Result<Consumer, ConsumerError> {
        let meta = std::fs::metadata(path).map_err(|e| ConsumerError::io(path, e))?;
        if meta.len() > STATE_FILE_BYTES_LIMIT {
            return Err(ConsumerError::Unreadable {
                name: path.display().to_string(),
                detail: format!(
                    "the file is {} bytes; the limit is {STATE_FILE_BYTES_LIMIT}",
                    meta.len()
                ),
            });
        }
        let bytes = std::fs::read(path).map_err(|e| ConsumerError::io(path, e))?;
        let image: FileImage =
            serde_json::from_slice(&bytes).map_err(|e| ConsumerError::Unreadable {
                name: path.display().to_string(),
                detail: e.to_string(),
            })?;
        if image.format != FILE_FORMAT {
            return Err(ConsumerError::Unreadable {
                name: path.display().to_string(),
                detail: format!("format {:?} is not {FILE_FORMAT:?}", image.format),
            });
        }
        image.config.validate()?;
        Ok(Consumer {
            config: image.config,
            path: path.to_path_buf(),
            state: Mutex::new(image.state),
            persist: Mutex::new(PersistState {
                persisted_version: 0,
                deleted: false,
            }),
            notify: tokio::sync::Notify::new(),
        })
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Wakes long-polls waiting on this consumer (an ack made room, a nack or retry made an
    /// event due).
    pub fn notify(&self) {
        self.notify.notify_waiters();
    }

    /// A future that completes at the next [`Consumer::notify`]; enable it before checking.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Every seq at or below this has been considered.
    pub fn scan_position(&self) -> Seq {
        lock(&self.state).scan_pos
    }

    /// How many more events may become pending before the consumer holds back.
    pub fn room(&self) -> usize {
        PENDING_LIMIT.saturating_sub(lock(&self.state).pending.len())
    }

    /// Records what a read of the log found: `matched` (ascending) are the seqs that pass the
    /// filter among those read, up to and including `end_seq`. Seqs at or below the scan
    /// position are ignored (a concurrent caller offered them first). If the pending list
    /// fills, the scan position stops just before the first seq that did not fit.
    pub fn offer(&self, matched: &[Seq], end_seq: Seq) {
        let mut st = lock(&self.state);
        let mut new_pos = end_seq.max(st.scan_pos);
        for &seq in matched {
            if seq <= st.scan_pos {
                continue;
            }
            if st.pending.len() >= PENDING_LIMIT {
                new_pos = seq - 1;
                break;
            }
            st.pending.insert(
                seq,
                PendingEntry {
                    deliveries: 0,
                    not_before_ms: 0,
                    leased: false,
                },
            );
        }
        if new_pos > st.scan_pos {
            st.scan_pos = new_pos;
            st.version += 1;
        }
    }

    /// Retention deleted the log before `first_seq`: seqs this consumer never read are counted
    /// and passed, with an error that says so.
    pub fn skip_expired(&self, first_seq: Seq) {
        let mut st = lock(&self.state);
        if st.scan_pos + 1 >= first_seq {
            return;
        }
        let lost = first_seq - 1 - st.scan_pos;
        st.counters.expired_unread += lost;
        st.last_error = Some(format!(
            "retention deleted {lost} events (seqs {}..={}) before this consumer read them",
            st.scan_pos + 1,
            first_seq - 1
        ));
        st.scan_pos = first_seq - 1;
        st.version += 1;
    }

    /// Pending events whose records retention deleted before they were acked: counted,
    /// dropped from pending, and reported.
    pub fn expire_pending(&self, seqs: &[Seq]) {
        if seqs.is_empty() {
            return;
        }
        let mut st = lock(&self.state);
        let mut n = 0;
        for seq in seqs {
            if st.pending.remove(seq).is_some() {
                n += 1;
            }
        }
        st.counters.expired_pending += n;
        st.last_error = Some(format!(
            "retention deleted {n} pending events before they were acked (first: seq {})",
            seqs[0]
        ));
        st.version += 1;
    }

    /// Leases up to `max` due events, oldest first, each to this caller alone until
    /// `now_ms + ack_wait_ms`. A due event already delivered `max_deliver` times is parked
    /// instead (or held, if the parked list is full).
    pub fn lease(&self, max: usize, now_ms: u64) -> Vec<Lease> {
        let mut st = lock(&self.state);
        let mut out = Vec::new();
        let mut to_park = Vec::new();
        let parked_room = PARKED_LIMIT.saturating_sub(st.parked.len());
        for (&seq, entry) in st.pending.iter_mut() {
            if out.len() >= max {
                break;
            }
            if entry.not_before_ms > now_ms {
                continue;
            }
            if entry.deliveries >= self.config.max_deliver {
                if to_park.len() < parked_room {
                    to_park.push((seq, entry.deliveries));
                }
                continue;
            }
            entry.deliveries += 1;
            entry.leased = true;
            entry.not_before_ms = now_ms + self.config.ack_wait_ms;
            out.push(Lease {
                seq,
                deliveries: entry.deliveries,
            });
        }
        for &(seq, deliveries) in &to_park {
            st.pending.remove(&seq);
            st.parked.insert(
                seq,
                ParkedEntry {
                    deliveries,
                    parked_at_ms: now_ms,
                },
            );
        }
        st.counters.parked += to_park.len() as u64;
        st.counters.delivered += out.len() as u64;
        st.counters.redelivered += out.iter().filter(|l| l.deliveries > 1).count() as u64;
        if !out.is_empty() || !to_park.is_empty() {
            st.version += 1;
        }
        out
    }

    /// The earliest time after `now_ms` at which a pending event falls due, if any.
    pub fn next_due_ms(&self, now_ms: u64) -> Option<u64> {
        lock(&self.state)
            .pending
            .values()
            .map(|e| e.not_before_ms)
            .filter(|&t| t > now_ms)
            .min()
    }

    /// Acks `seqs`: each delivered pending (or parked) seq is done for good once persisted.
    pub fn ack(&self, seqs: &[Seq]) -> AckOutcome {
        let mut st = lock(&self.state);
        let mut out = AckOutcome::default();
        for &seq in seqs {
            let delivered = st.pending.get(&seq).is_some_and(|e| e.deliveries > 0);
            if delivered {
                st.pending.remove(&seq);
                out.done.push(seq);
            } else if st.parked.remove(&seq).is_some() {
                out.done.push(seq);
            } else {
                out.not_pending.push(seq);
            }
        }
        if !out.done.is_empty() {
            st.counters.acked += out.done.len() as u64;
            st.version += 1;
        }
        drop(st);
        if !out.done.is_empty() {
            self.notify();
        }
        out
    }

    /// Nacks `seqs`: each leased seq is released, due again after `delay_ms`.
    pub fn nack(&self, seqs: &[Seq], delay_ms: u64, now_ms: u64) -> AckOutcome {
        let mut st = lock(&self.state);
        let mut out = AckOutcome::default();
        for &seq in seqs {
            match st.pending.get_mut(&seq) {
                Some(e) if e.leased => {
                    e.leased = false;
                    e.not_before_ms = now_ms + delay_ms;
                    out.done.push(seq);
                }
                _ => out.not_pending.push(seq),
            }
        }
        if !out.done.is_empty() {
            st.counters.nacked += out.done.len() as u64;
            st.version += 1;
        }
        drop(st);
        if !out.done.is_empty() {
            self.notify();
        }
        out
    }

    /// Up to `limit` parked events from `after` (exclusive), oldest first.
    pub fn parked(&self, after: Seq, limit: usize) -> Vec<(Seq, ParkedEntry)> {
        lock(&self.state)
            .parked
            .range(after.saturating_add(1)..)
            .take(limit)
            .map(|(s, e)| (*s, e.clone()))
            .collect()
    }

    /// Moves a parked event back to pending with a fresh delivery count.
    pub fn retry_parked(&self, seq: Seq) -> Result<(), ConsumerError> {
        let mut st = lock(&self.state);
        if st.parked.remove(&seq).is_none() {
            return Err(ConsumerError::NotParked {
                name: self.config.name.clone(),
                seq,
            });
        }
        st.pending.insert(
            seq,
            PendingEntry {
                deliveries: 0,
                not_before_ms: 0,
                leased: false,
            },
        );
        st.version += 1;
        drop(st);
        self.notify();
        Ok(())
    }

    /// The filter as statistics show it.
    pub fn filter_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "types": c.types,
            "library_id": c.library_id,
            "near": c.near.as_ref().map(|n| serde_json::json!({
                "dimension": n.embedding.len(),
                "max_distance": n.max_distance,
                "metric": n.metric.as_str(),
                "query": n.query,
                "filter": n.filter,
            })),
        })
    }

    /// The oldest seq this consumer still needs from the log: the next to scan, a pending
    /// (unacked) one, or a parked one (which may be retried). Log retention keeps it.
    pub fn oldest_needed(&self) -> Seq {
        let st = lock(&self.state);
        let mut oldest = st.scan_pos + 1;
        if let Some(s) = st.pending.keys().next() {
            oldest = oldest.min(*s);
        }
        if let Some(s) = st.parked.keys().next() {
            oldest = oldest.min(*s);
        }
        oldest
    }

    pub fn info(&self, last_seq: Seq, now_ms: u64) -> ConsumerInfo {
        let st = lock(&self.state);
        let ack_floor = st
            .pending
            .keys()
            .next()
            .map_or(st.scan_pos, |s| s.saturating_sub(1));
        ConsumerInfo {
            name: self.config.name.clone(),
            filter: self.filter_json(),
            start_seq: self.config.start_seq,
            ack_wait_ms: self.config.ack_wait_ms,
            max_deliver: self.config.max_deliver,
            created_at_ms: self.config.created_at_ms,
            ack_floor,
            next_seq: st.scan_pos + 1,
            last_seq,
            lag: last_seq.saturating_sub(ack_floor),
            pending: st.pending.len(),
            leased: st
                .pending
                .values()
                .filter(|e| e.leased && e.not_before_ms > now_ms)
                .count(),
            parked: st.parked.len(),
            parked_full: st.parked.len() >= PARKED_LIMIT,
            pending_full: st.pending.len() >= PENDING_LIMIT,
            counters: st.counters.clone(),
            last_error: st.last_error.clone(),
        }
    }

    /// Makes the current state durable. Concurrent callers share writes: a caller whose
    /// changes a newer write already covered returns at once.
    pub fn persist(&self) -> Result<(), ConsumerError> {
        let mut p = lock(&self.persist);
        if p.deleted {
            return Err(ConsumerError::NotFound(self.config.name.clone()));
        }
        let snapshot = {
            let st = lock(&self.state);
            if st.version <= p.persisted_version {
                return Ok(());
            }
            st.clone()
        };
        self.write_file(&snapshot)?;
        p.persisted_version = snapshot.version;
        Ok(())
    }

    fn write_file(&self, state: &State) -> Result<(), ConsumerError> {
        #[derive(Serialize)]
        struct ImageRef<'a> {
            format: &'a str,
            config: &'a ConsumerConfig,
            state: &'a State,
        }
        let bytes = serde_json::to_vec(&ImageRef {
            format: FILE_FORMAT,
            config: &self.config,
            state,
        })
        .map_err(|e| ConsumerError::io(&self.path, std::io::Error::other(e)))?;
        write_atomic(&self.path, |w| w.write_all(&bytes))?;
        Ok(())
    }

    /// Deletes the file; later persists fail with `NotFound`.
    pub(crate) fn delete_file(&self) -> Result<(), ConsumerError> {
        let mut p = lock(&self.persist);
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ConsumerError::io(&self.path, e)),
        }
        p.deleted = true;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        drop(p);
        self.notify();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> ConsumerConfig {
        ConsumerConfig {
            name: name.into(),
            types: vec![],
            library_id: None,
            near: None,
            ack_wait_ms: 1000,
            max_deliver: 2,
            start_seq: 1,
            created_at_ms: 0,
        }
    }

    #[test]
    fn lease_ack_redeliver_park_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let c = Consumer::create(path.clone(), config("c")).unwrap();
        c.offer(&[2, 4, 6], 7);
        assert_eq!(c.scan_position(), 7);
        let a = c.lease(2, 100);
        assert_eq!(a.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![2, 4]);
        let b = c.lease(10, 100);
        assert_eq!(b.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![6]);
        assert!(c.lease(10, 100).is_empty(), "live leases are exclusive");
        assert_eq!(c.ack(&[2, 99]).not_pending, vec![99]);
        // Lease of 4 and 6 expires: redelivered, second delivery.
        let r = c.lease(10, 1200);
        assert_eq!(
            r,
            vec![
                Lease {
                    seq: 4,
                    deliveries: 2
                },
                Lease {
                    seq: 6,
                    deliveries: 2
                }
            ]
        );
        c.ack(&[6]);
        // 4 expires again with max_deliver = 2: parked.
        assert!(c.lease(10, 2300).is_empty());
        assert_eq!(c.parked(0, 10).len(), 1);
        c.persist().unwrap();
        let info = c.info(7, 2300);
        assert_eq!((info.ack_floor, info.pending, info.parked), (7, 0, 1));
        let re = Consumer::load(&path).unwrap();
        assert_eq!(re.parked(0, 10)[0].0, 4);
        re.retry_parked(4).unwrap();
        assert_eq!(
            re.lease(10, 2400),
            vec![Lease {
                seq: 4,
                deliveries: 1
            }]
        );
        assert!(re.retry_parked(4).is_err());
    }

    #[test]
    fn pending_limit_holds_back_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let c = Consumer::create(dir.path().join("c.json"), config("c")).unwrap();
        let seqs: Vec<Seq> = (1..=(PENDING_LIMIT as Seq + 10)).collect();
        c.offer(&seqs, *seqs.last().unwrap());
        assert_eq!(c.scan_position(), PENDING_LIMIT as Seq);
        assert_eq!(c.room(), 0);
    }

    #[test]
    fn retention_overtaking_a_consumer_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let c = Consumer::create(dir.path().join("c.json"), config("c")).unwrap();
        c.offer(&[3], 3);
        c.skip_expired(11);
        c.expire_pending(&[3]);
        let info = c.info(20, 0);
        assert_eq!(info.counters.expired_unread, 7, "seqs 4..=10 never read");
        assert_eq!(info.counters.expired_pending, 1);
        assert_eq!((info.next_seq, info.pending), (11, 0));
        assert!(info.last_error.unwrap().contains("retention"));
    }

    #[test]
    fn names() {
        assert!(validate_name("orders-1.v2_x").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}

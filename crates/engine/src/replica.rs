//! Being one replica of a log kept in NATS JetStream (DESIGN principle 5).
//!
//! With [`crate::EngineConfig::jetstream`] set, the stream is the log of record and the
//! engine's [`quiver_log::FileLog`] is this replica's copy of it. A commit is published to the
//! stream on condition that nobody wrote since this replica last folded
//! (`Nats-Expected-Last-Sequence`), then appended to the local log and applied, exactly as in
//! the embedded mode; messages other replicas published are folded (appended locally and
//! applied) by a follower thread in stream order. Every replica therefore holds the same
//! records under the same `seq`s, and everything that reads the log (event streams, consumer
//! groups, webhooks, restarts) reads local disk.
//!
//! This module owns the replica's position in the stream: finding it at start-up from the
//! local log (the stream message that holds the last local record, checked byte for byte),
//! and the follower thread. The fold itself is the engine's ([`crate::Engine`]), under its
//! write lock, so a fold and a commit never interleave.
//!
//! It must never fold a message twice or skip one (records are folded only when their first
//! `seq` is exactly the next one; a stream that lost records stops the replica with an error
//! that says which), and never start a replica whose local records differ from the stream's.

use crate::error::{EngineError, Result};
use quiver_log::{Envelope, FileLog, JetStreamLog, Seq};

/// The file in a data directory that names its replica.
const REPLICA_ID_FILE: &str = "replica_id";

/// This data directory's replica id: read from `<data_dir>/replica_id`, or made (a random
/// UUID, written atomically) on its first start as a replica. A copied data directory keeps
/// the id: give a copy a new one by deleting the file before its first start.
pub(crate) fn replica_id(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join(REPLICA_ID_FILE);
    let io = |e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(EngineError::Corrupt(format!(
                    "{} does not hold a replica id (1..=64 printable characters)",
                    path.display()
                )));
            }
            Ok(id.to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().to_string();
            quiver_log::write_atomic(&path, |w| {
                use std::io::Write;
                w.write_all(id.as_bytes())
            })?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

/// How many missing messages in a row the position search steps over (messages an operator
/// deleted from the middle of the stream) before it gives up.
const DELETED_MESSAGES_SKIP_LIMIT: u64 = 64;

/// A replica's place in the stream at start-up.
pub(crate) struct Position {
    /// The last message whose records this replica holds in full: the next publish expects it
    /// to be the stream's last, and following starts after it.
    pub folded_msg_seq: u64,
    /// The message after it, when the local log holds only its first records (a crash between
    /// appending them locally): to be folded first; the fold skips what is held.
    pub partial: Option<Envelope>,
    /// The stream's last message when it was located: start-up folds up to it before serving.
    pub stream_last_msg_seq: u64,
}

/// Where a replica whose local log ends at `local_last_seq` stands in the stream. The stream
/// must hold every record after it; a replica ahead of the stream, or whose record
/// `local_last_seq` differs from the stream's, belongs to another stream and is refused.
pub(crate) fn locate(
    stream: &JetStreamLog,
    local: &FileLog,
    local_last_seq: Seq,
) -> Result<Position> {
    let located = locate_message(stream, local, local_last_seq)?;
    let (first_msg, last_msg) = stream.bounds()?;
    let stream_empty = last_msg == 0 || first_msg > last_msg;
    Ok(match located {
        // An empty replica folds from the stream's start (`locate_message` checked that the
        // start is there), or, if every message was removed, expects the stream's last.
        None => Position {
            folded_msg_seq: if stream_empty {
                last_msg
            } else {
                first_msg - 1
            },
            partial: None,
            stream_last_msg_seq: last_msg,
        },
        Some(e) if e.last_seq() == local_last_seq => Position {
            folded_msg_seq: e.msg_seq,
            partial: None,
            stream_last_msg_seq: last_msg,
        },
        Some(e) => Position {
            folded_msg_seq: e.msg_seq - 1,
            partial: Some(e),
            stream_last_msg_seq: last_msg,
        },
    })
}

/// The message holding record `local_last_seq` (`None` for an empty replica).
fn locate_message(
    stream: &JetStreamLog,
    local: &FileLog,
    local_last_seq: Seq,
) -> Result<Option<Envelope>> {
    let name = &stream.config().stream;
    let (first_msg, last_msg) = stream.bounds()?;
    let stream_empty = last_msg == 0 || first_msg > last_msg;
    if local_last_seq == 0 {
        if !stream_empty && first_msg > 1 {
            return Err(EngineError::Corrupt(format!(
                "JetStream stream {name:?} begins at message {first_msg}: its first records were removed, so a new replica cannot be built from it; start this replica from a copy of another replica's data directory"
            )));
        }
        return Ok(None);
    }
    if stream_empty {
        return Err(EngineError::Corrupt(format!(
            "this data directory holds records up to seq {local_last_seq} but JetStream stream {name:?} is empty: the data directory belongs to another log"
        )));
    }
    // Binary search for the message whose records include `local_last_seq`.
    let (mut lo, mut hi) = (first_msg, last_msg);
    let found = loop {
        if lo > hi {
            break None;
        }
        let mid = lo + (hi - lo) / 2;
        let Some(envelope) = get_near(stream, mid, hi)? else {
            // Nothing in mid..=hi: the answer, if any, is below mid.
            if mid == lo {
                break None;
            }
            hi = mid - 1;
            continue;
        };
        if envelope.last_seq() < local_last_seq {
            lo = envelope.msg_seq + 1;
        } else if envelope.first_seq > local_last_seq {
            if mid == lo {
                break Some(envelope); // the first message already starts after us: a gap
            }
            hi = mid - 1;
        } else {
            break Some(envelope);
        }
    };
    let Some(envelope) = found else {
        return Err(EngineError::Corrupt(format!(
            "this data directory holds records up to seq {local_last_seq} but JetStream stream {name:?} ends before it: the data directory belongs to another log"
        )));
    };
    if envelope.first_seq > local_last_seq {
        return Err(EngineError::Corrupt(format!(
            "JetStream stream {name:?} no longer holds the records after seq {local_last_seq} (its oldest message starts at seq {}): they were removed by the stream's limits; start this replica from a copy of a current replica's data directory",
            envelope.first_seq
        )));
    }
    // Same seq, same bytes: otherwise this replica's history is another log's.
    if let Ok(records) = local.read_from(local_last_seq, 1, usize::MAX) {
        if let Some((seq, payload)) = records.first() {
            let theirs = &envelope.payloads[(local_last_seq - envelope.first_seq) as usize];
            if *seq == local_last_seq && payload.as_slice() != theirs.as_slice() {
                return Err(EngineError::Corrupt(format!(
                    "record {local_last_seq} in this data directory differs from the one in JetStream stream {name:?} (message {}): the data directory belongs to another log",
                    envelope.msg_seq
                )));
            }
        }
    }
    Ok(Some(envelope))
}

/// The first message at or after `msg_seq` (up to `hi`), stepping over deleted ones.
fn get_near(stream: &JetStreamLog, msg_seq: u64, hi: u64) -> Result<Option<Envelope>> {
    let mut at = msg_seq;
    while at <= hi && at - msg_seq <= DELETED_MESSAGES_SKIP_LIMIT {
        if let Some(e) = stream.get(at)? {
            return Ok(Some(e));
        }
        at += 1;
    }
    if at <= hi {
        return Err(EngineError::Corrupt(format!(
            "JetStream stream {:?} has more than {DELETED_MESSAGES_SKIP_LIMIT} deleted messages in a row after message {msg_seq}",
            stream.config().stream
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    //! The conflict path, made deterministic: replica B stops folding (its follower's queue
    //! is taken away) while A writes, so B's next commit expects a stream position that has
    //! moved. While B cannot fold, its retries cannot succeed and it answers `write_conflict`;
    //! once it can, a retry validates again and commits after A's write. Needs `nats-server`
    //! (skips without it unless `QUIVER_REQUIRE_NATS` is set).
    use crate::{Engine, EngineConfig, EngineError, WriteCtx};
    use quiver_log::JetStreamConfig;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    struct Nats(Child);

    impl Drop for Nats {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn nats(dir: &std::path::Path) -> Option<(Nats, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            assert!(
                std::env::var_os("QUIVER_REQUIRE_NATS").is_none(),
                "nats-server is not installed and QUIVER_REQUIRE_NATS is set"
            );
            eprintln!("SKIPPED: nats-server is not installed");
            return None;
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some((Nats(child), format!("nats://127.0.0.1:{port}")))
    }

    fn replica(dir: &std::path::Path, url: &str) -> std::sync::Arc<Engine> {
        let mut config = EngineConfig::new(dir);
        config.jetstream = Some(JetStreamConfig::new(url, "conflict"));
        Engine::open(config).expect("open replica")
    }

    fn wait_for(engine: &Engine, seq: u64) {
        let started = Instant::now();
        while engine.applied_seq() < seq {
            assert!(started.elapsed() < Duration::from_secs(20), "replica stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stale_replica_gets_a_conflict_and_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some((_nats, url)) = nats(&tmp.path().join("nats")) else {
            return;
        };
        let a = replica(&tmp.path().join("a"), &url);
        let b = replica(&tmp.path().join("b"), &url);
        let ctx = WriteCtx::default();
        let first = a
            .append_event(&ctx, "app.one", None, serde_json::json!({"n": 1}))
            .expect("A writes");
        wait_for(&b, first.seq);

        // B stops folding; A writes again; B's view is now one message behind.
        let inbox = b.write_lock.lock().inbox.take();
        let second = a
            .append_event(&ctx, "app.two", None, serde_json::json!({"n": 2}))
            .expect("A writes again");
        let refused = b.append_event(&ctx, "app.stale", None, serde_json::json!({}));
        match refused {
            Err(EngineError::Conflict { code, .. }) => assert_eq!(code, "write_conflict"),
            other => panic!("expected a write_conflict, got {other:?}"),
        }
        assert_eq!(
            b.applied_seq(),
            first.seq,
            "the refused write applied nothing"
        );

        // B folds again: it catches up, and its next write lands after A's.
        b.write_lock.lock().inbox = inbox;
        wait_for(&b, second.seq);
        let third = b
            .append_event(&ctx, "app.three", None, serde_json::json!({"n": 3}))
            .expect("B writes once it has folded");
        assert_eq!(
            third.seq,
            second.seq + 1,
            "seqs stay gapless across replicas"
        );

        // A conflict the replica can resolve is retried inside: B stops folding, A writes, B
        // writes and starts folding again while its first attempt has been refused.
        let inbox = b.write_lock.lock().inbox.take();
        let fourth = a
            .append_event(&ctx, "app.four", None, serde_json::json!({"n": 4}))
            .expect("A writes");
        let restore = {
            let b = std::sync::Arc::clone(&b);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                b.write_lock.lock().inbox = inbox;
            })
        };
        let fifth = b
            .append_event(&ctx, "app.five", None, serde_json::json!({"n": 5}))
            .expect("B's write is retried after it folds A's");
        restore.join().expect("restore thread");
        assert_eq!(
            fifth.seq,
            fourth.seq + 1,
            "B's retry landed right after A's write"
        );
        let third = fifth;
        wait_for(&a, third.seq);
        // Both local logs hold the same records, byte for byte, and no refused one (reads
        // serve durable records only: wait for the fsync that follows the apply).
        let read = |e: &Engine| {
            e.log().wait_durable(third.seq).expect("durable");
            e.log().read_from(1, 100, usize::MAX).expect("read log")
        };
        let (la, lb) = (read(&a), read(&b));
        assert_eq!(la, lb);
        assert_eq!(la.len() as u64, third.seq);
        let stale = la
            .iter()
            .any(|(_, p)| String::from_utf8_lossy(p).contains("app.stale"));
        assert!(!stale, "the refused event is in no log");
        a.close().expect("close A");
        b.close().expect("close B");
    }
}

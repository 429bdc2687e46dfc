//! [`JetStreamLog`]: the log as a NATS JetStream stream, for deployments that outgrow one
//! machine (DESIGN principle 5). Every replica publishes its commits to one stream and folds
//! every message of it in stream order, so all replicas hold the same records under the same
//! `seq`s, and any of them can serve reads and streams.
//!
//! This module owns the wire side only: creating or checking the stream, the message format
//! (an [`Envelope`]: one commit's records with their `seq`s, CRC-framed by [`crate::frame`]),
//! conditional publishing, reading one message, and following the stream. The engine owns
//! what the records mean and when they are applied; each replica also keeps its own
//! [`crate::FileLog`] as a copy of the records it folded, so event streams, consumer groups
//! and restarts read local disk, never the network.
//!
//! Why one message per commit: a commit (a document and its chunks, a batch) must be all or
//! nothing. JetStream (2.9) has no atomic multi-message publish, but one message is atomic, and
//! publishing it with `Nats-Expected-Last-Sequence` makes the stream itself the serialiser: a
//! replica whose view is stale gets [`Published::Conflict`] and nothing is written. So `seq`s
//! stay gapless across replicas without any lock but the stream's.
//!
//! It must never return an envelope whose frames fail their checksums or whose `seq`s are not
//! contiguous (every field read from the network is validated, and errors are values), never
//! block an async runtime (calls run on its own runtime and are awaited from plain threads),
//! and never wait without a limit (every call has [`JetStreamConfig::request_timeout`]).

use crate::error::LogError;
use crate::frame::{self, DecodeResult};
use crate::Seq;
use async_nats::jetstream::{self, consumer, context, stream};
use futures::StreamExt;
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

/// First bytes of every message body: format and version.
const MAGIC: &[u8; 8] = b"QVJS\0\0\0\x01";
/// Magic plus the record count (u32 LE).
const HEADER_BYTES: usize = 12;
/// Most records one message may carry (a commit of this many records is refused before it is
/// published): bounds what decoding one message may allocate.
pub const ENVELOPE_RECORDS_LIMIT: usize = 1 << 20;
/// Messages the follower may hold for the engine before it stops reading the stream: at most
/// this many times the server's `max_payload` bytes (64 MiB at the default 1 MiB).
pub const FOLLOW_QUEUE_LIMIT: usize = 64;
/// Below this `max_payload` a batch of documents may not fit in one commit: warned at start.
const MESSAGE_BYTES_ADVISED: usize = 8 << 20;
/// Longest the follower waits before retrying a failed subscription.
const FOLLOW_RETRY_MS_MAX: u64 = 5_000;

/// Where the stream is and how to reach it.
#[derive(Clone, Debug)]
pub struct JetStreamConfig {
    /// NATS server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// Stream name (created if missing) and its one subject, `quiver.<stream>.log`.
    pub stream: String,
    /// Copies JetStream keeps of each message (1 on a single server, 3 in a cluster).
    pub replicas: usize,
    /// Longest any one call (connect, publish and its ack, a read) may take.
    pub request_timeout: Duration,
}

impl JetStreamConfig {
    pub fn new(url: impl Into<String>, stream: impl Into<String>) -> Self {
        JetStreamConfig {
            url: url.into(),
            stream: stream.into(),
            replicas: 1,
            request_timeout: Duration::from_secs(10),
        }
    }

    fn subject(&self) -> String {
        format!("quiver.{}.log", self.stream)
    }

    fn validate(&self) -> Result<(), LogError> {
        let name_ok = !self.stream.is_empty()
            && self.stream.len() <= 64
            && self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(LogError::InvalidConfig(format!(
                "JetStream stream name {:?} must be 1..=64 characters of A-Z, a-z, 0-9, '_' or '-'",
                self.stream
            )));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(LogError::InvalidConfig(format!(
                "JetStream replicas must be 1..=5, got {}",
                self.replicas
            )));
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(600) {
            return Err(LogError::InvalidConfig(
                "JetStream request timeout must be in (0 s, 600 s]".into(),
            ));
        }
        Ok(())
    }
}

/// One stream message: the records of one commit, `first_seq..first_seq + payloads.len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The message's stream sequence (its position in JetStream, not a record `seq`).
    pub msg_seq: u64,
    pub first_seq: Seq,
    pub payloads: Vec<Vec<u8>>,
}

impl Envelope {
    /// The last record `seq` this message carries.
    pub fn last_seq(&self) -> Seq {
        self.first_seq + self.payloads.len() as u64 - 1
    }
}

/// Outcome of a conditional publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// Stored at this stream sequence (always the expected one plus one).
    Stored(u64),
    /// The stream has moved past the expected sequence (another replica wrote): nothing was
    /// stored. Fold what is new and validate again.
    Conflict,
}

/// Encodes one commit's records as a message body.
pub fn encode_envelope(first_seq: Seq, payloads: &[Vec<u8>]) -> Vec<u8> {
    assert!(first_seq >= 1, "seqs start at 1");
    assert!(
        !payloads.is_empty() && payloads.len() <= ENVELOPE_RECORDS_LIMIT,
        "an envelope carries 1..=ENVELOPE_RECORDS_LIMIT records"
    );
    let size: usize = payloads.iter().map(|p| frame::HEADER_BYTES + p.len()).sum();
    let mut out = Vec::with_capacity(HEADER_BYTES + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payloads.len() as u32).to_le_bytes());
    for (i, p) in payloads.iter().enumerate() {
        frame::encode(first_seq + i as u64, p, &mut out);
    }
    debug_assert_eq!(out.len(), HEADER_BYTES + size);
    out
}

/// Decodes a message body read from stream sequence `msg_seq`. Never panics: the bytes came
/// from the network.
pub fn decode_envelope(msg_seq: u64, body: &[u8]) -> Result<Envelope, String> {
    if body.len() < HEADER_BYTES || &body[..8] != MAGIC {
        return Err(format!(
            "stream message {msg_seq} is not a Quiver record envelope (wrong magic or too short)"
        ));
    }
    let mut count_bytes = [0u8; 4];
    count_bytes.copy_from_slice(&body[8..HEADER_BYTES]);
    let count = u32::from_le_bytes(count_bytes) as usize;
    if count == 0 || count > ENVELOPE_RECORDS_LIMIT {
        return Err(format!(
            "stream message {msg_seq} claims {count} records (1..={ENVELOPE_RECORDS_LIMIT})"
        ));
    }
    // Each record costs at least a frame header: a count the body cannot hold is a lie.
    if count > (body.len() - HEADER_BYTES) / frame::HEADER_BYTES {
        return Err(format!(
            "stream message {msg_seq} claims {count} records in {} bytes",
            body.len()
        ));
    }
    let mut payloads = Vec::with_capacity(count);
    let mut first_seq = 0;
    let mut at = HEADER_BYTES;
    for i in 0..count {
        match frame::decode(&body[at..]) {
            DecodeResult::Ok {
                seq,
                payload,
                frame_len,
            } => {
                if i == 0 {
                    if seq == 0 {
                        return Err(format!("stream message {msg_seq} holds seq 0"));
                    }
                    first_seq = seq;
                } else if Some(seq) != first_seq.checked_add(i as u64) {
                    return Err(format!(
                        "stream message {msg_seq}: record {i} has seq {seq}, expected {}",
                        first_seq.saturating_add(i as u64)
                    ));
                }
                payloads.push(body[at + payload.start..at + payload.end].to_vec());
                at += frame_len;
            }
            DecodeResult::Incomplete { .. } => {
                return Err(format!("stream message {msg_seq} ends inside record {i}"))
            }
            DecodeResult::Bad(reason) => {
                return Err(format!("stream message {msg_seq}, record {i}: {reason}"))
            }
        }
    }
    if at != body.len() {
        return Err(format!(
            "stream message {msg_seq} has {} bytes after its {count} records",
            body.len() - at
        ));
    }
    Ok(Envelope {
        msg_seq,
        first_seq,
        payloads,
    })
}

/// A connection to the stream. Calls block the calling thread (never an async runtime's: they
/// run on this value's own runtime) for at most the configured request timeout.
pub struct JetStreamLog {
    /// `Some` until drop; shut down in the background so dropping never blocks a runtime.
    runtime: Option<tokio::runtime::Runtime>,
    context: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    config: JetStreamConfig,
    /// The server's `max_payload`: the largest message (so the largest commit) it accepts.
    message_bytes_limit: usize,
}

impl JetStreamLog {
    /// Connects and creates the stream if it does not exist (file storage, keep everything:
    /// retention is the operator's choice, and a replica refuses to start past a gap).
    pub fn connect(config: JetStreamConfig) -> Result<JetStreamLog, LogError> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("quiver-nats")
            .enable_all()
            .build()
            .map_err(|e| LogError::io("NATS runtime", e))?;
        let subject = config.subject();
        let timeout = config.request_timeout;
        let (url, name, replicas) = (config.url.clone(), config.stream.clone(), config.replicas);
        let subject_for_stream = subject.clone();
        let connected = call(runtime.handle(), timeout, async move {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(timeout)
                .request_timeout(Some(timeout))
                .name("quiver")
                .connect(url.as_str())
                .await
                .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))?;
            let context = jetstream::new(client.clone());
            let stream = context
                .get_or_create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject_for_stream.clone()],
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    retention: stream::RetentionPolicy::Limits,
                    discard: stream::DiscardPolicy::New,
                    allow_direct: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("cannot create or open JetStream stream {name:?}: {e}"))?;
            let subjects = &stream.cached_info().config.subjects;
            if !subjects.iter().any(|s| s == &subject_for_stream) {
                return Err(format!(
                    "JetStream stream {name:?} exists but does not hold subject {subject_for_stream:?} (it holds {subjects:?}): it is not a Quiver log"
                ));
            }
            let max_payload = client.server_info().max_payload;
            Ok((context, stream, max_payload))
        })
        .and_then(|r| r.map_err(unavailable));
        let (context, stream, max_payload) = match connected {
            Ok(c) => c,
            Err(e) => {
                // Never a blocking drop: this may run where a runtime is already current.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        if max_payload < MESSAGE_BYTES_ADVISED {
            tracing::warn!(
                max_payload,
                "the NATS server's max_payload is under 8 MiB: a commit (one document, or one group of a batch or NDJSON ingest) larger than it is refused with 413; raise max_payload in nats-server.conf (up to 64 MiB)"
            );
        }
        Ok(JetStreamLog {
            runtime: Some(runtime),
            context,
            stream,
            subject,
            config,
            message_bytes_limit: max_payload,
        })
    }

    pub fn config(&self) -> &JetStreamConfig {
        &self.config
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .handle()
    }

    /// Publishes one commit's records, `first_seq..`, on condition that the stream's last
    /// message is `expected_last_msg_seq` (what this replica has folded). Blocks until the
    /// stream acknowledges (the message is stored under the stream's replication) or refuses.
    pub fn publish(
        &self,
        expected_last_msg_seq: u64,
        first_seq: Seq,
        payloads: &[Vec<u8>],
    ) -> Result<Published, LogError> {
        if payloads.len() > ENVELOPE_RECORDS_LIMIT {
            return Err(LogError::InvalidConfig(format!(
                "a commit of {} records exceeds the {ENVELOPE_RECORDS_LIMIT} one message may carry",
                payloads.len()
            )));
        }
        let body = encode_envelope(first_seq, payloads);
        // Headers (the expected sequence) take well under 256 bytes.
        if body.len() + 256 > self.message_bytes_limit {
            return Err(LogError::MessageTooLarge {
                size_bytes: body.len(),
                limit_bytes: self.message_bytes_limit.saturating_sub(256),
            });
        }
        let context = self.context.clone();
        let subject = self.subject.clone();
        let outcome = call(self.handle(), self.config.request_timeout, async move {
            let publish = jetstream::message::PublishMessage::build()
                .payload(body.into())
                .expected_last_sequence(expected_last_msg_seq);
            let ack = context.send_publish(subject, publish).await?;
            ack.await
        })?;
        match outcome {
            Ok(ack) => {
                // The condition guarantees the position; check it anyway (TIGER_STYLE: assert
                // across the boundary), since a wrong one would fork this replica's seqs.
                if ack.sequence != expected_last_msg_seq + 1 {
                    return Err(LogError::Failed(format!(
                        "JetStream stored a conditional publish at sequence {} after {expected_last_msg_seq}",
                        ack.sequence
                    )));
                }
                Ok(Published::Stored(ack.sequence))
            }
            Err(e) if e.kind() == context::PublishErrorKind::WrongLastSequence => {
                Ok(Published::Conflict)
            }
            Err(e) => Err(unavailable(format!("JetStream publish failed: {e}"))),
        }
    }

    /// Reads the message at stream sequence `msg_seq`; `None` if the stream has none there
    /// (never written, or removed by the stream's limits).
    pub fn get(&self, msg_seq: u64) -> Result<Option<Envelope>, LogError> {
        let stream = self.stream.clone();
        let got = call(self.handle(), self.config.request_timeout, async move {
            stream.get_raw_message(msg_seq).await
        })?;
        match got {
            Ok(m) => decode_envelope(m.sequence, &m.payload)
                .map(Some)
                .map_err(LogError::Failed),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(format!(
                "cannot read JetStream message {msg_seq}: {e}"
            ))),
        }
    }

    /// The stream's first and last message sequences (`first > last` when it is empty).
    pub fn bounds(&self) -> Result<(u64, u64), LogError> {
        let mut stream = self.stream.clone();
        let info = call(self.handle(), self.config.request_timeout, async move {
            stream.info().await.map(|i| i.state.clone())
        })?
        .map_err(|e| unavailable(format!("cannot read the JetStream stream's state: {e}")))?;
        Ok((info.first_sequence, info.last_sequence))
    }

    /// Follows the stream from message `from_msg_seq` on, in order, into a bounded queue (so a
    /// slow engine slows the reading, never grows memory). `wake` runs after each message is
    /// queued. Reconnects by itself after failures, resuming after the last message queued;
    /// stops when the receiver is dropped. A message that cannot be decoded is delivered as an
    /// `Err` and following stops: a replica must not skip a record.
    pub fn follow(
        &self,
        from_msg_seq: u64,
        wake: impl Fn() + Send + 'static,
    ) -> tokio::sync::mpsc::Receiver<Result<Envelope, String>> {
        let (tx, rx) = tokio::sync::mpsc::channel(FOLLOW_QUEUE_LIMIT);
        let stream = self.stream.clone();
        self.handle().spawn(async move {
            let mut next = from_msg_seq.max(1);
            let mut retry_ms = 50;
            loop {
                let consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: next,
                        },
                        ..Default::default()
                    })
                    .await;
                let messages = match consumer {
                    Ok(c) => c.messages().await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let mut messages = match messages {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("JetStream follow from message {next}: {e}; retrying");
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                        retry_ms = (retry_ms * 2).min(FOLLOW_RETRY_MS_MAX);
                        continue;
                    }
                };
                retry_ms = 50;
                while let Some(m) = messages.next().await {
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!("JetStream follow: {e}; resubscribing at {next}");
                            break;
                        }
                    };
                    let msg_seq = match m.info() {
                        Ok(info) => info.stream_sequence,
                        Err(e) => {
                            tracing::warn!("JetStream follow: a message without metadata ({e}); resubscribing at {next}");
                            break;
                        }
                    };
                    if msg_seq < next {
                        continue; // redelivered after a resubscribe
                    }
                    let envelope = decode_envelope(msg_seq, &m.payload);
                    let failed = envelope.is_err();
                    if tx.send(envelope).await.is_err() {
                        return;
                    }
                    wake();
                    if failed {
                        return;
                    }
                    next = msg_seq + 1;
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(retry_ms)).await;
            }
        });
        rx
    }
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn unavailable(detail: String) -> LogError {
    LogError::Unavailable(detail)
}

/// Runs `work` on the NATS runtime and waits for it from this (plain) thread, for at most
/// `timeout` (plus a little, so the call's own timeouts report first).
fn call<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, LogError> {
    let (tx, rx) = mpsc::sync_channel(1);
    handle.spawn(async move {
        let out = tokio::time::timeout(timeout, work).await;
        let _ = tx.send(out);
    });
    match rx.recv_timeout(timeout + Duration::from_secs(1)) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(_)) | Err(_) => Err(unavailable(format!(
            "JetStream did not answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn an_envelope_round_trips() {
        let payloads = vec![b"one".to_vec(), Vec::new(), vec![7u8; 1000]];
        let body = encode_envelope(41, &payloads);
        let e = decode_envelope(9, &body).expect("decodes");
        assert_eq!(e.msg_seq, 9);
        assert_eq!(e.first_seq, 41);
        assert_eq!(e.last_seq(), 43);
        assert_eq!(e.payloads, payloads);
    }

    #[test]
    fn damaged_envelopes_are_errors() {
        let body = encode_envelope(5, &[b"abc".to_vec(), b"defg".to_vec()]);
        // Every truncation, and every single-bit flip, is refused (never a panic, never a
        // different envelope). A flip in a payload or crc breaks the checksum; in a length it
        // breaks the framing; in the count it breaks the total.
        for cut in 0..body.len() {
            assert!(decode_envelope(1, &body[..cut]).is_err(), "cut at {cut}");
        }
        for byte in 0..body.len() {
            for bit in 0..8 {
                let mut b = body.clone();
                b[byte] ^= 1 << bit;
                assert!(decode_envelope(1, &b).is_err(), "flip {byte}:{bit}");
            }
        }
        let mut extra = body.clone();
        extra.push(0);
        assert!(decode_envelope(1, &extra).is_err());
    }

    #[test]
    fn records_out_of_order_are_refused() {
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&2u32.to_le_bytes());
        frame::encode(5, b"a", &mut body);
        frame::encode(7, b"b", &mut body);
        let e = decode_envelope(1, &body).expect_err("a gap inside one message");
        assert!(e.contains("expected 6"), "{e}");
    }

    #[test]
    fn fuzzed_bodies_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let good = encode_envelope(1, &[vec![1, 2, 3], vec![4; 40]]);
        for _ in 0..20_000 {
            let mut b = if rng.gen_bool(0.5) {
                good.clone()
            } else {
                let n = rng.gen_range(0..64);
                (0..n).map(|_| rng.gen()).collect()
            };
            for _ in 0..rng.gen_range(0..4) {
                if !b.is_empty() {
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
            }
            if let Ok(e) = decode_envelope(1, &b) {
                // Whatever decodes must re-encode to the same bytes: nothing was guessed.
                assert_eq!(encode_envelope(e.first_seq, &e.payloads), b);
            }
        }
    }
}

use quiver_log::segment::{parse_segment_file_name, segment_file_name, SEGMENT_HEADER_BYTES};
use quiver_log::{frame, DecodeResult, FileLog, FsyncPolicy, LogConfig, LogError, Retention, Seq};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn small_config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.segment_size_bytes_limit = 4096;
    config.record_size_bytes_limit = 1024;
    config
}

fn payload(seq: Seq) -> Vec<u8> {
    format!("record-{seq};")
        .repeat((seq % 7 + 1) as usize * 3)
        .into_bytes()
}

fn append_range(log: &FileLog, seqs: std::ops::RangeInclusive<Seq>) {
    for seq in seqs {
        assert_eq!(log.append(vec![payload(seq)]).unwrap(), seq);
    }
}

fn read_all(log: &FileLog, from: Seq) -> Vec<(Seq, Vec<u8>)> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let chunk = log.read_from(next, 50, 1000).unwrap();
        let Some(&(last, _)) = chunk.last() else {
            break;
        };
        next = last + 1;
        out.extend(chunk);
    }
    out
}

fn assert_records(records: &[(Seq, Vec<u8>)], from: Seq, to: Seq) {
    assert_eq!(records.len() as u64, to + 1 - from, "record count");
    for (i, (seq, bytes)) in records.iter().enumerate() {
        assert_eq!(*seq, from + i as u64);
        assert_eq!(bytes, &payload(*seq), "payload of seq {seq}");
    }
}

/// Segment files in seq order.
fn segment_paths(dir: &Path) -> Vec<PathBuf> {
    let mut firsts: Vec<Seq> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| parse_segment_file_name(e.unwrap().file_name().to_str()?))
        .collect();
    firsts.sort_unstable();
    firsts
        .iter()
        .map(|&s| dir.join(segment_file_name(s)))
        .collect()
}

/// `(seq, start offset, end offset)` of every frame in a segment file.
fn frames_of(path: &Path) -> Vec<(Seq, u64, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut offset = SEGMENT_HEADER_BYTES as usize;
    let mut frames = Vec::new();
    while offset < bytes.len() {
        let DecodeResult::Ok { seq, frame_len, .. } = frame::decode(&bytes[offset..]) else {
            panic!("bad frame in {} at {offset}", path.display());
        };
        frames.push((seq, offset as u64, (offset + frame_len) as u64));
        offset += frame_len;
    }
    frames
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn round_trip_across_rolls_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (log, recovery) = FileLog::open(small_config(dir.path())).unwrap();
    assert_eq!(
        (recovery.first_seq, recovery.last_seq, recovery.segments),
        (1, 0, 1)
    );
    assert_eq!(log.read_from(1, 10, 1000).unwrap(), vec![]);
    append_range(&log, 1..=300);
    log.wait_durable(300).unwrap();
    assert_eq!(log.durable_seq(), 300);
    assert!(log.segment_count() > 5, "segments: {}", log.segment_count());
    assert_records(&read_all(&log, 1), 1, 300);
    assert_records(&read_all(&log, 177), 177, 300);
    // Read limits: records, bytes, and at least one record.
    assert_eq!(log.read_from(10, 3, usize::MAX).unwrap().len(), 3);
    assert_eq!(log.read_from(10, 100, 0).unwrap().len(), 1);
    assert_eq!(log.read_from(10, 0, 1000).unwrap().len(), 0);
    let bytes: usize = log
        .read_from(10, 1000, 500)
        .unwrap()
        .iter()
        .map(|r| r.1.len())
        .sum();
    assert!(bytes <= 500);
    assert_eq!(log.read_from(301, 10, 1000).unwrap(), vec![]);
    let size_bytes = log.size_bytes();
    let on_disk: u64 = segment_paths(dir.path())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(size_bytes, on_disk);
    log.close().unwrap();
    assert!(matches!(
        log.append(vec![b"x".to_vec()]),
        Err(LogError::Closed)
    ));
    drop(log);

    for file in segment_paths(dir.path()) {
        let first = parse_segment_file_name(file.file_name().unwrap().to_str().unwrap()).unwrap();
        let frames = frames_of(&file);
        assert_eq!(frames[0].0, first, "segment name matches its first frame");
        assert!(std::fs::metadata(&file).unwrap().len() <= 4096);
    }

    let (log, recovery) = FileLog::open(small_config(dir.path())).unwrap();
    assert_eq!(
        (
            recovery.first_seq,
            recovery.last_seq,
            recovery.truncated_bytes
        ),
        (1, 300, 0)
    );
    append_range(&log, 301..=400);
    log.wait_durable(400).unwrap();
    assert_records(&read_all(&log, 1), 1, 400);
}

#[test]
fn batch_append_is_contiguous_and_validated() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(dir.path())).unwrap();
    assert!(matches!(log.append(vec![]), Err(LogError::EmptyAppend)));
    let too_large = log.append(vec![payload(1), vec![0; 1025]]);
    assert!(matches!(
        too_large,
        Err(LogError::RecordTooLarge {
            size_bytes: 1025,
            limit_bytes: 1024
        })
    ));
    assert_eq!(
        log.last_assigned_seq(),
        0,
        "nothing enqueued for a rejected call"
    );
    assert_eq!(
        log.append(vec![payload(1), payload(2), payload(3)])
            .unwrap(),
        1
    );
    assert_eq!(log.append(vec![payload(4)]).unwrap(), 4);
    assert_eq!(log.append(vec![vec![7; 1024]]).unwrap(), 5);
    assert!(matches!(
        log.wait_durable(6),
        Err(LogError::Unassigned {
            requested: 6,
            last_assigned: 5
        })
    ));
    log.wait_durable(5).unwrap();
    let records = log.read_from(1, 10, usize::MAX).unwrap();
    assert_records(&records[..4], 1, 4);
    assert_eq!(records[4], (5, vec![7; 1024]));
}

#[test]
fn group_commit_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.segment_size_bytes_limit = 64 * 1024;
    let (log, _) = FileLog::open(config).unwrap();
    let log = Arc::new(log);
    let threads: u64 = 8;
    let calls_per_thread: u64 = 2000;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut assigned = Vec::new();
                let mut previous = 0;
                for call in 0..calls_per_thread {
                    let count = call % 3 + 1;
                    let payloads: Vec<Vec<u8>> = (0..count)
                        .map(|i| format!("t{thread}-c{call}-{i}").into_bytes())
                        .collect();
                    let first = log.append(payloads.clone()).unwrap();
                    assert!(first > previous, "seqs are assigned in call order");
                    previous = first + count - 1;
                    if call % 500 == 0 {
                        log.wait_durable(previous).unwrap();
                        assert!(log.durable_seq() >= previous);
                    }
                    for (i, p) in payloads.into_iter().enumerate() {
                        assigned.push((first + i as u64, p));
                    }
                }
                assigned
            })
        })
        .collect();
    let mut expected: HashMap<Seq, Vec<u8>> = HashMap::new();
    for handle in handles {
        for (seq, p) in handle.join().unwrap() {
            assert!(
                expected.insert(seq, p).is_none(),
                "seq {seq} assigned twice"
            );
        }
    }
    let total = expected.len() as u64;
    let per_thread: u64 = (0..calls_per_thread).map(|call| call % 3 + 1).sum();
    assert_eq!(total, threads * per_thread);
    log.wait_durable(total).unwrap();
    assert_eq!(log.last_assigned_seq(), total);
    let mut next = 1;
    loop {
        let chunk = log.read_from(next, 1000, 1 << 20).unwrap();
        if chunk.is_empty() {
            break;
        }
        for (seq, bytes) in chunk {
            assert_eq!(seq, next);
            assert_eq!(Some(&bytes), expected.get(&seq));
            next += 1;
        }
    }
    assert_eq!(next, total + 1, "every seq read back, contiguous");
    let stats = log.stats();
    assert_eq!(stats.appended_records, total);
    assert!(stats.fsyncs < stats.appended_records, "{stats:?}");
    assert!(stats.fsyncs >= stats.groups, "{stats:?}");
    eprintln!("group commit: {stats:?}");
}

#[test]
fn backpressure_with_tiny_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.queue_records_limit = 2;
    config.fsync = FsyncPolicy::Never;
    let (log, _) = FileLog::open(config).unwrap();
    let log = Arc::new(log);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for _ in 0..200 {
                    // Larger than the whole queue: goes alone.
                    log.append(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
                        .unwrap();
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    log.close().unwrap();
    assert_eq!(log.durable_seq(), 2400);
}

#[test]
fn interval_and_never_policies() {
    for policy in [
        FsyncPolicy::Interval(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = small_config(dir.path());
        config.fsync = policy;
        let (log, _) = FileLog::open(config.clone()).unwrap();
        append_range(&log, 1..=100);
        log.wait_durable(100).unwrap();
        assert_records(&read_all(&log, 1), 1, 100);
        if let FsyncPolicy::Interval(_) = policy {
            std::thread::sleep(Duration::from_millis(50));
            assert!(log.stats().fsyncs >= 1, "the interval fsync ran");
        }
        log.close().unwrap();
        drop(log);
        let (log, recovery) = FileLog::open(config).unwrap();
        assert_eq!(recovery.last_seq, 100);
        assert_records(&read_all(&log, 1), 1, 100);
    }
}

#[test]
fn watch_durable_async() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(dir.path())).unwrap();
    let log = Arc::new(log);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut receiver = log.watch_durable();
    let writer = Arc::clone(&log);
    let appender = std::thread::spawn(move || append_range(&writer, 1..=50));
    runtime.block_on(async {
        let reached =
            tokio::time::timeout(Duration::from_secs(10), receiver.wait_for(|d| *d >= 50))
                .await
                .unwrap()
                .map(|d| *d)
                .unwrap();
        assert_eq!(reached, 50);
    });
    appender.join().unwrap();
    log.close().unwrap();
    let mut receiver = log.watch_durable();
    runtime.block_on(async {
        assert!(receiver.wait_for(|d| *d >= 50).await.is_ok());
        assert!(
            receiver.wait_for(|d| *d >= 51).await.is_err(),
            "closed log ends waits"
        );
    });
}

#[test]
fn second_open_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = FileLog::open(small_config(dir.path())).unwrap();
    assert!(matches!(
        FileLog::open(small_config(dir.path())),
        Err(LogError::Locked { .. })
    ));
}

#[test]
fn missing_dir_is_created_and_bad_config_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/log");
    let (log, recovery) = FileLog::open(small_config(&nested)).unwrap();
    assert_eq!(recovery.segments, 1);
    drop(log);
    let mut config = small_config(&nested);
    config.segment_size_bytes_limit = 1;
    let error = FileLog::open(config).err().unwrap();
    assert!(
        error.to_string().contains("segment_size_bytes_limit"),
        "{error}"
    );
}

#[test]
fn torn_tail_at_every_kind_of_offset() {
    let source = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(source.path())).unwrap();
    append_range(&log, 1..=120);
    log.close().unwrap();
    drop(log);
    let segments = segment_paths(source.path());
    assert!(segments.len() >= 3);
    let last = segments.last().unwrap().clone();
    let last_name = last.file_name().unwrap().to_owned();
    let last_first = parse_segment_file_name(last_name.to_str().unwrap()).unwrap();
    let frames = frames_of(&last);
    let file_len = std::fs::metadata(&last).unwrap().len();
    assert_eq!(frames.last().unwrap().0, 120);

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut cuts: Vec<u64> = (0..40).map(|_| rng.gen_range(0..file_len)).collect();
    cuts.extend([
        0,
        3,
        SEGMENT_HEADER_BYTES,
        SEGMENT_HEADER_BYTES + 1,
        file_len - 1,
    ]);
    cuts.extend(frames.iter().map(|f| f.1 + 5));
    cuts.extend(frames.iter().map(|f| f.2));
    for cut in cuts {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(source.path(), copy.path());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(copy.path().join(&last_name))
            .unwrap();
        file.set_len(cut).unwrap();
        drop(file);

        let whole = frames.iter().filter(|f| f.2 <= cut).count() as u64;
        let expected_last = last_first - 1 + whole;
        let on_boundary = cut == SEGMENT_HEADER_BYTES || frames.iter().any(|f| f.2 == cut);
        let (log, recovery) = FileLog::open(small_config(copy.path())).unwrap();
        assert_eq!(recovery.last_seq, expected_last, "cut at {cut}");
        if on_boundary {
            assert_eq!(recovery.truncated_bytes, 0, "cut at {cut}");
        } else if cut > SEGMENT_HEADER_BYTES {
            assert!(recovery.truncated_bytes > 0, "cut at {cut}");
        } else {
            assert_eq!(recovery.truncated_bytes, cut, "torn header, cut at {cut}");
        }
        assert_records(&read_all(&log, 1), 1, expected_last);
        assert_eq!(
            log.append(vec![payload(expected_last + 1)]).unwrap(),
            expected_last + 1
        );
        log.close().unwrap();
        drop(log);
        let (log, recovery) = FileLog::open(small_config(copy.path())).unwrap();
        assert_eq!(
            (recovery.last_seq, recovery.truncated_bytes),
            (expected_last + 1, 0)
        );
        assert_records(&read_all(&log, 1), 1, expected_last + 1);
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

fn expect_corrupt(dir: &Path, expected_file: &Path, expected_offset: u64) {
    let error = FileLog::open(small_config(dir))
        .err()
        .expect("open must fail");
    let message = error.to_string();
    match error {
        LogError::Corrupt { file, offset, .. } => {
            assert_eq!(file, expected_file);
            assert_eq!(offset, expected_offset, "{message}");
            assert!(
                message.contains(&expected_file.display().to_string()),
                "{message}"
            );
            assert!(
                message.contains(&format!("byte offset {expected_offset}")),
                "{message}"
            );
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn corruption_before_the_tail_is_reported() {
    let source = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(source.path())).unwrap();
    append_range(&log, 1..=120);
    log.close().unwrap();
    drop(log);
    let segments = segment_paths(source.path());

    // A payload byte in a non-last segment.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(source.path(), copy.path());
    let first = copy.path().join(segments[0].file_name().unwrap());
    let (_, start, _) = frames_of(&first)[3];
    flip_byte(&first, start + 20);
    expect_corrupt(copy.path(), &first, start);

    // The middle of the last segment, followed by valid frames: payload byte,
    // then the length field.
    for field_offset in [frame::HEADER_BYTES as u64 + 1, 1, 9] {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(source.path(), copy.path());
        let last = copy
            .path()
            .join(segments.last().unwrap().file_name().unwrap());
        let frames = frames_of(&last);
        let (_, start, _) = frames[frames.len() / 2];
        flip_byte(&last, start + field_offset);
        expect_corrupt(copy.path(), &last, start);
    }

    // A non-last segment cut short.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(source.path(), copy.path());
    let second = copy.path().join(segments[1].file_name().unwrap());
    let len = std::fs::metadata(&second).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&second)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let (_, start, _) = *frames_of(&segments[1]).last().unwrap();
    expect_corrupt(copy.path(), &second, start);

    // A missing middle segment is a seq gap.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(source.path(), copy.path());
    std::fs::remove_file(copy.path().join(segments[1].file_name().unwrap())).unwrap();
    let third = copy.path().join(segments[2].file_name().unwrap());
    expect_corrupt(copy.path(), &third, 0);

    // A segment whose name does not match its first frame.
    let only = tempfile::tempdir().unwrap();
    std::fs::copy(&segments[0], only.path().join(segment_file_name(1000))).unwrap();
    expect_corrupt(
        only.path(),
        &only.path().join(segment_file_name(1000)),
        SEGMENT_HEADER_BYTES,
    );
}

#[test]
fn retention_deletes_only_covered_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(dir.path())).unwrap();
    append_range(&log, 1..=300);
    log.wait_durable(300).unwrap();
    let before = segment_paths(dir.path());
    let firsts: Vec<Seq> = before
        .iter()
        .map(|p| parse_segment_file_name(p.file_name().unwrap().to_str().unwrap()).unwrap())
        .collect();
    assert!(firsts.len() >= 6);

    // Keep-forever and young-age retention delete nothing.
    assert_eq!(log.truncate_before(301, &Retention::FOREVER).unwrap(), 0);
    assert_eq!(log.truncate_before(301, &"1d".parse().unwrap()).unwrap(), 0);
    // Nothing is covered below the first segment's end.
    assert_eq!(
        log.truncate_before(firsts[1] - 1, &Retention::NONE)
            .unwrap(),
        0
    );
    assert_eq!(log.first_seq(), 1);

    // Covered below the third segment's start: exactly two segments go.
    assert_eq!(log.truncate_before(firsts[2], &Retention::NONE).unwrap(), 2);
    assert_eq!(log.first_seq(), firsts[2]);
    assert!(!before[0].exists() && !before[1].exists() && before[2].exists());
    match log.read_from(1, 10, 1000) {
        Err(LogError::Compacted {
            requested: 1,
            first_available,
        }) => assert_eq!(first_available, firsts[2]),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert_records(&read_all(&log, firsts[2]), firsts[2], 300);

    // Size retention keeps the newest bytes even when covered.
    let keep_bytes = log.size_bytes() / 2;
    let deleted = log
        .truncate_before(
            u64::MAX,
            &Retention {
                max_age: None,
                max_bytes: Some(keep_bytes),
            },
        )
        .unwrap();
    assert!(deleted >= 1);
    assert!(
        log.size_bytes() <= keep_bytes,
        "{} vs {keep_bytes}",
        log.size_bytes()
    );
    assert!(log.segment_count() >= 2);

    // Everything covered and no retention: all but the active segment go.
    log.truncate_before(u64::MAX, &Retention::NONE).unwrap();
    assert_eq!(log.segment_count(), 1);
    let first_seq = log.first_seq();
    assert_records(&read_all(&log, first_seq), first_seq, 300);
    log.close().unwrap();
    drop(log);

    let (log, recovery) = FileLog::open(small_config(dir.path())).unwrap();
    assert_eq!(
        (recovery.first_seq, recovery.last_seq, recovery.segments),
        (first_seq, 300, 1)
    );
    append_range(&log, 301..=310);
    log.wait_durable(310).unwrap();
    assert_records(&read_all(&log, first_seq), first_seq, 310);
}

#[test]
fn readers_race_retention_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(dir.path())).unwrap();
    let log = Arc::new(log);
    append_range(&log, 1..=200);
    log.wait_durable(200).unwrap();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for round in 0..300u64 {
                    let from = round % 200 + 1;
                    match log.read_from(from, 20, 10_000) {
                        Ok(records) => {
                            for (i, (seq, bytes)) in records.iter().enumerate() {
                                assert_eq!(*seq, from + i as u64);
                                assert_eq!(bytes, &payload(*seq));
                            }
                        }
                        Err(LogError::Compacted {
                            first_available, ..
                        }) => assert!(first_available > from),
                        Err(other) => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for covered in (20..=200).step_by(20) {
        log.truncate_before(covered, &Retention::NONE).unwrap();
        std::thread::yield_now();
    }
    for reader in readers {
        reader.join().unwrap();
    }
}

#[test]
fn writer_failure_fails_everything_and_is_sticky() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = FileLog::open(small_config(dir.path())).unwrap();
    // 100-byte payloads make 116-byte frames: 35 fit after the 8-byte header,
    // so seq 36 rolls to a new segment, whose name we occupy to make the
    // writer's create fail.
    std::fs::write(dir.path().join(segment_file_name(36)), b"squatter").unwrap();
    for seq in 1..=35 {
        assert_eq!(log.append(vec![vec![1; 100]]).unwrap(), seq);
        log.wait_durable(seq).unwrap();
    }
    for seq in 36..=40 {
        match log.append(vec![vec![1; 100]]) {
            Ok(assigned) => assert_eq!(assigned, seq),
            Err(LogError::Failed(_)) => break,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let error = log.wait_durable(log.last_assigned_seq()).unwrap_err();
    assert!(matches!(error, LogError::Failed(_)), "{error}");
    assert!(error.to_string().contains("unusable"), "{error}");
    assert_eq!(log.durable_seq(), 35);
    assert!(matches!(
        log.append(vec![vec![1]]),
        Err(LogError::Failed(_))
    ));
    assert_eq!(log.read_from(1, 100, usize::MAX).unwrap().len(), 35);
    assert!(matches!(log.close(), Err(LogError::Failed(_))));
}

/// Under `never` nothing is fsynced per append; `sync_through` forces it (snapshots rely on
/// this so they never cover records a power loss could take back).
#[test]
fn sync_through_fsyncs_under_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LogConfig::new(dir.path());
    config.fsync = FsyncPolicy::Never;
    let (log, _) = FileLog::open(config).unwrap();
    append_range(&log, 1..=10);
    log.wait_durable(10).unwrap();
    let before = log.stats().fsyncs;
    log.sync_through(10).unwrap();
    assert_eq!(log.stats().fsyncs, before + 1);
    assert!(
        log.sync_through(11).is_err(),
        "a seq never assigned cannot be synced"
    );
}

/// Reads near the tail come from the in-memory ring of recent records; older ones, and every
/// read after a reopen, from the files. Both must give the same records, including pages that
/// start in the files and would continue in the ring.
#[test]
fn recent_ring_reads_equal_file_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    // Small enough that the first records leave the ring.
    config.recent_bytes_limit = 2000;
    let (log, _) = FileLog::open(config.clone()).unwrap();
    append_range(&log, 1..=150);
    log.wait_durable(150).unwrap();
    // Every start, every page shape: from the ring where it holds `from`, else the files.
    let through_ring: Vec<Vec<(Seq, Vec<u8>)>> = (1..=151)
        .map(|from| log.read_from(from, 7, 300).unwrap())
        .collect();
    assert!(
        log.read_recent(1, 10, 1000).is_none(),
        "seq 1 left the ring"
    );
    let recent = log
        .read_recent(150, 10, 1000)
        .expect("the newest record is in the ring");
    assert_eq!(recent, vec![(150, payload(150))]);
    assert_records(&read_all(&log, 1), 1, 150);
    log.close().unwrap();
    drop(log);

    let (log, _) = FileLog::open(config).unwrap();
    assert!(
        log.read_recent(150, 10, 1000).is_none(),
        "a reopened log's ring is empty"
    );
    for (i, page) in through_ring.iter().enumerate() {
        let from = i as Seq + 1;
        assert_eq!(
            page,
            &log.read_from(from, 7, 300).unwrap(),
            "page from {from}"
        );
    }
    // Off: every read goes to the files.
    log.close().unwrap();
    drop(log);
    let mut off = small_config(dir.path());
    off.recent_bytes_limit = 0;
    let (log, _) = FileLog::open(off).unwrap();
    append_range(&log, 151..=160);
    log.wait_durable(160).unwrap();
    assert!(log.read_recent(160, 10, 1000).is_none());
    assert_records(&read_all(&log, 1), 1, 160);
}

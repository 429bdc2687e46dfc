//! The library statistics projection over a real file log: the live runner equals a replay
//! from seq 1, and a restart from its checkpoint file neither skips nor double-counts.

use quiver_consumers::projection::{replay, Projection};
use quiver_consumers::{LibraryStatsProjection, ProjectionRunner};
use quiver_log::{FileLog, FsyncPolicy, LogConfig};
use quiver_model::record::Change;
use quiver_model::{Chunk, Document, IndexType, Library, Metric, Record, RecordMeta};
use std::sync::Arc;
use std::time::Duration;

fn open_log(dir: &std::path::Path) -> Arc<FileLog> {
    let mut c = LogConfig::new(dir.join("log"));
    c.fsync = FsyncPolicy::Never;
    Arc::new(FileLog::open(c).expect("the log opens").0)
}

fn library(id: &str) -> Change {
    Change::LibraryCreated(Library {
        id: id.into(),
        name: format!("name-{id}"),
        description: String::new(),
        dimension: 2,
        metric: Metric::L2,
        index_type: IndexType::Flat,
        embedding_model: None,
        created_at_ms: 1,
        updated_at_ms: 1,
        metadata: Default::default(),
    })
}

fn chunk(doc: &str, id: &str) -> Chunk {
    Chunk {
        id: id.into(),
        document_id: doc.into(),
        text: "t".into(),
        embedding: vec![1.0, 0.0],
        metadata: Default::default(),
    }
}

fn document(lib: &str, id: &str, chunks: usize, replaced: bool) -> Change {
    Change::DocumentUpserted {
        document: Document {
            id: id.into(),
            library_id: lib.into(),
            title: "T".into(),
            metadata: Default::default(),
            created_at_ms: 1,
            updated_at_ms: 1,
            chunks: (0..chunks).map(|i| chunk(id, &format!("c{i}"))).collect(),
        },
        replaced,
    }
}

fn append(log: &FileLog, changes: Vec<Change>) {
    let payloads = changes
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            Record::new(
                RecordMeta {
                    timestamp_ms: 1_800_000_000_000 + i as u64,
                    trace_id: None,
                    source: None,
                },
                c,
            )
            .encode()
        })
        .collect();
    let last = log.append(payloads).expect("append");
    log.wait_durable(last).expect("durable");
}

fn workload(round: usize) -> Vec<Change> {
    let a = format!("a{round}");
    let b = format!("b{round}");
    vec![
        library(&a),
        library(&b),
        document(&a, "d1", 3, false),
        document(&a, "d2", 2, false),
        document(&a, "d1", 5, true),
        Change::ChunksAdded {
            library_id: a.clone(),
            document_id: "d2".into(),
            chunks: vec![chunk("d2", "x"), chunk("d2", "y")],
        },
        Change::ChunkDeleted {
            library_id: a.clone(),
            document_id: "d1".into(),
            chunk_id: "c0".into(),
        },
        document(&b, "d1", 1, false),
        Change::DocumentDeleted {
            library_id: a.clone(),
            document_id: "d2".into(),
        },
        Change::AppEvent {
            event_type: "app.note".into(),
            library_id: Some(a.clone()),
            data: serde_json::json!({}),
        },
        Change::AppEvent {
            event_type: "app.note".into(),
            library_id: Some("unknown".into()),
            data: serde_json::json!({}),
        },
        Change::LibraryDeleted {
            library_id: b.clone(),
            name: "x".into(),
        },
    ]
}

fn rebuilt(log: &FileLog, through: u64) -> LibraryStatsProjection {
    let mut p = LibraryStatsProjection::default();
    let mut errors = 0;
    replay(log, &mut p, 1, through, &mut errors).expect("replay");
    assert_eq!(errors, 0);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_equals_rebuild_and_checkpoint_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let proj_dir = dir.path().join("projections");
    let log = open_log(dir.path());
    append(&log, workload(0));

    let runner = ProjectionRunner::<LibraryStatsProjection>::open(Arc::clone(&log), &proj_dir);
    let task = runner.start();
    // Follows live commits after catching up.
    append(&log, workload(1));
    let durable = log.durable_seq();
    assert_eq!(
        runner.wait_for(durable, Duration::from_secs(10)).await,
        durable
    );

    let live = runner.read(|p, cp| {
        assert_eq!(cp, durable);
        p.clone()
    });
    let a0 = live.get("a0").expect("library a0");
    assert_eq!((a0.documents, a0.chunks), (1, 4), "{a0:?}");
    assert_eq!(a0.events_by_type["document.added"], 2);
    assert_eq!(a0.events_by_type["document.updated"], 1);
    assert_eq!(a0.events_by_type["app.note"], 1);
    assert!(live.get("b0").is_none(), "deleted libraries leave");
    assert!(live.get("unknown").is_none());
    assert_eq!(
        live,
        rebuilt(&log, durable),
        "live equals a replay from seq 1"
    );
    let report = runner.rebuild_blocking().expect("rebuild");
    assert!(report.equal_to_live);
    assert_eq!(report.through, durable);

    // Stop (the runner persists state + checkpoint together), restart from the file.
    runner.stop();
    task.await.unwrap();
    let saved = std::fs::read_to_string(proj_dir.join("library_stats.json")).unwrap();
    assert!(saved.contains("\"checkpoint\":") && saved.contains("quiver-projection/1"));
    drop(runner);

    append(&log, workload(2));
    let again = ProjectionRunner::<LibraryStatsProjection>::open(Arc::clone(&log), &proj_dir);
    assert_eq!(again.checkpoint(), durable, "resumes at its checkpoint");
    let cp = tokio::task::spawn_blocking({
        let again = Arc::clone(&again);
        move || again.catch_up_blocking()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(cp, log.durable_seq());
    let after = again.read(|p, _| p.clone());
    assert_eq!(
        after,
        rebuilt(&log, cp),
        "no double counting, nothing skipped"
    );
    assert_eq!(after.get("a0"), live.get("a0"));
    assert!(after.get("a2").is_some());
    assert_eq!(LibraryStatsProjection::NAME, "library_stats");
}

#[tokio::test]
async fn a_checkpoint_ahead_of_the_log_rebuilds() {
    let dir = tempfile::tempdir().unwrap();
    let proj_dir = dir.path().join("projections");
    {
        let log = open_log(dir.path());
        append(&log, workload(0));
        let runner = ProjectionRunner::<LibraryStatsProjection>::open(Arc::clone(&log), &proj_dir);
        runner.catch_up_blocking().unwrap();
        runner.persist().unwrap();
    }
    // A different, shorter log in the same place (as if records were lost).
    std::fs::remove_dir_all(dir.path().join("log")).unwrap();
    let log = open_log(dir.path());
    append(&log, vec![library("only")]);
    let runner = ProjectionRunner::<LibraryStatsProjection>::open(Arc::clone(&log), &proj_dir);
    assert_eq!(runner.checkpoint(), 0);
    runner.catch_up_blocking().unwrap();
    let p = runner.read(|p, _| p.clone());
    assert_eq!(p.libraries.len(), 1);
    assert!(p.get("only").is_some());
}

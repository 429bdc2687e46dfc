//! The job table outlives log retention: once snapshots and `--retain-events none` have
//! deleted the segments holding a job's events, the table file written at shutdown still
//! knows the job after a restart (and without the file, it would be gone — which is why the
//! file exists).

use quiver_engine::input::{ChunkInput, CreateLibrary, DocumentInput};
use quiver_engine::{Engine, EngineConfig, Retention, WriteCtx};
use quiver_jobs::{JobStatus, JobType, Jobs, JobsConfig, Submit};
use serde_json::json;
use std::time::{Duration, Instant};

fn config(dir: &std::path::Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir);
    c.retention = Retention::NONE;
    c.segment_size_bytes_limit = 4096;
    c.snapshot_every_records = u64::MAX;
    c.snapshot_replay_ms_limit = u64::MAX;
    c
}

#[test]
fn table_file_keeps_jobs_whose_events_retention_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(config(dir.path())).expect("open");
    let ctx = WriteCtx::default();
    let lib = engine
        .create_library(
            &ctx,
            CreateLibrary {
                name: "t".into(),
                dimension: Some(2),
                metric: Some("l2".into()),
                ..Default::default()
            },
        )
        .expect("library")
        .value
        .library
        .id;
    engine
        .upsert_document(
            &ctx,
            &lib,
            DocumentInput {
                id: Some("d1".into()),
                title: "d".into(),
                chunks: Some(vec![ChunkInput {
                    text: "x".into(),
                    embedding: Some(vec![1.0, 0.0]),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        )
        .expect("doc");
    let jobs = Jobs::start(engine.clone(), JobsConfig::default()).expect("jobs");
    let job = jobs
        .submit(Submit {
            id: None,
            job_type: JobType::BatchDelete,
            params: json!({"library_id": lib, "ids": ["d1"]}),
            trace_id: None,
        })
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while jobs.get(&job.id).expect("job").status != JobStatus::Completed {
        assert!(Instant::now() < deadline, "the job completes");
        std::thread::sleep(Duration::from_millis(10));
    }
    jobs.stop(); // writes the table file
                 // Push the job's events out of the log: more records, two snapshots, retention none.
    for round in 0..2 {
        for i in 0..200 {
            engine
                .append_event(
                    &ctx,
                    "app.filler",
                    None,
                    json!({"round": round, "i": i, "pad": "x".repeat(64)}),
                )
                .expect("event");
        }
        engine.snapshot().expect("snapshot");
    }
    assert!(
        engine.log().first_seq() > job.queued_seq,
        "the log no longer reaches the job's events (first seq {}, job queued at {})",
        engine.log().first_seq(),
        job.queued_seq
    );
    engine.close().expect("close");
    drop(jobs);
    drop(engine);

    let engine = Engine::open(config(dir.path())).expect("reopen");
    let jobs = Jobs::start(engine.clone(), JobsConfig::default()).expect("jobs");
    let j = jobs.get(&job.id).expect("the job is still known");
    assert_eq!(j.status, JobStatus::Completed);
    assert_eq!(
        j.result.as_ref().map(|r| r["deleted_documents"].clone()),
        Some(json!(1))
    );
    jobs.stop();
    engine.close().expect("close");
    drop(jobs);
    drop(engine);

    std::fs::remove_file(dir.path().join("jobs").join("table.json")).expect("remove");
    let engine = Engine::open(config(dir.path())).expect("reopen");
    let jobs = Jobs::start(engine.clone(), JobsConfig::default()).expect("jobs");
    assert!(
        jobs.get(&job.id).is_err(),
        "without the file, the job's events are gone"
    );
    jobs.stop();
    engine.close().expect("close");
}

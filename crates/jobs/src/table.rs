//! The job table as a fold of `job.*` events: the types a job has on the wire and in the log,
//! and [`Table::apply`], the one function that changes the table — used live (right after the
//! event is appended) and at start-up (replaying the log), so both give the same table.
//!
//! It must never change a job except by folding an event that is in the log.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobType {
    BatchImport,
    BatchExport,
    IndexRebuild,
    IndexOptimize,
    BatchDelete,
    RegenerateEmbeddings,
}

impl JobType {
    pub const ALL: [JobType; 6] = [
        JobType::BatchImport,
        JobType::BatchExport,
        JobType::IndexRebuild,
        JobType::IndexOptimize,
        JobType::BatchDelete,
        JobType::RegenerateEmbeddings,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::BatchImport => "batch_import",
            JobType::BatchExport => "batch_export",
            JobType::IndexRebuild => "index_rebuild",
            JobType::IndexOptimize => "index_optimize",
            JobType::BatchDelete => "batch_delete",
            JobType::RegenerateEmbeddings => "regenerate_embeddings",
        }
    }
    pub fn parse(s: &str) -> Option<JobType> {
        JobType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|t| t.as_str() == s)
    }
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub current: u64,
    pub total: u64,
    pub message: String,
}

impl Progress {
    pub fn percentage(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            (self.current as f64 * 100.0 / self.total as f64).min(100.0)
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobFailure {
    pub code: String,
    pub detail: String,
}

/// One job as the table holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub job_type: JobType,
    pub status: JobStatus,
    pub library_id: Option<String>,
    pub params: Value,
    pub progress: Progress,
    /// Attempts started so far (the first run is attempt 1).
    pub attempts: u32,
    pub max_retries: u32,
    pub error: Option<JobFailure>,
    pub result: Option<Value>,
    pub created_at_ms: u64,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Where a resumed run starts (e.g. the import's next input line); 0 = from the start.
    pub checkpoint: u64,
    pub cancel_requested: bool,
    /// A retry waits until then (exponential backoff with jitter).
    pub not_before_ms: u64,
    pub trace_id: Option<String>,
    /// The `seq` of its `job.queued` event: queue order.
    pub queued_seq: u64,
    /// With a JetStream log: the replica that queued it, the only one that runs it or resumes
    /// it after a restart (`None`: queued by a server on the embedded log).
    #[serde(default)]
    pub replica: Option<String>,
}

/// The table: every job still retained, and the queue of jobs waiting for a worker.
#[derive(Default, Serialize, Deserialize)]
pub struct Table {
    pub jobs: HashMap<String, Job>,
    /// Jobs waiting for a worker, in queue order (ids; a job is here iff it is queued and
    /// not taken by a worker).
    #[serde(skip)]
    pub queue: VecDeque<String>,
    /// The last `seq` folded into the table.
    pub seq: u64,
    /// Finished jobs by finish time, for retention.
    #[serde(skip)]
    pub finished: BTreeMap<(u64, String), ()>,
}

fn s(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}
fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

impl Table {
    /// Folds one `job.*` event (its type, data, timestamp and seq). Unknown types and events
    /// about unknown (already removed) jobs change nothing.
    pub fn apply(&mut self, event_type: &str, data: &Value, at_ms: u64, seq: u64) {
        self.seq = self.seq.max(seq);
        let Some(id) = s(data, "job_id") else { return };
        if event_type == "job.queued" {
            let Some(job_type) = data
                .get("job_type")
                .and_then(Value::as_str)
                .and_then(JobType::parse)
            else {
                return;
            };
            let job = Job {
                id: id.clone(),
                job_type,
                status: JobStatus::Queued,
                library_id: s(data, "library_id"),
                params: data.get("params").cloned().unwrap_or(Value::Null),
                progress: Progress::default(),
                attempts: 0,
                max_retries: u(data, "max_retries") as u32,
                error: None,
                result: None,
                created_at_ms: at_ms,
                started_at_ms: None,
                finished_at_ms: None,
                checkpoint: 0,
                cancel_requested: false,
                not_before_ms: 0,
                trace_id: s(data, "trace_id"),
                replica: s(data, "replica"),
                queued_seq: seq,
            };
            self.jobs.insert(id.clone(), job);
            self.queue.push_back(id);
            return;
        }
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        match event_type {
            "job.started" => {
                job.status = JobStatus::Running;
                job.attempts = u(data, "attempt") as u32;
                job.started_at_ms.get_or_insert(at_ms);
                job.error = None;
            }
            "job.progress" => {
                job.progress = Progress {
                    current: u(data, "current"),
                    total: u(data, "total"),
                    message: s(data, "message").unwrap_or_default(),
                };
                job.checkpoint = u(data, "checkpoint");
            }
            "job.retrying" => {
                job.status = JobStatus::Queued;
                job.not_before_ms = u(data, "retry_at_ms");
                job.error = Some(JobFailure {
                    code: s(data, "error").unwrap_or_default(),
                    detail: s(data, "detail").unwrap_or_default(),
                });
                self.queue.push_back(id);
            }
            "job.cancel_requested" => job.cancel_requested = true,
            "job.completed" | "job.failed" | "job.cancelled" => {
                // Only a job cancelled while it waited is still in the queue (a worker took
                // every other one out), so the queue is scanned only then.
                let was_waiting = job.status == JobStatus::Queued;
                job.status = match event_type {
                    "job.completed" => JobStatus::Completed,
                    "job.failed" => JobStatus::Failed,
                    _ => JobStatus::Cancelled,
                };
                if event_type == "job.completed" {
                    job.result = data.get("result").cloned();
                    if job.progress.total > 0 {
                        job.progress.current = job.progress.total;
                    }
                    job.progress.message = "done".into();
                }
                if event_type == "job.failed" {
                    job.error = Some(JobFailure {
                        code: s(data, "error").unwrap_or_default(),
                        detail: s(data, "detail").unwrap_or_default(),
                    });
                }
                job.finished_at_ms = Some(at_ms);
                self.finished.insert((at_ms, id.clone()), ());
                if was_waiting {
                    self.queue.retain(|q| q != &id);
                }
            }
            _ => {}
        }
    }

    /// After a replay: every job that was queued or running when the process stopped is
    /// queued again, in its original order (a running one resumes from its checkpoint).
    pub fn requeue_unfinished(&mut self, replica: Option<&str>) {
        // A replica resumes only the jobs it queued: every replica folds every job's events,
        // and a job must run once.
        let mut open: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| !j.status.is_finished())
            .filter(|j| replica.is_none() || j.replica.as_deref() == replica)
            .map(|j| (j.queued_seq, j.id.clone()))
            .collect();
        open.sort();
        self.queue = open.into_iter().map(|(_, id)| id).collect();
        self.finished = self
            .jobs
            .values()
            .filter_map(|j| j.finished_at_ms.map(|t| ((t, j.id.clone()), ())))
            .collect();
    }

    /// Removes finished jobs that finished before `cutoff_ms`, and the oldest finished ones
    /// beyond `keep_finished`; returns their ids (so their files can go too).
    pub fn prune(&mut self, cutoff_ms: u64, keep_finished: usize) -> Vec<String> {
        let mut removed = Vec::new();
        while let Some(((t, id), ())) = self.finished.first_key_value() {
            if *t >= cutoff_ms && self.finished.len() <= keep_finished {
                break;
            }
            let key = (*t, id.clone());
            self.finished.remove(&key);
            self.jobs.remove(&key.1);
            removed.push(key.1);
        }
        removed
    }

    pub fn count(&self, status: JobStatus) -> usize {
        self.jobs.values().filter(|j| j.status == status).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fold_follows_a_job_through_retry_to_completion() {
        let mut t = Table::default();
        t.apply(
            "job.queued",
            &json!({"job_id": "j1", "job_type": "batch_export", "library_id": "l", "params": {}, "max_retries": 2}),
            10,
            1,
        );
        assert_eq!(t.queue.len(), 1);
        t.queue.pop_front();
        t.apply("job.started", &json!({"job_id": "j1", "attempt": 1}), 11, 2);
        t.apply(
            "job.progress",
            &json!({"job_id": "j1", "current": 5, "total": 10, "checkpoint": 5}),
            12,
            3,
        );
        assert_eq!(t.jobs["j1"].progress.percentage(), 50.0);
        t.apply(
            "job.retrying",
            &json!({"job_id": "j1", "error": "io", "detail": "x", "retry_at_ms": 99}),
            13,
            4,
        );
        assert_eq!(t.jobs["j1"].status, JobStatus::Queued);
        assert_eq!(t.queue.len(), 1);
        t.apply(
            "job.completed",
            &json!({"job_id": "j1", "result": {"n": 1}}),
            14,
            5,
        );
        let j = &t.jobs["j1"];
        assert_eq!(j.status, JobStatus::Completed);
        assert_eq!(j.checkpoint, 5);
        assert!(t.queue.is_empty());
        assert_eq!(t.seq, 5);
        assert_eq!(t.prune(14, 10), Vec::<String>::new());
        assert_eq!(t.prune(15, 10), vec!["j1".to_string()]);
        assert!(t.jobs.is_empty());
    }

    #[test]
    fn replay_requeues_running_jobs_in_order() {
        let mut t = Table::default();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            t.apply(
                "job.queued",
                &json!({"job_id": id, "job_type": "batch_delete", "params": {}}),
                1,
                i as u64 + 1,
            );
        }
        t.apply("job.started", &json!({"job_id": "a", "attempt": 1}), 2, 4);
        t.apply("job.completed", &json!({"job_id": "b"}), 2, 5);
        t.apply("job.unknown", &json!({"job_id": "c"}), 2, 6);
        t.requeue_unfinished(None);
        assert_eq!(
            t.queue,
            VecDeque::from(vec!["a".to_string(), "c".to_string()])
        );
    }

    #[test]
    fn a_replica_resumes_only_the_jobs_it_queued() {
        let mut t = Table::default();
        for (i, (id, replica)) in [("a", "r1"), ("b", "r2"), ("c", "r1")].iter().enumerate() {
            t.apply(
                "job.queued",
                &json!({"job_id": id, "job_type": "batch_delete", "params": {}, "replica": replica}),
                1,
                i as u64 + 1,
            );
        }
        t.requeue_unfinished(Some("r1"));
        assert_eq!(
            t.queue,
            VecDeque::from(vec!["a".to_string(), "c".to_string()])
        );
        t.requeue_unfinished(Some("r2"));
        assert_eq!(t.queue, VecDeque::from(vec!["b".to_string()]));
        // On the embedded log every unfinished job is this server's.
        t.requeue_unfinished(None);
        assert_eq!(t.queue.len(), 3);
    }
}

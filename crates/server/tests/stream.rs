//! NDJSON streaming over real HTTP: ingest with bad lines, memory that stays flat however
//! large the upload, export consistent at one seq, export → import round trip, streamed search.

mod common;

use quiver_engine::{Engine, EngineConfig};
use quiver_model::record::Change;
use quiver_model::Record;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

struct Server {
    base: String,
    client: Client,
    engine: Arc<Engine>,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let (base, engine) = common::spawn(EngineConfig::new(dir.path())).await;
    Server {
        base,
        client: Client::new(),
        engine,
        _dir: dir,
    }
}

impl Server {
    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let st = resp.status();
        let text = resp.text().await.unwrap();
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn library(&self, name: &str, dim: usize) {
        let (st, _) = self
            .json(
                reqwest::Method::POST,
                "/v1/libraries",
                Some(json!({"name": name, "dimension": dim, "metric": "l2"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED);
    }

    async fn ndjson_post(&self, path: &str, body: reqwest::Body) -> Vec<Value> {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        lines(&resp.text().await.unwrap())
    }

    async fn ndjson_get(&self, path: &str) -> Vec<Value> {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        lines(&resp.text().await.unwrap())
    }

    fn app_events(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for (_, payload) in self
            .engine
            .log()
            .read_from(1, 1_000_000, usize::MAX)
            .unwrap()
        {
            if let Change::AppEvent {
                event_type, data, ..
            } = Record::decode(&payload).unwrap().change
            {
                out.push((event_type, data));
            }
        }
        out
    }
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_reports_each_bad_line_and_commits_the_rest() {
    let s = start().await;
    s.library("docs", 4).await;
    let total = 100_000u64;
    let bad_every = 997u64;
    let mut body = String::with_capacity(total as usize * 80);
    let mut expected_bad = Vec::new();
    for i in 1..=total {
        if i % bad_every == 0 {
            expected_bad.push(i);
            match (i / bad_every) % 4 {
                0 => body.push_str("{not json\n"),
                1 => body.push_str(&format!("{{\"id\":\"d{i}\",\"title\":\"t\",\"chunks\":[{{\"embedding\":[1,2]}}]}}\n")),
                2 => body.push_str(&format!("{{\"id\":\"d{i}\",\"title\":\"t\",\"chunks\":[{{\"embedding\":[1e39,0,0,0]}}]}}\n")),
                _ => body.push_str("{\"unknown\": true}\n"),
            }
        } else {
            body.push_str(&format!(
                "{{\"id\":\"d{i}\",\"title\":\"t{i}\",\"metadata\":{{\"i\":{i}}},\"chunks\":[{{\"text\":\"x\",\"embedding\":[{i},1,2,3]}}]}}\n"
            ));
        }
    }
    let replies = s
        .ndjson_post("/v1/libraries/docs/documents/stream", body.into())
        .await;
    assert_eq!(
        replies.len() as u64,
        total + 1,
        "one status line per input line, then a summary"
    );
    let mut bad_seen = Vec::new();
    let mut last_seq = 0;
    for (i, r) in replies[..total as usize].iter().enumerate() {
        assert_eq!(r["line"], i as u64 + 1, "status lines in input order");
        if r["ok"] == true {
            let seq = r["seq"].as_u64().unwrap();
            assert!(seq > last_seq, "seqs increase with the lines");
            last_seq = seq;
        } else {
            assert!(r["error"].as_str().is_some() && r["detail"].as_str().is_some());
            bad_seen.push(r["line"].as_u64().unwrap());
        }
    }
    assert_eq!(bad_seen, expected_bad);
    let summary = &replies[total as usize]["summary"];
    assert_eq!(summary["committed"], total - expected_bad.len() as u64);
    assert_eq!(summary["failed"], expected_bad.len() as u64);
    let (_, lib) = s
        .json(reqwest::Method::GET, "/v1/libraries/docs", None)
        .await;
    assert_eq!(lib["num_documents"], total - expected_bad.len() as u64);

    // The upload is framed on the change stream by batch.started / batch.completed.
    let events = s.app_events();
    assert_eq!(events.first().unwrap().0, "batch.started");
    let (last_type, last_data) = events.last().unwrap();
    assert_eq!(last_type, "batch.completed");
    assert_eq!(last_data["committed"], summary["committed"]);

    // A retried upload with the same ids is idempotent (updates, no duplicates).
    let again = "{\"id\":\"d1\",\"title\":\"t1\",\"chunks\":[{\"embedding\":[1,1,2,3]}]}\n";
    let replies = s
        .ndjson_post("/v1/libraries/docs/documents/stream", again.into())
        .await;
    assert_eq!(replies[0]["created"], false);
    let (_, lib) = s
        .json(reqwest::Method::GET, "/v1/libraries/docs", None)
        .await;
    assert_eq!(lib["num_documents"], total - expected_bad.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_long_line_fails_alone() {
    let s = start().await;
    s.library("docs", 2).await;
    let long = format!(
        "{{\"id\":\"x\",\"title\":\"{}\"}}\n",
        "y".repeat(17 * 1024 * 1024)
    );
    let body = format!("{{\"id\":\"a\",\"chunks\":[{{\"embedding\":[1,2]}}]}}\n{long}{{\"id\":\"b\",\"chunks\":[{{\"embedding\":[3,4]}}]}}");
    let replies = s
        .ndjson_post("/v1/libraries/docs/documents/stream", body.into())
        .await;
    assert_eq!(replies[0]["ok"], true);
    assert_eq!(replies[1]["line"], 2);
    assert_eq!(replies[1]["error"], "line_too_long");
    assert_eq!(
        replies[2]["ok"], true,
        "the last line has no newline and still counts"
    );
    assert_eq!(replies[3]["summary"]["committed"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_is_consistent_and_round_trips() {
    let s = start().await;
    s.library("src", 3).await;
    let mut body = String::new();
    for i in 0..500 {
        body.push_str(&format!(
            "{{\"id\":\"d{i}\",\"title\":\"T{i}\",\"metadata\":{{\"k\":{}}},\"chunks\":[{{\"id\":\"c\",\"text\":\"t{i}\",\"embedding\":[{}, {}, 1.5]}},{{\"text\":\"u\",\"embedding\":[0.25,{i},-1]}}]}}\n",
            i % 5,
            i as f32 * 0.37,
            (i % 13) as f32
        ));
    }
    s.ndjson_post("/v1/libraries/src/documents/stream", body.into())
        .await;

    // Export while a writer keeps adding documents: the export holds exactly those at its seq.
    let writer = {
        let client = s.client.clone();
        let base = s.base.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..200 {
                let r = client
                    .post(format!("{base}/v1/libraries/src/documents"))
                    .json(&json!({"id": format!("w{i}"), "title": "w", "chunks": [{"embedding": [1, 1, 1]}]}))
                    .send()
                    .await
                    .unwrap();
                let v: Value = r.json().await.unwrap();
                acked.push((format!("w{i}"), v["seq"].as_u64().unwrap()));
            }
            acked
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let export = s.ndjson_get("/v1/libraries/src/documents/stream").await;
    let acked = writer.await.unwrap();
    let header = &export[0]["quiver_export"];
    let export_seq = header["seq"].as_u64().unwrap();
    assert_eq!(
        header["documents"].as_u64().unwrap() as usize,
        export.len() - 1
    );
    let exported: std::collections::HashSet<String> = export[1..]
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    for (id, seq) in &acked {
        assert_eq!(
            exported.contains(id),
            *seq <= export_seq,
            "{id} at seq {seq} vs export at {export_seq}"
        );
    }

    // Snapshot + tail: the change stream from export_seq + 1 holds exactly the writes the
    // export did not see — no gap, no duplicate.
    let (_, pulled) = s
        .json(
            reqwest::Method::GET,
            &format!(
                "/v1/events?from_seq={}&limit=1000&types=document.*",
                export_seq + 1
            ),
            None,
        )
        .await;
    let tailed: Vec<(String, u64)> = pulled["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["data"]["document_id"].as_str().unwrap().to_string(),
                e["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    let after: Vec<(String, u64)> = acked
        .iter()
        .filter(|(_, seq)| *seq > export_seq)
        .cloned()
        .collect();
    assert!(
        !after.is_empty(),
        "the writer kept writing after the export"
    );
    assert_eq!(tailed, after);

    // Import into a new library: identical search results.
    s.library("dst", 3).await;
    let mut body = String::new();
    for l in &export {
        body.push_str(&serde_json::to_string(l).unwrap());
        body.push('\n');
    }
    let replies = s
        .ndjson_post("/v1/libraries/dst/documents/stream", body.into())
        .await;
    assert_eq!(replies.last().unwrap()["summary"]["failed"], 0);
    let (_, a) = s
        .json(reqwest::Method::GET, "/v1/libraries/src", None)
        .await;
    let (_, b) = s
        .json(reqwest::Method::GET, "/v1/libraries/dst", None)
        .await;
    assert_eq!(
        b["num_documents"].as_u64().unwrap() as usize,
        exported.len()
    );
    assert!(a["num_documents"].as_u64() >= b["num_documents"].as_u64());
    for q in [
        [0.013, 0.021, 0.7],
        [50.3, 3.1, 1.2],
        [0.31, 100.7, -0.9],
        [0.25, 17.0, -1.0],
    ] {
        let body = json!({"embedding": q, "k": 20, "filter": [{"field": "document_id", "operator": "nin", "value": acked.iter().map(|a| &a.0).collect::<Vec<_>>()}]});
        let (_, ra) = s
            .json(
                reqwest::Method::POST,
                "/v1/libraries/src/search",
                Some(body.clone()),
            )
            .await;
        let (_, rb) = s
            .json(
                reqwest::Method::POST,
                "/v1/libraries/dst/search",
                Some(body),
            )
            .await;
        assert_eq!(ra["results"], rb["results"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_search_matches_search_and_allows_large_k() {
    let s = start().await;
    s.library("docs", 2).await;
    let mut body = String::new();
    for i in 0..3000 {
        body.push_str(&format!(
            "{{\"id\":\"d{i}\",\"chunks\":[{{\"embedding\":[{i},{}]}}]}}\n",
            i % 7
        ));
    }
    s.ndjson_post("/v1/libraries/docs/documents/stream", body.into())
        .await;
    let q = json!({"embedding": [1500, 3], "k": 2500});
    let resp = s
        .client
        .post(format!("{}/v1/libraries/docs/search/stream", s.base))
        .json(&q)
        .send()
        .await
        .unwrap();
    let out = lines(&resp.text().await.unwrap());
    assert_eq!(out.len(), 2501);
    assert_eq!(out[2500]["summary"]["total_results"], 2500);
    let d: Vec<f64> = out[..2500]
        .iter()
        .map(|r| r["distance"].as_f64().unwrap())
        .collect();
    assert!(d.windows(2).all(|w| w[0] <= w[1]), "rank order");
    assert_eq!(out[0]["rank"], 1);
    let (_, small) = s
        .json(
            reqwest::Method::POST,
            "/v1/libraries/docs/search",
            Some(json!({"embedding": [1500, 3], "k": 50})),
        )
        .await;
    for (i, r) in small["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["chunk"], out[i]["chunk"]);
    }
    let (st, v) = s
        .json(
            reqwest::Method::POST,
            "/v1/libraries/docs/search/stream",
            Some(json!({"embedding": [1, 1], "k": 10_001})),
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"], "invalid_k");
    let (st, v) = s
        .json(
            reqwest::Method::POST,
            "/v1/libraries/nope/documents/stream",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

/// Lines split across body chunks at every possible place still parse as the same lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_split_across_chunks() {
    let s = start().await;
    s.library("docs", 2).await;
    let mut body = String::new();
    for i in 0..40 {
        body.push_str(&format!(
            "{{\"id\":\"d{i}\",\"title\":\"t{i}\",\"chunks\":[{{\"embedding\":[{i},1]}}]}}\n"
        ));
        if i % 10 == 0 {
            body.push('\n');
        }
    }
    body.push_str("{\"id\":\"last\",\"chunks\":[{\"embedding\":[1,1]}]}");
    let bytes = body.into_bytes();
    for piece in [1usize, 7, 50, 4096] {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            bytes.chunks(piece).map(|c| Ok(c.to_vec())).collect();
        let replies = s
            .ndjson_post(
                "/v1/libraries/docs/documents/stream",
                reqwest::Body::wrap_stream(futures::stream::iter(chunks)),
            )
            .await;
        let summary = &replies.last().unwrap()["summary"];
        assert_eq!(summary["committed"], 41, "pieces of {piece} bytes");
        assert_eq!(summary["failed"], 0, "pieces of {piece} bytes: {replies:?}");
        assert_eq!(replies[replies.len() - 2]["document_id"], "last");
    }
}

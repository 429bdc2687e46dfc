//! End-to-end tests of the `quiver` client commands: a real `quiver serve` child process on a
//! temporary data directory, and the CLI run against it with `--url`, checking stdout,
//! stderr and exit codes as a user or a script would see them.
//!
//! What they hold the client to: tables and `--json` agree with the server's state; ingest
//! reports refused lines by their line number and exits 2, commits the rest, and keeps those
//! numbers right when a file is cut into several requests; text files that cannot be embedded
//! fail cleanly; export → import reproduces a library; server errors come out as
//! `error: <detail> (<code>)` with exit 1, and an unreachable server is named; the progress
//! bar never touches stdout; the event tail resumes from its resume file and across a server
//! restart.

mod common;

use assert_cmd::Command;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ the server

/// A running `quiver serve`; killed on drop so a failing test leaks no process.
struct Server {
    /// Held for its `Drop`: the server dies with the test.
    _process: common::ServeProcess,
    url: String,
}

impl Server {
    fn start(data_dir: &Path) -> Server {
        Server::start_at(data_dir, "127.0.0.1:0")
    }

    fn start_at(data_dir: &Path, addr: &str) -> Server {
        let (child, url) = common::spawn_serve(data_dir, addr, &["--fsync", "never"], false);
        Server {
            _process: child,
            url,
        }
    }

    fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("url ends in a port")
    }

    /// Runs the CLI against this server.
    fn run(&self, args: &[&str]) -> Output {
        quiver(&self.url, args)
    }

    /// Runs the CLI, expecting exit code `code`; returns stdout.
    fn ok(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "quiver {args:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.ok(&all, code);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("quiver {args:?}: not JSON ({e}):\n{text}"))
    }
}

fn quiver(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(args)
        .args(["--url", url])
        .env_remove("QUIVER_URL")
        .env_remove("QUIVER_PROGRESS")
        .timeout(Duration::from_secs(120))
        .output()
        .expect("run quiver")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A deterministic 3-dimensional vector for document `i`.
fn vector(i: usize) -> Vec<f64> {
    let a = i as f64 * 0.7;
    vec![
        a.cos().abs() + 0.01,
        a.sin().abs() + 0.01,
        ((i % 7) as f64) / 7.0,
    ]
}

/// Writes an NDJSON file of `n` documents; the 1-based line numbers in `bad` are broken
/// (malformed JSON, or a vector of the wrong dimension on every third one).
fn write_ndjson(path: &Path, n: usize, bad: &[usize]) {
    let mut s = String::new();
    for line in 1..=n {
        if bad.contains(&line) {
            if line % 3 == 0 {
                s.push_str(&json!({"id": format!("d{line}"), "title": "bad", "chunks": [{"text": "x", "embedding": [1.0, 2.0]}]}).to_string());
            } else {
                s.push_str("{\"id\": \"broken\", \"title\": ");
            }
        } else {
            s.push_str(
                &json!({"id": format!("d{line}"), "title": format!("Document {line}"),
                        "metadata": {"n": line},
                        "chunks": [{"text": format!("text of document {line}"), "embedding": vector(line)}]})
                .to_string(),
            );
        }
        s.push('\n');
    }
    std::fs::write(path, s).expect("write ndjson");
}

fn failure_lines(report: &Value) -> Vec<u64> {
    report["failures"]
        .as_array()
        .expect("failures array")
        .iter()
        .map(|f| f["line"].as_u64().expect("line number"))
        .collect()
}

fn num_documents(server: &Server, library: &str) -> u64 {
    server.json(&["libraries", "show", library], 0)["num_documents"]
        .as_u64()
        .expect("num_documents")
}

// ------------------------------------------------------------------ libraries

#[test]
fn libraries_create_list_show_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));

    let table = s.ok(
        &[
            "libraries",
            "create",
            "docs",
            "--dimension",
            "3",
            "--description",
            "my docs",
        ],
        0,
    );
    assert!(table.contains("name") && table.contains("docs"), "{table}");
    assert!(
        table.contains("dimension") && table.contains('3'),
        "{table}"
    );
    let created = s.json(
        &[
            "libraries",
            "create",
            "other",
            "--dimension",
            "4",
            "--metric",
            "l2",
        ],
        0,
    );
    assert_eq!(created["name"], "other");
    assert_eq!(created["metric"], "l2");
    let other_id = created["id"].as_str().expect("id").to_string();

    // The HNSW flags reach the library; an m0 outside m..=2m is the server's error.
    let hnsw = s.json(
        &[
            "libraries",
            "create",
            "approx",
            "--dimension",
            "8",
            "--index",
            "hnsw",
            "--m",
            "12",
            "--m0",
            "12",
            "--ef-search",
            "80",
            "--int8",
        ],
        0,
    );
    assert_eq!(hnsw["index_type"], "hnsw");
    assert_eq!(
        hnsw["index_params"],
        json!({"m": 12, "m0": 12, "ef_construction": 200, "ef_search": 80})
    );
    assert_eq!(hnsw["quantization"]["type"], "int8");
    let out = s.run(&[
        "libraries",
        "create",
        "bad",
        "--dimension",
        "8",
        "--index",
        "hnsw",
        "--m0",
        "40",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(invalid_index_params)") && stderr(&out).contains("m0"),
        "{}",
        stderr(&out)
    );
    s.ok(&["libraries", "delete", "approx"], 0);

    let list = s.ok(&["libraries", "list"], 0);
    let mut lines = list.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with("ID") && header.contains("NAME") && header.contains("DOCS"),
        "{list}"
    );
    assert_eq!(lines.clone().count(), 2, "{list}");
    assert!(
        list.contains("my docs") && list.contains(&other_id),
        "{list}"
    );
    let list = s.json(&["libraries", "list"], 0);
    assert_eq!(list["total"], 2);

    // By name and by id.
    let shown = s.json(&["libraries", "show", "docs"], 0);
    assert_eq!(shown["dimension"], 3);
    assert_eq!(shown["num_documents"], 0);
    assert_eq!(
        s.json(&["libraries", "show", &other_id], 0)["name"],
        "other"
    );
    let text = s.ok(&["libraries", "show", "docs"], 0);
    assert!(
        text.lines()
            .any(|l| l.starts_with("metric") && l.ends_with("cosine")),
        "{text}"
    );

    // A second library of the same name is the server's error, passed through.
    let out = s.run(&["libraries", "create", "docs", "--dimension", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: ") && stderr(&out).contains("(library_exists)"),
        "{}",
        stderr(&out)
    );

    let deleted = s.json(&["libraries", "delete", "other"], 0);
    assert_eq!(deleted["deleted"], "other");
    assert!(deleted["seq"].as_u64().is_some(), "{deleted}");
    let text = s.ok(&["libraries", "delete", "docs"], 0);
    assert!(text.starts_with("deleted library docs (seq "), "{text}");
    assert_eq!(s.json(&["libraries", "list"], 0)["total"], 0);
}

// ------------------------------------------------------------------ ingest

#[test]
fn ingest_reports_bad_lines_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));
    s.ok(&["libraries", "create", "docs", "--dimension", "3"], 0);
    let file = dir.path().join("docs.ndjson");
    let bad = [1, 17, 501, 1200, 2000];
    write_ndjson(&file, 2000, &bad);
    let path = file.to_str().expect("utf-8 path");

    let text = s.ok(&["ingest", path, "--library", "docs"], 2);
    assert!(
        text.starts_with("ingested into docs: 1995 committed, 5 failed (2000 lines"),
        "{text}"
    );
    for n in bad {
        assert!(
            text.contains(&format!("docs.ndjson:{n}: ")),
            "line {n} not reported:\n{text}"
        );
    }
    assert!(
        text.contains("(dimension_mismatch)") && text.contains("(malformed_json)"),
        "{text}"
    );
    assert_eq!(num_documents(&s, "docs"), 1995);

    // Again, as JSON, cut into requests of 300 lines: the same numbers, file line numbers.
    let report = s.json(&["ingest", path, "-l", "docs", "--batch-lines", "300"], 2);
    let sum = &report["summary"];
    assert_eq!(
        (
            sum["lines"].as_u64(),
            sum["committed"].as_u64(),
            sum["failed"].as_u64()
        ),
        (Some(2000), Some(1995), Some(5)),
        "{report}"
    );
    assert!(
        sum["first_seq"].as_u64() < sum["last_seq"].as_u64(),
        "{report}"
    );
    assert_eq!(failure_lines(&report), bad.map(|n| n as u64).to_vec());
    assert_eq!(report["failures"][0]["error"], "malformed_json");
    assert_eq!(report["failures"][4]["error"], "malformed_json");
    assert_eq!(report["failures"][3]["error"], "dimension_mismatch");
    assert_eq!(
        num_documents(&s, "docs"),
        1995,
        "re-ingesting the same ids replaces, not duplicates"
    );

    // --show-failures limits the human list, not the counts.
    let text = s.ok(&["ingest", path, "-l", "docs", "--show-failures", "2"], 2);
    assert!(
        text.contains("failures (first 2 of 5)") && text.contains("… and 3 more"),
        "{text}"
    );

    // A clean file exits 0.
    let clean = dir.path().join("clean.jsonl");
    write_ndjson(&clean, 50, &[]);
    let text = s.ok(&["import", clean.to_str().expect("utf-8"), "-l", "docs"], 0);
    assert!(text.contains("50 committed, 0 failed"), "{text}");
}

#[test]
fn progress_bar_forced_without_a_terminal_keeps_stdout_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));
    s.ok(&["libraries", "create", "docs", "--dimension", "3"], 0);
    let file = dir.path().join("docs.ndjson");
    write_ndjson(&file, 3000, &[10]);
    let path = file.to_str().expect("utf-8 path");

    let out = s.run(&[
        "ingest",
        path,
        "-l",
        "docs",
        "--progress",
        "always",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let report: Value =
        serde_json::from_slice(&out.stdout).expect("stdout is only the JSON report");
    assert_eq!(report["summary"]["committed"], 2999);
    let err = stderr(&out);
    assert!(
        err.contains("KiB") && err.contains('/'),
        "no progress on stderr:\n{err}"
    );
    assert!(!err.contains("error"), "{err}");

    // Through the environment, with a human report.
    let out = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["ingest", path, "-l", "docs", "--url", &s.url])
        .env("QUIVER_PROGRESS", "always")
        .timeout(Duration::from_secs(120))
        .output()
        .expect("run quiver");
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("ingested into docs: 2999 committed, 1 failed"),
        "{text}"
    );
    assert!(
        !text.contains("KiB"),
        "progress leaked onto stdout:\n{text}"
    );
    assert!(stderr(&out).contains("KiB"), "{}", stderr(&out));

    // --quiet beats auto, and auto without a terminal draws nothing.
    let out = s.run(&["ingest", path, "-l", "docs", "--quiet"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn ingest_directory_reports_text_files_that_cannot_be_embedded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));
    s.ok(&["libraries", "create", "docs", "--dimension", "3"], 0);
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::create_dir_all(tree.join(".git")).expect("mkdir");
    std::fs::write(
        tree.join("readme.md"),
        "# Title\n\nA paragraph. Another sentence.\n",
    )
    .expect("write");
    std::fs::write(tree.join("sub/notes.txt"), "Long notes. ".repeat(400)).expect("write");
    std::fs::write(tree.join("image.png"), [0u8, 1, 2]).expect("write");
    std::fs::write(tree.join(".git/HEAD.md"), "hidden").expect("write");
    write_ndjson(&tree.join("sub/data.ndjson"), 20, &[]);

    let text = s.ok(&["ingest", tree.to_str().expect("utf-8"), "-l", "docs"], 2);
    assert!(text.contains("20 committed, 2 failed"), "{text}");
    assert!(text.contains("skipped 1 files"), "{text}");
    assert!(
        text.contains("readme.md: ") && text.contains("sub/notes.txt: "),
        "{text}"
    );
    assert!(text.contains("(embedding_unavailable)"), "{text}");
    assert!(
        !text.contains("HEAD"),
        "hidden entries are skipped:\n{text}"
    );

    let report = s.json(&["ingest", tree.to_str().expect("utf-8"), "-l", "docs"], 2);
    let failures = report["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 2, "{report}");
    for f in failures {
        assert_eq!(f["error"], "embedding_unavailable", "{report}");
        assert!(f["line"].is_null());
    }
    assert_eq!(failures[1]["file"], "sub/notes.txt");
    assert_eq!(failures[1]["document_id"], "sub:notes.txt");
    assert_eq!(num_documents(&s, "docs"), 20);
}

// ------------------------------------------------------------------ search

#[test]
fn search_table_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));
    s.ok(&["libraries", "create", "geo", "--dimension", "3"], 0);
    let file = dir.path().join("geo.ndjson");
    let docs = [
        json!({"id": "east", "title": "East", "metadata": {"lang": "en"},
               "chunks": [{"text": "pointing east\nacross several lines of a fairly long text that the table will have to cut short somewhere", "embedding": [1.0, 0.0, 0.0]}]}),
        json!({"id": "north", "title": "North", "metadata": {"lang": "de"}, "chunks": [{"text": "pointing north", "embedding": [0.0, 1.0, 0.0]}]}),
        json!({"id": "up", "title": "Up", "metadata": {"lang": "en"}, "chunks": [{"text": "pointing up", "embedding": [0.0, 0.1, 1.0]}]}),
    ];
    let body: String = docs.iter().map(|d| format!("{d}\n")).collect();
    std::fs::write(&file, body).expect("write");
    s.ok(&["ingest", file.to_str().expect("utf-8"), "-l", "geo"], 0);

    let text = s.ok(
        &[
            "search",
            "-l",
            "geo",
            "--embedding",
            "[0.9, 0.1, 0]",
            "-k",
            "2",
        ],
        0,
    );
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(
        rows[0].starts_with("RANK") && rows[0].contains("DISTANCE"),
        "{text}"
    );
    let first: Vec<&str> = rows[1].split_whitespace().collect();
    assert_eq!(&first[..3], &["1", first[1], "east"], "{text}");
    assert!(
        rows[1].contains("pointing east across") && rows[1].ends_with('…'),
        "{text}"
    );
    assert!(rows[2].contains("north"), "{text}");

    let v = s.json(
        &[
            "search",
            "-l",
            "geo",
            "--embedding",
            "[0.9, 0.1, 0]",
            "--filter",
            r#"{"lang": "en"}"#,
        ],
        0,
    );
    let ids: Vec<&str> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|h| h["document_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, vec!["east", "up"]);
    let v = s.json(
        &[
            "search",
            "-l",
            "geo",
            "--embedding",
            "1,0,0",
            "--distance-threshold",
            "0.01",
        ],
        0,
    );
    assert_eq!(v["total_results"], 1);

    // Bad input: named locally (vector syntax) or by the server (dimension), exit 1.
    let out = s.run(&["search", "-l", "geo", "--embedding", "[1, x]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--embedding"), "{}", stderr(&out));
    let out = s.run(&["search", "-l", "geo", "--embedding", "[1, 0]"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: ") && stderr(&out).contains("(dimension_mismatch)"),
        "{}",
        stderr(&out)
    );
    let out = s.run(&["search", "-l", "geo", "--query", "where is east"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("(embedding_unavailable)"),
        "{}",
        stderr(&out)
    );
}

// ------------------------------------------------------------------ export / import

#[test]
fn export_then_import_reproduces_a_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));
    s.ok(&["libraries", "create", "src", "--dimension", "3"], 0);
    s.ok(&["libraries", "create", "dst", "--dimension", "3"], 0);
    let file = dir.path().join("src.ndjson");
    write_ndjson(&file, 1500, &[]);
    s.ok(&["ingest", file.to_str().expect("utf-8"), "-l", "src"], 0);

    let out = s.run(&["export", "--library", "src"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exported 1500 documents of src"),
        "{}",
        stderr(&out)
    );
    let exported = dir.path().join("export.ndjson");
    std::fs::write(&exported, &out.stdout).expect("write export");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.lines().count(), 1501, "header + one line per document");
    assert!(text.starts_with("{\"quiver_export\""));

    let report = s.json(
        &[
            "import",
            exported.to_str().expect("utf-8"),
            "--library",
            "dst",
        ],
        0,
    );
    assert_eq!(report["summary"]["committed"], 1500);
    assert_eq!(report["summary"]["failed"], 0);
    assert_eq!(num_documents(&s, "dst"), num_documents(&s, "src"));
    let a = s.json(
        &["search", "-l", "src", "--embedding", "[1,0.2,0]", "-k", "5"],
        0,
    );
    let b = s.json(
        &["search", "-l", "dst", "--embedding", "[1,0.2,0]", "-k", "5"],
        0,
    );
    let ids = |v: &Value| -> Vec<Value> {
        v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|h| h["document_id"].clone())
            .collect()
    };
    assert_eq!(ids(&a), ids(&b));

    // Without vectors, into a file; the same documents.
    let small = dir.path().join("small.ndjson");
    s.ok(
        &[
            "export",
            "-l",
            "src",
            "--no-embeddings",
            "-o",
            small.to_str().expect("utf-8"),
            "-q",
        ],
        0,
    );
    let text = std::fs::read_to_string(&small).expect("read");
    assert_eq!(text.lines().count(), 1501);
    assert!(!text.contains("embedding_b64"));
}

// ------------------------------------------------------------------ errors

#[test]
fn errors_are_one_line_with_exit_code_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("data"));
    let file = dir.path().join("x.ndjson");
    write_ndjson(&file, 3, &[]);
    for args in [
        vec!["libraries", "show", "nope"],
        vec!["libraries", "delete", "nope"],
        vec!["search", "-l", "nope", "--embedding", "[1,0,0]"],
        vec!["export", "-l", "nope"],
        vec!["ingest", file.to_str().expect("utf-8"), "-l", "nope"],
    ] {
        let out = s.run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ")
                && err.contains("\"nope\"")
                && err.trim_end().ends_with("(library_not_found)"),
            "{args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = s.run(&[
        "ingest",
        dir.path().join("missing.ndjson").to_str().expect("utf-8"),
        "-l",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.ndjson"), "{}", stderr(&out));

    // Nobody listening: a port that was just free.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["libraries", "list"],
        vec!["ingest", file.to_str().expect("utf-8"), "-l", "x"],
    ] {
        let out = quiver(&url, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.starts_with("error: cannot connect to the quiver server at ") && err.contains(&url),
            "{err}"
        );
    }
    // A bad command line is exit 1 too (2 is reserved for a partly refused ingest).
    let out = s.run(&["search", "-l", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--embedding"), "{}", stderr(&out));

    let out = quiver("not a url", &["libraries", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a URL"), "{}", stderr(&out));
}

// ------------------------------------------------------------------ events

/// Reads stdout lines of a child into a channel.
fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn events_tail_prints_resumes_and_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let s = Server::start(&data);
    s.ok(&["libraries", "create", "a", "--dimension", "3"], 0);
    s.ok(&["libraries", "create", "b", "--dimension", "3"], 0);

    let text = s.ok(&["events", "tail", "--from-seq", "1", "--limit", "2"], 0);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("1 library.created ") && lines[1].starts_with("2 library.created "),
        "{text}"
    );
    let v: Value = serde_json::from_str(
        s.ok(
            &[
                "events",
                "tail",
                "--from-seq",
                "2",
                "--limit",
                "1",
                "--json",
            ],
            0,
        )
        .trim(),
    )
    .expect("one JSON envelope");
    assert_eq!(
        (v["seq"].as_u64(), v["type"].as_str()),
        (Some(2), Some("library.created"))
    );
    assert_eq!(v["data"]["name"], "b");

    // A resume file: the next run continues after the last printed seq.
    let pos = dir.path().join("pos");
    let pos_s = pos.to_str().expect("utf-8");
    let first = s.ok(
        &[
            "events",
            "tail",
            "--from-seq",
            "1",
            "--limit",
            "1",
            "--resume-file",
            pos_s,
        ],
        0,
    );
    assert!(first.starts_with("1 "), "{first}");
    assert_eq!(
        std::fs::read_to_string(&pos).expect("resume file").trim(),
        "1"
    );
    let second = s.ok(
        &[
            "events",
            "tail",
            "--from-seq",
            "1",
            "--limit",
            "1",
            "--resume-file",
            pos_s,
        ],
        0,
    );
    assert!(
        second.starts_with("2 "),
        "the resume file wins over --from-seq: {second}"
    );
    assert_eq!(
        std::fs::read_to_string(&pos).expect("resume file").trim(),
        "2"
    );

    // The query reaches the server, and what it refuses is not retried.
    let too_long = "x".repeat(1000);
    let out = s.run(&["events", "tail", "--types", &too_long, "--limit", "1"]);
    assert_eq!(out.status.code(), Some(1), "a refused query is not retried");
    assert!(stderr(&out).contains("(invalid_types)"), "{}", stderr(&out));

    // Across a server restart on the same port: the tail reconnects with Last-Event-ID and
    // prints the next event exactly once.
    let port = s.port();
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args([
            "events",
            "tail",
            "--from-seq",
            "1",
            "--limit",
            "3",
            "--max-retries",
            "20",
            "--url",
            &s.url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tail");
    let rx = lines_of(&mut tail);
    let wait = Duration::from_secs(20);
    let l1 = rx.recv_timeout(wait).expect("event 1");
    let l2 = rx.recv_timeout(wait).expect("event 2");
    assert!(l1.starts_with("1 ") && l2.starts_with("2 "), "{l1}\n{l2}");
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        // The port is free again once the old process is gone.
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => {
                drop(l);
                break Server::start_at(&data, &format!("127.0.0.1:{port}"));
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("port {port} stayed busy: {e}"),
        }
    };
    s.ok(&["libraries", "create", "c", "--dimension", "3"], 0);
    let l3 = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("event 3 after the restart");
    assert!(l3.starts_with("3 library.created "), "{l3}");
    let status = tail.wait().expect("tail exits after --limit");
    let mut err = String::new();
    if let Some(mut e) = tail.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "{err}");
    assert!(err.contains("reconnecting after seq 2"), "{err}");
}

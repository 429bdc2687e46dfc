//! Text in, semantic search out, with the real local model and the real binary: a library
//! created with neither dimension nor model gets all-MiniLM-L6-v2 (384-d), a folder of text
//! files is ingested and embedded, and a text query ranks the paraphrase first — offline, from
//! the model cache. Without the model, the refusal names the command that installs it.
//!
//! The model must be installed in `$QUIVER_MODEL_DIR`, else `<workspace>/target/quiver-models`
//! (`.ci/run` does it: `cargo run -p quiver-embed --example embed_tool -- install …`). When it
//! is not, the test says so and skips — unless `QUIVER_REQUIRE_MODELS=1` (CI), where it fails.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MINILM: &str = "local:all-minilm-l6-v2";

fn model_dir() -> PathBuf {
    match std::env::var_os("QUIVER_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/quiver-models"),
    }
}

fn installed() -> Option<PathBuf> {
    let dir = model_dir();
    match quiver_embed::models::is_installed(MINILM, &dir) {
        Ok(true) => Some(dir),
        other => {
            let why = format!("{MINILM} is not installed in {} ({other:?})", dir.display());
            if std::env::var("QUIVER_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

struct Server {
    /// Held for its `Drop`: the server dies with the test.
    _process: common::ServeProcess,
    url: String,
}

impl Server {
    fn start(data_dir: &Path, models: &Path) -> Server {
        let args: [&std::ffi::OsStr; 5] = [
            "--fsync".as_ref(),
            "never".as_ref(),
            "--no-model-install".as_ref(),
            "--model-dir".as_ref(),
            models.as_os_str(),
        ];
        let (child, url) = common::spawn_serve(data_dir, "127.0.0.1:0", &args, false);
        Server {
            _process: child,
            url,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_quiver"))
            .args(args)
            .args(["--url", &self.url])
            .env_remove("QUIVER_URL")
            .env("QUIVER_PROGRESS", "never")
            .stdin(Stdio::null())
            .output()
            .expect("run quiver")
    }

    fn json(&self, args: &[&str], code: i32) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert_eq!(
            out.status.code(),
            Some(code),
            "quiver {args:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }
}

#[test]
fn text_files_in_semantic_search_out() {
    let Some(models) = installed() else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&tmp.path().join("data"), &models);
    let lib = s.json(&["libraries", "create", "notes"], 0);
    assert_eq!(lib["embedding_model"], MINILM, "{lib}");
    assert_eq!(lib["dimension"], 384, "{lib}");

    let tree = tmp.path().join("notes");
    std::fs::create_dir_all(&tree).expect("mkdir");
    for (name, text) in [
        (
            "cat.txt",
            "The cat is sleeping on the warm windowsill in the afternoon sun.",
        ),
        (
            "rust.txt",
            "Rust's borrow checker rejects programs with data races at compile time.",
        ),
        (
            "soup.txt",
            "Simmer the onions slowly, then add the stock and the lentils.",
        ),
        (
            "trains.md",
            "# Timetable\n\nThe night train to Vienna leaves platform four at ten.",
        ),
    ] {
        std::fs::write(tree.join(name), text).expect("write");
    }
    let report = s.json(&["ingest", tree.to_str().expect("utf-8"), "-l", "notes"], 0);
    assert_eq!(report["summary"]["failed"], 0, "{report}");
    assert_eq!(report["summary"]["committed"], 4, "{report}");

    for (query, want) in [
        ("a kitten napping in sunlight", "cat.txt"),
        (
            "memory safety guarantees of a programming language",
            "rust.txt",
        ),
        ("how do I cook a lentil stew", "soup.txt"),
        ("when does the overnight rail service depart", "trains.md"),
    ] {
        let v = s.json(&["search", "-l", "notes", "--query", query, "-k", "2"], 0);
        let top = v["results"][0]["document_id"].as_str().unwrap_or_default();
        assert!(top.ends_with(want), "{query:?} → {top} (want {want}): {v}");
    }
}

#[test]
fn a_missing_model_names_the_command_that_installs_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let empty = tmp.path().join("no-models");
    let s = Server::start(&tmp.path().join("data"), &empty);
    let lib = s.json(&["libraries", "create", "notes"], 0);
    assert_eq!(lib["embedding_model"], MINILM);
    let out = s.run(&["search", "-l", "notes", "--query", "anything"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("quiver models install local:all-minilm-l6-v2")
            && err.contains("embedding_unavailable"),
        "{err}"
    );
}

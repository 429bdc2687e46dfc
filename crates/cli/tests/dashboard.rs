//! The dashboard in a real browser: Debian's `chromium`, headless, driven over the DevTools
//! protocol, against the real `quiver serve` binary on a real socket.
//!
//! The page must show what the server holds and follow the change stream as it happens: the
//! library table from a snapshot, then every later change by `seq`, each event exactly once,
//! across a pause and across a SIGKILL and restart of the server (the page resumes from the
//! last `seq` it saw). Search works through the form, bad input shows the API's error, a
//! name that looks like HTML stays text, and jobs and consumer groups show their state.
//!
//! Without a browser the test says so and passes, like the model tests; `.ci/run` installs
//! `chromium` and sets `QUIVER_REQUIRE_BROWSER=1`, which turns a missing browser into a failure.

mod common;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// How long one condition on the page may take to hold (a CI machine can be slow).
const WAIT_LIMIT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long the browser may take to start and open its DevTools port.
const BROWSER_START_LIMIT: Duration = Duration::from_secs(30);
/// DevTools messages skipped while waiting for one reply (events the test did not ask for).
const CDP_MESSAGES_SKIPPED_LIMIT: usize = 10_000;

fn browser_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("QUIVER_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// The server process; SIGKILLed when dropped, so no server outlives its test.
struct Server {
    child: common::ServeProcess,
    url: String,
}

impl Server {
    fn start(data_dir: &Path, addr: &str) -> Server {
        let (child, url) = common::spawn_serve(data_dir, addr, &["--fsync", "always"], true);
        Server { child, url }
    }

    fn kill9(&mut self) {
        self.child.kill9();
    }
}

/// The browser, in a process group of its own that is SIGKILLed when dropped (Chromium's
/// renderer and helper processes go with it).
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this test created; no memory is involved.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Starts headless Chromium on `url` and returns it with the page's DevTools WebSocket URL.
async fn launch(binary: &Path, url: &str) -> (Browser, String) {
    use std::os::unix::process::CommandExt;
    let profile = tempfile::tempdir().expect("a profile directory");
    let child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn chromium");
    let browser = Browser {
        child,
        _profile: profile,
    };
    // Chromium writes the port it chose to DevToolsActivePort in the profile directory.
    let port_file = browser._profile.path().join("DevToolsActivePort");
    let started = Instant::now();
    let port = loop {
        if let Ok(text) = std::fs::read_to_string(&port_file) {
            if let Some(port) = text
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<u16>().ok())
            {
                break port;
            }
        }
        assert!(
            started.elapsed() < BROWSER_START_LIMIT,
            "chromium did not open its DevTools port within {BROWSER_START_LIMIT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let http = reqwest::Client::new();
    loop {
        let targets: Option<Vec<Value>> = match http
            .get(format!("http://127.0.0.1:{port}/json/list"))
            .send()
            .await
        {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let page = targets
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page" && t["url"].as_str().is_some_and(|u| u.starts_with(url)));
        if let Some(ws) = page.and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from)) {
            return (browser, ws);
        }
        assert!(
            started.elapsed() < BROWSER_START_LIMIT,
            "chromium did not list the page {url} within {BROWSER_START_LIMIT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// One page, driven over the Chrome DevTools Protocol.
struct Page {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn connect(ws_url: &str) -> Page {
        let (socket, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("the DevTools WebSocket opens");
        Page { socket, next_id: 1 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(request.to_string()))
            .await
            .expect("a DevTools request is sent");
        for _ in 0..CDP_MESSAGES_SKIPPED_LIMIT {
            let message = tokio::time::timeout(WAIT_LIMIT, self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no DevTools reply to {method} within {WAIT_LIMIT:?}"))
                .expect("the DevTools socket stays open")
                .expect("a DevTools message");
            let Message::Text(body) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&body).expect("DevTools speaks JSON");
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                return reply["result"].clone();
            }
        }
        panic!("no reply to {method} among {CDP_MESSAGES_SKIPPED_LIMIT} DevTools messages");
    }

    /// Evaluates `expression` in the page and returns its value (a thrown error fails).
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "the page threw on {expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy; fails with `what` and its last value.
    async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                started.elapsed() < WAIT_LIMIT,
                "the page did not show {what} within {WAIT_LIMIT:?} (last: {value})"
            );
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the library table shows `name` with these document and chunk counts.
    async fn wait_for_counts(&mut self, name: &str, documents: u64, chunks: u64) {
        let expression = format!(
            "(() => {{ const r = [...document.querySelectorAll('#libraries tbody tr')].find(r => r.cells[0].textContent === {name});
                      return !!r && r.cells[4].textContent === '{documents}' && r.cells[5].textContent === '{chunks}'; }})()",
            name = json!(name),
        );
        self.wait_for(
            &format!("{name} with {documents} documents and {chunks} chunks"),
            &expression,
        )
        .await;
    }

    /// The seqs in the feed, oldest first.
    async fn feed_seqs(&mut self) -> Vec<u64> {
        let value = self
            .eval("[...document.querySelectorAll('#events tbody tr')].map(r => Number(r.dataset.seq)).reverse()")
            .await;
        serde_json::from_value(value).expect("a list of seqs")
    }

    async fn stream_state(&mut self) -> String {
        self.eval("document.getElementById('stream-state').dataset.state")
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// DevTools network conditions: offline, or online with no throttling.
fn offline(offline: bool) -> Value {
    json!({"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> Value {
    let response = http.post(&url).json(&body).send().await.expect("POST");
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON reply");
    assert!(status.is_success(), "POST {url}: {status} {body}");
    body
}

async fn add_document(http: &reqwest::Client, server: &str, library: &str, title: &str) -> u64 {
    let body = json!({"title": title, "chunks": [
        {"text": format!("{title}: ownership and borrowing"), "embedding": [0.9, 0.1, 0.0]},
        {"text": format!("{title}: async with tokio"), "embedding": [0.1, 0.9, 0.2]},
    ]});
    let reply = post(
        http,
        format!("{server}/v1/libraries/{library}/documents"),
        body,
    )
    .await;
    reply["seq"].as_u64().expect("a write reports its seq")
}

/// Fills the search form and submits it; returns the status line once the search has ended.
async fn search_through_form(page: &mut Page, library_id: &str, query: &str) -> (String, String) {
    let script = format!(
        "(() => {{ document.getElementById('search-status').textContent = '';
                  document.getElementById('search-library').value = {library};
                  document.getElementById('search-query').value = {query};
                  document.getElementById('search-k').value = '2';
                  document.getElementById('search-button').click(); return true; }})()",
        library = json!(library_id),
        query = json!(query),
    );
    page.eval(&script).await;
    let status = page
        .wait_for(
            "the search's outcome",
            "(() => { const s = document.getElementById('search-status');
                      return s.className !== 'muted' && s.textContent ? [s.className, s.textContent] : null; })()",
        )
        .await;
    (
        status[0].as_str().unwrap_or_default().to_string(),
        status[1].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_the_stream_in_a_real_browser() {
    let Some(binary) = browser_binary() else {
        assert!(
            std::env::var_os("QUIVER_REQUIRE_BROWSER").is_none(),
            "QUIVER_REQUIRE_BROWSER is set but no chromium was found (apt-get install chromium, or set QUIVER_CHROMIUM)"
        );
        eprintln!(
            "skipped: no chromium on PATH (apt-get install chromium, or set QUIVER_CHROMIUM)"
        );
        return;
    };
    let data = tempfile::tempdir().expect("a data directory");
    let mut server = Server::start(data.path(), "127.0.0.1:0");
    let base = server.url.clone();
    let http = reqwest::Client::new();

    // A library that exists before the page opens comes from the snapshot.
    let news = post(
        &http,
        format!("{base}/v1/libraries"),
        json!({"name": "news", "dimension": 3, "metric": "cosine"}),
    )
    .await;
    let news_id = news["id"].as_str().expect("an id").to_string();

    // `/` leads to the page.
    let (browser, ws_url) = launch(&binary, &format!("{base}/")).await;
    let mut page = Page::connect(&ws_url).await;
    page.wait_for(
        "the dashboard at /",
        "location.pathname === '/dashboard' && document.title === 'Quiver'",
    )
    .await;
    page.wait_for(
        "the library from the snapshot",
        "[...document.querySelectorAll('#libraries td.name')].some(td => td.textContent === 'news')",
    )
    .await;
    page.wait_for(
        "a live stream",
        "document.getElementById('stream-state').dataset.state === 'live'",
    )
    .await;

    // A write shows up in the feed with its seq and type, and in the library's counts.
    let first = add_document(&http, &base, "news", "one").await;
    page.wait_for(
        "the document.added event",
        &format!("document.querySelector('#events tr[data-seq=\"{first}\"] td.type')?.textContent === 'document.added'"),
    )
    .await;
    page.wait_for_counts("news", 1, 2).await;

    // A name that looks like HTML is shown as text and runs nothing.
    let trap = "<img src=x onerror=\"window.__injected=1\">";
    post(
        &http,
        format!("{base}/v1/libraries"),
        json!({"name": trap, "dimension": 3}),
    )
    .await;
    page.wait_for(
        "the HTML-looking name as text",
        &format!(
            "[...document.querySelectorAll('#libraries td.name')].some(td => td.textContent === {})",
            json!(trap)
        ),
    )
    .await;
    assert_eq!(
        page.eval(
            "[window.__injected === undefined, document.querySelectorAll('main img').length]"
        )
        .await,
        json!([true, 0]),
        "markup from a library name reached the DOM"
    );

    // Search through the form: nearest first, with the seq the answer is consistent at.
    let (class, status) = search_through_form(&mut page, &news_id, "[0.9, 0.1, 0.0]").await;
    assert_eq!(class, "ok", "{status}");
    assert!(status.contains("consistent at seq"), "{status}");
    let chunks = page
        .eval("[...document.querySelectorAll('#search-results tbody td.chunk')].map(td => td.textContent)")
        .await;
    assert_eq!(
        chunks,
        json!(["one: ownership and borrowing", "one: async with tokio"])
    );
    // Bad input: the page's own check, then the API's JSON error, shown as they are.
    let (class, status) = search_through_form(&mut page, &news_id, "[0.9, 0.1").await;
    assert_eq!(class, "error");
    assert!(
        status.starts_with("the embedding is not a JSON array"),
        "{status}"
    );
    let (class, status) = search_through_form(&mut page, &news_id, "[1, 2]").await;
    assert_eq!(class, "error");
    let api_error = http
        .post(format!("{base}/v1/libraries/news/search"))
        .json(&json!({"embedding": [1, 2], "k": 2}))
        .send()
        .await
        .expect("POST search");
    assert_eq!(api_error.status(), 422);
    let api_error: Value = api_error.json().await.expect("a JSON error");
    assert_eq!(
        status,
        format!(
            "{}: {}",
            api_error["error"].as_str().unwrap_or_default(),
            api_error["detail"].as_str().unwrap_or_default()
        )
    );

    // Paused, the feed stands still while events keep arriving; resumed, it shows them all.
    page.eval("document.getElementById('pause').click()").await;
    let mut paused: Vec<u64> = Vec::new();
    for title in ["two", "three", "four"] {
        paused.push(add_document(&http, &base, "news", title).await);
    }
    page.wait_for(
        "the count of events that arrived while paused",
        "document.getElementById('feed-note').textContent.startsWith('paused; 3 new')",
    )
    .await;
    let shown = page.feed_seqs().await;
    assert!(
        paused.iter().all(|s| !shown.contains(s)),
        "a paused feed showed new events: {shown:?}"
    );
    page.eval("document.getElementById('pause').click()").await;
    let last = *paused.last().expect("three writes");
    page.wait_for(
        "the events written while paused",
        &format!("!!document.querySelector('#events tr[data-seq=\"{last}\"]')"),
    )
    .await;

    // SIGKILL, restart on the same address, and write while the page cannot reach it (the
    // browser is told it is offline): back online, it resumes from the last seq it saw, so
    // those writes arrive, once each, in order.
    let addr = base.trim_start_matches("http://").to_string();
    server.kill9();
    page.wait_for(
        "the stream noticing the dead server",
        "document.getElementById('stream-state').dataset.state === 'reconnecting'",
    )
    .await;
    page.call("Network.enable", json!({})).await;
    page.call("Network.emulateNetworkConditions", offline(true))
        .await;
    server = Server::start(data.path(), &addr);
    assert_eq!(server.url, base, "the server came back on its address");
    let mut after = Vec::new();
    for title in ["five", "six"] {
        after.push(add_document(&http, &base, "news", title).await);
    }
    assert_eq!(page.stream_state().await, "reconnecting");
    page.call("Network.emulateNetworkConditions", offline(false))
        .await;
    let newest = *after.last().expect("two writes");
    page.wait_for(
        "the writes made while the page was away",
        &format!("!!document.querySelector('#events tr[data-seq=\"{newest}\"]')"),
    )
    .await;
    page.wait_for_counts("news", 6, 12).await;

    // The feed holds the history before the snapshot (seq 1, the library's creation), then
    // every later change once, in order: exactly the log's seqs 1..=newest, no gap, no repeat,
    // across the pause, the SIGKILL and the restart.
    let seqs = page.feed_seqs().await;
    assert_eq!(seqs, (1..=newest).collect::<Vec<u64>>());
    assert!(first < paused[0] && paused[2] < after[0]);

    // The type filter narrows the feed in place.
    page.eval("(() => { const f = document.getElementById('filter-types'); f.value = 'library.*'; f.dispatchEvent(new Event('input')); return true; })()")
        .await;
    page.wait_for(
        "only library events",
        "(() => { const t = [...document.querySelectorAll('#events td.type')].map(td => td.textContent);
                  return t.length === 2 && t.every(x => x === 'library.created'); })()",
    )
    .await;

    // Jobs and consumer groups have their panels: a job shows its outcome as its events
    // arrive, a consumer group its position and lag (from the bus statistics).
    post(
        &http,
        format!("{base}/v1/consumers"),
        json!({"name": "mirror", "start": "beginning"}),
    )
    .await;
    let job = post(
        &http,
        format!("{base}/v1/jobs/batch_export"),
        json!({"library_id": news_id}),
    )
    .await;
    let job_id = job["job_id"].as_str().expect("a job id");
    page.wait_for(
        "the export job, completed",
        &format!(
            "document.querySelector('#jobs tr[data-id={}] td.status')?.textContent === 'completed'",
            json!(job_id)
        ),
    )
    .await;
    page.wait_for(
        "the consumer group with its lag",
        "[...document.querySelectorAll('#consumers tbody tr')]
             .some(r => r.cells[0].textContent === 'mirror' && Number(r.cells[2].textContent) > 0)",
    )
    .await;
    drop(page);
    drop(browser);
}

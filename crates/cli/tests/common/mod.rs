//! What the CLI crate's integration tests share: starting the real `quiver serve` binary.
//!
//! Every test file is its own crate and pulls this in with `mod common;`. It owns only the
//! start-up handshake (spawn, wait for the address line, drain stdout) and the process's end
//! ([`ServeProcess`]: SIGKILLed and reaped when dropped, so a failing test leaks no server),
//! never what a test does with the server, so each file keeps its own `Server` with the
//! methods it needs.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long `quiver serve` may take to print its address (it loads a snapshot and replays the
/// log first; a loaded CI machine can be slow).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Spawns `quiver serve --addr <addr> --data-dir <data_dir> <args…>` with logs at `warn`,
/// waits for its `quiver listening on <url>` line and returns the process and the URL. stderr is
/// the test's own when `show_stderr`, else discarded. The rest of stdout is read and dropped
/// on a thread, so the server never blocks on a full pipe. If no address line comes within
/// [`START_TIMEOUT`], the child is killed before the panic, so no server outlives its test.
pub fn spawn_serve<S: AsRef<OsStr>>(
    data_dir: &Path,
    addr: &str,
    args: &[S],
    show_stderr: bool,
) -> (ServeProcess, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_quiver"))
        .args(["serve", "--addr", addr, "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env("QUIVER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if show_stderr {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn quiver serve");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Discarded as it comes (not collected), so a chatty server costs no memory here.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
    match line.trim().strip_prefix("quiver listening on ") {
        Some(url) => (
            ServeProcess {
                child,
                reaped: false,
            },
            url.to_string(),
        ),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("quiver serve did not print its address within {START_TIMEOUT:?} (first line: {line:?})");
        }
    }
}

/// A running `quiver serve`: SIGKILLed and reaped when dropped, so no server outlives its test
/// (a panicking test included).
pub struct ServeProcess {
    child: Child,
    /// Set once `kill9` has reaped it: a reaped pid may already belong to another process.
    reaped: bool,
}

impl ServeProcess {
    /// The server's pid (for `/proc/<pid>/…`).
    #[allow(dead_code)] // not every test file reads it
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, the way a crash ends a process (no shutdown path runs), then reap, so a
    /// restart finds the data directory free. Panics if the server had already exited 0.
    #[allow(dead_code)] // not every test file crashes its server
    pub fn kill9(&mut self) {
        if self.reaped {
            return;
        }
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().expect("reap the server");
        self.reaped = true;
        assert!(!status.success(), "a SIGKILLed server cannot exit 0");
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

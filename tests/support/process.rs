//! Running the `crsync` binary from tests: commands with a time limit, and a
//! long-running child (a server, `sync --watch`) whose output lines are read
//! with timeouts.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Limit on one short command (`enable`, `status`, `sync --once`).
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit on waiting for one expected line of a long-running child.
pub(crate) const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub(crate) fn crsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crsync"));
    // Never inherit the developer's token or log settings.
    cmd.env_remove("CRSYNC_TOKEN").env_remove("RUST_LOG");
    cmd
}

/// What a finished command printed.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    /// The exit code (`None` if killed by a signal).
    pub(crate) fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the output unless the command succeeded.
    pub(crate) fn assert_success(&self) -> &Self {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }

    /// Panics unless the command failed with `code` and `stderr` contains `needle`.
    pub(crate) fn assert_failure(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(self.code(), Some(code), "unexpected exit: {self:#?}");
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        self
    }
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Runs `cmd` to completion; kills it and panics past `COMMAND_TIMEOUT`.
pub(crate) fn run(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crsync");
    let stdout = read_all(child.stdout.take().expect("piped"));
    let stderr = read_all(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {COMMAND_TIMEOUT:?}; stderr: {}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().expect("reader"),
        stderr: stderr.join().expect("reader"),
    }
}

/// A long-running child whose stdout lines arrive on a channel; killed on drop.
pub(crate) struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    /// Starts `cmd`.
    pub(crate) fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crsync");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Some(read_all(child.stderr.take().expect("piped")));
        Running {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits for a line containing `needle` and returns it; panics (with
    /// everything seen so far) past `LINE_TIMEOUT` or if the child ends.
    pub(crate) fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    let stderr = self
                        .stderr
                        .take()
                        .map(|h| h.join().unwrap_or_default())
                        .unwrap_or_default();
                    panic!(
                        "no line with {needle:?} ({e:?}); stdout so far: {:#?}; stderr: {stderr}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Whether the child has exited.
    /// Sends `signal` (such as `HUP`) to the child with `kill -s`.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} failed");
    }

    pub(crate) fn has_exited(&mut self) -> bool {
        self.exited().is_some()
    }

    /// SIGKILL (`kill -9`: no clean-up runs) if still running, then reaps
    /// the child; returns whether it was still running.
    pub(crate) fn kill(&mut self) -> bool {
        let running = !self.has_exited();
        if running {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        running
    }

    /// The child's exit status, if it has ended.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait")
    }

    /// Kills the child with SIGKILL (`kill -9`: no cleanup runs) and waits
    /// for it; returns its status and everything it printed on stdout.
    pub(crate) fn kill_9(mut self) -> (ExitStatus, Vec<String>) {
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait");
        (status, self.rest_of_stdout())
    }

    /// Waits (within [`COMMAND_TIMEOUT`]) for the child to exit; `what` says
    /// what it was waiting for, in the panic.
    fn exit_within_timeout(&mut self, what: &str) -> ExitStatus {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "crsync did not {what} within {COMMAND_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The lines seen so far and the rest of stdout (the reader thread ends
    /// with the pipe).
    fn rest_of_stdout(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.seen);
        while let Ok(line) = self.lines.recv_timeout(LINE_TIMEOUT) {
            out.push(line);
        }
        out
    }

    /// Waits for the child to exit by itself (within [`COMMAND_TIMEOUT`]);
    /// returns its status, stdout and stderr.
    pub(crate) fn wait_exit(mut self) -> Output {
        let status = self.exit_within_timeout("exit");
        let out = self.rest_of_stdout();
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        Output {
            status,
            stdout: out.join("\n"),
            stderr: stderr.unwrap_or_default(),
        }
    }

    /// As [`terminate`](Self::terminate), also returning all of stderr.
    pub(crate) fn terminate_with_stderr(mut self) -> (ExitStatus, Vec<String>, String) {
        let stderr = self.stderr.take();
        let (status, rest) = self.terminate();
        let stderr = stderr.map(|h| h.join().unwrap_or_default());
        (status, rest, stderr.unwrap_or_default())
    }

    /// Sends SIGTERM and waits for the exit; returns its status and the rest of stdout.
    pub(crate) fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let status = self.exit_within_timeout("stop after SIGTERM");
        (status, self.rest_of_stdout())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `crsync serve` on 127.0.0.1, port 0.
pub(crate) struct TestServer {
    pub(crate) running: Running,
    /// `http://127.0.0.1:<port>`.
    pub(crate) base: String,
}

impl TestServer {
    /// Starts `crsync serve` in `dir` with `schema` for new databases and
    /// `token` in `CRSYNC_TOKEN`, plus `extra` arguments.
    pub(crate) fn start(
        dir: &Path,
        schema: &Path,
        token: Option<&str>,
        extra: &[&str],
    ) -> TestServer {
        Self::start_on("127.0.0.1:0", dir, schema, token, extra)
    }

    /// As [`start`](Self::start), listening on `bind` (to restart a server
    /// on the port it had).
    pub(crate) fn start_on(
        bind: &str,
        dir: &Path,
        schema: &Path,
        token: Option<&str>,
        extra: &[&str],
    ) -> TestServer {
        let mut cmd = crsync();
        cmd.arg("serve")
            .args(["--bind", bind, "--allow-create", "--data-dir"])
            .arg(dir.join("server"))
            .arg("--schema")
            .arg(schema)
            .args(extra);
        if let Some(token) = token {
            cmd.env("CRSYNC_TOKEN", token);
        }
        let mut running = Running::start(cmd);
        let line = running.wait_for_line("crsync server listening on ");
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .expect("address in the line")
            .to_owned();
        TestServer { running, base }
    }

    /// The URL of database `name`.
    pub(crate) fn db_url(&self, name: &str) -> String {
        format!("{}/db/{name}", self.base)
    }

    /// `127.0.0.1:<port>`.
    pub(crate) fn addr(&self) -> &str {
        self.base
            .trim_start_matches("https://")
            .trim_start_matches("http://")
    }
}

/// A temp dir with the server's schema for new databases (`server.sql`) and
/// the clients' (`client.sql`), for `crsync enable` and `crsync serve`.
pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
}

impl Fixture {
    /// One schema for the server and the clients.
    pub(crate) fn new(schema: &str) -> Fixture {
        Fixture::with_schemas(schema, schema)
    }

    /// The server's schema and the clients'.
    pub(crate) fn with_schemas(server: &str, client: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("server.sql"), server).expect("write schema");
        std::fs::write(dir.path().join("client.sql"), client).expect("write schema");
        Fixture { dir }
    }

    pub(crate) fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Creates `name` with the client schema and `notes` enabled, via the CLI.
    pub(crate) fn client_db(&self, name: &str) -> std::path::PathBuf {
        let db = self.path(name);
        let mut cmd = crsync();
        cmd.arg("enable")
            .arg("--db")
            .arg(&db)
            .arg("--schema")
            .arg(self.path("client.sql"))
            .arg("notes");
        run(cmd).assert_success();
        db
    }

    /// `crsync serve` on 127.0.0.1, port 0 (see [`TestServer::start`]).
    pub(crate) fn server(&self, token: Option<&str>, extra: &[&str]) -> TestServer {
        self.server_on("127.0.0.1:0", token, extra)
    }

    /// `crsync serve` listening on `bind` (see [`TestServer::start_on`]).
    pub(crate) fn server_on(&self, bind: &str, token: Option<&str>, extra: &[&str]) -> TestServer {
        TestServer::start_on(
            bind,
            self.dir.path(),
            &self.path("server.sql"),
            token,
            extra,
        )
    }
}

/// Runs SQL on a database file through the Store (cr-sqlite loaded), then closes it.
pub(crate) fn write_sql(db: &Path, sql: &'static str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let store = crsync::Store::open(db).await.expect("open");
            store
                .write(move |tx| tx.execute_batch(sql))
                .await
                .expect("write");
            store.close().await.expect("close");
        });
}

//! Shared by the server's integration tests: the real `pagesync-server` binary as a child
//! process, and S3 buckets on moto.
#![allow(dead_code)] // each test binary uses part of it

pub mod probe;
pub mod s3;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The server process; killed (SIGKILL) and reaped when dropped, also when a test panics.
pub struct ServerProcess(pub Child);

impl ServerProcess {
    pub fn sigkill(&mut self) {
        self.0.kill().expect("SIGKILL"); // std's Child::kill sends SIGKILL on unix
        self.0.wait().expect("reaped");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start(port: u16, journal: &str) -> ServerProcess {
    start_with(port, journal, &[])
}

/// Starts a server on a port the kernel picks (no race with other tests for a free port) and
/// returns it with that port, read from the server's "listening on" log line.
pub fn start_on_any_port(journal: &str, extra: &[&str]) -> (ServerProcess, u16) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["--listen", "127.0.0.1:0", "--journal", journal])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagesync-server");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let server = ServerProcess(child);
    for line in lines.by_ref() {
        let line = line.expect("read the server's log");
        if let Some(rest) = line.split("listening on ws://127.0.0.1:").nth(1) {
            let port = rest.split('/').next().and_then(|p| p.parse().ok()).expect("a port in the log line");
            // Keep draining the log so the server never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return (server, port);
        }
    }
    panic!("pagesync-server exited before listening");
}

/// `start` with extra flags.
pub fn start_with(port: u16, journal: &str, extra: &[&str]) -> ServerProcess {
    start_with_env(port, journal, extra, &[])
}

/// `start_with`, with environment variables set (an S3 endpoint of its own, say).
pub fn start_with_env(port: u16, journal: &str, extra: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--journal", journal])
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagesync-server");
    let server = ServerProcess(child);
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("pagesync-server did not start on port {port}");
}

/// Runs the `pagesync` CLI (built beside the server binary by the workspace build) on `doc`
/// with `token` and its own data directory.
pub fn cli_as(
    port: u16,
    data: &std::path::Path,
    doc: pagesync::DocId,
    token: &str,
    args: &[&str],
) -> std::process::Output {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_pagesync-server")).with_file_name("pagesync");
    assert!(path.exists(), "{} is missing: build the workspace (cargo build --workspace)", path.display());
    Command::new(path)
        .args(["--server", &format!("ws://127.0.0.1:{port}/v1/sync"), "--timeout-ms", "20000"])
        .args(["--doc", &doc.to_string(), "--token", token])
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run pagesync")
}

/// One HTTP request to the server on `port` (with a bearer `token` when given): the status code
/// and the body.
pub fn http_request(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nhost: localhost\r\n{auth}\r\n").expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    (status, text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

//! The `pagesync` CLI binary against a real server on a loopback port: two data directories
//! converge, offline writes wait and then sync, rejections are reported with the server's
//! message, `sync` fails loudly without a server, and `repl` reads statements from stdin.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use pagesync_server::{Metrics, ServerConfig, Store, serve};

const DOC: &str = "0000000000000000000000000000c11a";

struct Server {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    fn start(data: &Path, addr: SocketAddr) -> (Server, SocketAddr) {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = ServerConfig::new(addr, Store::Files(data.to_path_buf()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(serve(listener, cfg, Arc::new(Metrics::default()), async move {
            let _ = stopped.await;
        }));
        (Server { rt, stop: Some(stop), task: Some(task) }, addr)
    }

    fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        let task = self.task.take().expect("running");
        self.rt.block_on(task).expect("join").expect("server ran");
    }
}

fn cli_with(addr: SocketAddr, data: &Path, timeout_ms: u64, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagesync"))
        .args(["--server", &format!("ws://{addr}/v1/sync"), "--doc", DOC])
        .args(["--timeout-ms", &timeout_ms.to_string()])
        .arg("--data")
        .arg(data)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pagesync");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("pagesync ran")
}

fn cli(addr: SocketAddr, data: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    cli_with(addr, data, 5_000, args, stdin)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "pagesync failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_cli_clients_converge_offline_writes_sync_and_rejections_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));

    let ddl = "CREATE TABLE t(x TEXT NOT NULL CHECK (length(x) > 0))";
    assert!(ok(&cli(addr, &a, &["exec", ddl], None)).contains("confirmed"));
    assert!(ok(&cli(addr, &a, &["exec", "INSERT INTO t VALUES (?1)", "from a"], None)).contains("confirmed"));
    let seen = ok(&cli(addr, &b, &["query", "SELECT x FROM t"], None));
    assert_eq!(seen, "x\nfrom a\n");
    let json = ok(&cli(addr, &b, &["query", "--json", "SELECT x FROM t"], None));
    assert_eq!(json.trim(), r#"[{"x":"from a"}]"#);

    // A write the server refuses: non-zero exit and the server's reason.
    let rejected = cli(addr, &b, &["exec", "INSERT INTO t VALUES ('')"], None);
    assert!(!rejected.status.success());
    assert!(String::from_utf8_lossy(&rejected.stderr).contains("CHECK constraint failed"), "{rejected:?}");
    let status = ok(&cli(addr, &b, &["status"], None));
    assert!(status.contains("rejected\t1") && status.contains("CHECK constraint failed"), "{status}");

    // Offline: the write is kept, `sync` fails with a non-zero exit, `status` shows it pending.
    server.stop();
    let offline = ok(&cli(addr, &b, &["exec", "--offline", "INSERT INTO t VALUES ('offline')"], None));
    assert!(offline.contains("pending"), "{offline}");
    let failed = cli_with(addr, &b, 300, &["sync"], None);
    assert!(!failed.status.success(), "sync without a server fails");
    assert!(ok(&cli_with(addr, &b, 300, &["status"], None)).contains("pending\t1"));

    // The server is back on the same port and data: the offline write reaches A.
    let (server, _) = Server::start(&dir.path().join("server"), addr);
    assert_eq!(ok(&cli(addr, &b, &["sync"], None)).trim(), "synced");
    let rows = ok(&cli(addr, &a, &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(rows, "x\nfrom a\noffline\n");

    // repl: statements from stdin, reads and writes, and dot commands.
    let session =
        "INSERT INTO t VALUES ('from the repl');\nSELECT count(*) AS n\n  FROM t;\n.status\n.quit\n";
    let out = ok(&cli(addr, &a, &["repl"], Some(session)));
    assert!(out.contains("applied locally"), "{out}");
    assert!(out.contains("n\n3\n"), "{out}");
    assert!(out.contains("pending\t"), "{out}");
    let rows = ok(&cli(addr, &b, &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(rows, "x\nfrom a\noffline\nfrom the repl\n");
    server.stop();
}

#[test]
fn a_long_sync_draws_progress_and_export_writes_a_sqlite_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    let writer = dir.path().join("writer");
    let mut script = String::from("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);\n");
    for k in 0..40 {
        script.push_str(&format!("INSERT INTO t VALUES ({k}, hex(zeroblob(2000)));\n"));
    }
    ok(&cli(addr, &writer, &["repl"], Some(&script)));

    let reader = dir.path().join("reader");
    let file = dir.path().join("out.sqlite");
    let out = Command::new(env!("CARGO_BIN_EXE_pagesync"))
        .args(["--server", &format!("ws://{addr}/v1/sync"), "--doc", DOC, "--data"])
        .arg(&reader)
        .arg("export")
        .arg(&file)
        .env("PAGESYNC_PROGRESS", "1")
        .output()
        .expect("pagesync export");
    let stdout = ok(&out);
    assert!(stdout.contains("wrote"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let frames: Vec<&str> = stderr.split('\r').filter(|f| f.starts_with("syncing [")).collect();
    assert!(!frames.is_empty(), "no progress drawn: {stderr:?}");
    let last = frames.last().expect("a frame").trim_end();
    let counts = last.split("] ").nth(1).and_then(|r| r.split(' ').next()).expect("n/m");
    let (have, total) = counts.split_once('/').expect("n/m");
    assert_eq!(have, total, "the last frame shows the sync complete: {last}");
    assert!(total.parse::<u64>().expect("number") >= 2, "{last}");
    assert!(last.contains("[##############################]"), "{last}");
    let bytes = std::fs::read(&file).expect("exported file");
    assert_eq!(&bytes[..16], b"SQLite format 3\0");
    assert!(bytes.len() > 80_000, "40 rows of 4 kB text: {} bytes", bytes.len());
    server.stop();
}

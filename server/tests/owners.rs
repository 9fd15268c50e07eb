//! One owner per replica and per store, with the real binaries: a `pagesync repl` and a
//! `pagesync exec` on one `--data`, two `exec` loops on one `--data`, and two servers on one
//! `file://` directory. Every write reported confirmed is on the server exactly once; a second
//! opener waits or fails naming the holder; a second server refuses to start.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::start_on_any_port;

const DOC: &str = "000000000000000000000000000000c0";

fn cli_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_pagesync-server")).with_file_name("pagesync");
    assert!(path.exists(), "{} is missing: build the workspace (cargo build --workspace)", path.display());
    path
}

fn cli(port: u16, data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(cli_binary());
    c.args(["--server", &format!("ws://127.0.0.1:{port}/v1/sync"), "--doc", DOC, "--timeout-ms", "20000"])
        .arg("--data")
        .arg(data)
        .args(args);
    c
}

fn run(c: &mut Command) -> Output {
    c.output().expect("run pagesync")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The rows of `SELECT v FROM t ORDER BY v` as the server has them (through a fresh replica).
fn server_rows(port: u16, dir: &Path) -> Vec<String> {
    let fresh = dir.join(format!("fresh-{}", rand_suffix()));
    let out = run(&mut cli(port, &fresh, &["query", "SELECT v FROM t ORDER BY v"]));
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).lines().skip(1).map(str::to_owned).collect()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos()
}

#[test]
fn a_repl_and_an_exec_on_one_replica_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().join("store").display()), &[]);
    let alice = dir.path().join("alice");
    let out = run(&mut cli(port, &alice, &["exec", "CREATE TABLE t(v TEXT)"]));
    assert!(out.status.success(), "{}", text(&out));

    let mut repl = cli(port, &alice, &["repl"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("repl");
    let mut stdin = repl.stdin.take().expect("stdin");
    writeln!(stdin, "INSERT INTO t VALUES ('from the repl');").expect("write");
    std::thread::sleep(Duration::from_millis(500));

    // The replica is the repl's: an exec waits, then names it.
    let out =
        run(&mut cli(port, &alice, &["--wait-ms", "1000", "exec", "INSERT INTO t VALUES ('from exec')"]));
    assert!(!out.status.success(), "a second process wrote the replica: {}", text(&out));
    let err = text(&out);
    assert!(err.contains("open in another process") && err.contains("repl") && err.contains("pid"), "{err}");

    writeln!(stdin, "INSERT INTO t VALUES ('repl again');").expect("write");
    writeln!(stdin, ".quit").expect("quit");
    drop(stdin);
    let done = repl.wait_with_output().expect("repl ends");
    assert!(done.status.success(), "{}", text(&done));
    // Now the exec gets it.
    let out = run(&mut cli(port, &alice, &["exec", "INSERT INTO t VALUES ('from exec')"]));
    assert!(out.status.success() && text(&out).contains("confirmed"), "{}", text(&out));
    let out = run(&mut cli(port, &alice, &["status"]));
    assert!(text(&out).contains("pending\t0"), "{}", text(&out));
    assert_eq!(server_rows(port, dir.path()), ["from exec", "from the repl", "repl again"]);
}

#[test]
fn two_exec_loops_on_one_replica_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().join("store").display()), &[]);
    let data = dir.path().join("shared");
    let out = run(&mut cli(port, &data, &["exec", "CREATE TABLE t(v TEXT)"]));
    assert!(out.status.success(), "{}", text(&out));
    let loops: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut confirmed = Vec::new();
                for i in 0..40 {
                    let v = format!("{name}{i:02}");
                    let out = run(&mut cli(port, &data, &["exec", &format!("INSERT INTO t VALUES ('{v}')")]));
                    assert!(out.status.success(), "exec {v}: {}", text(&out));
                    if text(&out).contains("confirmed") {
                        confirmed.push(v);
                    }
                }
                confirmed
            })
        })
        .collect();
    let mut confirmed: Vec<String> = loops.into_iter().flat_map(|l| l.join().expect("loop")).collect();
    confirmed.sort();
    assert_eq!(confirmed.len(), 80, "every exec reported confirmed");
    assert_eq!(
        server_rows(port, dir.path()),
        confirmed,
        "each confirmed write is on the server exactly once"
    );
}

#[test]
fn a_second_server_on_one_file_store_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("file://{}", dir.path().display());
    let (first, port) = start_on_any_port(&store, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["--listen", "127.0.0.1:0", "--journal", &store])
        .output()
        .expect("second server");
    assert!(!out.status.success(), "a second server started on one store");
    let err = text(&out);
    assert!(err.contains("another pagesync-server is serving") && err.contains("pid"), "{err}");
    // The first still serves.
    let out = run(&mut cli(port, &dir.path().join("c"), &["exec", "CREATE TABLE t(v TEXT)"]));
    assert!(out.status.success(), "{}", text(&out));
    // Once it is gone, a server starts there again.
    drop(first);
    let (_again, _) = start_on_any_port(&store, &[]);
}

/// A directory is either a `file://` store or an `object+file://` one: the two keep documents
/// in different forms, and a server of one kind refuses to start while one of the other serves it.
#[test]
fn a_file_store_and_an_object_store_never_share_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, objects) =
        (format!("file://{}", dir.path().display()), format!("object+file://{}", dir.path().display()));
    for (first, second) in [(&files, &objects), (&objects, &files)] {
        let (running, _) = start_on_any_port(first, &[]);
        let out = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
            .args(["--listen", "127.0.0.1:0", "--journal", second])
            .output()
            .expect("second server");
        assert!(!out.status.success(), "{second} started beside {first}");
        let err = text(&out);
        assert!(err.contains("another pagesync-server is serving") && err.contains("pid"), "{err}");
        if first == &files {
            // Nor does a restore write into a store a server is serving, even as a new document.
            let out = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
                .args(["restore", "--journal", first, "--doc", &"1".repeat(32), "--at", "lsn:1"])
                .args(["--to", &"2".repeat(32)])
                .output()
                .expect("restore");
            assert!(!out.status.success(), "a restore ran beside the server");
            assert!(text(&out).contains("another pagesync-server is serving"), "{}", text(&out));
        }
        drop(running);
    }
}

#[test]
fn a_killed_owner_frees_its_replica_and_its_acknowledged_writes_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, port) = start_on_any_port(&format!("file://{}", dir.path().join("store").display()), &[]);
    let alice = dir.path().join("alice");
    let out = run(&mut cli(port, &alice, &["exec", "CREATE TABLE t(v TEXT)"]));
    assert!(out.status.success(), "{}", text(&out));
    drop(server); // offline: the repl's write stays pending, acknowledged locally
    let mut repl = cli(port, &alice, &["repl"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("repl");
    let mut stdin = repl.stdin.take().expect("stdin");
    writeln!(stdin, "INSERT INTO t VALUES ('acknowledged offline');").expect("write");
    let mut stdout = repl.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("applied locally") {
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("repl output");
        assert!(n > 0, "the repl ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    repl.kill().expect("SIGKILL the owner");
    repl.wait().expect("reaped");
    // The kernel dropped its lock; the next process owns the replica and sends the write.
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().join("store").display()), &[]);
    let out = run(&mut cli(port, &alice, &["sync"]));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(server_rows(port, dir.path()), ["acknowledged offline"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_in_one_process_cannot_both_open_a_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = "ws://127.0.0.1:9/v1/sync"; // nothing listens: offline is enough
    let doc: pagesync::DocId = DOC.parse().expect("doc");
    let first = pagesync_client::Client::connect(url, "", dir.path()).expect("first");
    let _open = first.open(doc).expect("first open");
    let second = pagesync_client::Client::connect(url, "", dir.path()).expect("second");
    match second.open_wait(doc, Duration::from_millis(200)).await {
        Err(pagesync_client::ClientError::ReplicaBusy { holder, .. }) => {
            assert!(holder.contains(&std::process::id().to_string()), "{holder}")
        }
        other => panic!("expected ReplicaBusy, got {other:?}"),
    }
    drop(_open);
    drop(first); // the lock goes with the client, once its background task has stopped
    second.open_wait(doc, Duration::from_secs(5)).await.expect("free once the first client is gone");
}

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
    cli_at(&format!("ws://{addr}/v1/sync"), data, timeout_ms, args, stdin, &[])
}

/// The CLI against the server at `url`, with `env` added to its environment.
fn cli_at(
    url: &str,
    data: &Path,
    timeout_ms: u64,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &Path)],
) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagesync"))
        .args(["--server", url, "--doc", DOC])
        .envs(env.iter().copied())
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
    // A statement that begins as a read does but writes (`WITH ... INSERT`) is a write.
    let with = "WITH v(x) AS (VALUES ('with a cte')) INSERT INTO t SELECT x FROM v;\n";
    let out = ok(&cli(addr, &a, &["repl"], Some(with)));
    assert!(out.contains("applied locally"), "{out}");
    // Nothing to run is said so, not queued as an empty mutation.
    for nothing in [" ; ;", "-- INSERT INTO t VALUES ('commented out')", "/* x */ ;"] {
        let out = cli(addr, &a, &["exec", "--", nothing], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("holds no statement"), "{nothing:?}: {err}");
    }
    let rows = ok(&cli(addr, &b, &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(rows, "x\nfrom a\noffline\nfrom the repl\nwith a cte\n");
    // A repl on a new replica first takes what the server has (its first write ran on an
    // empty database: "no such table"), and input that ends without a last `;` runs too.
    let c = dir.path().join("c");
    let out = ok(&cli(addr, &c, &["repl"], Some("INSERT INTO t VALUES ('no semicolon')")));
    assert!(out.contains("applied locally"), "{out}");
    let rows = ok(&cli(addr, &a, &["query", "SELECT count(*) AS n FROM t WHERE x = 'no semicolon'"], None));
    assert_eq!(rows, "n\n1\n");
    server.stop();
}

/// `wss://`: the CLI through a TLS terminator in front of the server (rustls, with a
/// certificate from a CA made for the test by `openssl` and trusted through `SSL_CERT_FILE`)
/// writes and reads as over `ws://`, a new replica included (its first query may fetch pages
/// over a connection of its own); a CLI that does not trust the CA refuses the certificate and
/// says so.
#[test]
fn the_cli_syncs_over_wss_and_refuses_a_certificate_it_does_not_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    let certs = make_certificates(dir.path());
    let tls_addr = server.rt.block_on(tls_terminator(&certs, addr));
    let url = format!("wss://{tls_addr}/v1/sync");
    let trusted = [("SSL_CERT_FILE", certs.ca.as_path())];
    let over_tls =
        |name: &str, args: &[&str]| ok(&cli_at(&url, &dir.path().join(name), 10_000, args, None, &trusted));
    assert!(over_tls("a", &["exec", "CREATE TABLE t (x TEXT)"]).contains("confirmed"));
    assert!(over_tls("a", &["exec", "INSERT INTO t VALUES ('over tls')"]).contains("confirmed"));
    // Another replica, straight at the server: the write went through the terminator.
    assert_eq!(ok(&cli(addr, &dir.path().join("b"), &["query", "SELECT x FROM t"], None)), "x\nover tls\n");
    assert_eq!(over_tls("c", &["query", "SELECT x FROM t"]), "x\nover tls\n");
    // Trusting another CA only: the certificate is refused, and the error says so.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    let untrusted = [("SSL_CERT_FILE", make_certificates(&other).ca)];
    let untrusted: Vec<(&str, &Path)> = untrusted.iter().map(|(k, v)| (*k, v.as_path())).collect();
    let refused = cli_at(&url, &dir.path().join("d"), 1_000, &["sync"], None, &untrusted);
    assert!(!refused.status.success(), "a certificate from an unknown CA is refused");
    let why = String::from_utf8_lossy(&refused.stderr);
    // (`BadSignature`: the other CA bears the same name, so it is tried and does not verify.)
    assert!(why.contains("invalid peer certificate"), "the certificate check refused it: {why}");
    server.stop();
}

struct Certificates {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

/// A CA and a certificate it signs for 127.0.0.1, made with the `openssl` command.
fn make_certificates(dir: &Path) -> Certificates {
    let path = |name: &str| dir.join(name);
    std::fs::write(
        path("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let steps: [Vec<&str>; 3] = [
        [&["req", "-x509"][..], &ec, &["-days", "2", "-subj", "/CN=pagesync test CA"]].concat(),
        [&["req"][..], &ec, &["-subj", "/CN=127.0.0.1"]].concat(),
        vec!["x509", "-req", "-days", "2", "-CAcreateserial"],
    ];
    let files: [&[(&str, &str)]; 3] = [
        &[("-keyout", "ca.key"), ("-out", "ca.pem")],
        &[("-keyout", "leaf.key"), ("-out", "leaf.csr")],
        &[
            ("-in", "leaf.csr"),
            ("-CA", "ca.pem"),
            ("-CAkey", "ca.key"),
            ("-extfile", "leaf.ext"),
            ("-out", "leaf.pem"),
        ],
    ];
    for (args, files) in steps.iter().zip(files) {
        let mut cmd = Command::new("openssl");
        cmd.args(args);
        for (flag, name) in files {
            cmd.arg(flag).arg(path(name));
        }
        let out =
            cmd.output().expect("this test needs the `openssl` command (Debian: apt-get install openssl)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Certificates { ca: path("ca.pem"), cert: path("leaf.pem"), key: path("leaf.key") }
}

/// Accepts TLS on a port of its own and relays each connection to `upstream` in the clear.
async fn tls_terminator(certs: &Certificates, upstream: SocketAddr) -> SocketAddr {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(&certs.cert).expect("cert").collect::<Result<Vec<_>, _>>();
    let key = PrivateKeyDer::from_pem_file(&certs.key).expect("key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain.expect("cert"), key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
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

/// A command that only reads (`query`, `status`, `export`, `sync`, `presence`, `broadcast`)
/// on a document the server does not have fails naming `not_found`, and leaves no document on
/// the server and no replica here; `exec` creates it, and a write made offline creates it
/// when it is synced (the replica holds a write, so it asks to).
#[test]
fn a_mistyped_document_is_said_not_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("server");
    let (server, addr) = Server::start(&store, "127.0.0.1:0".parse().expect("addr"));
    ok(&cli(addr, &dir.path().join("a"), &["exec", "CREATE TABLE t(x)"], None));
    let run = |doc: &str, data: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pagesync"))
            .args(["--server", &format!("ws://{addr}/v1/sync"), "--doc", doc, "--timeout-ms", "5000"])
            .arg("--data")
            .arg(data)
            .args(args)
            .output()
            .expect("pagesync ran")
    };
    let documents = || {
        let shards = std::fs::read_dir(&store).expect("store").flatten().filter(|e| e.path().is_dir());
        shards.flat_map(|s| std::fs::read_dir(s.path()).expect("shard").flatten()).count()
    };
    assert_eq!(documents(), 1);

    let typo = "0000000000000000000000000000c11b";
    let reader = dir.path().join("reader");
    let file = dir.path().join("out.sqlite");
    let file_arg = file.to_str().expect("utf-8 path");
    for args in [
        &["query", "SELECT * FROM t"][..],
        &["status"],
        &["export", file_arg],
        &["sync"],
        &["presence"],
        &["broadcast", "hello"],
    ] {
        let out = run(typo, &reader, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} on a missing document succeeded: {stderr}");
        assert!(stderr.contains("not_found") && stderr.contains(typo), "{args:?}: {stderr}");
        assert_eq!(documents(), 1, "{args:?} made a document on the server");
        assert!(!reader.join(typo).exists(), "{args:?} left a replica of the missing document");
    }
    assert!(!file.exists(), "an export of nothing wrote a file");

    // A write creates it; so does one made offline, once synced.
    assert!(ok(&run(typo, &reader, &["exec", "CREATE TABLE u(x)"])).contains("confirmed"));
    assert_eq!(documents(), 2);
    server.stop();
    let offline = "0000000000000000000000000000c11c";
    assert!(ok(&run(offline, &reader, &["exec", "--offline", "CREATE TABLE v(x)"])).contains("pending"));
    let (server, _) = Server::start(&store, addr);
    assert_eq!(ok(&run(offline, &reader, &["sync"])).trim(), "synced");
    assert_eq!(documents(), 3);
    let rows = ok(&run(offline, &dir.path().join("b"), &["query", "SELECT count(*) AS n FROM v"]));
    assert_eq!(rows, "n\n0\n");
    server.stop();
}

/// `presence --watch` ends, failing with the server's reason, when the server refuses the
/// document while it watches (here, deleted under it): a listing that stood still would look
/// current.
#[test]
fn a_presence_watch_ends_when_the_server_refuses_the_document() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    ok(&cli(addr, &dir.path().join("a"), &["exec", "CREATE TABLE t(x)"], None));
    let mut watch = Command::new(env!("CARGO_BIN_EXE_pagesync"))
        .args(["--server", &format!("ws://{addr}/v1/sync"), "--doc", DOC, "--data"])
        .arg(dir.path().join("b"))
        .args(["presence", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pagesync");
    // Its first listing: it is watching.
    let mut stdout = watch.stdout.take().expect("stdout");
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).expect("a first listing");
    assert_eq!(&first, b"0 here");
    let mut http = std::net::TcpStream::connect(addr).expect("connect");
    write!(http, "DELETE /v1/docs/{DOC} HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("delete");
    let mut answer = String::new();
    http.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = watch.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = watch.kill();
            panic!("presence --watch went on watching a deleted document");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    watch.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
    assert!(!status.success(), "it succeeded: {stderr}");
    assert!(stderr.contains("refused") && stderr.contains("deleted"), "{stderr}");
    server.stop();
}

/// `forget` waits `--wait-ms` for another process holding the replica, as every command that
/// opens it does (it failed at once).
#[test]
fn forget_waits_for_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    let data = dir.path().join("a");
    ok(&cli(addr, &data, &["exec", "CREATE TABLE t(x)"], None));
    let replica = data.join(DOC);
    let held = pagesync::journal::DirLock::try_lock(&replica, "the test").expect("lock");
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        drop(held);
    });
    let out = ok(&cli(addr, &data, &["--wait-ms", "10000", "forget"], None));
    assert!(out.contains("forgot"), "{out}");
    assert!(!replica.exists());
    release.join().expect("released");
    // With no wait, a held replica is said at once, naming its holder.
    let _again = ok(&cli(addr, &data, &["exec", "CREATE TABLE u(x)"], None));
    let held = pagesync::journal::DirLock::try_lock(&replica, "the test").expect("lock");
    let out = cli(addr, &data, &["--wait-ms", "0", "forget"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the test"), "{out:?}");
    drop(held);
    server.stop();
}

/// A write goes up while its fsync runs, under the replica's sent mark. A power cut can then
/// take from the timeline writes the server already holds: here a `repl` is killed once the
/// server has its writes, and its timeline's newest two entries are cut off, as a power cut
/// before their fsync would, with the entries the replica received meanwhile (made durable
/// once a second). The next open fills the LSNs the mark covers past the timeline's end, so
/// the next write takes a new LSN, and every write is on the server exactly once. Without the
/// fill, that write would take the LSN of a cut one, and the server would drop it as applied.
#[test]
fn a_write_after_a_crash_took_sent_writes_from_the_timeline_is_not_lost() {
    use pagesync::journal::{FileJournal, FileJournalOptions, Journal};
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    // A clean close lowers the mark to the timeline's end: the next open has nothing to fill.
    assert!(ok(&cli(addr, &a, &["exec", "CREATE TABLE t(x TEXT)"], None)).contains("confirmed"));
    let timeline_dir = a.join(DOC).join("timeline");
    let written = FileJournal::open(&timeline_dir, FileJournalOptions::default()).expect("timeline").range();
    // What the clean close made durable of the server's entries (the later ones come with the
    // repl, and are made durable once a second).
    let storage_dir = a.join(DOC).join("storage");
    let kept = FileJournal::open(&storage_dir, FileJournalOptions::default()).expect("storage").range();
    let mark = FileJournal::open(a.join(DOC).join("sent"), FileJournalOptions::default()).expect("mark");
    let newest = mark.read(mark.range().last().expect("a mark")).expect("read the mark");
    assert_eq!(newest, written.last().expect("the write").get().to_le_bytes(), "lowered on close");
    drop(mark);

    let mut repl = Command::new(env!("CARGO_BIN_EXE_pagesync"))
        .args(["--server", &format!("ws://{addr}/v1/sync"), "--doc", DOC, "--data"])
        .arg(&a)
        .arg("repl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagesync");
    let mut input = repl.stdin.take().expect("stdin");
    let writes: String = (1..=5).map(|i| format!("INSERT INTO t VALUES ('w{i}');\n")).collect();
    writeln!(input, "{writes}.sync").expect("write stdin");
    let mut output = std::io::BufReader::new(repl.stdout.take().expect("stdout")).lines();
    let answer = output.by_ref().map_while(Result::ok).find(|l| l == "synced" || l.starts_with("error"));
    assert_eq!(answer.as_deref(), Some("synced"), "the repl's writes reached the server");
    // A crash: no clean close, so the sent mark stays where the writes left it.
    repl.kill().expect("kill the repl");
    repl.wait().expect("reap the repl");
    drop(input);

    let mut timeline = FileJournal::open(&timeline_dir, FileJournalOptions::default()).expect("timeline");
    let before = timeline.range();
    for _ in 0..2 {
        timeline.remove_last().expect("cut the newest entry");
    }
    assert_eq!(timeline.range().next().get(), before.next().get() - 2);
    drop(timeline);
    let mut storage = FileJournal::open(&storage_dir, FileJournalOptions::default()).expect("storage");
    assert!(storage.range().next() > kept.next(), "the repl received the server's entries");
    while storage.range().next() > kept.next() {
        storage.remove_last().expect("cut a received entry");
    }
    drop(storage);

    let after = ok(&cli(addr, &a, &["exec", "INSERT INTO t VALUES ('after the crash')"], None));
    assert!(after.contains("confirmed"), "{after}");
    let rows = ok(&cli(addr, &b, &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(rows, "x\nw1\nw2\nw3\nw4\nw5\nafter the crash\n");
    // The reopened replica holds the same, its cut writes brought back by the server's pages.
    let rows = ok(&cli(addr, &a, &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(rows, "x\nw1\nw2\nw3\nw4\nw5\nafter the crash\n");
    server.stop();
}

/// A replica whose copy of the server's entries is damaged (a flipped byte in a frame header)
/// sets that copy aside and downloads it again: its own writes, made offline and still pending,
/// are kept and reach the server, and the replica reads and writes as before. (Before, every
/// command failed naming the corrupt entry, and only `forget`, which drops pending writes too,
/// got out.)
#[test]
fn a_damaged_copy_of_the_servers_entries_is_downloaded_again_and_pending_writes_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a");
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    assert!(ok(&cli(addr, &a, &["exec", "CREATE TABLE t(x TEXT)"], None)).contains("confirmed"));
    assert!(ok(&cli(addr, &a, &["exec", "INSERT INTO t VALUES ('confirmed')"], None)).contains("confirmed"));
    server.stop();
    let offline = ok(&cli(addr, &a, &["exec", "--offline", "INSERT INTO t VALUES ('pending')"], None));
    assert!(offline.contains("pending"), "{offline}");
    // The first frame's header, just past the segment's 40-byte header.
    let storage = a.join(DOC).join("storage");
    let segment = std::fs::read_dir(&storage)
        .expect("storage")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    bytes[44] ^= 0x5a;
    std::fs::write(&segment, &bytes).expect("write");
    let (server, _) = Server::start(&dir.path().join("server"), addr);
    assert_eq!(ok(&cli(addr, &a, &["sync"], None)).trim(), "synced");
    let rows = ok(&cli(addr, &a, &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(rows, "x\nconfirmed\npending\n");
    let fresh = ok(&cli(addr, &dir.path().join("b"), &["query", "SELECT x FROM t ORDER BY rowid"], None));
    assert_eq!(fresh, "x\nconfirmed\npending\n");
    let aside = std::fs::read_dir(a.join(DOC)).expect("replica").filter_map(Result::ok);
    assert!(
        aside.into_iter().any(|e| e.file_name().to_string_lossy().starts_with("storage.damaged-")),
        "the damaged copy was kept aside"
    );
    server.stop();
}

/// A replica whose own disk refuses the download (here a file size limit, as a full disk
/// would: the write fails) says so, naming the failure, as soon as it happens; it used to wait
/// out the whole timeout and blame the server ("is the server reachable?"). Without the limit
/// the same replica then syncs.
#[test]
fn a_replica_whose_disk_refuses_the_download_says_so_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = Server::start(&dir.path().join("server"), "127.0.0.1:0".parse().expect("addr"));
    let mut script = String::from("CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);\n");
    for k in 0..300 {
        script.push_str(&format!("INSERT INTO t VALUES ({k}, hex(randomblob(2000)));\n"));
    }
    ok(&cli(addr, &dir.path().join("writer"), &["repl"], Some(&script)));

    let reader = dir.path().join("reader");
    // SIGXFSZ ignored, so a write past the limit fails (EFBIG) rather than killing the process;
    // `ulimit -f` counts blocks of 512 bytes (dash, and bash as `sh`): 256 KiB of the 1.2 MB.
    let started = std::time::Instant::now();
    let out = Command::new("sh")
        .args(["-c", "trap '' XFSZ; ulimit -f 512; exec \"$@\"", "sh", env!("CARGO_BIN_EXE_pagesync")])
        .args(["--server", &format!("ws://{addr}/v1/sync"), "--doc", DOC, "--timeout-ms", "30000", "--data"])
        .arg(&reader)
        .arg("sync")
        .output()
        .expect("pagesync sync");
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "synced past the limit: {err}");
    assert!(err.contains("could not keep what the server sent") && err.contains("too large"), "{err}");
    assert!(!err.contains("timed out"), "{err}");
    assert!(took < std::time::Duration::from_secs(20), "told after {took:?}, near the 30 s timeout");
    let rows = ok(&cli(addr, &reader, &["query", "SELECT count(*) AS n FROM t"], None));
    assert_eq!(rows, "n\n300\n");
    server.stop();
}

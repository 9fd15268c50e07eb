//! `pagesync-server verify`: sound documents pass; a flipped bit anywhere in any segment is a
//! fault naming the document, the journal and the LSN; the binary exits non-zero on a fault.

use std::path::{Path, PathBuf};
use std::process::Command;

use pagesync::journal::{FileJournal, FileJournalOptions, Lsn};
use pagesync::{DocId, Mutation, ServerDocument, SqlMutation, TimelineId, Value};
use pagesync_server::ops::{list_documents, verify_document};
use pagesync_server::{Store, storage_dir};

/// A document of `rows` rows written one mutation per step, in segments of 4 KiB.
fn write_document(root: &Path, doc: DocId, rows: i64) {
    let opts = FileJournalOptions { max_segment_bytes: 4096, ..FileJournalOptions::default() };
    let journal = FileJournal::create(storage_dir(root, doc), doc.journal_id(), opts).expect("create");
    let mut d = ServerDocument::open(Box::new(journal)).expect("open");
    let timeline = TimelineId::from_u128(1);
    let mut lsn = Lsn::FIRST;
    let mut submit = |d: &mut ServerDocument, sql: &str, params: Vec<Value>| {
        let body = SqlMutation::one(sql, params).encode();
        let m = Mutation { client_time_ms: 1, seed: lsn.get(), body }.encode().expect("encode");
        d.receive(timeline, lsn, vec![m]);
        d.step(1).expect("step");
        lsn = lsn.next();
    };
    submit(&mut d, "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)", vec![]);
    for k in 0..rows {
        submit(
            &mut d,
            "INSERT INTO t VALUES (?, ?)",
            vec![k.into(), format!("row {k} {}", "x".repeat(40)).into()],
        );
    }
}

fn segments(root: &Path, doc: DocId) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(storage_dir(root, doc))
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn verify_binary(root: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["verify", "--journal", &format!("file://{}", root.display())])
        .output()
        .expect("run pagesync-server verify");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn verify_passes_sound_documents_and_names_document_journal_and_lsn_of_every_flipped_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let docs = [DocId::from_u128(0xa1), DocId::from_u128(0xb2), DocId::from_u128(0xc3)];
    for (i, doc) in docs.iter().enumerate() {
        write_document(root, *doc, 20 + 10 * i as i64);
    }
    let store = Store::Files(root.to_path_buf());
    assert_eq!(list_documents(&store).expect("list"), docs.to_vec());
    for doc in docs {
        let v = verify_document(&store, doc).expect("a sound document verifies");
        assert!(v.pages >= 2, "{v:?}");
    }
    let (ok, out) = verify_binary(root);
    assert!(ok, "verify failed on a sound store:\n{out}");
    assert!(out.contains("3 ok, 0 faulty"), "{out}");

    let victim = docs[1];
    let files = segments(root, victim);
    assert!(files.len() >= 3, "the document should span several segments, has {}", files.len());
    let mut flips = 0;
    for file in &files {
        let original = std::fs::read(file).expect("read");
        for byte in (0..original.len()).step_by(11) {
            let mut bad = original.clone();
            bad[byte] ^= 1 << (byte % 8);
            std::fs::write(file, &bad).expect("write");
            let why = verify_document(&store, victim).expect_err("a flipped bit must be a fault");
            let at = format!("{} byte {byte}", file.display());
            assert!(why.contains(&victim.to_string()), "{at}: the document is not named: {why}");
            assert!(why.contains(&victim.journal_id().to_string()), "{at}: the journal is not named: {why}");
            if byte >= pagesync::journal::file::SEGMENT_HEADER_BYTES {
                assert!(why.contains("LSN"), "{at}: the LSN is not named: {why}");
            }
            flips += 1;
        }
        std::fs::write(file, &original).expect("restore");
    }
    assert!(flips > 300, "only {flips} flips tried");

    // The binary: a fault in one document, the others still verified, exit code 1.
    let file = &files[1];
    let mut bad = std::fs::read(file).expect("read");
    let mid = bad.len() / 2;
    bad[mid] ^= 0x04;
    std::fs::write(file, &bad).expect("write");
    let (ok, out) = verify_binary(root);
    assert!(!ok, "verify must exit non-zero on a fault:\n{out}");
    let fault = out.lines().find(|l| l.starts_with("FAULT")).expect("a FAULT line");
    assert!(fault.contains(&victim.to_string()) && fault.contains("LSN"), "{fault}");
    assert!(out.contains("2 ok, 1 faulty"), "{out}");
}

fn server_cmd(root: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(args)
        .args(["--journal", &format!("file://{}", root.display())])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run pagesync-server");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn rows_in(file: &Path) -> i64 {
    let conn = rusqlite::Connection::open(file).expect("open the export");
    conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count")
}

#[test]
fn export_and_restore_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("data");
    let doc = DocId::from_u128(0xd0c);
    // Entries: 1 the system tables, 2 the table, 3..=22 one row each.
    write_document(&root, doc, 20);
    let (d, new) = (doc.to_string(), DocId::from_u128(0x2e7).to_string());
    let out = |name: &str| dir.path().join(name);
    let path = |name: &str| out(name).display().to_string();

    let (ok, text) = server_cmd(&root, &["export", "--doc", &d, "--at", "lsn:12", &path("at12.sqlite")], "");
    assert!(ok, "{text}");
    assert!(text.contains("as of entry 12"), "{text}");
    assert_eq!(rows_in(&out("at12.sqlite")), 10);

    let (ok, text) = server_cmd(&root, &["export", "--doc", &d, "--at", "yesterday", &path("x.sqlite")], "");
    assert!(!ok && text.contains("expected lsn:N or an RFC 3339 time"), "{text}");
    let (ok, text) = server_cmd(&root, &["export", "--doc", &d, "--at", "lsn:99", &path("x.sqlite")], "");
    assert!(!ok && text.contains("outside the history kept: 1..=22"), "{text}");

    let (ok, text) = server_cmd(&root, &["restore", "--doc", &d, "--at", "lsn:12", "--to", &new], "");
    assert!(ok, "{text}");
    let (ok, text) = server_cmd(&root, &["export", "--doc", &new, &path("new.sqlite")], "");
    assert!(ok, "{text}");
    assert_eq!(rows_in(&out("new.sqlite")), 10);

    let (ok, text) = server_cmd(&root, &["restore", "--doc", &d, "--at", "lsn:12", "--in-place"], "no\n");
    assert!(!ok && text.contains("not confirmed: nothing was changed"), "{text}");
    server_cmd(&root, &["export", "--doc", &d, &path("still.sqlite")], "");
    assert_eq!(rows_in(&out("still.sqlite")), 20, "an unconfirmed restore changes nothing");

    let (ok, text) =
        server_cmd(&root, &["restore", "--doc", &d, "--at", "lsn:12", "--in-place"], &format!("{d}\n"));
    assert!(ok, "{text}");
    server_cmd(&root, &["export", "--doc", &d, &path("restored.sqlite")], "");
    assert_eq!(rows_in(&out("restored.sqlite")), 10);
    let (ok, text) = verify_binary(&root);
    assert!(ok && text.contains("2 ok, 0 faulty"), "{text}");
}

/// A typo in `--journal` or `--doc` is an error naming it, not "verified 0 documents" (exit 0)
/// nor the journal layer's "create it with FileJournal::create".
#[test]
fn a_store_or_document_that_is_not_there_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_pagesync-server");
    let missing = dir.path().join("typo");
    let out = Command::new(bin)
        .args(["verify", "--journal", &format!("file://{}", missing.display())])
        .output()
        .expect("verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot read the store"), "{err}");
    let doc = "00000000000000000000000000000abc";
    let out = Command::new(bin)
        .args(["delete", "--yes", "--doc", doc, "--journal", &format!("file://{}", missing.display())])
        .output()
        .expect("delete");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no store at"), "{err}");
    assert!(!missing.exists(), "a mistyped store was created by delete");
    let store = format!("file://{}", dir.path().display());
    for args in
        [vec!["verify", "--doc", doc], vec!["history", "--doc", doc], vec!["delete", "--yes", "--doc", doc]]
    {
        let out = Command::new(bin).args(&args).args(["--journal", &store]).output().expect("run");
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains(&format!("no document {doc} in {store}")), "{args:?}: {text}");
        assert!(!text.contains("FileJournal"), "{args:?}: {text}");
    }
}

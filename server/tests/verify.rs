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

//! `Durability::Normal` on real files: writes are not durable until `sync_timeline`, nothing
//! is sent to the server before it is, and a power cut that loses or tears the unsynced tail
//! of the timeline leaves a replica that opens cleanly with every synced write and none of the
//! lost ones (so the server, which never saw them, agrees).
//!
//! The server's entries a replica receives are appended without an fsync each (the server
//! holds them); a power cut that tears them off leaves a replica that opens at the state
//! before them, with the mutations they confirmed pending again, and converges on the
//! server's pages with nothing lost or applied twice.

use std::path::{Path, PathBuf};

use pagesync::journal::{FileJournal, FileJournalOptions, JournalId};
use pagesync::protocol::{ClientSession, ConnId, Message, ServerSession};
use pagesync::{ClientDocument, DocId, Durability, MutationState, ServerDocument, Value};
use pagesync_tests::{memory_journal, sql};

const T0: i64 = 1_700_000_000_000;
const DOC: DocId = DocId([7; 16]);

fn replica(dir: &Path) -> ClientDocument {
    let open = |name: &str, id: u128| {
        let path = dir.join(name);
        let j = if path.exists() {
            FileJournal::open(&path, FileJournalOptions::default())
        } else {
            FileJournal::create(&path, JournalId::from_u128(id), FileJournalOptions::default())
        };
        Box::new(j.expect("journal"))
    };
    ClientDocument::open(open("storage", 1), open("timeline", 2)).expect("replica")
}

/// The timeline's one segment file.
fn segment(dir: &Path) -> PathBuf {
    segment_of(dir, "timeline")
}

/// A journal's one segment file.
fn segment_of(dir: &Path, journal: &str) -> PathBuf {
    let segs: Vec<PathBuf> = std::fs::read_dir(dir.join(journal))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].clone()
}

fn rows(doc: &ClientDocument) -> Vec<Vec<Value>> {
    doc.query("SELECT x FROM t ORDER BY x", &[]).expect("query").rows
}

#[test]
fn unsynced_writes_are_not_sent_and_a_power_cut_loses_them_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut doc = replica(dir.path());
    doc.mutate(sql("CREATE TABLE t(x INTEGER)", vec![]), T0, 1).expect("ddl");
    doc.set_durability(Durability::Normal).expect("normal");
    doc.mutate(sql("INSERT INTO t VALUES (1)", vec![]), T0, 2).expect("write");
    doc.sync_timeline().expect("sync");
    let synced_len = std::fs::metadata(segment(dir.path())).expect("stat").len();
    assert!(!doc.needs_sync());

    for x in 2..=4 {
        doc.mutate(sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(x)]), T0, 10 + x as u64)
            .expect("write");
    }
    assert!(doc.needs_sync());
    assert_eq!(rows(&doc).len(), 4, "unsynced writes are visible locally at once");

    // Nothing unsynced goes up: the server sees exactly the two synced mutations.
    let mut session = ClientSession::new("");
    session.add_document(DOC, doc);
    let mut server = ServerSession::new(Box::new(|d: DocId| {
        ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
    }));
    server.connect(ConnId(1));
    session.connected(T0);
    let mut sent = 0;
    for _ in 0..10 {
        while let Some(m) = session.poll_transmit() {
            if let Message::Mutations { entries, .. } = &m {
                sent += entries.len();
            }
            server.handle_frame(ConnId(1), T0, &m.encode());
        }
        server.handle_timeout(T0);
        while let Some((_, m)) = server.poll_transmit() {
            session.handle_frame(T0, &m.encode()).expect("apply");
        }
    }
    assert_eq!(sent, 2, "only durable writes may be sent");
    assert_eq!(session.status(DOC).expect("status").pending, 3);

    // Power cut: the unsynced tail is lost, its first frame torn half way.
    let doc = session.remove_document(DOC).expect("doc");
    drop(doc);
    let seg = segment(dir.path());
    let len = std::fs::metadata(&seg).expect("stat").len();
    assert!(len > synced_len + 16, "the unsynced writes reached the file ({len} bytes)");
    let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open");
    f.set_len(synced_len + (len - synced_len) / 5).expect("cut");
    drop(f);

    let doc = replica(dir.path());
    assert_eq!(rows(&doc), vec![vec![Value::Integer(1)]], "the synced write stays, the lost ones are gone");
    assert_eq!(doc.pending_count(), 0, "the server confirmed everything that survived");
    assert_eq!(
        doc.state(pagesync::journal::Lsn::new(2).expect("lsn")).expect("state"),
        MutationState::Confirmed
    );
    // And the replica goes on: the next write takes the next free LSN.
    let mut doc = doc;
    let w = doc.mutate(sql("INSERT INTO t VALUES (5)", vec![]), T0, 99).expect("write");
    assert_eq!(w.lsn.get(), 3);
}

/// Client and server exchange frames until neither has anything to send.
fn exchange(session: &mut ClientSession, server: &mut ServerSession, conn: ConnId, now: i64) {
    for _ in 0..20 {
        let mut quiet = true;
        while let Some(m) = session.poll_transmit() {
            quiet = false;
            server.handle_frame(conn, now, &m.encode());
        }
        server.handle_timeout(now);
        while let Some((_, m)) = server.poll_transmit() {
            quiet = false;
            session.handle_frame(now, &m.encode()).expect("apply");
        }
        if quiet {
            return;
        }
    }
}

#[test]
fn received_entries_torn_off_by_a_power_cut_come_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerSession::new(Box::new(|d: DocId| {
        ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
    }));
    let mut session = ClientSession::new("");
    session.add_document(DOC, replica(dir.path()));
    server.connect(ConnId(1));
    session.connected(T0);
    let write = |session: &mut ClientSession, x: i64| {
        let body = sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(x)]);
        session.mutate(DOC, body, T0, x as u64).expect("write").lsn
    };
    session.mutate(DOC, sql("CREATE TABLE t(x INTEGER)", vec![]), T0, 1).expect("ddl");
    write(&mut session, 1);
    exchange(&mut session, &mut server, ConnId(1), T0);
    assert_eq!(session.status(DOC).expect("status").pending, 0);
    session.sync_storage().expect("sync");
    let synced_len = std::fs::metadata(segment_of(dir.path(), "storage")).expect("stat").len();

    let (l2, l3) = (write(&mut session, 2), write(&mut session, 3));
    exchange(&mut session, &mut server, ConnId(1), T0 + 1);
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.state(l3).expect("state"), MutationState::Confirmed);
    let seg = segment_of(dir.path(), "storage");
    let len = std::fs::metadata(&seg).expect("stat").len();
    assert!(len > synced_len + 64, "the confirming entries reached the file unsynced ({len} bytes)");
    // Power cut: no clean close (which would sync), and the unsynced tail torn part way.
    std::mem::forget(doc);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open");
    f.set_len(synced_len + (len - synced_len) / 3).expect("cut");
    drop(f);

    let doc = replica(dir.path());
    assert_eq!(doc.state(l2).expect("state"), MutationState::Pending, "its confirmation was lost");
    assert_eq!(doc.pending_count(), 2);
    assert_eq!(rows(&doc).len(), 3, "the writes are still there, pending again");
    let mut session = ClientSession::new("");
    session.add_document(DOC, doc);
    server.disconnect(ConnId(1));
    server.connect(ConnId(2));
    session.connected(T0 + 2);
    exchange(&mut session, &mut server, ConnId(2), T0 + 2);
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.state(l3).expect("state"), MutationState::Confirmed);
    assert_eq!(doc.pending_count(), 0);
    let want: Vec<Vec<Value>> = (1..=3).map(|x| vec![Value::Integer(x)]).collect();
    assert_eq!(rows(&doc), want, "every write once");
    let theirs = server.document(DOC).expect("open on the server").export().expect("export");
    assert_eq!(doc.export().expect("export"), theirs, "the replica holds the server's pages");
}

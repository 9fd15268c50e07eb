//! `Durability::Normal` on real files: writes are not durable until `sync_timeline`, nothing
//! is sent to the server before it is, and a power cut that loses or tears the unsynced tail
//! of the timeline leaves a replica that opens cleanly with every synced write and none of the
//! lost ones (so the server, which never saw them, agrees).

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
    let segs: Vec<PathBuf> = std::fs::read_dir(dir.join("timeline"))
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

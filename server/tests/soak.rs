//! The operations soak: 100,000 mutations through the real protocol sessions (in process, with
//! a virtual clock) onto real file journals, with checkpoints and retention on. The server's and
//! the writer's journals stay within a named bound; a client that was offline with pending
//! writes since the start and a client that joins at the end both restart at a checkpoint and
//! converge; restoring to three recorded points (by LSN and by time) gives exactly the
//! recorded `SELECT` results, in a new document and in place.

use std::path::Path;

use pagesync::journal::{FileJournal, FileJournalOptions, JournalId, Lsn};
use pagesync::protocol::{ClientSession, ConnId, ServerSession};
use pagesync::{ClientDocument, Compaction, DocId, ServerDocument, SqlMutation, Value};
use pagesync_server::Store;
use pagesync_server::ops::{self, At, RestoreTo};

const T0: i64 = 1_800_000_000_000;
/// Each round is a second of virtual time.
const ROUND_MS: i64 = 1_000;
const ROUNDS: u64 = 400;
const PER_ROUND: u64 = 250;
const KEYS: u64 = 4_000;
const COMPACTION: Compaction = Compaction { checkpoint_after_bytes: 1 << 20, retention_ms: 30_000 };
/// Rounds after which the result of `SUMMARY` is recorded, to restore later: inside the
/// retention window at the end (the last 30 rounds, and the checkpoint before them).
const POINTS: [u64; 3] = [375, 385, 395];
const SUMMARY: &str = "SELECT count(*), sum(v), (SELECT n FROM meta), (SELECT count(*) FROM offline) FROM kv";

/// The bound on the server's journal, in bytes. With retention R and checkpoints every C bytes
/// (or the document's size D, if larger), the journal holds: the checkpoint before the window
/// (D), the entries from it to the window (less than max(C, D)), the window itself (R /
/// ROUND_MS steps of about 200 KiB here, plus the checkpoints written meanwhile, which are
/// never larger than the steps before each), and up to a segment (`STORAGE_SEGMENT_BYTES`)
/// that is only partly trimmed. Here that is about 1 + 1 + 2 x 6 + 4 = 18 MiB, and the bound
/// leaves a third more for the variation in step sizes. Without compaction the journal passes
/// 80 MiB by the end.
const SERVER_DISK_BOUND: u64 = 24 << 20;
/// A client keeps no history, only its newest checkpoint and what follows it.
const CLIENT_DISK_BOUND: u64 = 6 << 20;

fn server(store: &Store) -> ServerSession {
    let store = store.clone();
    ServerSession::new(Box::new(move |doc: DocId| {
        let mut d = ServerDocument::open(store.open_journal(doc)?)?;
        d.set_compaction(Some(COMPACTION));
        Ok(d)
    }))
}

fn client(dir: &Path, doc: DocId, n: u128) -> ClientSession {
    let opts = FileJournalOptions { max_segment_bytes: 1 << 20, ..FileJournalOptions::default() };
    let open = |name: &str, id: u128| {
        let j = FileJournal::open_or_create(dir.join(name), JournalId::from_u128(id), opts.clone())
            .expect("journal");
        Box::new(j) as Box<dyn pagesync::journal::Journal>
    };
    let mut s = ClientSession::new("");
    let key = pagesync::TimelineKey::insecure_from_u128(n + 1);
    let timeline = FileJournal::open_or_create(dir.join("timeline"), key.id().journal_id(), opts.clone())
        .expect("journal");
    let mut d = ClientDocument::open(open("storage", n), Box::new(timeline)).expect("client document");
    d.set_timeline_key(key).expect("the key opens the timeline");
    s.add_document(doc, d);
    s
}

/// Moves messages between the server and the connected clients until all are quiet.
fn pump(s: &mut ServerSession, clients: &mut [(ConnId, &mut ClientSession)], now: i64) {
    for _ in 0..100_000 {
        let mut moved = false;
        for (conn, c) in clients.iter_mut() {
            c.handle_timeout(now);
            while let Some(m) = c.poll_transmit() {
                s.handle_frame(*conn, now, &m.encode());
                moved = true;
            }
        }
        s.handle_timeout(now);
        while let Some((conn, m)) = s.poll_transmit() {
            let (_, c) = clients.iter_mut().find(|(k, _)| *k == conn).expect("a connected client");
            c.handle_frame(now, &m.encode()).expect("client applies the frame");
            moved = true;
        }
        if !moved {
            return;
        }
    }
    panic!("the sessions never went quiet");
}

fn du(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .map(|e| e.expect("dir entry"))
        .map(|e| {
            if e.file_type().expect("type").is_dir() {
                du(&e.path())
            } else {
                e.metadata().expect("meta").len()
            }
        })
        .sum()
}

fn mutation(sql: &str, params: Vec<Value>) -> Vec<u8> {
    SqlMutation::one(sql, params).encode()
}

fn summary(db: &pagesync::db::Database) -> String {
    db.conn()
        .query_row(SUMMARY, [], |r| {
            Ok(format!(
                "{} {} {} {}",
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?
            ))
        })
        .expect("summary")
}

fn converged(c: &ClientSession, s: &ServerSession, doc: DocId) -> bool {
    let st = c.status(doc).expect("status");
    st.pending == 0 && Some(st.storage_next) == s.document(doc).map(|d| d.storage_range().next())
}

#[test]
fn a_hundred_thousand_mutations_with_compaction_stay_bounded_converge_and_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::Files(tmp.path().join("server"));
    let doc = DocId::from_u128(0x50a6);
    let (ca, cb, cc) = (ConnId(1), ConnId(2), ConnId(3));
    let mut s = server(&store);
    let mut a = client(&tmp.path().join("a"), doc, 10);
    let mut c = client(&tmp.path().join("c"), doc, 30);
    s.connect(ca);
    s.connect(cc);
    a.connected(T0);
    c.connected(T0);
    let setup = "CREATE TABLE kv(k INTEGER PRIMARY KEY, v INTEGER NOT NULL, pad TEXT NOT NULL);
        CREATE TABLE meta(n INTEGER NOT NULL); INSERT INTO meta VALUES (0);
        CREATE TABLE offline(n INTEGER PRIMARY KEY);
        CREATE TRIGGER count_kv AFTER INSERT ON kv BEGIN UPDATE meta SET n = n + 1; END;
        CREATE TRIGGER count_kv_update AFTER UPDATE ON kv BEGIN UPDATE meta SET n = n + 1; END;";
    a.mutate(doc, SqlMutation::migration(1, setup).encode(), T0, 0).expect("setup");
    pump(&mut s, &mut [(ca, &mut a), (cc, &mut c)], T0);
    assert!(converged(&c, &s, doc), "client C synced the schema");

    // C goes offline for the whole run with 100 writes of its own.
    s.disconnect(cc);
    c.disconnected();
    for n in 0..100 {
        c.mutate(doc, mutation("INSERT INTO offline(n) VALUES (?1)", vec![Value::Integer(n)]), T0, n as u64)
            .expect("offline write");
    }

    let (mut max_server, mut max_a, mut points) = (0, 0, Vec::new());
    let pad = Value::Text("x".repeat(60));
    for round in 0..ROUNDS {
        let now = T0 + (round as i64 + 1) * ROUND_MS;
        for i in 0..PER_ROUND {
            let n = round * PER_ROUND + i;
            let body = mutation(
                "INSERT INTO kv(k, v, pad) VALUES (?1, ?2, ?3) ON CONFLICT(k) DO UPDATE SET v = v + excluded.v",
                vec![Value::Integer((n * 7919 % KEYS) as i64), Value::Integer(n as i64 % 1000), pad.clone()],
            );
            a.mutate(doc, body, now, n).expect("mutate");
        }
        pump(&mut s, &mut [(ca, &mut a)], now);
        assert!(converged(&a, &s, doc), "round {round}: A converged");
        max_server = max_server.max(du(&tmp.path().join("server")));
        max_a = max_a.max(du(&tmp.path().join("a")));
        if POINTS.contains(&round) {
            let d = s.document(doc).expect("open");
            let lsn = d.storage_range().last().expect("entries");
            points.push((lsn, now, summary(d.database())));
        }
    }
    let now = T0 + (ROUNDS as i64 + 1) * ROUND_MS;
    let d = s.document(doc).expect("open");
    let cp = d.base_checkpoint().expect("the journal starts with a checkpoint");
    eprintln!(
        "journal {} (base checkpoint {}..={}), max disk: server {max_server} bytes, client A {max_a} bytes",
        d.storage_range(),
        cp.first,
        cp.last
    );
    assert!(max_server <= SERVER_DISK_BOUND, "server journal reached {max_server} bytes");
    assert!(max_a <= CLIENT_DISK_BOUND, "client A's journals reached {max_a} bytes");
    assert!(cp.first.get() > 300, "history was trimmed: the journal starts at {}", cp.first);

    // C comes back, and B joins: both are behind the oldest entry kept, and restart.
    let mut b = client(&tmp.path().join("b"), doc, 20);
    s.connect(cb);
    s.connect(cc);
    b.connected(now);
    c.connected(now);
    pump(&mut s, &mut [(ca, &mut a), (cb, &mut b), (cc, &mut c)], now);
    pump(&mut s, &mut [(ca, &mut a), (cb, &mut b), (cc, &mut c)], now + 1);
    let server_doc = s.document(doc).expect("open");
    let server_pages = pagesync_tests_pages(server_doc.database());
    for (name, cl) in [("A", &a), ("B", &b), ("C", &c)] {
        assert!(converged(cl, &s, doc), "{name} converged");
        let replica = cl.document(doc).expect("open");
        assert_eq!(pagesync_tests_pages(replica.database()), server_pages, "{name} has the server's pages");
    }
    for (name, cl) in [("B", &b), ("C", &c)] {
        assert_eq!(cl.document(doc).expect("open").restarts(), 1, "{name} restarted at the checkpoint");
    }
    let final_summary = summary(server_doc.database());
    let expected = format!("{KEYS} ");
    assert!(final_summary.starts_with(&expected), "{final_summary}");
    assert!(final_summary.ends_with(" 100"), "C's 100 offline writes applied exactly once: {final_summary}");
    assert!(
        final_summary.contains(&format!(" {} ", ROUNDS * PER_ROUND)),
        "every upsert counted once: {final_summary}"
    );
    let c_doc = c.document(doc).expect("open");
    for lsn in 1..=100 {
        let state = c_doc.state(Lsn::new(lsn).expect("lsn")).expect("state");
        assert_eq!(state, pagesync::MutationState::Confirmed, "C's write {lsn}");
    }
    ops::verify_document(&store, doc).expect("the compacted document verifies");

    // A point before the history kept is refused with the range that is kept.
    let err = ops::export_at(&store, doc, At::Lsn(Lsn::new(5).expect("5"))).expect_err("trimmed");
    assert!(err.contains("outside the history kept"), "{err}");

    // Restore each point into a new document: by LSN, by time, by time.
    let ats = [At::Lsn(points[0].0), At::Time(points[1].1), At::Time(points[2].1 + 500)];
    for (i, (at, (lsn, _, recorded))) in ats.iter().zip(&points).enumerate() {
        let new = DocId::from_u128(0x7e57 + i as u128);
        let r = ops::restore(&store, doc, *at, RestoreTo::New(new), now).expect("restore");
        assert_eq!(r.from, *lsn, "{at:?} names entry {lsn}");
        let restored = ServerDocument::open(store.open_journal(new).expect("journal")).expect("open");
        assert_eq!(summary(restored.database()), *recorded, "restored {at:?}");
        ops::verify_document(&store, new).expect("the restored document verifies");
        let (_, exported) = ops::export_at(&store, doc, *at).expect("export");
        assert_eq!(exported, restored.export().expect("export"), "export at {at:?} = the restored pages");
    }
    let again = ops::restore(&store, doc, ats[0], RestoreTo::New(DocId::from_u128(0x7e57)), now);
    assert!(again.expect_err("exists").contains("already exists"));

    // In place, with the server stopped: A reconnects and follows.
    drop(s);
    a.disconnected();
    ops::restore(&store, doc, ats[1], RestoreTo::InPlace, now + 2).expect("restore in place");
    let mut s = server(&store);
    s.connect(ca);
    a.connected(now + 3);
    pump(&mut s, &mut [(ca, &mut a)], now + 3);
    assert!(converged(&a, &s, doc));
    let (_, _, recorded) = &points[1];
    let ours = summary(a.document(doc).expect("open").database());
    // C's offline writes were applied after the point, so they are undone too, and stay
    // confirmed: the server remembers it applied them and does not take them again.
    assert_eq!(&ours, recorded, "A follows the in-place restore");
    let c_state = s.document(doc).expect("open").applied_lsn(c_doc.timeline_id());
    assert_eq!(c_state, Lsn::new(100), "the server still knows C's writes were applied");
}

fn pagesync_tests_pages(db: &pagesync::db::Database) -> Vec<pagesync::page::Page> {
    db.store().committed_pages().expect("pages")
}

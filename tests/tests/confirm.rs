//! Confirmation by digest: a step that applied one client's mutations alone reaches that
//! client as a `Confirm` (what the entry records beside its pages, and a digest); the client
//! replays its own mutations as the step did and keeps its own pages. Other subscribers get the
//! pages. Every replica stays byte-identical to the server, schema changes included, and a
//! replay that gives other pages falls back to the pages, counted on both sides.

use pagesync::journal::Lsn;
use pagesync::protocol::{ClientSession, ConnId, Message, ServerSession};
use pagesync::wire::WireKind;
use pagesync::{ClientDocument, DocId, MutationState, ServerDocument, Value};
use pagesync_tests::{memory_journal, sql};

const T0: i64 = 1_700_000_000_000;
const DOC: DocId = DocId([3; 16]);

struct Pair {
    server: ServerSession,
    a: ClientSession,
    b: ClientSession,
    /// Downloaded entries by kind, per client: (full or delta, confirm).
    kinds: [(usize, usize); 2],
    /// Bytes of `Storage` frames A received.
    a_storage_bytes: usize,
}

fn replica(n: u128) -> ClientDocument {
    pagesync_tests::client_doc(memory_journal(n), n + 1)
}

impl Pair {
    fn new() -> Pair {
        let server = ServerSession::new(Box::new(|d: DocId| {
            ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
        }));
        let (mut a, mut b) = (ClientSession::new(""), ClientSession::new(""));
        a.add_document(DOC, replica(10));
        b.add_document(DOC, replica(20));
        let mut p = Pair { server, a, b, kinds: [(0, 0); 2], a_storage_bytes: 0 };
        for (i, s) in [&mut p.a, &mut p.b].into_iter().enumerate() {
            p.server.connect(ConnId(i as u64 + 1));
            s.connected(T0);
        }
        p
    }

    /// Frames both ways until nobody has anything to send.
    fn exchange(&mut self, now: i64) {
        for _ in 0..50 {
            let mut quiet = true;
            for (i, s) in [&mut self.a, &mut self.b].into_iter().enumerate() {
                while let Some(m) = s.poll_transmit() {
                    quiet = false;
                    self.server.handle_frame(ConnId(i as u64 + 1), now, &m.encode());
                }
            }
            self.server.handle_timeout(now);
            while let Some((conn, m)) = self.server.poll_transmit() {
                quiet = false;
                let i = conn.0 as usize - 1;
                let frame = m.encode();
                if let Message::Storage { entries, .. } = &m {
                    for e in entries {
                        match e.kind {
                            WireKind::Confirm => self.kinds[i].1 += 1,
                            _ => self.kinds[i].0 += 1,
                        }
                    }
                    if i == 0 {
                        self.a_storage_bytes += frame.len();
                    }
                }
                let s = if i == 0 { &mut self.a } else { &mut self.b };
                s.handle_frame(now, &frame).expect("apply");
            }
            if quiet {
                return;
            }
        }
        panic!("the exchange did not settle");
    }

    /// Sends one client's frames up (B's if `from_b`), lets the server step, and delivers what
    /// it sends B; what it sends A is returned, held back.
    fn step_holding_a(&mut self, from_b: bool, now: i64) -> Vec<Vec<u8>> {
        let (s, conn) = if from_b { (&mut self.b, ConnId(2)) } else { (&mut self.a, ConnId(1)) };
        while let Some(m) = s.poll_transmit() {
            self.server.handle_frame(conn, now, &m.encode());
        }
        self.server.handle_timeout(now);
        let mut held = Vec::new();
        while let Some((conn, m)) = self.server.poll_transmit() {
            match conn.0 {
                1 => held.push(m.encode()),
                _ => self.b.handle_frame(now, &m.encode()).expect("B applies"),
            }
        }
        held
    }

    fn write(&mut self, on_b: bool, q: &str, params: Vec<Value>, seed: u64) -> Lsn {
        let s = if on_b { &mut self.b } else { &mut self.a };
        s.mutate(DOC, sql(q, params), T0 + seed as i64, seed).expect("write").lsn
    }

    /// Every replica holds the server's pages, byte for byte, and nothing is pending.
    fn assert_converged(&self) {
        let theirs = self.server.document(DOC).expect("open").export().expect("export");
        for s in [&self.a, &self.b] {
            let doc = s.document(DOC).expect("doc");
            assert_eq!(doc.pending_count(), 0);
            assert_eq!(doc.export().expect("export"), theirs, "a replica differs from the server");
        }
    }
}

#[test]
fn an_authors_own_steps_come_back_as_digests_and_replicas_stay_identical() {
    let mut p = Pair::new();
    // Schema changes move the schema cookie, which a client shows SQLite differently.
    p.write(false, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![], 1);
    p.exchange(T0);
    p.assert_converged();
    let mut lsns = Vec::new();
    for i in 0..40 {
        lsns.push(p.write(
            false,
            "INSERT INTO t(v) VALUES (?1)",
            vec![Value::Text(format!("row {i} {}", "x".repeat(i * 7)))],
            100 + i as u64,
        ));
        if i == 20 {
            p.write(false, "CREATE INDEX t_v ON t(v)", vec![], 999);
        }
        p.exchange(T0 + i as i64);
    }
    p.assert_converged();
    let a = p.a.status(DOC).expect("status");
    assert!(a.confirms.kept >= 40, "A kept its own steps from digests: {a:?}");
    assert!(a.confirms.kept_as_is >= 40, "one write per step: its optimistic state is the step's: {a:?}");
    assert_eq!(a.confirms.mismatches, 0);
    assert!(p.kinds[0].1 >= 40 && p.kinds[1].1 == 0, "only the author gets digests: {:?}", p.kinds);
    assert!(p.kinds[1].0 >= 40, "B gets the pages: {:?}", p.kinds);
    for lsn in lsns {
        assert_eq!(p.a.document(DOC).expect("doc").state(lsn).expect("state"), MutationState::Confirmed);
    }
    let stats = p.server.stats();
    assert!(stats.confirms_sent >= 40 && stats.digest_fallbacks == 0, "{stats:?}");

    // Many writes in one step (each its own local transaction, one with a schema change):
    // the optimistic state is still the step's pages.
    let as_is = p.a.status(DOC).expect("status").confirms.kept_as_is;
    for i in 0..10 {
        p.write(false, "INSERT INTO t(v) VALUES (?1)", vec![Value::Integer(i)], 2_000 + i as u64);
    }
    p.write(false, "CREATE TABLE u(x)", vec![], 2_100);
    p.exchange(T0 + 50);
    p.assert_converged();
    assert_eq!(p.a.status(DOC).expect("status").confirms.kept_as_is, as_is + 1, "eleven writes, one step");

    // A single-row commit costs its author a frame of a few dozen bytes.
    let before = p.a_storage_bytes;
    p.write(false, "INSERT INTO t(v) VALUES ('one more')", vec![], 5_000);
    p.exchange(T0 + 100);
    let bytes = p.a_storage_bytes - before;
    assert!(bytes <= 64, "the author downloaded {bytes} bytes for a one-row commit");
    p.assert_converged();
}

#[test]
fn steps_with_other_writers_or_rejections_send_pages() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)", vec![], 1);
    p.exchange(T0);
    let confirms = p.kinds[0].1;
    // Both write before either is sent: one step applies both timelines.
    p.write(false, "INSERT INTO t(v) VALUES ('a')", vec![], 2);
    p.write(true, "INSERT INTO t(v) VALUES ('b')", vec![], 3);
    p.exchange(T0 + 1);
    // A rejected mutation: its step carries a rejection row, which the author does not replay.
    let bad = p.write(false, "INSERT INTO t(v) VALUES (NULL)", vec![], 4);
    p.exchange(T0 + 2);
    assert!(matches!(p.a.document(DOC).expect("doc").state(bad).expect("state"), MutationState::Rejected(_)));
    assert_eq!(p.kinds[0].1, confirms, "no step since the first was A's alone without a rejection");
    p.assert_converged();
}

#[test]
fn a_replay_that_gives_other_pages_falls_back_to_the_pages() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE t(x)", vec![], 1);
    p.exchange(T0);
    // A runs its mutations under a far smaller budget than the server's: its replay of the
    // server's step rejects what the server applied, the digest cannot match.
    let tight = pagesync::sandbox::Budget { max_vm_steps: 2_000, ..Default::default() };
    let mut doc = p.a.remove_document(DOC).expect("doc");
    doc.set_budget(tight).expect("budget");
    p.a.add_document(DOC, doc);
    let heavy = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 500) INSERT INTO t SELECT x FROM c";
    let lsn = p.write(false, heavy, vec![], 2);
    p.exchange(T0 + 1);
    let a = p.a.status(DOC).expect("status");
    assert_eq!(a.confirms.mismatches, 1, "{a:?}");
    assert_eq!(p.server.stats().digest_fallbacks, 1);
    assert_eq!(p.a.document(DOC).expect("doc").state(lsn).expect("state"), MutationState::Confirmed);
    p.assert_converged();
    let n = p.a.document(DOC).expect("doc").query("SELECT count(*) FROM t", &[]).expect("query");
    assert_eq!(n.rows[0][0], Value::Integer(500), "A holds the server's rows");
    // Later steps still converge (with pages, on this connection).
    p.write(false, "INSERT INTO t VALUES (1)", vec![], 3);
    p.exchange(T0 + 2);
    p.assert_converged();
}

#[test]
fn confirmations_that_arrive_together_rerun_the_pending_writes_once() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![], 1);
    p.exchange(T0);
    p.assert_converged();
    // Eight writes, each its own step at the server, whose frames to A are held back: A is
    // behind its confirmations, with every write still pending.
    const N: usize = 8;
    let mut held: Vec<Vec<u8>> = Vec::new();
    for i in 0..N {
        p.write(false, "INSERT INTO t(v) VALUES (?1)", vec![Value::Text(format!("row {i}"))], 10 + i as u64);
        held.extend(p.step_holding_a(false, T0 + 1));
    }
    let confirms = held
        .iter()
        .filter_map(|f| match Message::decode(f).expect("decode") {
            Message::Storage { entries, .. } => {
                Some(entries.iter().filter(|e| e.kind == WireKind::Confirm).count())
            }
            _ => None,
        })
        .sum::<usize>();
    assert_eq!(confirms, N, "one step per write, each confirmed to its author");
    let before = p.a.status(DOC).expect("status").confirms;
    assert_eq!(p.a.document(DOC).expect("doc").pending_count(), N);
    p.a.handle_frames(T0 + 2, &held).expect("A applies them together");
    let after = p.a.status(DOC).expect("status").confirms;
    // Each confirmation replays its own write on the stored state; what stays pending is
    // re-run once at the end, not after every confirmation (that was 8 + 7 + ... + 1 = 36).
    assert_eq!(after.kept - before.kept, N as u64, "{after:?}");
    assert!(after.replayed - before.replayed <= N as u64, "re-runs: {}", after.replayed - before.replayed);
    p.exchange(T0 + 3);
    p.assert_converged();
    let rows = p.a.document(DOC).expect("doc").query("SELECT count(*) FROM t", &[]).expect("count");
    assert_eq!(rows.rows[0][0], Value::Integer(N as i64));
}

#[test]
fn new_mutators_after_storage_in_one_batch_rerun_the_pending_writes_once() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE c(n INTEGER)", vec![], 1);
    p.write(false, "INSERT INTO c VALUES (0)", vec![], 2);
    p.exchange(T0);
    p.assert_converged();
    // A's pending write, not sent; B's write reaches A as pages, held back.
    p.write(false, "UPDATE c SET n = n + 1 WHERE n < 100", vec![], 3);
    p.write(true, "INSERT INTO c VALUES (100)", vec![], 4);
    let mut held = p.step_holding_a(true, T0 + 1);
    assert!(held.iter().any(|f| matches!(Message::decode(f), Ok(Message::Storage { .. }))));
    // New mutator definitions in the same batch, after the storage: they re-run the pending
    // writes themselves, and the re-run the storage left due must not run them again on top.
    let source = "-- mutator: bump()\nUPDATE c SET n = n + 1 WHERE n < 100;\n".to_owned();
    held.push(Message::Mutators { doc: DOC, version: "v1".into(), source }.encode());
    p.a.handle_frames(T0 + 2, &held).expect("A applies them together");
    let a = p.a.document(DOC).expect("doc");
    let rows = a.query("SELECT n FROM c ORDER BY n", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(1)], vec![Value::Integer(100)]], "the pending write ran once");
    assert_eq!(a.pending_count(), 1);
}

/// A's writes, each its own step at the server, whose frames to A are held back until all are
/// written: A is ahead of every confirmation. Returns how A's confirmation counters moved when
/// it applied them together, and checks that every replica converged.
fn confirm_while_ahead(p: &mut Pair, writes: &[(&str, Vec<Value>)], seed: u64) -> pagesync::ConfirmStats {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for (i, (q, params)) in writes.iter().enumerate() {
        p.write(false, q, params.clone(), seed + i as u64);
        held.extend(p.step_holding_a(false, T0 + 1));
    }
    let before = p.a.status(DOC).expect("status").confirms;
    p.a.handle_frames(T0 + 2, &held).expect("A applies them together");
    let after = p.a.status(DOC).expect("status").confirms;
    p.exchange(T0 + 3);
    p.assert_converged();
    pagesync::ConfirmStats {
        kept: after.kept - before.kept,
        kept_as_is: after.kept_as_is - before.kept_as_is,
        kept_from_commits: after.kept_from_commits - before.kept_from_commits,
        mismatches: after.mismatches - before.mismatches,
        replayed: after.replayed - before.replayed,
    }
}

#[test]
fn a_writer_ahead_of_its_confirmations_keeps_them_from_its_own_commits() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![], 1);
    p.exchange(T0);
    // Rows that fill pages and split them, so later writes touch pages earlier ones wrote.
    let row =
        |i: usize| ("INSERT INTO t(v) VALUES (?1)", vec![Value::Text(format!("{i} {}", "x".repeat(900)))]);
    let writes: Vec<_> = (0..12).map(row).collect();
    let moved = confirm_while_ahead(&mut p, &writes, 10);
    // Each confirmation is kept from the pages A's own commits left (the digest matched), and
    // nothing is run again: not the confirmed writes, not the ones still pending after them.
    assert_eq!(moved.kept, 12, "{moved:?}");
    assert_eq!(moved.kept_from_commits, 12, "{moved:?}");
    assert_eq!((moved.replayed, moved.mismatches), (0, 0), "{moved:?}");

    // B's write reaches the server first; A, which has not seen it, writes four more. B's
    // pages reach A alone first: A runs its four pending writes again on them, a commit each,
    // and keeps the confirmations that follow from those commits.
    p.write(true, "INSERT INTO t(v) VALUES ('from b')", vec![], 50);
    let from_b = p.step_holding_a(true, T0 + 4);
    let mut held = Vec::new();
    for i in 0..4 {
        p.write(false, "INSERT INTO t(v) VALUES (?1)", vec![Value::Integer(i)], 60 + i as u64);
        held.extend(p.step_holding_a(false, T0 + 4));
    }
    let before = p.a.status(DOC).expect("status").confirms;
    p.a.handle_frames(T0 + 5, &from_b).expect("A applies B's pages");
    let rebased = p.a.status(DOC).expect("status").confirms;
    assert_eq!(rebased.replayed - before.replayed, 4, "{rebased:?}");
    p.a.handle_frames(T0 + 6, &held).expect("A applies its confirmations");
    let after = p.a.status(DOC).expect("status").confirms;
    assert_eq!(after.kept_from_commits - rebased.kept_from_commits, 4, "{after:?}");
    assert_eq!((after.replayed, after.mismatches), (rebased.replayed, 0), "{after:?}");
    p.exchange(T0 + 7);
    p.assert_converged();

    // A schema change among them: SQLite parses again, so the confirmations from it on are
    // kept by running the writes again; all converge, none mismatches.
    let mut mixed: Vec<_> = (0..3).map(row).collect();
    mixed.push(("CREATE INDEX t_v ON t(v)", vec![]));
    mixed.extend((3..6).map(row));
    let moved = confirm_while_ahead(&mut p, &mixed, 100);
    assert_eq!((moved.kept, moved.mismatches), (7, 0), "{moved:?}");
    assert!(moved.kept_from_commits < 7 && moved.replayed > 0, "{moved:?}");
    let n = p.a.document(DOC).expect("doc").query("SELECT count(*) FROM t", &[]).expect("count");
    assert_eq!(n.rows[0][0], Value::Integer(12 + 1 + 4 + 6));
}

#[test]
fn local_commits_past_their_bound_are_not_recorded_and_their_confirmations_replay() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)", vec![], 1);
    p.exchange(T0);
    // `randomblob` makes at most 1 MiB at once: a mutation of `mib` rows of 1 MiB.
    let many = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
                INSERT INTO t(v) SELECT randomblob(1048576) FROM n";
    let blob = |mib: i64| (many, vec![Value::Integer(mib)]);
    // 12 MiB of commits ahead of their confirmations: within the bound, all recorded.
    let within = confirm_while_ahead(&mut p, &vec![blob(3); 4], 10);
    assert_eq!((within.kept, within.kept_from_commits, within.mismatches), (4, 4, 0), "{within:?}");
    // 21 MiB: past `LOCAL_COMMIT_BYTES` (16 MiB) the store stops recording and forgets what it
    // had, so every confirmation is kept by running its writes again, and all converge.
    const { assert!(7 * (3 << 20) > pagesync::store::LOCAL_COMMIT_BYTES) };
    let past = confirm_while_ahead(&mut p, &vec![blob(3); 7], 20);
    assert_eq!((past.kept, past.mismatches), (7, 0), "{past:?}");
    assert_eq!(past.kept_from_commits, 0, "{past:?}");
    assert!(past.replayed > 0, "{past:?}");
}

#[test]
fn schema_changes_among_confirmations_that_arrive_together_keep_replicas_identical() {
    let mut p = Pair::new();
    p.write(false, "CREATE TABLE t(x)", vec![], 1);
    p.exchange(T0);
    // A table, then (a step later) another table and a row in it: A holds both steps'
    // confirmations back and applies them together, the second's commits recorded on the
    // state before the first was kept.
    let mut held = Vec::new();
    p.write(false, "CREATE TABLE x(a)", vec![], 2);
    held.extend(p.step_holding_a(false, T0 + 1));
    p.write(false, "CREATE TABLE u(b)", vec![], 3);
    p.write(false, "INSERT INTO u VALUES (7)", vec![], 4);
    p.write(false, "INSERT INTO t VALUES (8)", vec![], 5);
    held.extend(p.step_holding_a(false, T0 + 1));
    p.write(false, "INSERT INTO u VALUES (9)", vec![], 6);
    held.extend(p.step_holding_a(false, T0 + 1));
    let before = p.a.status(DOC).expect("status").confirms;
    p.a.handle_frames(T0 + 2, &held).expect("A applies them together");
    let after = p.a.status(DOC).expect("status").confirms;
    assert_eq!((after.kept - before.kept, after.mismatches), (3, 0), "{after:?}");
    let doc = p.a.document(DOC).expect("doc");
    let u = doc.query("SELECT group_concat(b) FROM u", &[]).expect("u");
    assert_eq!(u.rows[0][0], Value::Text("7,9".into()));
    p.exchange(T0 + 3);
    p.assert_converged();
}

//! Client and server documents end to end, in process: states, rejections, refusals, restarts.

use pagesync::journal::{FileJournal, FileJournalOptions, JournalId, Lsn};
use pagesync::{ClientDocument, Error, MutationState, ServerDocument, Value};
use pagesync_tests::{SharedJournal, drain, integrity_ok, memory_journal, pages_of, pull, push, sql};

const T0: i64 = 1_700_000_000_000;

fn setup() -> (ServerDocument, ClientDocument) {
    let server = ServerDocument::open(memory_journal(1)).expect("server");
    let client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    (server, client)
}

#[test]
fn local_write_is_instant_then_confirmed() {
    let (mut server, mut client) = setup();
    let a =
        client.mutate(sql("CREATE TABLE t(x INTEGER PRIMARY KEY, y TEXT)", vec![]), T0, 1).expect("mutate");
    let b = client.mutate(sql("INSERT INTO t(y) VALUES (?1)", vec!["hello".into()]), T0, 2).expect("mutate");
    assert_eq!(b.local, Ok(()));
    let rows = client.query("SELECT y FROM t", &[]).expect("query");
    assert_eq!(rows.rows, vec![vec![Value::Text("hello".into())]]);
    assert_eq!(client.state(a.lsn).expect("state"), MutationState::Pending);

    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.state(a.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(client.state(b.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(client.pending_count(), 0);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
    assert!(integrity_ok(client.database()));
}

#[test]
fn a_mutation_stays_pending_while_its_confirmation_fails_to_append() {
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let storage = SharedJournal::new(2);
    let mut client = ClientDocument::open(storage.boxed(), memory_journal(3)).expect("client");
    let a = client.mutate(sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    push(&client, &mut server);
    drain(&mut server, T0);

    storage.disk_full.store(true, std::sync::atomic::Ordering::Relaxed);
    let range = server.storage_range();
    let entries = server.read_storage(range).expect("read");
    assert!(client.receive_storage(range.first(), &entries).is_err(), "the append fails");
    assert_eq!(client.state(a.lsn).expect("state"), MutationState::Pending, "not held, so not applied");
    assert_eq!(client.applied_lsn(), None);
    assert_eq!(client.pending_count(), 1);
    assert_eq!(
        client.query("SELECT count(*) FROM t", &[]).expect("query").rows,
        vec![vec![Value::Integer(0)]]
    );

    storage.disk_full.store(false, std::sync::atomic::Ordering::Relaxed);
    pull(&mut client, &server);
    assert_eq!(client.state(a.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(client.pending_count(), 0);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

/// A read that fails outside any mutation leaves its cause in the page store; a later
/// mutation's rejection must not be taken for it (the step would fail, as on a broken disk).
#[test]
fn an_old_read_error_does_not_fail_a_later_step() {
    use pagesync_tests::disk::{Disk, FaultRates, Faults, Kind};
    let faults = Faults::new(FaultRates { read: 1000, ..FaultRates::default() });
    faults.stop();
    let disk = Disk::new(Kind::File, JournalId::from_u128(1), "server", 1, &faults);
    let mut server = ServerDocument::open(disk.open().expect("open")).expect("server");
    let tl = pagesync::TimelineId::from_u128(9);
    let ddl = |n: u64, s: &str| pagesync::Mutation { client_time_ms: T0, seed: n, body: sql(s, vec![]) };
    let m = ddl(1, "CREATE TABLE t(x INTEGER CHECK (x > 0))").encode().expect("encode");
    server.receive(tl, Lsn::FIRST, vec![m]);
    drain(&mut server, T0);
    server.shrink_memory().expect("shrink");

    let m = ddl(2, "INSERT INTO t VALUES (1)").encode().expect("encode");
    server.receive(tl, Lsn::new(2).expect("2"), vec![m]);
    faults.resume();
    server.step(T0).expect_err("every read fails");
    faults.stop();
    let m = ddl(3, "INSERT INTO t VALUES (0)").encode().expect("encode");
    server.receive(tl, Lsn::new(3).expect("3"), vec![m]);
    let step = server.step(T0).expect("the disk works again").expect("a step");
    assert_eq!((step.applied, step.rejected), (2, 1), "{step:?}");
}

/// A server document that checkpoints often and keeps no history, and a writer that makes it
/// write enough to checkpoint and trim: a replica that was not following restarts at the
/// checkpoint the journal starts with.
fn trimmed_server(server: ServerDocument) -> ServerDocument {
    trimmed_server_followed_by(server, &mut [])
}

/// `trimmed_server`, with `followers` pulling after every step.
fn trimmed_server_followed_by(
    mut server: ServerDocument,
    followers: &mut [&mut ClientDocument],
) -> ServerDocument {
    server.set_compaction(Some(pagesync::Compaction { checkpoint_after_bytes: 4096, retention_ms: 0 }));
    let mut writer = ClientDocument::open(memory_journal(90), memory_journal(91)).expect("writer");
    writer.mutate(sql("CREATE TABLE IF NOT EXISTS w(b BLOB)", vec![]), T0, 0).expect("ddl");
    for n in 1..=12 {
        writer.mutate(sql("INSERT INTO w VALUES (randomblob(3000))", vec![]), T0, n).expect("insert");
        push(&writer, &mut server);
        drain(&mut server, T0 + n as i64);
        pull(&mut writer, &server);
        for follower in followers.iter_mut() {
            pull(follower, &server);
        }
    }
    assert!(server.base_checkpoint().is_some_and(|c| c.first > Lsn::FIRST), "trimmed to a checkpoint");
    server
}

/// A replica keeps its storage journal from its newest checkpoint on. On files, where entries
/// arrive without a barrier, the trim (which makes them durable first: one fsync of all that
/// came since the last) waits for the timer, `trim_if_due`, instead of stopping a download
/// half-way; a journal whose every append is durable trims at once.
#[test]
fn a_replica_drops_the_history_before_its_newest_checkpoint_at_the_timer_on_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = FileJournalOptions::default();
    let storage =
        FileJournal::create(dir.path().join("storage"), JournalId::from_u128(2), opts).expect("journal");
    let mut on_files = ClientDocument::open(Box::new(storage), memory_journal(3)).expect("client");
    let mut in_memory = ClientDocument::open(memory_journal(4), memory_journal(5)).expect("client");
    let server = ServerDocument::open(memory_journal(1)).expect("server");
    let server = trimmed_server_followed_by(server, &mut [&mut on_files, &mut in_memory]);
    let trimmed = in_memory.storage_range().first();
    assert!(trimmed > Lsn::FIRST, "a journal with durable appends trims at once");
    // (It may have trimmed to an older checkpoint at a moment its journal was durable anyway.)
    assert!(on_files.storage_range().first() < trimmed, "on files the history waits for the timer");
    on_files.trim_if_due().expect("trim");
    assert_eq!(on_files.storage_range().first(), trimmed, "the timer trims to the same checkpoint");
    assert_eq!(pages_of(on_files.database()), pages_of(server.database()));
    on_files.trim_if_due().expect("nothing more to trim");
    assert_eq!(on_files.storage_range().first(), trimmed);
}

/// A replica that restarts at a checkpoint and fails to append its first part holds none of it:
/// it says it holds nothing, so the server sends the checkpoint whole, and it refuses a delta
/// (it has no pages to apply one to; resolved against zeros it would become an empty file).
#[test]
fn a_restart_whose_append_failed_takes_no_delta() {
    let server = trimmed_server(ServerDocument::open(memory_journal(1)).expect("server"));
    let storage = SharedJournal::new(2);
    let mut client = ClientDocument::open(storage.boxed(), memory_journal(3)).expect("client");
    let range = server.storage_range();
    let entries = server.read_storage(range).expect("read");
    storage.disk_full.store(true, std::sync::atomic::Ordering::Relaxed);
    client.receive_storage(range.first(), &entries).expect_err("the append fails");
    storage.disk_full.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(client.is_restarting());
    assert_eq!(client.storage_range(), pagesync::journal::LsnRange::new_empty(), "holds nothing");

    let cp = server.base_checkpoint().expect("checkpoint");
    let parts = server.read_wire(pagesync::journal::LsnRange::inclusive(cp.first, cp.last)).expect("wire");
    assert!(
        parts[0].kind == pagesync::wire::WireKind::Delta,
        "the server keeps a new checkpoint's parts as deltas"
    );
    client.receive_wire(cp.first, parts.clone()).expect_err("a delta needs the pages before it");
    pull(&mut client, &server);
    assert!(!client.is_restarting());
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
    assert!(integrity_ok(client.database()));
}

/// A replica restarted at a checkpoint learns from it (`_pagesync_timelines`) which of its
/// mutations the server applied. When that read fails, the rebase stays due: the next storage
/// message, even one it holds already, finishes it, and so does the session's timer when no
/// message comes (`rebase_if_due`: without it the mutations stayed pending for good once the
/// document was quiet, found by the simulator).
#[test]
fn a_rebase_cut_short_after_a_checkpoint_is_finished_later() {
    rebase_cut_short(true);
    rebase_cut_short(false);
}

fn rebase_cut_short(by_a_message: bool) {
    use pagesync_tests::disk::{Disk, FaultRates, Faults, Kind};
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let faults = Faults::new(FaultRates { read: 1000, ..FaultRates::default() });
    faults.stop();
    let storage = Disk::new(Kind::File, JournalId::from_u128(2), "storage", 1, &faults);
    let mut client = ClientDocument::open(storage.open().expect("open"), memory_journal(3)).expect("client");
    let a = client.mutate(sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    push(&client, &mut server);
    drain(&mut server, T0);
    let server = trimmed_server(server);

    faults.resume();
    assert!(pagesync_tests::try_pull(&mut client, &server).is_err(), "reads fail after the append");
    faults.stop();
    assert!(!client.is_restarting(), "the checkpoint is in");
    assert_eq!(client.pending_count(), 1, "the rebase is cut short");
    if by_a_message {
        let last = server.storage_range().last().expect("entries");
        let again = server.read_storage(pagesync::journal::LsnRange::inclusive(last, last)).expect("read");
        client.receive_storage(last, &again).expect("held already; the rebase finishes");
    } else {
        client.rebase_if_due().expect("the rebase finishes");
    }
    assert_eq!(client.state(a.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(client.pending_count(), 0);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn rejected_mutation_carries_the_server_message_and_changes_nothing() {
    let (mut server, mut client) = setup();
    client
        .mutate(sql("CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER CHECK (bal >= 0))", vec![]), T0, 1)
        .expect("ddl");
    client.mutate(sql("INSERT INTO acct VALUES (1, 10)", vec![]), T0, 2).expect("insert");
    let bad =
        client.mutate(sql("UPDATE acct SET bal = bal - 50 WHERE id = 1", vec![]), T0, 3).expect("queued");
    assert!(bad.local.is_err(), "the CHECK fails locally too");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    match client.state(bad.lsn).expect("state") {
        MutationState::Rejected(r) => {
            assert_eq!(r.code, pagesync::RejectionCode::Constraint);
            assert!(r.message.contains("CHECK constraint failed"), "{}", r.message);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let bal = client.query("SELECT bal FROM acct", &[]).expect("query");
    assert_eq!(bal.rows, vec![vec![Value::Integer(10)]]);
}

#[test]
fn statements_that_cannot_replay_are_refused_with_a_reason() {
    let (mut server, mut client) = setup();
    pull(&mut client, &server); // the system tables arrive with the first entry
    for (stmt, needle) in [
        ("ATTACH 'x.db' AS x", "ATTACH"),
        ("PRAGMA journal_mode = WAL", "journal_mode"),
        ("PRAGMA page_size = 8192", "page_size"),
        ("SELECT load_extension('evil')", "load_extension"),
        ("INSERT INTO _pagesync_timelines VALUES (x'00', 1)", "_pagesync_timelines"),
        ("BEGIN", "transaction"),
        ("VACUUM", "VACUUM"),
    ] {
        match client.mutate(sql(stmt, vec![]), T0, 1) {
            Err(Error::Refused(msg)) => {
                assert!(msg.to_lowercase().contains(&needle.to_lowercase()), "{stmt}: {msg}")
            }
            other => panic!("{stmt}: expected a refusal, got {other:?}"),
        }
    }
    // Parameters the statement does not take fail the same way everywhere: refused too.
    for params in [vec![], vec![Value::Integer(1), Value::Integer(2)]] {
        match client.mutate(sql("SELECT ?1 + 5", params.clone()), T0, 1) {
            Err(Error::Refused(msg)) => assert!(msg.contains("takes 1 parameters"), "{params:?}: {msg}"),
            other => panic!("{params:?}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(client.pending_count(), 0, "refused mutations are not queued");

    // A client that skips the local check gets the same refusal from the server.
    let forged = pagesync::Mutation {
        client_time_ms: T0,
        seed: 0,
        body: sql("DELETE FROM _pagesync_timelines", vec![]),
    };
    let tl = pagesync::TimelineId::from_u128(99);
    server.receive(tl, Lsn::FIRST, vec![forged.encode().expect("encode")]);
    let outcome = server.step(T0).expect("step").expect("applied");
    assert_eq!(outcome.rejected, 1);
    let code: String = server
        .database()
        .conn()
        .query_row("SELECT code FROM _pagesync_rejections", [], |r| r.get(0))
        .expect("rejection recorded");
    assert_eq!(code, "refused");
}

#[test]
fn clock_and_randomness_are_the_mutations_own() {
    let (mut server, mut client) = setup();
    client.mutate(sql("CREATE TABLE r(t TEXT, a INTEGER, b BLOB)", vec![]), T0, 1).expect("ddl");
    client
        .mutate(sql("INSERT INTO r VALUES (datetime('now'), random(), randomblob(8))", vec![]), T0, 42)
        .expect("ins");
    let local = client.query("SELECT * FROM r", &[]).expect("query").rows;
    assert_eq!(local[0][0], Value::Text("2023-11-14 22:13:20".into()));
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(
        client.query("SELECT * FROM r", &[]).expect("query").rows,
        local,
        "server computed the same values"
    );
}

#[test]
fn client_time_ahead_of_the_server_is_clamped() {
    let (mut server, mut client) = setup();
    client.mutate(sql("CREATE TABLE r(t INTEGER)", vec![]), T0, 1).expect("ddl");
    let far = T0 + 86_400_000;
    client
        .mutate(sql("INSERT INTO r VALUES (unixepoch('now', 'subsec') * 1000)", vec![]), far, 1)
        .expect("ins");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    let rows = client.query("SELECT CAST(t AS INTEGER) FROM r", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(T0 + pagesync::server::MAX_CLOCK_AHEAD_MS)]]);
}

#[test]
fn duplicates_and_replays_are_applied_once() {
    let (mut server, mut client) = setup();
    client.mutate(sql("CREATE TABLE c(n INTEGER)", vec![]), T0, 1).expect("ddl");
    for _ in 0..5 {
        client.mutate(sql("INSERT INTO c VALUES (1)", vec![]), T0, 1).expect("ins");
    }
    push(&client, &mut server);
    push(&client, &mut server);
    drain(&mut server, T0);
    push(&client, &mut server); // after it was applied: ignored
    let range = client.pending_range();
    let entries = client.read_pending(range).expect("read");
    let gap = server.receive(client.timeline_id(), Lsn::new(100).expect("lsn"), entries);
    assert_eq!(gap.accepted, 0);
    assert_eq!(gap.next_expected, Lsn::new(7).expect("lsn"));
    drain(&mut server, T0);
    pull(&mut client, &server);
    let n = client.query("SELECT count(*) FROM c", &[]).expect("query").rows;
    assert_eq!(n, vec![vec![Value::Integer(5)]]);
}

#[test]
fn offline_work_survives_a_client_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = FileJournalOptions::default;
    let open = |dir: &std::path::Path| {
        let storage = FileJournal::open_or_create(dir.join("storage"), JournalId::from_u128(10), opts())
            .expect("storage");
        let timeline =
            FileJournal::open_or_create(dir.join("timeline"), JournalId::from_u128(11), opts()).expect("tl");
        ClientDocument::open(Box::new(storage), Box::new(timeline)).expect("client")
    };
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let mut client = open(dir.path());
    client.mutate(sql("CREATE TABLE n(v TEXT)", vec![]), T0, 1).expect("ddl");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    client.mutate(sql("INSERT INTO n VALUES ('offline 1')", vec![]), T0, 2).expect("ins");
    let last = client.mutate(sql("INSERT INTO n VALUES ('offline 2')", vec![]), T0, 3).expect("ins");
    drop(client);

    let mut client = open(dir.path());
    assert_eq!(client.pending_count(), 2);
    assert_eq!(client.state(last.lsn).expect("state"), MutationState::Pending);
    let rows = client.query("SELECT v FROM n ORDER BY v", &[]).expect("query").rows;
    assert_eq!(rows.len(), 2, "pending writes show after restart");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.state(last.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn vacuum_shrinks_the_file_and_replicates() {
    let (mut server, mut client) = setup();
    client.mutate(sql("CREATE TABLE big(b BLOB)", vec![]), T0, 1).expect("ddl");
    client
        .mutate(sql("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM s WHERE i < 500) INSERT INTO big SELECT randomblob(3000) FROM s", vec![]), T0, 2)
        .expect("fill");
    client.mutate(sql("DELETE FROM big WHERE rowid > 10", vec![]), T0, 3).expect("delete");
    push(&client, &mut server);
    drain(&mut server, T0);
    let before = server.database().store().page_count();
    server.vacuum(0).expect("vacuum").expect("vacuum changed pages");
    let after = server.database().store().page_count();
    assert!(after * 10 < before, "VACUUM truncated the file: {before} -> {after} pages");
    pull(&mut client, &server);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
    assert!(integrity_ok(client.database()) && integrity_ok(server.database()));
    let n = client.query("SELECT count(*) FROM big", &[]).expect("query").rows;
    assert_eq!(n, vec![vec![Value::Integer(10)]]);
}

/// The README's example, verbatim but for `now_ms`/`seed` and error plumbing.
#[test]
fn readme_example() -> Result<(), pagesync::Error> {
    use pagesync::journal::{Journal, JournalId, MemoryJournal};
    use pagesync::{ClientDocument, MutationState, ServerDocument, SqlMutation};
    let (now_ms, seed) = (T0, 7);

    let journal = |n| -> Box<dyn Journal> { Box::new(MemoryJournal::new(JournalId::from_u128(n))) };
    let mut server = ServerDocument::open(journal(1))?;
    let mut client = ClientDocument::open(journal(2), journal(3))?; // storage, timeline
    let body = SqlMutation::one("CREATE TABLE t(x TEXT)", vec![]).encode();
    let done = client.mutate(body, now_ms, seed)?; // local, instant, durable
    // Move the timeline up and the storage down (the sessions do this over a network):
    let up = client.pending_range();
    server.receive(client.timeline_id(), up.first(), client.read_pending(up)?);
    server.step(now_ms)?;
    let down = server.storage_range();
    client.receive_storage(down.first(), &server.read_storage(down)?)?;
    assert_eq!(client.state(done.lsn)?, MutationState::Confirmed);
    Ok(())
}

/// `INSERT OR ROLLBACK` and `RAISE(ROLLBACK, ...)` end the whole transaction, not just the
/// mutation's savepoint. Such a mutation is rejected alone; the rest of its step, the document
/// and the client's rebase carry on.
#[test]
fn a_mutation_that_rolls_back_the_transaction_is_rejected_alone() {
    let (mut server, mut client) = setup();
    client.mutate(sql("CREATE TABLE u(k INTEGER PRIMARY KEY)", vec![]), T0, 1).expect("ddl");
    client
        .mutate(sql("CREATE TRIGGER no13 BEFORE INSERT ON u WHEN new.k = 13 BEGIN SELECT RAISE(ROLLBACK, 'unlucky'); END", vec![]), T0, 1)
        .expect("trigger");
    client.mutate(sql("INSERT INTO u VALUES (1)", vec![]), T0, 1).expect("ins");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    let dup = client.mutate(sql("INSERT OR ROLLBACK INTO u VALUES (1)", vec![]), T0, 1).expect("queued");
    let ok = client.mutate(sql("INSERT INTO u VALUES (2)", vec![]), T0, 1).expect("ins");
    let unlucky = client.mutate(sql("INSERT INTO u VALUES (13)", vec![]), T0, 1).expect("queued");
    let last = client.mutate(sql("INSERT INTO u VALUES (3)", vec![]), T0, 1).expect("ins");
    assert!(dup.local.is_err() && unlucky.local.is_err());
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    for (lsn, needle) in [(dup.lsn, "UNIQUE"), (unlucky.lsn, "unlucky")] {
        match client.state(lsn).expect("state") {
            MutationState::Rejected(r) => assert!(r.message.contains(needle), "{r}"),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    assert_eq!(client.state(ok.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(client.state(last.lsn).expect("state"), MutationState::Confirmed);
    let rows = client.query("SELECT k FROM u ORDER BY k", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(1)], vec![Value::Integer(2)], vec![Value::Integer(3)]]);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn a_document_at_its_size_limit_rejects_growth_and_stays_usable() {
    let limits = pagesync::StepLimits { max_doc_bytes: Some(256 << 10), ..Default::default() };
    let mut server = ServerDocument::with_reducer(memory_journal(1), pagesync::SqlReducer::default(), limits)
        .expect("server");
    let mut client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    client.mutate(sql("CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB)", vec![]), T0, 1).expect("ddl");
    let mut writes = Vec::new();
    for i in 0..40 {
        let insert = sql("INSERT INTO blobs VALUES (?1, zeroblob(10000))", vec![Value::Integer(i)]);
        writes.push(client.mutate(insert, T0, 10 + i as u64).expect("local write").lsn);
    }
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    let states: Vec<MutationState> = writes.iter().map(|l| client.state(*l).expect("state")).collect();
    let confirmed = states.iter().filter(|s| **s == MutationState::Confirmed).count();
    assert!((15..40).contains(&confirmed), "{confirmed} of 40 10 kB rows fit in 256 KiB");
    match &states[39] {
        MutationState::Rejected(r) => {
            assert_eq!(r.code, pagesync::RejectionCode::DocFull);
            assert!(r.message.contains("limit of 262144 bytes"), "{}", r.message);
        }
        other => panic!("expected doc_full, got {other:?}"),
    }
    let size = server.database().store().size_bytes();
    assert!(size <= 256 << 10, "the document grew to {size} bytes");
    // Still usable: a delete applies, and then growth fits again.
    client.mutate(sql("DELETE FROM blobs WHERE id < 10", vec![]), T0, 100).expect("delete");
    let again =
        client.mutate(sql("INSERT INTO blobs VALUES (1000, zeroblob(10000))", vec![]), T0, 101).expect("w");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.state(again.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
    assert!(integrity_ok(server.database()));
}

#[test]
fn a_migration_shipped_by_two_clients_at_once_runs_once() {
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let mut a = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client a");
    let mut b = ClientDocument::open(memory_journal(4), memory_journal(5)).expect("client b");
    let migrations = [
        (1, "CREATE TABLE todo(id INTEGER PRIMARY KEY, title TEXT); CREATE TABLE ran(v INTEGER)"),
        (2, "ALTER TABLE todo ADD COLUMN done INTEGER NOT NULL DEFAULT 0; INSERT INTO ran VALUES (2)"),
    ];
    // Both clients start offline and bring the same migrations, plus a write that needs them.
    let mut submitted = Vec::new();
    for (c, client) in [&mut a, &mut b].into_iter().enumerate() {
        let ran = client.migrate(&migrations, T0, 1).expect("migrate");
        assert_eq!(ran.len(), 2, "a fresh replica submits every migration");
        assert!(ran.iter().all(|s| s.local.is_ok()));
        assert!(client.migrate(&migrations, T0, 9).expect("again").is_empty(), "already applied locally");
        let insert = sql("INSERT INTO todo(title, done) VALUES (?1, 0)", vec![format!("from {c}").into()]);
        submitted.extend(ran.into_iter().map(|s| s.lsn));
        submitted.push(client.mutate(insert, T0, 5).expect("insert").lsn);
    }
    push(&a, &mut server);
    push(&b, &mut server);
    drain(&mut server, T0);
    pull(&mut a, &server);
    pull(&mut b, &server);
    for client in [&a, &b] {
        let ran = client.query("SELECT count(*) FROM ran", &[]).expect("query");
        assert_eq!(ran.rows, vec![vec![Value::Integer(1)]], "migration 2 ran once");
        let todos = client.query("SELECT count(*) FROM todo WHERE done = 0", &[]).expect("query");
        assert_eq!(todos.rows, vec![vec![Value::Integer(2)]], "both writes applied on the migrated schema");
        assert_eq!(client.pending_count(), 0);
    }
    for (i, lsn) in submitted.iter().enumerate() {
        let client = if i < 3 { &a } else { &b };
        assert_eq!(client.state(*lsn).expect("state"), MutationState::Confirmed, "mutation {i}");
    }
    // A client that arrives later sees the migrations as applied and submits nothing.
    let mut late = ClientDocument::open(memory_journal(6), memory_journal(7)).expect("late");
    pull(&mut late, &server);
    assert!(late.migrate(&migrations, T0, 1).expect("migrate").is_empty());
    assert_eq!(pages_of(a.database()), pages_of(server.database()));
    assert_eq!(pages_of(b.database()), pages_of(server.database()));
}

#[test]
fn apps_cannot_forge_a_migration_record() {
    let (mut server, mut client) = setup();
    client.mutate(sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("ddl");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server); // the replica now holds the system tables
    match client.mutate(sql("INSERT INTO _pagesync_once VALUES ('migration:1', 0)", vec![]), T0, 2) {
        Err(Error::Refused(m)) => assert!(m.contains("_pagesync_once"), "{m}"),
        other => panic!("a write to _pagesync_once must be refused, got {other:?}"),
    }
}

#[test]
fn a_local_schema_with_the_servers_schema_cookie_is_not_mistaken_for_it() {
    // The server's first entry creates its system tables; a client that has created as many
    // tables locally carries the same schema cookie. SQLite must still reload the schema when
    // the server's pages replace the local ones.
    let (mut server, mut client) = setup();
    let system_tables: i64 = server
        .database()
        .conn()
        .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table'", [], |r| r.get(0))
        .expect("count");
    let ddl: Vec<String> = (0..system_tables).map(|i| format!("CREATE TABLE local{i}(x)")).collect();
    client.mutate(sql(&ddl.join("; "), vec![]), T0, 1).expect("local ddl");
    client.mutate(sql("INSERT INTO local0 VALUES (42)", vec![]), T0, 2).expect("insert");
    pull(&mut client, &server); // the server's system tables only: the local DDL is still pending
    assert_eq!(client.pending_count(), 2);
    assert!(integrity_ok(client.database()));
    let rows = client.query("SELECT x FROM local0", &[]).expect("the local table is still there");
    assert_eq!(rows.rows, vec![vec![Value::Integer(42)]]);
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.pending_count(), 0);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn a_group_commit_keeps_each_mutation_its_own() {
    let (mut server, mut client) = setup();
    client
        .mutate(sql("CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER CHECK (bal >= 0))", vec![]), T0, 1)
        .expect("ddl");
    let batch = vec![
        sql("INSERT INTO acct VALUES (1, 10)", vec![]),
        sql("UPDATE acct SET bal = bal - 50 WHERE id = 1", vec![]),
        sql("INSERT INTO acct VALUES (2, 5)", vec![]),
    ];
    let done = client.mutate_many(batch, T0, 10).expect("group commit");
    let lsns: Vec<u64> = done.iter().map(|s| s.lsn.get()).collect();
    assert_eq!(lsns, [2, 3, 4]);
    assert!(done[0].local.is_ok() && done[1].local.is_err() && done[2].local.is_ok(), "{done:?}");
    let rows = client.query("SELECT id, bal FROM acct ORDER BY id", &[]).expect("query");
    assert_eq!(rows.rows.len(), 2, "the failing one changed nothing locally, the others applied");

    // A refused statement fails the whole call, and nothing of it is kept.
    let refused = client.mutate_many(
        vec![sql("INSERT INTO acct VALUES (3, 1)", vec![]), sql("ATTACH 'x' AS y", vec![])],
        T0,
        20,
    );
    assert!(matches!(refused, Err(Error::Refused(_))), "{refused:?}");
    assert_eq!(client.pending_count(), 4);
    assert_eq!(
        client.query("SELECT count(*) FROM acct", &[]).expect("q").rows,
        vec![vec![Value::Integer(2)]]
    );

    // One that ends the local transaction itself: submitted one by one instead.
    let lost = client
        .mutate_many(
            vec![
                sql("INSERT INTO acct VALUES (4, 1)", vec![]),
                sql("INSERT OR ROLLBACK INTO acct VALUES (1, 0)", vec![]),
            ],
            T0,
            30,
        )
        .expect("submitted");
    assert_eq!(lost.iter().map(|s| s.lsn.get()).collect::<Vec<_>>(), [5, 6]);

    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    let states: Vec<MutationState> =
        (2..=6).map(|l| client.state(Lsn::new(l).expect("lsn")).expect("state")).collect();
    assert_eq!(states[0], MutationState::Confirmed);
    assert!(matches!(&states[1], MutationState::Rejected(r) if r.message.contains("CHECK")), "{states:?}");
    assert_eq!(states[2], MutationState::Confirmed);
    assert_eq!(states[3], MutationState::Confirmed);
    assert!(matches!(&states[4], MutationState::Rejected(_)), "{states:?}");
    let outcomes = client.outcomes().expect("outcomes");
    assert_eq!(outcomes.confirmed, 4, "the DDL and three writes");
    assert_eq!(outcomes.rejected.iter().map(|(l, _)| l.get()).collect::<Vec<_>>(), [3, 6]);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn rows_from_the_server_leave_sqlites_schema_and_statements_alone() {
    // A client's SQLite keeps its parsed schema and prepared statements while only rows change
    // underneath it; a schema change from the server makes it parse again.
    let (mut server, mut client) = setup();
    let round = |client: &mut ClientDocument, server: &mut ServerDocument, m: Vec<u8>| {
        client.mutate(m, T0, 1).expect("mutate");
        push(client, server);
        drain(server, T0);
        pull(client, server);
    };
    round(&mut client, &mut server, sql("CREATE TABLE t(x)", vec![]));
    let count = "SELECT count(*) FROM t";
    let reprepared = |client: &ClientDocument| {
        // The key a query is cached under (`query_rows`: keys of their own).
        let key = format!("{count}\n-- query");
        let stmt = client.database().conn().prepare_cached(&key).expect("cached");
        stmt.get_status(rusqlite::StatementStatus::RePrepare)
    };
    client.query(count, &[]).expect("query");
    let before = reprepared(&client);
    for n in 1..=3 {
        round(&mut client, &mut server, sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(n)]));
        assert_eq!(client.query(count, &[]).expect("query").rows, vec![vec![Value::Integer(n)]]);
    }
    assert_eq!(reprepared(&client), before, "rows alone made SQLite prepare the statement again");
    round(&mut client, &mut server, sql("ALTER TABLE t ADD COLUMN y", vec![]));
    let all = client.query("SELECT * FROM t", &[]).expect("query");
    assert_eq!(all.columns, ["x", "y"], "the server's schema change is seen");
    assert_eq!(client.query(count, &[]).expect("query").rows, vec![vec![Value::Integer(3)]]);
    assert!(reprepared(&client) > before, "the schema change made SQLite prepare again");
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

/// Each received entry counts against a document's queue bound with what it costs to hold,
/// not only its bytes: a client sending empty entries (a million in a frame) gets no more
/// queued than the bound allows. They held 90 MB per frame and counted nothing.
#[test]
fn empty_entries_count_against_the_queue_bound() {
    use pagesync::server::{MAX_QUEUED_BYTES, QUEUED_ENTRY_COST};
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let timeline = pagesync::TimelineId::from_u128(5);
    let most = MAX_QUEUED_BYTES / QUEUED_ENTRY_COST;
    let received = server.receive(timeline, Lsn::FIRST, vec![Vec::new(); most + 1_000]);
    assert_eq!(received.accepted as usize, most);
    assert_eq!(server.queued(), most);
    let more = server.receive(timeline, received.next_expected, vec![Vec::new(); 10]);
    assert_eq!(more.accepted, 0, "a full queue took more");
}

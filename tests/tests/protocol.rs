//! The sans-io sessions over a perfect in-memory link: resume after reconnect without resending,
//! fairness across documents, byte batches and windows, version mismatch.

use pagesync::journal::Lsn;
use pagesync::protocol::{
    ClientSession, ConnId, MAX_BATCH_BYTES, Message, PROTOCOL_VERSION, ServerSession, UPLOAD_WINDOW_BYTES,
    codes,
};
use pagesync::{ClientDocument, DocId, MutationState, ServerDocument, Value};
use pagesync_tests::{memory_journal, sql};

const T0: i64 = 1_700_000_000_000;
const C: ConnId = ConnId(1);

fn server() -> ServerSession {
    ServerSession::new(Box::new(|d: DocId| ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))))
}

/// A server whose one document opens a new handle on `journal` each time.
fn server_over(journal: &pagesync_tests::SharedJournal) -> ServerSession {
    let journal = journal.clone();
    ServerSession::new(Box::new(move |_| ServerDocument::open(journal.boxed())))
}

/// A server over `journal` and a connected client whose first mutation, a table, is applied.
fn with_a_table(
    doc: DocId,
    journal: &pagesync_tests::SharedJournal,
) -> (ServerSession, ClientSession, pagesync::Submitted) {
    let mut s = server_over(journal);
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    let table = c.mutate(doc, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    exchange(&mut s, &mut c, 0, true);
    (s, c, table)
}

/// The client's replica of `doc` is byte-identical to the server's.
fn assert_same_pages(c: &ClientSession, s: &ServerSession, doc: DocId) {
    assert_eq!(
        pagesync_tests::pages_of(c.document(doc).expect("open").database()),
        pagesync_tests::pages_of(s.document(doc).expect("open").database())
    );
}

fn client(docs: &[DocId]) -> ClientSession {
    let mut s = ClientSession::new("");
    for (i, d) in docs.iter().enumerate() {
        let n = 100 + 2 * i as u128;
        s.add_document(*d, pagesync_tests::client_doc(memory_journal(n), n + 1));
    }
    s
}

/// Hands the server everything `c` has to send now (as connection `C`); whether there was any.
fn upload(c: &mut ClientSession, s: &mut ServerSession, now: i64) -> bool {
    let mut any = false;
    while let Some(m) = c.poll_transmit() {
        s.handle_frame(C, now, &m.encode());
        any = true;
    }
    any
}

/// What the server sends now, up to 100 messages (a busy loop shows as 100).
fn downloads(s: &mut ServerSession) -> Vec<Message> {
    std::iter::from_fn(|| s.poll_transmit().map(|(_, m)| m)).take(100).collect()
}

/// Counts of what crossed the link, by kind.
#[derive(Default, Debug)]
struct Traffic {
    mutation_entries: usize,
    storage_entries: usize,
    /// The codes of the server's errors, in order.
    errors: Vec<String>,
}

/// Exchanges messages until both sides are quiet. `deliver_to_client = false` drops the
/// server's replies (as if the link died before they arrived).
fn exchange(s: &mut ServerSession, c: &mut ClientSession, now: i64, deliver_to_client: bool) -> Traffic {
    let mut t = Traffic::default();
    for _ in 0..1_000 {
        let mut moved = false;
        while let Some(m) = c.poll_transmit() {
            if let Message::Mutations { entries, .. } = &m {
                t.mutation_entries += entries.len();
            }
            s.handle_frame(C, now, &m.encode());
            moved = true;
        }
        s.handle_timeout(now);
        while let Some((_, m)) = s.poll_transmit() {
            match &m {
                Message::Storage { entries, .. } => t.storage_entries += entries.len(),
                Message::Error { code, .. } => t.errors.push(code.clone()),
                _ => {}
            }
            if deliver_to_client {
                c.handle_frame(now, &m.encode()).expect("apply");
            }
            moved = true;
        }
        if !moved {
            return t;
        }
    }
    panic!("the link never went quiet");
}

#[test]
fn reconnect_resumes_without_resending() {
    let doc = DocId::from_u128(1);
    let (mut s, mut c) = (server(), client(&[doc]));
    s.connect(C);
    c.connected(0);
    exchange(&mut s, &mut c, 0, true);
    for i in 0..50 {
        c.mutate(doc, sql("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)", vec![]), T0, i)
            .expect("mutate");
    }
    // The server gets and applies all 50, but its replies are lost with the connection.
    let first = exchange(&mut s, &mut c, 1, false);
    assert_eq!(first.mutation_entries, 50);
    s.disconnect(C);
    c.disconnected();
    assert_eq!(c.status(doc).expect("status").pending, 50, "the client has not heard back");

    s.connect(C);
    c.connected(2);
    let second = exchange(&mut s, &mut c, 2, true);
    assert_eq!(second.mutation_entries, 0, "nothing the server already had was resent");
    assert_eq!(second.storage_entries, first.storage_entries, "the storage it missed, once");
    assert_eq!(c.status(doc).expect("status").pending, 0);
    let third = exchange(&mut s, &mut c, 3, true);
    assert_eq!((third.mutation_entries, third.storage_entries), (0, 0));
}

#[test]
fn documents_share_the_link_fairly_in_byte_batches() {
    let (busy, quiet) = (DocId::from_u128(1), DocId::from_u128(2));
    let (mut s, mut c) = (server(), client(&[busy, quiet]));
    s.connect(C);
    c.connected(0);
    exchange(&mut s, &mut c, 0, true);
    let big = "x".repeat(10_000);
    c.mutate(busy, sql("CREATE TABLE t(x)", vec![]), T0, 0).expect("ddl");
    for i in 0..600 {
        c.mutate(busy, sql("INSERT INTO t VALUES (?1)", vec![big.clone().into()]), T0, i).expect("mutate");
    }
    c.mutate(quiet, sql("CREATE TABLE q(x)", vec![]), T0, 0).expect("ddl");
    let mut order = Vec::new();
    let mut uploaded = 0;
    while let Some(m) = c.poll_transmit() {
        if let Message::Mutations { doc, entries, .. } = &m {
            let bytes: usize = entries.iter().map(Vec::len).sum();
            assert!(bytes < MAX_BATCH_BYTES + 20_000, "a batch of {bytes} bytes");
            uploaded += bytes;
            order.push(*doc);
        }
    }
    assert!(order.len() > 2, "the busy document needs several batches: {order:?}");
    assert!(order[..2].contains(&quiet), "the quiet document waited behind the busy one: {order:?}");
    assert!(uploaded <= UPLOAD_WINDOW_BYTES + MAX_BATCH_BYTES, "sent {uploaded} bytes without an ack");
    assert!(uploaded < 600 * 10_000, "the window stopped the upload before the acks");
}

#[test]
fn a_version_mismatch_is_a_clear_error_and_closes() {
    let mut s = server();
    s.connect(C);
    s.handle_message(C, 0, Message::Hello { version: PROTOCOL_VERSION + 1, token: String::new() });
    match s.poll_transmit() {
        Some((_, Message::Error { doc: None, code, message })) => {
            assert_eq!(code, codes::VERSION);
            assert!(message.contains("upgrade"), "{message}");
        }
        other => panic!("expected a version error, got {other:?}"),
    }
    assert!(s.should_close(C));
}

#[test]
fn garbage_and_oversized_frames_are_refused_with_a_reason() {
    let mut s = server();
    s.connect(C);
    s.handle_frame(C, 0, &[0xff; 64]);
    match s.poll_transmit() {
        Some((_, Message::Error { code, .. })) => assert_eq!(code, codes::MALFORMED),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(s.should_close(C));
    let big = vec![0u8; pagesync::protocol::MAX_FRAME_BYTES + 1];
    assert!(matches!(Message::decode(&big), Err(pagesync::protocol::DecodeError::TooLarge { .. })));
}

/// A document whose disk is full: its writers are told, nothing is lost, another document on
/// the same server carries on, and once space is back the queued mutations apply.
#[test]
fn a_full_disk_on_one_document_is_reported_and_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (sick, healthy) = (DocId::from_u128(1), DocId::from_u128(2));
    let full = Arc::new(AtomicBool::new(false));
    let flag = full.clone();
    let mut s = ServerSession::new(Box::new(move |d: DocId| {
        let mut journal = pagesync_tests::SharedJournal::new(u128::from_be_bytes(d.0));
        if d == sick {
            journal.disk_full = flag.clone();
        }
        ServerDocument::open(journal.boxed())
    }));
    let mut c = client(&[sick, healthy]);
    s.connect(C);
    c.connected(0);
    exchange(&mut s, &mut c, 0, true);
    full.store(true, Ordering::Relaxed);
    for d in [sick, healthy] {
        c.mutate(d, sql("CREATE TABLE t(x)", vec![]), T0, 0).expect("mutate");
    }
    exchange(&mut s, &mut c, 1, true);
    let (code, message) = c.status(sick).expect("status").error.expect("the writer was told");
    assert_eq!(code, codes::STORAGE);
    assert!(message.contains("retry"), "{message}");
    assert_eq!(c.status(sick).expect("status").pending, 1, "still pending, not lost");
    assert_eq!(c.status(healthy).expect("status").pending, 0, "the other document carried on");
    assert_eq!(s.poll_timeout(), Some(1 + pagesync::protocol::STEP_RETRY_MS), "no busy retry");

    full.store(false, Ordering::Relaxed);
    exchange(&mut s, &mut c, 1 + pagesync::protocol::STEP_RETRY_MS, true);
    assert_eq!(c.status(sick).expect("status").pending, 0, "applied once the disk had room");
}

#[test]
fn storage_frames_that_arrive_together_apply_as_one_batch() {
    let doc = DocId::from_u128(9);
    let (mut s, mut c) = (server(), client(&[doc]));
    let mut writer = client(&[doc]);
    s.connect(C);
    c.connected(0);
    exchange(&mut s, &mut c, 0, true);
    // Another connection writes three steps' worth; C's storage frames are held back, then
    // handed over together.
    let w = ConnId(2);
    s.connect(w);
    writer.connected(0);
    let mut held = Vec::new();
    for step in 0..3 {
        writer
            .mutate(doc, sql("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)", vec![]), T0, step)
            .expect("mutate");
        for _ in 0..100 {
            let mut moved = false;
            while let Some(m) = writer.poll_transmit() {
                s.handle_frame(w, 1, &m.encode());
                moved = true;
            }
            s.handle_timeout(1);
            while let Some((conn, m)) = s.poll_transmit() {
                moved = true;
                if conn == w {
                    writer.handle_frame(1, &m.encode()).expect("writer applies");
                } else if matches!(m, Message::Storage { .. }) {
                    held.push(m.encode());
                }
            }
            if !moved {
                break;
            }
        }
    }
    assert!(held.len() >= 3, "one storage frame per step: {}", held.len());
    let before = c.status(doc).expect("status").storage_next;
    c.handle_frames(2, &held).expect("apply together");
    let after = c.status(doc).expect("status").storage_next;
    assert_eq!(after.get() - before.get(), held.len() as u64, "every entry applied");
    let rows = c.document(doc).expect("open").query("SELECT count(*) FROM t", &[]).expect("query");
    assert_eq!(rows.rows, vec![vec![pagesync::Value::Integer(3)]]);
    // A frame that does not decode is a connection error, as one at a time.
    c.handle_frames(3, &[b"garbage".to_vec()]).expect("no panic");
    assert!(c.connection_error().is_some_and(|(code, _)| code == codes::MALFORMED));
}

#[test]
fn a_new_replica_starts_at_the_newest_checkpoint_not_the_history() {
    let doc = DocId::from_u128(11);
    let mut s = ServerSession::new(Box::new(|d: DocId| {
        let mut doc = ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))?;
        // Checkpoints often; a week of retention, so the whole history stays.
        doc.set_compaction(Some(pagesync::Compaction {
            checkpoint_after_bytes: 0,
            retention_ms: 7 * 86_400_000,
        }));
        Ok(doc)
    }));
    let mut writer = client(&[doc]);
    s.connect(C);
    writer.connected(0);
    for i in 0..40 {
        writer
            .mutate(
                doc,
                sql("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (randomblob(500))", vec![]),
                T0,
                i,
            )
            .expect("mutate");
        exchange(&mut s, &mut writer, i as i64, true);
    }
    let server_doc = s.document(doc).expect("open");
    let history = server_doc.storage_range();
    let newest = server_doc.newest_checkpoint().expect("checkpoints were written");
    assert_eq!(history.first(), Lsn::FIRST, "nothing was trimmed");
    s.disconnect(C);

    let mut fresh = ClientSession::new("");
    fresh.add_document(doc, pagesync_tests::client_doc(memory_journal(500), 501));
    s.connect(C);
    fresh.connected(100);
    let traffic = exchange(&mut s, &mut fresh, 100, true);
    let replica = fresh.document(doc).expect("open");
    assert_eq!(replica.restarts(), 1, "the new replica restarted at the checkpoint");
    assert_eq!(traffic.storage_entries as u64, history.next().get() - newest.first.get());
    assert_same_pages(&fresh, &s, doc);
    assert_eq!(replica.storage_range().first(), newest.first, "it keeps no history");
}

#[test]
fn a_replica_cut_off_inside_a_checkpoint_gets_the_rest_of_it_whole() {
    let doc = DocId::from_u128(12);
    let mut s = pagesync_tests::checkpointing_server();
    let mut writer = client(&[doc]);
    s.connect(C);
    writer.connected(0);
    // About 6 MiB, so a checkpoint has two parts; rewritten, so the history outgrows the
    // document and the next write checkpoints it.
    for (i, step) in pagesync_tests::checkpoint_steps(1500).iter().enumerate() {
        writer.mutate(doc, sql(step, vec![]), T0, i as u64).expect("mutate");
        exchange(&mut s, &mut writer, i as i64, true);
    }
    let newest = s.document(doc).expect("open").newest_checkpoint().expect("a checkpoint");
    assert!(newest.last > newest.first, "the checkpoint has more than one part: {newest:?}");
    s.disconnect(C);

    // A new replica restarts at the checkpoint; the link dies after its first part.
    let mut fresh = ClientSession::new("");
    fresh.add_document(doc, pagesync_tests::client_doc(memory_journal(600), 601));
    s.connect(C);
    fresh.connected(100);
    upload(&mut fresh, &mut s, 100);
    let (_, first) = s.poll_transmit().expect("the ack");
    fresh.handle_frame(100, &first.encode()).expect("ack");
    let (_, part) = s.poll_transmit().expect("the first part");
    assert!(matches!(&part, Message::Storage { entries, .. } if entries.len() == 1), "one part per frame");
    fresh.handle_frame(100, &part.encode()).expect("part 1");
    assert!(fresh.document(doc).expect("open").is_restarting());
    s.disconnect(C);

    // Reconnected, it resumes inside the checkpoint, and completes it.
    s.connect(C);
    fresh.connected(2_000);
    exchange(&mut s, &mut fresh, 2_000, true);
    let replica = fresh.document(doc).expect("open");
    assert!(!replica.is_restarting(), "the replica never completed the checkpoint");
    assert_same_pages(&fresh, &s, doc);
}

#[test]
fn a_persistent_read_error_is_reported_once_per_retransmit_period_not_in_a_loop() {
    let doc = DocId::from_u128(13);
    let journal = pagesync_tests::SharedJournal::new(700);
    let (mut s, _writer, _) = with_a_table(doc, &journal);
    s.disconnect(C);

    // A new replica, while whole-entry reads fail: one error, then nothing until the period ends.
    journal.read_errors.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut fresh = ClientSession::new("");
    fresh.add_document(doc, pagesync_tests::client_doc(memory_journal(701), 702));
    s.connect(C);
    fresh.connected(100);
    upload(&mut fresh, &mut s, 100);
    let sent: Vec<Message> = downloads(&mut s);
    let errors =
        sent.iter().filter(|m| matches!(m, Message::Error { code, .. } if code == codes::STORAGE)).count();
    assert_eq!(errors, 1, "{sent:?}");
    let again = s.poll_timeout().expect("a retry is scheduled");
    assert!(again > 100, "the retry is in the future: {again}");
    s.handle_timeout(again);
    let sent: Vec<Message> = downloads(&mut s);
    assert_eq!(sent.len(), 1, "one more attempt: {sent:?}");
    fresh.handle_frame(again, &sent[0].encode()).expect("apply");
    let shown = fresh.status(doc).expect("status").error.map(|(code, _)| code);
    assert_eq!(shown.as_deref(), Some(codes::STORAGE), "the replica shows why it waits");
    assert_eq!(fresh.sync_error(doc), None, "a retried read does not end a wait to sync");

    // The storage heals: the replica catches up, and no longer shows the error.
    journal.read_errors.store(false, std::sync::atomic::Ordering::Relaxed);
    exchange(&mut s, &mut fresh, again + 1_000, true);
    assert_same_pages(&fresh, &s, doc);
    assert_eq!(fresh.status(doc).expect("status").error, None);
}

#[test]
fn a_journal_that_refuses_writes_is_opened_again_with_the_queued_mutations() {
    let doc = DocId::from_u128(14);
    let journal = pagesync_tests::SharedJournal::new(800);
    let (mut s, mut c, first) = with_a_table(doc, &journal);
    assert_eq!(c.document(doc).expect("open").state(first.lsn).expect("state"), MutationState::Confirmed);

    // The next append fails as a failed fsync does: that handle refuses every later write.
    journal.poison_next.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes: Vec<_> = (2..=3)
        .map(|i| c.mutate(doc, sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(i)]), T0, i as u64))
        .collect::<Result<_, _>>()
        .expect("mutate");
    exchange(&mut s, &mut c, 10, true);
    assert_eq!(s.stats().steps_failed, 1);
    let told = c.status(doc).expect("status").error.expect("the client is told the step failed");
    assert_eq!(told.0, codes::STORAGE);
    assert!(told.1.ends_with(pagesync::protocol::SEE_THE_LOG) && !told.1.contains("fsync"), "{told:?}");
    let logged = std::iter::from_fn(|| s.poll_event())
        .find_map(|e| match e {
            pagesync::protocol::Event::StepFailed { error, .. } => Some(error),
            _ => None,
        })
        .expect("the failed step is logged");
    assert!(logged.contains("an earlier fsync failed"), "{logged}");
    // After the retry delay the document is opened again, and its acknowledged mutations,
    // which the client will not send again, are applied.
    let later = 10 + pagesync::protocol::STEP_RETRY_MS;
    exchange(&mut s, &mut c, later, true);
    assert_eq!(s.stats().documents_reopened, 1);
    for w in &writes {
        assert_eq!(c.document(doc).expect("open").state(w.lsn).expect("state"), MutationState::Confirmed);
    }
    assert_same_pages(&c, &s, doc);
}

/// Runs the server's due jobs on threads of their own, as the server's pool does; returns how
/// many ran.
fn run_jobs(s: &mut ServerSession, now: i64) -> usize {
    let mut ran = 0;
    while let Some(job) = s.poll_job(now) {
        let done = std::thread::spawn(move || job.run()).join().expect("a job thread");
        s.job_done(done, now);
        ran += 1;
    }
    ran
}

/// `exchange` with the server's jobs run on other threads (`with_external_jobs`).
fn exchange_with_jobs(s: &mut ServerSession, c: &mut ClientSession, now: i64) -> usize {
    let mut jobs = 0;
    for _ in 0..10_000 {
        let mut moved = upload(c, s, now);
        s.handle_timeout(now);
        let ran = run_jobs(s, now);
        jobs += ran;
        while let Some((_, m)) = s.poll_transmit() {
            c.handle_frame(now, &m.encode()).expect("apply");
            moved = true;
        }
        if !moved && ran == 0 && s.poll_timeout().is_none_or(|t| t > now) {
            return jobs;
        }
    }
    panic!("the link never went quiet");
}

/// A document with `steps` storage entries after its first, written through its own handle.
fn history(journal: &pagesync_tests::SharedJournal, steps: u64) {
    let mut d = ServerDocument::open(journal.boxed()).expect("open");
    let tl = pagesync::TimelineId::from_u128(99);
    let m = |n: u64, s: &str| {
        pagesync::Mutation { client_time_ms: T0, seed: n, body: sql(s, vec![Value::Integer(n as i64)]) }
            .encode()
            .expect("encode")
    };
    d.receive(tl, Lsn::FIRST, vec![m(1, "CREATE TABLE t(x)")]);
    d.step(T0).expect("step");
    for n in 2..=steps + 1 {
        d.receive(tl, Lsn::new(n).expect("lsn"), vec![m(n, "INSERT INTO t VALUES (?1)")]);
        d.step(T0).expect("step");
    }
}

/// With external jobs the session does no I/O: a new replica far behind (past the entries a
/// document keeps in memory) is sent entries that jobs read on other threads, and the replica
/// converges.
#[test]
fn a_replica_far_behind_is_served_from_reads_that_jobs_made() {
    let doc = DocId::from_u128(15);
    let journal = pagesync_tests::SharedJournal::new(900);
    history(&journal, 2 * pagesync::server::RECENT_WIRE_ENTRIES as u64);
    journal.readers.lock().expect("lock").clear();
    let mut s = server_over(&journal).with_external_jobs();
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    let jobs = exchange_with_jobs(&mut s, &mut c, 0);
    assert!(jobs >= 2, "an open and at least one read: {jobs} jobs");
    {
        let readers = journal.readers.lock().expect("lock");
        assert!(!readers.is_empty(), "the history was read");
        assert!(!readers.contains(&std::thread::current().id()), "the session read the journal itself");
    }
    assert_same_pages(&c, &s, doc);
}

/// With external jobs, a read that keeps failing is reported once per `RETRANSMIT_MS` and
/// tried again by a later job; once the storage heals the replica catches up.
#[test]
fn a_failing_read_job_is_reported_and_retried() {
    let doc = DocId::from_u128(16);
    let journal = pagesync_tests::SharedJournal::new(910);
    history(&journal, 2);
    let mut s = server_over(&journal).with_external_jobs();
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    upload(&mut c, &mut s, 0);
    run_jobs(&mut s, 0); // the open
    journal.read_errors.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut errors, mut logged) = (0, 0);
    for now in (0..1_000).step_by(10) {
        s.handle_timeout(now);
        run_jobs(&mut s, now);
        while let Some((_, m)) = s.poll_transmit() {
            if let Message::Error { code, message, .. } = &m
                && code == codes::STORAGE
            {
                errors += 1;
                // The client hears the kind of failure; the details are the server's log's.
                assert!(!message.contains("injected"), "{message}");
                assert!(message.ends_with(pagesync::protocol::SEE_THE_LOG), "{message}");
            }
        }
        while let Some(e) = s.poll_event() {
            if let pagesync::protocol::Event::Failed { doc: d, error, .. } = &e {
                assert_eq!(*d, doc);
                assert!(error.contains("injected read error"), "{e:?}");
                logged += 1;
            }
        }
    }
    // One report per `RETRANSMIT_MS` (200 ms) over a second, give or take the first.
    assert!((3..=6).contains(&errors), "{errors} read errors reported in a second");
    assert!(logged >= 3, "{logged} read errors logged");
    journal.read_errors.store(false, std::sync::atomic::Ordering::Relaxed);
    c.connected(2_000);
    exchange_with_jobs(&mut s, &mut c, 2_000);
    assert_same_pages(&c, &s, doc);
}

/// A document whose open (or step) is out on a job holds up no other: its messages wait, and
/// another document opens, takes writes and confirms them meanwhile.
#[test]
fn a_document_out_on_a_job_holds_up_no_other() {
    let (slow, quick) = (DocId::from_u128(17), DocId::from_u128(18));
    let mut s = ServerSession::new(|d: DocId| ServerDocument::open(memory_journal(u128::from_be_bytes(d.0))))
        .with_external_jobs()
        .with_options(pagesync::protocol::SessionOptions { step_threads: 4, ..Default::default() });
    let mut c = client(&[slow, quick]);
    s.connect(C);
    c.connected(0);
    upload(&mut c, &mut s, 0);
    let mut held = None;
    while let Some(job) = s.poll_job(0) {
        if job.doc() == slow {
            held = Some(job);
        } else {
            let done = job.run();
            s.job_done(done, 0);
        }
    }
    let held = held.expect("the slow document's open went out");
    assert!(s.is_away(slow));
    let w = c.mutate(quick, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    for _ in 0..10 {
        upload(&mut c, &mut s, 0);
        while let Some(job) = s.poll_job(0) {
            assert_eq!(job.doc(), quick, "the slow document's job is still out");
            s.job_done(job.run(), 0);
        }
        while let Some((_, m)) = s.poll_transmit() {
            c.handle_frame(0, &m.encode()).expect("apply");
        }
    }
    assert_eq!(c.document(quick).expect("open").state(w.lsn).expect("state"), MutationState::Confirmed);
    assert!(s.is_away(slow));
    s.job_done(held.run(), 0);
    exchange_with_jobs(&mut s, &mut c, 0);
    assert_same_pages(&c, &s, slow);
    assert_same_pages(&c, &s, quick);
}

/// Rejections leave the replicated table once their client copied them into its outcome
/// journal (`StorageAck`): under a long run of rejections the table stays bounded, the client
/// still reports every one (after a restart too), and a replay of the storage entries deletes
/// the same rows.
#[test]
fn rejections_are_forgotten_once_their_client_copied_them() {
    use pagesync_tests::SharedJournal;
    let doc = DocId::from_u128(19);
    let mut s = server();
    let (storage, timeline, outcomes) =
        (SharedJournal::new(1_000), SharedJournal::timeline(1_001), SharedJournal::new(1_002));
    let open = || {
        let doc = ClientDocument::open_with_outcomes(storage.boxed(), timeline.boxed(), outcomes.boxed());
        pagesync_tests::keyed(doc.expect("doc"), 1_001)
    };
    let mut c = ClientSession::new("");
    c.add_document(doc, open());
    s.connect(C);
    c.connected(0);
    let mut sent = Vec::new();
    let mut mutate = |c: &mut ClientSession, sql_text: &str, params: Vec<Value>| {
        let seed = sent.len() as u64 + 1;
        let body = sql(sql_text, params);
        let submitted = c.mutate(doc, body.clone(), T0, seed).expect("mutate");
        let bytes = pagesync::Mutation { client_time_ms: T0, seed, body }.encode().expect("encode");
        sent.push((submitted.lsn, bytes));
        submitted.lsn
    };
    mutate(&mut c, "CREATE TABLE t(x INTEGER CHECK (x > 0))", vec![]);
    exchange(&mut s, &mut c, 0, true);
    let (rounds, per_round) = (50, 20);
    let mut most = 0;
    let mut first_rejected = None;
    for round in 0..rounds {
        for i in 0..per_round {
            let x = if i == 0 { round + 1 } else { 0 };
            let lsn = mutate(&mut c, "INSERT INTO t VALUES (?1)", vec![Value::Integer(x)]);
            first_rejected = first_rejected.or((i == 1).then_some(lsn));
        }
        exchange(&mut s, &mut c, 0, true);
        let count: i64 = s
            .document(doc)
            .expect("open")
            .database()
            .conn()
            .query_row("SELECT count(*) FROM _pagesync_rejections", [], |r| r.get(0))
            .expect("count");
        most = most.max(count);
    }
    let rejected = (rounds * (per_round - 1)) as usize;
    assert!(most <= 2 * per_round, "the table held {most} rejections at once, of {rejected}");
    let outcomes_now = c.document(doc).expect("open").outcomes().expect("outcomes");
    assert_eq!(outcomes_now.rejected.len(), rejected);
    let first = first_rejected.expect("a rejection");
    let state = c.document(doc).expect("open").state(first).expect("state");
    assert!(matches!(&state, MutationState::Rejected(r) if r.message.contains("CHECK")), "{state:?}");

    // A restart reads them back from the outcome journal.
    drop(c);
    let again = open();
    assert_eq!(again.outcomes().expect("outcomes"), outcomes_now);

    // A replay of every storage entry deletes the same rows: the same bytes.
    let server_doc = s.document(doc).expect("open");
    let entries = server_doc.read_storage(server_doc.storage_range()).expect("read");
    let bytes_of: std::collections::HashMap<_, _> = sent.into_iter().collect();
    let mut replica = ServerDocument::open(memory_journal(1_003)).expect("replica");
    let mut forgetting_entries = 0;
    for payload in entries.iter().skip(1) {
        let header = pagesync::storage::decode(payload).expect("decode");
        forgetting_entries += usize::from(!header.forgotten.is_empty());
        let recorded: Vec<_> = header.applied.iter().map(|a| (*a, bytes_of[&a.lsn].clone())).collect();
        let outcome = replica.replay_step(&recorded, &header.forgotten, header.time_ms).expect("replay");
        let replayed = replica.read_storage(pagesync::journal::LsnRange::inclusive(outcome.lsn, outcome.lsn));
        assert_eq!(replayed.expect("read")[0], *payload, "entry {} differs on replay", outcome.lsn);
    }
    assert!(forgetting_entries >= rounds as usize - 1, "{forgetting_entries} entries forgot rejections");
}

/// A connection with unwritten bytes resends nothing and asks for no wake-up on its account
/// (no busy loop); once its backlog drains, what went unacknowledged is sent again.
#[test]
fn resends_wait_for_a_backlog_to_drain() {
    let doc = DocId::from_u128(20);
    let journal = pagesync_tests::SharedJournal::new(1_100);
    history(&journal, 3);
    let mut s = server_over(&journal);
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    upload(&mut c, &mut s, 0);
    let first: Vec<Message> = downloads(&mut s);
    assert!(first.iter().any(|m| matches!(m, Message::Storage { .. })), "{first:?}");
    // Nothing is acknowledged, and the driver still holds some of it.
    s.set_send_backlog(C, 1_000);
    let due = s.poll_timeout().expect("a resend is scheduled");
    s.handle_timeout(due);
    assert!(s.poll_transmit().is_none(), "a resend went out behind unwritten bytes");
    assert!(s.poll_timeout().is_none_or(|t| t > due), "a wake-up at once: a busy loop");
    // Drained: the unacknowledged storage goes again.
    s.set_send_backlog(C, 0);
    let again: Vec<Message> = downloads(&mut s);
    assert!(again.iter().any(|m| matches!(m, Message::Storage { .. })), "{again:?}");
}

/// Subscribers far behind on many documents, never acknowledging, cannot grow the server's
/// read-ahead past `max_read_ahead_bytes` over every document, nor pin it: a read past the
/// bound evicts other documents' read-ahead, which is read again when needed. A subscriber
/// that does acknowledge meanwhile gets every document whole, within the bound all along.
#[test]
fn read_ahead_over_every_document_is_bounded() {
    const DOCS: u128 = 6;
    const CAP: usize = 2 << 20;
    let journals: std::collections::HashMap<DocId, pagesync_tests::SharedJournal> = (0..DOCS)
        .map(|i| {
            let journal = pagesync_tests::SharedJournal::new(950 + i);
            let mut d = ServerDocument::open(journal.boxed()).expect("open");
            let tl = pagesync::TimelineId::from_u128(99);
            let m = |n: u64, s: &str| {
                pagesync::Mutation { client_time_ms: T0, seed: n, body: sql(s, vec![]) }
                    .encode()
                    .expect("encode")
            };
            d.receive(tl, Lsn::FIRST, vec![m(1, "CREATE TABLE t(x)")]);
            d.step(T0).expect("step");
            // About 3 MiB of entries the serving session has never held in memory.
            for n in 2..=31 {
                d.receive(
                    tl,
                    Lsn::new(n).expect("lsn"),
                    vec![m(n, "INSERT INTO t VALUES (randomblob(100000))")],
                );
                d.step(T0).expect("step");
            }
            (DocId::from_u128(7_000 + i), journal)
        })
        .collect();
    let docs: Vec<DocId> = journals.keys().copied().collect();
    let opener = move |d: DocId| ServerDocument::open(journals[&d].boxed());
    let options = pagesync::protocol::SessionOptions { max_read_ahead_bytes: CAP, ..Default::default() };
    let mut s = ServerSession::new(Box::new(opener)).with_external_jobs().with_options(options);
    // One document alone may hold its own full read-ahead, and one read lands before eviction.
    let bound = CAP + pagesync::protocol::MAX_FETCHED_BYTES + pagesync::protocol::FETCH_BYTES;

    // A raw subscriber to every document from the start, which never acknowledges, and a
    // client that does, both at once.
    let deaf = ConnId(9);
    s.connect(deaf);
    let hello = Message::Hello { version: pagesync::protocol::PROTOCOL_VERSION, token: String::new() };
    s.handle_message(deaf, 0, hello);
    for doc in &docs {
        let key = pagesync_tests::timeline_key(5);
        let subscribe =
            Message::Subscribe { doc: *doc, key, storage_next: Lsn::FIRST, digests: false, create: true };
        s.handle_message(deaf, 0, subscribe);
    }
    let mut c = client(&docs);
    s.connect(C);
    c.connected(0);
    let mut peak = 0;
    for round in 0..5_000 {
        let now = round;
        let mut moved = upload(&mut c, &mut s, now);
        s.handle_timeout(now);
        moved |= run_jobs(&mut s, now) > 0;
        while let Some((conn, m)) = s.poll_transmit() {
            if conn == C {
                c.handle_frame(now, &m.encode()).expect("apply");
            }
            moved = true;
        }
        peak = peak.max(s.read_ahead_bytes());
        assert!(s.read_ahead_bytes() <= bound, "read-ahead {} past the bound", s.read_ahead_bytes());
        if !moved && docs.iter().all(|d| c.status(*d).is_some_and(|st| st.storage_next.get() == 32)) {
            break;
        }
    }
    for doc in &docs {
        assert_same_pages(&c, &s, *doc);
    }
    assert!(peak > CAP, "the subscribers behind on every document reached the bound: {peak}");
    assert!(s.stats().read_ahead_evictions > 0, "{:?}", s.stats());
    s.disconnect(deaf);
    s.disconnect(C);
    assert_eq!(s.read_ahead_bytes(), 0, "read-ahead of subscribers that are gone stays");
}

/// Sends `m` on connection `conn` and returns what the server answers it, for page requests
/// (answered by a job the session runs itself here).
fn ask(s: &mut ServerSession, conn: ConnId, m: Message) -> Vec<Message> {
    s.handle_frame(conn, T0, &m.encode());
    s.handle_timeout(T0);
    std::iter::from_fn(|| s.poll_transmit()).filter(|(c, _)| *c == conn).map(|(_, m)| m).take(100).collect()
}

/// Pages from the server's session, as a client's fetcher would get them.
struct FromSession {
    s: std::sync::Arc<std::sync::Mutex<ServerSession>>,
    doc: DocId,
    /// Where page 1 is, to corrupt it as it arrives.
    tamper: Option<(Lsn, u32)>,
}

impl pagesync::remote::PageSource for FromSession {
    fn read(&mut self, lsn: Lsn, offset: u32, buf: &mut [u8]) -> Result<(), String> {
        let pages = (buf.len() / 4096) as u32;
        let mut s = self.s.lock().unwrap();
        match ask(&mut s, ConnId(2), Message::ReadPages { doc: self.doc, id: 9, lsn, offset, pages }).pop() {
            Some(Message::Pages { data, .. }) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                if self.tamper == Some((lsn, offset)) {
                    buf[31] ^= 1; // page 1's database size, as a corrupted or forged answer
                }
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    }
}

#[test]
fn page_requests_read_the_committed_state_bounded_and_never_create_a_document() {
    let doc = DocId::from_u128(0x9a6e);
    let journal = pagesync_tests::SharedJournal::new(1);
    let (mut s, mut c, _) = with_a_table(doc, &journal);
    for i in 0..200 {
        c.mutate(doc, sql("INSERT INTO t VALUES (?1)", vec![Value::Text(format!("{i:0>500}"))]), T0, 2)
            .unwrap();
    }
    exchange(&mut s, &mut c, 0, true);
    const R: ConnId = ConnId(2);
    s.connect(R);
    assert!(ask(&mut s, R, Message::Hello { version: PROTOCOL_VERSION, token: String::new() }).is_empty());

    let map = match ask(&mut s, R, Message::MapPages { doc, id: 1 }).as_slice() {
        [Message::PageMap { id: 1, map, .. }] => map.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(map.at, s.document(doc).unwrap().storage_range().next());
    assert_eq!(map.runs.iter().map(|r| r.pages).sum::<u32>(), map.page_count);

    // Bounded: no empty or oversized reads, nothing outside the journal.
    let r = map.runs[0];
    for pages in [0, pagesync::protocol::MAX_READ_PAGES + 1] {
        let got = ask(&mut s, R, Message::ReadPages { doc, id: 2, lsn: r.lsn, offset: r.offset, pages });
        assert!(
            matches!(got.as_slice(), [Message::Error { code, .. }] if code == codes::MALFORMED),
            "{got:?}"
        );
    }
    let past = Message::ReadPages { doc, id: 3, lsn: map.at, offset: 0, pages: 1 };
    assert!(
        matches!(ask(&mut s, R, past).as_slice(), [Message::Error { code, .. }] if code == codes::OUT_OF_RANGE)
    );
    assert!(
        s.poll_event().is_none(),
        "a read of what the document does not hold is the asker's error, not a failure to log"
    );

    // A peer that asks and does not take its answers is refused past a few.
    let read = |id| Message::ReadPages { doc, id, lsn: r.lsn, offset: r.offset, pages: 1 };
    for id in 10..20 {
        s.handle_frame(R, T0, &read(id).encode());
    }
    let got: Vec<Message> = std::iter::from_fn(|| s.poll_transmit()).map(|(_, m)| m).collect();
    let answered = got.iter().filter(|m| matches!(m, Message::Pages { .. })).count();
    let refused =
        got.iter().filter(|m| matches!(m, Message::Error { code, .. } if code == codes::LIMIT)).count();
    assert_eq!((answered, refused), (pagesync::protocol::MAX_ASKS_PER_CONNECTION, 10 - answered), "{got:?}");
    assert!(
        matches!(ask(&mut s, R, read(30)).as_slice(), [Message::Pages { id: 30, .. }]),
        "taken answers free the room"
    );

    // A document that does not exist is not created by a page request, even with a write grant.
    let mut fresh = server().with_exists(|_| Ok(false));
    fresh.connect(R);
    ask(&mut fresh, R, Message::Hello { version: PROTOCOL_VERSION, token: String::new() });
    let got = ask(&mut fresh, R, Message::MapPages { doc, id: 4 });
    assert!(matches!(got.as_slice(), [Message::Error { code, .. }] if code == codes::NOT_FOUND), "{got:?}");
    assert_eq!(fresh.document_count(), 0);

    // A snapshot over those answers reads the server's state; a tampered page 1 is refused.
    let expected = c.document(doc).unwrap().query("SELECT count(*), max(x) FROM t", &[]).unwrap();
    let shared = std::sync::Arc::new(std::sync::Mutex::new(s));
    let source = FromSession { s: shared.clone(), doc, tamper: None };
    let snapshot = pagesync::remote::RemoteSnapshot::open(map.clone(), Box::new(source)).expect("snapshot");
    assert_eq!(snapshot.query("SELECT count(*), max(x) FROM t", &[]).unwrap(), expected);
    assert!(snapshot.query("DELETE FROM t", &[]).is_err(), "a snapshot is read-only");
    let tampered = FromSession { s: shared, doc, tamper: Some((r.lsn, r.offset)) };
    let refused = pagesync::remote::RemoteSnapshot::open(map, Box::new(tampered)).map(|_| ()).unwrap_err();
    assert!(refused.to_string().contains("page 1"), "{refused}");
}

/// Pumps `route`'s messages between the client and `s` (as connection `C`) until both are quiet.
fn exchange_on(s: &mut ServerSession, c: &mut ClientSession, route: &pagesync::protocol::Route, now: i64) {
    for _ in 0..1_000 {
        let mut moved = false;
        while let Some(m) = c.poll_transmit_on(route) {
            s.handle_frame(C, now, &m.encode());
            moved = true;
        }
        s.handle_timeout(now);
        while let Some((_, m)) = s.poll_transmit() {
            c.handle_frames_on(route, now, [m.encode()]).expect("apply");
            moved = true;
        }
        if !moved {
            return;
        }
    }
    panic!("the link never went quiet");
}

#[test]
fn a_redirect_moves_a_document_and_its_pending_writes_to_the_server_that_holds_it() {
    let doc = DocId::from_u128(0x4ed);
    let b_url = "ws://b.example:8787/v1/sync".to_owned();
    // A does not hold the document: every open says where it is.
    let to_b = b_url.clone();
    let mut a = ServerSession::new(Box::new(move |_| Err(pagesync::Error::Moved { owner: to_b.clone() })));
    let mut b = server();
    let mut c = client(&[doc]);
    c.set_home_url("ws://a.example:8787/v1/sync");
    a.connect(C);
    c.connected(0);
    let mut writes = vec![c.mutate(doc, sql("CREATE TABLE t(x)", vec![]), T0, 9).expect("mutate")];
    for i in 0..3 {
        writes.push(
            c.mutate(doc, sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(i)]), T0, i as u64)
                .expect("mutate"),
        );
    }
    exchange_on(&mut a, &mut c, &None, 0);
    let there = Some(b_url.clone());
    assert_eq!(c.route_of(doc), Some(&there), "the client follows the redirect");
    assert_eq!(c.redirects(), 1);
    assert!(c.routes().contains(&there), "and wants a connection there");
    assert!(c.poll_transmit_on(&None).is_none(), "nothing more for the document goes to A");
    // A late answer from A about the document changes nothing.
    let stale = Message::MutationsAck {
        doc,
        timeline: c.document(doc).unwrap().timeline_id(),
        next_expected: Lsn::new(9).unwrap(),
        storage_next: Lsn::new(9).unwrap(),
    };
    c.handle_message(0, stale).expect("ignored");
    assert_eq!(c.status(doc).unwrap().server_storage_next, Lsn::FIRST);
    // At B, everything pending goes again and is applied once.
    b.connect(C);
    c.connected_on(&there, 1);
    exchange_on(&mut b, &mut c, &there, 1);
    for w in &writes {
        assert_eq!(c.document(doc).unwrap().state(w.lsn).expect("state"), MutationState::Confirmed);
    }
    assert!(c.caught_up(doc));
    assert_same_pages(&c, &b, doc);
    // B stops answering; the route fails and the document goes home.
    c.route_failed(&there);
    assert_eq!(c.route_of(doc), Some(&None));
}

#[test]
fn redirects_that_would_leak_or_flood_are_refused() {
    let doc = DocId::from_u128(0x4ee);
    let mut c = client(&[doc]);
    c.set_home_url("wss://a.example/v1/sync");
    c.connected(0);
    let redirect = |url: &str| Message::Redirect { doc, url: url.to_owned() };
    for url in [
        "ws://b.example/v1/sync",
        "http://b.example/",
        "wss://b.example/ v1",
        &format!("wss://{}", "b".repeat(3000)),
    ] {
        c.handle_message(0, redirect(url)).expect("handled");
        assert_eq!(c.route_of(doc), Some(&None), "followed {url:.60}");
        assert_eq!(c.status(doc).unwrap().error.map(|(code, _)| code).as_deref(), Some("redirect"));
    }
    c.handle_message(0, redirect("wss://b.example/v1/sync")).expect("handled");
    assert_eq!(c.route_of(doc), Some(&Some("wss://b.example/v1/sync".to_owned())));

    // A scheme in capitals is the same scheme: no way down to ws:// through `WSS://`.
    let mut c = client(&[doc]);
    c.set_home_url("WSS://a.example/v1/sync");
    c.connected(0);
    c.handle_message(0, redirect("ws://b.example/v1/sync")).expect("handled");
    assert_eq!(c.route_of(doc), Some(&None), "followed a redirect from WSS:// to ws://");
    c.handle_message(0, redirect("Wss://b.example/v1/sync")).expect("handled");
    assert_eq!(c.route_of(doc), Some(&Some("Wss://b.example/v1/sync".to_owned())));
}

/// Everything the server sends to `conn` now, decoded.
fn sent_to(s: &mut ServerSession, conn: ConnId) -> Vec<Message> {
    let all: Vec<(ConnId, Message)> = std::iter::from_fn(|| s.poll_transmit()).take(10_000).collect();
    all.into_iter().filter(|(c, _)| *c == conn).map(|(_, m)| m).collect()
}

#[test]
fn presence_is_told_on_demand_held_back_when_too_fast_and_never_to_its_sender() {
    let doc = DocId::from_u128(0x9e5);
    let mut s = server();
    let hello = Message::Hello { version: PROTOCOL_VERSION, token: String::new() };
    let conns = [ConnId(1), ConnId(2), ConnId(3)];
    for (i, c) in conns.iter().enumerate() {
        s.connect(*c);
        s.handle_message(*c, 0, hello.clone());
        let key = pagesync_tests::timeline_key(10 + i as u128);
        s.handle_message(
            *c,
            0,
            Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true },
        );
    }
    let presence = |ms: &[Message]| -> Vec<(u64, Vec<u8>)> {
        ms.iter()
            .filter_map(|m| match m {
                Message::Presence { peer, .. } => Some((peer.id, peer.value.clone())),
                _ => None,
            })
            .collect()
    };
    let drained = |s: &mut ServerSession| {
        let all: Vec<(ConnId, Message)> = std::iter::from_fn(|| s.poll_transmit()).take(10_000).collect();
        conns.map(|c| all.iter().filter(|(to, _)| *to == c).map(|(_, m)| m.clone()).collect::<Vec<_>>())
    };
    let quiet = drained(&mut s);
    assert!(quiet.iter().all(|ms| presence(ms).is_empty()), "nobody broadcast: nothing to tell");
    // Ten broadcasts at once from conn 1: one version now (what the others are told is the
    // latest value when they are told), one more when 25 ms are up; conn 1 hears nothing of
    // itself.
    for v in 0..10u8 {
        s.handle_message(conns[0], 0, Message::Broadcast { doc, value: vec![v] });
    }
    let now = drained(&mut s);
    assert!(presence(&now[0]).is_empty(), "never told of itself");
    assert_eq!(presence(&now[1]), vec![(1, vec![9])]);
    assert_eq!(presence(&now[2]), vec![(1, vec![9])]);
    s.handle_timeout(pagesync::protocol::MIN_BROADCAST_MS);
    let later = drained(&mut s);
    assert_eq!(presence(&later[1]), vec![(1, vec![9])], "the latest value, once");
    assert_eq!(s.stats().broadcasts_held, 9);
    // Conn 2 never broadcast: its leaving is news to nobody. Conn 1's is.
    s.disconnect(conns[1]);
    assert!(sent_to(&mut s, conns[2]).is_empty());
    s.disconnect(conns[0]);
    let left: Vec<Message> = sent_to(&mut s, conns[2]);
    assert!(matches!(left.as_slice(), [Message::PeerLeft { peer: 1, .. }]), "{left:?}");
    // A broadcast without a subscription is refused; too large is refused.
    s.connect(ConnId(4));
    s.handle_message(ConnId(4), 0, hello);
    s.handle_message(ConnId(4), 30, Message::Broadcast { doc, value: vec![1] });
    let refused = sent_to(&mut s, ConnId(4));
    assert!(
        matches!(refused.as_slice(), [Message::Error { code, .. }] if code == codes::MALFORMED),
        "{refused:?}"
    );
}

/// A replica with nothing of its own pending is caught up only once it holds what the server
/// had committed when it was asked (`ask_head`, as `Document::sync` does), not what the server
/// said last: another client's write confirmed to that client is then always there.
#[test]
fn a_head_request_waits_for_entries_written_since_the_last_report() {
    let doc = DocId::from_u128(0x4ead);
    let (a_conn, b_conn) = (ConnId(1), ConnId(2));
    let mut s = server();
    let mut a = client(&[doc]);
    let mut b = ClientSession::new("");
    b.add_document(doc, pagesync_tests::client_doc(memory_journal(200), 201));
    for (conn, c) in [(a_conn, &mut a), (b_conn, &mut b)] {
        s.connect(conn);
        c.connected(0);
    }
    // Moves every message until quiet; what the server sends B is held unless `to_b`.
    let pump = |s: &mut ServerSession, a: &mut ClientSession, b: &mut ClientSession, to_b: bool| {
        let mut held = Vec::new();
        for _ in 0..1_000 {
            let mut moved = false;
            for (conn, c) in [(a_conn, &mut *a), (b_conn, &mut *b)] {
                while let Some(m) = c.poll_transmit() {
                    s.handle_frame(conn, 0, &m.encode());
                    moved = true;
                }
            }
            s.handle_timeout(0);
            while let Some((conn, m)) = s.poll_transmit() {
                moved = true;
                match conn {
                    c if c == a_conn => a.handle_frame(0, &m.encode()).expect("a applies"),
                    _ if to_b => b.handle_frame(0, &m.encode()).expect("b applies"),
                    _ => held.push(m),
                }
            }
            if !moved {
                return held;
            }
        }
        panic!("the link never went quiet");
    };
    a.mutate(doc, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    pump(&mut s, &mut a, &mut b, true);
    assert!(b.caught_up(doc), "B holds the table");
    // A's row is confirmed to A; B has not received it yet, and by the head it last heard
    // of B would call itself caught up.
    a.mutate(doc, sql("INSERT INTO t VALUES (1)", vec![]), T0, 2).expect("mutate");
    let mut held = pump(&mut s, &mut a, &mut b, false);
    assert_eq!(a.status(doc).expect("a").pending, 0, "A's row is confirmed");
    assert!(b.caught_up(doc), "the stale head (what this test is about)");
    let ask = b.ask_head(doc);
    assert!(b.head_answered(doc) < ask, "asked, not answered yet");
    held.extend(pump(&mut s, &mut a, &mut b, false));
    let (acks, storage): (Vec<Message>, Vec<Message>) =
        held.into_iter().partition(|m| matches!(m, Message::Head { .. }));
    assert_eq!(acks.len(), 1, "one answer to the head request: {acks:?}");
    for m in &acks {
        b.handle_frame(0, &m.encode()).expect("b applies the answer");
    }
    assert!(b.head_answered(doc) >= ask, "answered");
    assert!(!b.caught_up(doc), "answered with a head past what B holds");
    for m in &storage {
        b.handle_frame(0, &m.encode()).expect("b applies the entry");
    }
    assert!(b.caught_up(doc), "B holds what the server had when it answered");
    // Asks made while one is in flight are answered too (one ask at a time, the newest id).
    let (first, second) = (b.ask_head(doc), b.ask_head(doc));
    assert!(first < second);
    pump(&mut s, &mut a, &mut b, true);
    assert_eq!(b.head_answered(doc), second);
    let rows = b.document(doc).expect("b").query("SELECT x FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(1)]]);
}

/// The server acknowledges a write it has queued, then closes the document before applying it
/// (its cluster lease lapsed): the queued write is gone from the server. The client's next
/// subscription learns what the server holds now and sends the write again, so it is applied
/// once, not left pending until the client reconnects. Found with a real server whose S3 was
/// cut (`server/tests/cluster.rs`).
#[test]
fn a_write_the_server_acknowledged_and_then_dropped_by_closing_the_document_is_sent_again() {
    let doc = DocId::from_u128(0x5f);
    let journal = pagesync_tests::SharedJournal::new(0x5f);
    let options = pagesync::protocol::SessionOptions { commit_interval_ms: 1_000, ..Default::default() };
    let mut s = server_over(&journal).with_options(options);
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    c.mutate(doc, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    let settle = |s: &mut ServerSession, c: &mut ClientSession, from: i64| {
        for now in (from..from + 5_000).step_by(250) {
            c.handle_timeout(now);
            exchange(s, c, now, true);
        }
    };
    settle(&mut s, &mut c, 0);
    assert_eq!(c.status(doc).expect("status").pending, 0);

    c.mutate(doc, sql("INSERT INTO t VALUES (1)", vec![]), T0, 2).expect("mutate");
    exchange(&mut s, &mut c, 5_000, true);
    assert_eq!(s.document(doc).expect("open").queued(), 1, "taken and queued, not applied yet");
    s.close_all(codes::UNAVAILABLE, "this server lost its place in the cluster for a moment");
    let t = exchange(&mut s, &mut c, 5_000, true);
    assert_eq!(t.errors, vec![codes::UNAVAILABLE.to_owned()]);
    settle(&mut s, &mut c, 5_000);
    let st = c.status(doc).expect("status");
    assert_eq!((st.pending, st.error), (0, None), "sent again on the new subscription and confirmed");
    let rows = c.document(doc).expect("open").query("SELECT x FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(1)]], "applied once");
    assert_same_pages(&c, &s, doc);
}

/// The server ends a subscription (it closed the document: an internal error, a lost cluster
/// lease): the client's next write is refused `not_subscribed`, nothing taken, and the client
/// subscribes again with its key and resends it. No error stays in its status.
#[test]
fn a_subscription_the_server_ended_is_taken_up_again_and_writes_resent() {
    let doc = DocId::from_u128(0x5e);
    let journal = pagesync_tests::SharedJournal::new(0x5e);
    let (mut s, mut c, _) = with_a_table(doc, &journal);
    s.close_all(codes::INTERNAL, "closed under the client");
    c.mutate(doc, sql("INSERT INTO t VALUES (1)", vec![]), T0, 2).expect("mutate");
    let t = exchange(&mut s, &mut c, 0, true);
    let refused = t.errors.iter().filter(|code| *code == codes::NOT_SUBSCRIBED).count();
    assert_eq!(refused, 1, "the write on the ended subscription was refused once: {:?}", t.errors);
    let st = c.status(doc).expect("status");
    assert_eq!(st.pending, 0, "resent on the new subscription and confirmed");
    assert_eq!(st.error, None, "not_subscribed is not left as an error");
    assert!(c.caught_up(doc));
    assert_same_pages(&c, &s, doc);
}

/// Subscribers that never read cannot hold more of the server's send memory than
/// `max_send_backlog_bytes` over every connection, however many there are and however large
/// the entries (each may hold its own backlog bound plus one message): at the bound nothing
/// more is sent, those that have not drained for `PRESSURE_CLOSE_MS` are closed as slow
/// readers, and a subscriber that reads then gets the whole document. Where the driver says
/// when each socket last took bytes, those whose socket took nothing for `PRESSURE_IDLE_MS`
/// are closed then, not at `PRESSURE_CLOSE_MS`.
#[test]
fn subscribers_that_never_read_share_one_bound_on_send_memory() {
    use pagesync::protocol::{PRESSURE_CLOSE_MS, PRESSURE_IDLE_MS};
    let latest = deaf_subscribers_closed_by(false);
    assert!(latest <= 2 * PRESSURE_CLOSE_MS, "closed at {latest} ms, not for being stalled under pressure");
    let idle = deaf_subscribers_closed_by(true);
    eprintln!("the last deaf subscriber closed at {latest} ms, and at {idle} ms with progress reported");
    assert!(idle <= 2 * PRESSURE_IDLE_MS, "closed at {idle} ms, not for their sockets taking nothing");
}

/// When the last of eight subscribers that never read was closed; with `progress`, the driver
/// reports when each socket took bytes: once, as its first frame was handed to it. A ninth
/// reads slowly (its socket takes bytes every 250 ms, and it drains what it holds every
/// 1.5 s): it is never closed, and gets the whole document.
fn deaf_subscribers_closed_by(progress: bool) -> i64 {
    use pagesync::protocol::SessionOptions;
    const CAP: usize = 1 << 20;
    const DEAF: u64 = 8;
    let doc = DocId::from_u128(40);
    let journal = pagesync_tests::SharedJournal::new(1_400);
    {
        // Eight entries of about 300 KB: each larger than a connection's backlog bound.
        let mut d = ServerDocument::open(journal.boxed()).expect("open");
        let tl = pagesync::TimelineId::from_u128(99);
        for n in 1..=9u64 {
            let text =
                if n == 1 { "CREATE TABLE t(b BLOB)" } else { "INSERT INTO t VALUES (randomblob(300000))" };
            let m = pagesync::Mutation { client_time_ms: T0, seed: n, body: sql(text, vec![]) };
            d.receive(tl, Lsn::new(n).expect("lsn"), vec![m.encode().expect("encode")]);
            d.step(T0).expect("step");
        }
    }
    let mut s = server_over(&journal)
        .with_options(SessionOptions { max_send_backlog_bytes: CAP, ..Default::default() });
    let (reader, slow) = (ConnId(100), ConnId(99));
    let mut conns: Vec<(ConnId, ClientSession)> =
        (0..DEAF).map(|i| (ConnId(10 + i), client(&[doc]))).collect();
    conns.push((slow, client(&[doc])));
    conns.push((reader, client(&[doc])));
    for (id, c) in &mut conns {
        s.connect(*id);
        c.connected(0);
        while let Some(m) = c.poll_transmit() {
            s.handle_frame(*id, 0, &m.encode());
        }
    }
    let mut backlog: std::collections::HashMap<ConnId, usize> = Default::default();
    let (mut largest, mut closed_at) = (0, std::collections::HashMap::new());
    let mut slow_held = 0;
    for now in (0..20_000).step_by(50) {
        if slow_held > 0 && progress && now % 250 == 0 {
            s.set_send_progress(slow, now, 0);
        }
        if slow_held > 0 && now % 1_500 == 0 {
            // It has read what it holds: its acknowledgements, then the drained socket.
            let c = &mut conns[DEAF as usize].1;
            while let Some(m) = c.poll_transmit() {
                s.handle_frame(slow, now, &m.encode());
            }
            slow_held = 0;
            s.set_send_backlog(slow, 0);
        }
        s.handle_timeout(now);
        while let Some((id, m)) = s.poll_transmit() {
            let frame = m.encode();
            largest = largest.max(frame.len());
            if id == slow {
                assert!(!matches!(m, Message::Error { .. }), "the slow reader was told {m:?}");
                conns[DEAF as usize].1.handle_frame(now, &frame).expect("apply");
                slow_held += frame.len();
                s.set_send_backlog(id, slow_held);
                continue;
            }
            if id == reader {
                let c = &mut conns.last_mut().expect("the reader").1;
                c.handle_frame(now, &frame).expect("apply");
                s.set_send_backlog(id, 0); // it reads everything at once
                while let Some(m) = c.poll_transmit() {
                    s.handle_frame(reader, now, &m.encode());
                }
                continue;
            }
            // A deaf connection: nothing it is sent is ever written, past what its socket's
            // buffer took of the first frame.
            let held = backlog.entry(id).or_default();
            if progress && *held == 0 {
                s.set_send_progress(id, now, 0);
            }
            *held += frame.len();
            s.set_send_backlog(id, *held);
            if let Message::Error { code, .. } = &m {
                assert_eq!(code, codes::SLOW_READER);
                closed_at.insert(id, now);
            }
            let total: usize = backlog.values().sum();
            assert!(total <= CAP + largest, "{total} bytes held by connections that do not read");
        }
        for id in backlog.keys().copied().collect::<Vec<_>>() {
            if s.should_close(id) {
                s.disconnect(id);
                backlog.remove(&id);
            }
        }
    }
    assert_eq!(closed_at.len(), DEAF as usize, "every deaf subscriber was closed: {closed_at:?}");
    assert_same_pages(&conns.last().expect("the reader").1, &s, doc);
    assert_same_pages(&conns[DEAF as usize].1, &s, doc);
    closed_at.values().max().copied().expect("closed")
}

/// A subscription answered `not_found` is asked again at once only when the next one would
/// differ: one that did not ask to create the document asks once a write is made; one that
/// asked (a grant that may not write gets `not_found` all the same) waits for the keepalive,
/// with no loop of subscriptions and answers in between.
#[test]
fn not_found_is_asked_again_at_once_only_by_a_subscription_that_would_create() {
    let (asked, not_asked) = (DocId::from_u128(0x4f1), DocId::from_u128(0x4f2));
    let mut c = client(&[asked, not_asked]);
    c.set_create(not_asked, false);
    c.connected(0);
    let not_found =
        |doc| Message::Error { doc: Some(doc), code: codes::NOT_FOUND.into(), message: "none".into() };
    let subscribes = |c: &mut ClientSession| {
        let sent: Vec<Message> = std::iter::from_fn(|| c.poll_transmit()).take(100).collect();
        sent.into_iter()
            .filter_map(|m| match m {
                Message::Subscribe { doc, create, .. } => Some((doc, create)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let mut first = subscribes(&mut c);
    first.sort();
    assert_eq!(first, vec![(asked, true), (not_asked, false)]);
    for doc in [asked, not_asked] {
        c.handle_frame(0, &not_found(doc).encode()).expect("error");
    }
    assert_eq!(subscribes(&mut c), vec![], "a not_found was asked again at once");
    for (doc, why) in [(asked, "asked"), (not_asked, "did not ask")] {
        let error = c.status(doc).expect("status").error.map(|(code, _)| code);
        assert_eq!(error.as_deref(), Some(codes::NOT_FOUND), "the one that {why} shows the answer");
    }

    c.mutate(not_asked, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    c.mutate(asked, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    assert_eq!(subscribes(&mut c), vec![(not_asked, true)], "a write asks to create, once");
    assert_eq!(subscribes(&mut c), vec![]);
}

/// A new token is said at once on a connection already open (the server takes a second
/// `Hello` as a new grant), and a refusal of the old one stops counting.
#[test]
fn a_new_token_is_said_at_once_on_an_open_connection() {
    let doc = DocId::from_u128(0x70c);
    let mut c = client(&[doc]);
    c.connected(0);
    while c.poll_transmit().is_some() {}
    let refused = Message::Error { doc: None, code: codes::UNAUTHORIZED.into(), message: "expired".into() };
    c.handle_frame(0, &refused.encode()).expect("error");
    assert!(c.refused_for_good());
    c.set_token("fresh");
    assert!(!c.refused_for_good());
    match c.poll_transmit() {
        Some(Message::Hello { token, .. }) => assert_eq!(token, "fresh"),
        other => panic!("expected a Hello with the new token, got {other:?}"),
    }
}

/// Opens go before steps (a client waits on each), but a client opening many documents at
/// once does not hold back a write to a document already open: after `OPENS_PER_STEP` opens,
/// a due step goes out. (40 documents opened at once went out before the step; 10,000
/// stalled every other document's writes for seconds.)
#[test]
fn opens_do_not_hold_back_a_due_step() {
    use pagesync::protocol::OPENS_PER_STEP;
    let doc = DocId::from_u128(0x5e);
    let mut s = server().with_external_jobs();
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    c.mutate(doc, sql("CREATE TABLE t(x)", vec![]), T0, 1).expect("mutate");
    exchange_with_jobs(&mut s, &mut c, 0);
    // Another connection asks for 40 new documents; then a write to the open one arrives.
    let other = ConnId(2);
    s.connect(other);
    s.handle_frame(other, 0, &Message::Hello { version: PROTOCOL_VERSION, token: String::new() }.encode());
    for n in 0..40u8 {
        let subscribe = Message::Subscribe {
            doc: DocId::from_u128(0x1000 + u128::from(n)),
            key: pagesync::TimelineKey([n + 1; 32]),
            storage_next: Lsn::FIRST,
            digests: false,
            create: true,
        };
        s.handle_frame(other, 0, &subscribe.encode());
    }
    let w = c.mutate(doc, sql("INSERT INTO t VALUES (1)", vec![]), T0, 2).expect("mutate");
    upload(&mut c, &mut s, 0);
    let mut order = Vec::new();
    while let Some(job) = s.poll_job(0) {
        order.push(job.doc());
        s.job_done(job.run(), 0);
    }
    let at = order.iter().position(|d| *d == doc).expect("the write's step went out");
    assert!(at <= OPENS_PER_STEP as usize, "the step went out after {at} opens: {order:?}");
    assert_eq!(order.len(), 41, "every open went out too: {order:?}");
    exchange_with_jobs(&mut s, &mut c, 0);
    assert_eq!(c.document(doc).expect("open").state(w.lsn).expect("state"), MutationState::Confirmed);
}

/// A client with more unacknowledged rejections than `MAX_TIMELINE_REJECTIONS` has no more of
/// its mutations taken until it acknowledges them; what the server had queued of it is dropped
/// and sent again (a lower `next_expected`). An honest client acknowledges at once, so it only
/// waits a moment: every write it made is applied exactly once, every rejection is reported,
/// none is lost or read as applied.
#[test]
fn a_client_past_its_unacknowledged_rejections_waits_for_its_acknowledgement_and_loses_nothing() {
    held_back_client_loses_nothing(23, false);
}

/// The same when the server restarts while the client is held back, before the client heard
/// of it: the new server knows nothing of acknowledgements (they are in memory), and the
/// client, subscribing again, says what it holds; nothing waits forever.
#[test]
fn a_client_held_back_across_a_server_restart_goes_on_and_loses_nothing() {
    held_back_client_loses_nothing(24, true);
}

fn held_back_client_loses_nothing(n: u128, restart: bool) {
    use pagesync::server::MAX_TIMELINE_REJECTIONS;
    let doc = DocId::from_u128(n);
    let journal = pagesync_tests::SharedJournal::new(n);
    // Steps of 300 at most: the first takes only bad ones, and the rest stay queued.
    let limits = pagesync::StepLimits { max_mutations: 300, ..pagesync::StepLimits::default() };
    let start = || {
        let journal = journal.clone();
        ServerSession::new(Box::new(move |_| {
            ServerDocument::with_reducer(journal.boxed(), pagesync::SqlReducer::default(), limits)
        }))
    };
    let mut s = start();
    let mut c = client(&[doc]);
    s.connect(C);
    c.connected(0);
    c.mutate(doc, sql("CREATE TABLE t(x INTEGER CHECK (x > 0))", vec![]), T0, 1).expect("mutate");
    exchange(&mut s, &mut c, 0, true);
    // More rejections than the bound in one upload, then good writes right behind them.
    let bad = MAX_TIMELINE_REJECTIONS + 100;
    let mut lsns = Vec::new();
    for i in 0..bad {
        let lsn =
            c.mutate(doc, sql("INSERT INTO t VALUES (0)", vec![]), T0, 10 + i as u64).expect("mutate").lsn;
        lsns.push(lsn);
    }
    for i in 0..20u64 {
        let x = Value::Integer(i as i64 + 1);
        c.mutate(doc, sql("INSERT INTO t VALUES (?1)", vec![x]), T0, 1_000 + i).expect("mutate");
    }
    upload(&mut c, &mut s, 0);
    s.handle_timeout(0);
    let queued = s.document(doc).expect("open").queued();
    assert_eq!(queued, 0, "what the first step left of a timeline past its bound was dropped");
    let rows = |s: &ServerSession| -> i64 {
        let conn = s.document(doc).expect("open").database().conn();
        conn.query_row("SELECT count(*) FROM _pagesync_rejections", [], |r| r.get(0)).expect("count")
    };
    assert_eq!(rows(&s), MAX_TIMELINE_REJECTIONS as i64, "no more than the bound kept");
    if restart {
        // The client hears all the server says and acknowledges the rejections it copied,
        // but the server stops before it reads that, and starts again over its journal.
        while let Some((_, m)) = s.poll_transmit() {
            c.handle_frame(0, &m.encode()).expect("apply");
        }
        let said: Vec<Message> = std::iter::from_fn(|| c.poll_transmit()).collect();
        assert!(
            said.iter().any(|m| matches!(m, Message::StorageAck { outcomes_through: Some(_), .. })),
            "{said:?}"
        );
        drop(s);
        c.disconnected();
        s = start();
        s.connect(C);
        c.connected(0);
    }
    let mut now = 0;
    for _ in 0..50 {
        exchange(&mut s, &mut c, now, true);
        if c.document(doc).expect("open").pending_count() == 0 {
            break;
        }
        now += 1_000;
        c.handle_timeout(now);
        s.handle_timeout(now);
    }
    let replica = c.document(doc).expect("open");
    assert_eq!(replica.pending_count(), 0, "every write was applied");
    let rows = replica.query("SELECT count(*) FROM t", &[]).expect("count").rows;
    assert_eq!(rows[0][0], Value::Integer(20), "each good write once");
    let outcomes = replica.outcomes().expect("outcomes");
    assert_eq!(outcomes.rejected.len(), bad, "every rejection reported, none read as applied");
    for lsn in lsns {
        let state = replica.state(lsn).expect("state");
        assert!(matches!(state, MutationState::Rejected(_)), "{lsn}: {state:?}");
    }
    assert_same_pages(&c, &s, doc);
}

//! Mutators in the core (`pagesync::mutators`): a call binds its arguments, `:subject` and
//! `:now`; `reject()` rejects with the app's message, the same on the client and the server;
//! the server refuses what a token does not allow before running it; a pending call runs again
//! under new definitions; the client's pages match the server's.

use std::sync::Arc;

use pagesync::history::Origin;
use pagesync::journal::Lsn;
use pagesync::mutators::{Call, Mutators, Permit};
use pagesync::{ClientDocument, Mutation, MutationState, RejectionCode, ServerDocument, SqlMutation, Value};
use pagesync_tests::{memory_journal, pages_of, pull, push};

const DEFS: &str = "\
-- mutator: add(title)
INSERT INTO t(title, owner, at) VALUES (:title, :subject, :now);
-- mutator: del(id)
SELECT reject('not yours') FROM t WHERE id = :id AND owner IS NOT :subject;
DELETE FROM t WHERE id = :id;
";

fn defs(source: &str) -> Option<Arc<Mutators>> {
    Some(Arc::new(Mutators::parse(source).expect("parse")))
}

fn call(name: &str, args: Vec<Value>, subject: &str) -> Vec<u8> {
    Call { name: name.into(), args, subject: subject.into() }.encode()
}

fn setup() -> (ClientDocument, ServerDocument) {
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    server.set_mutators(Box::new(|| defs(DEFS)));
    let mut client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    client.set_mutators(defs(DEFS)).expect("defs");
    let schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, title TEXT, owner TEXT, at INTEGER)";
    client.mutate(SqlMutation::one(schema, vec![]).encode(), 1_000, 0).expect("schema");
    push(&client, &mut server);
    server.step(1_000).expect("step");
    pull(&mut client, &server);
    (client, server)
}

#[test]
fn a_call_binds_its_arguments_subject_and_time_and_matches_the_server_byte_for_byte() {
    let (mut client, mut server) = setup();
    let added = client.mutate(call("add", vec!["milk".into()], "ann"), 5_000, 1).expect("call");
    assert!(added.local.is_ok(), "{:?}", added.local);
    let rows = client.query("SELECT title, owner, at FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::from("milk"), Value::from("ann"), Value::Integer(5_000)]]);
    // Someone else's row: `reject` says why, locally and on the server.
    let theft = client.mutate(call("del", vec![Value::Integer(1)], "bob"), 6_000, 2).expect("call");
    let local = theft.local.clone().expect_err("rejected locally");
    assert_eq!((local.code, local.message.as_str()), (RejectionCode::Denied, "not yours"));
    let wrong = client.mutate(call("add", vec![], "ann"), 6_000, 3).expect("call");
    assert_eq!(wrong.local.expect_err("arity").code, RejectionCode::NoSuchMutator);
    let missing = client.mutate(call("nope", vec![], "ann"), 6_000, 4).expect("call");
    assert_eq!(missing.local.expect_err("unknown").code, RejectionCode::NoSuchMutator);
    // The app chooses the message, not its size: a rejection keeps at most 1 KiB of it.
    let long = "SELECT reject(hex(zeroblob(100000)))";
    let big = client.mutate(SqlMutation::one(long, vec![]).encode(), 6_000, 5).expect("mutate");
    let r = big.local.expect_err("rejected");
    assert_eq!(r.code, RejectionCode::Denied);
    assert_eq!(r.message.len(), pagesync::reducer::MAX_REJECTION_MESSAGE_BYTES);
    // Another error that merely mentions the marker is not the app's rejection.
    let fake = SqlMutation::one("SELECT * FROM \"pagesync-reject: x\"", vec![]).encode();
    match client.mutate(fake, 6_000, 6) {
        Ok(done) => assert_ne!(done.local.expect_err("no such table").code, RejectionCode::Denied),
        Err(e) => assert!(!e.to_string().contains("denied"), "{e}"),
    }
    push(&client, &mut server);
    server.step(7_000).expect("step");
    pull(&mut client, &server);
    let r = match client.state(theft.lsn).expect("state") {
        MutationState::Rejected(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.code, r.message.as_str()), (RejectionCode::Denied, "not yours"));
    assert_eq!(client.state(added.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(pages_of(client.database()), pages_of(server.database()), "the same pages");
}

#[test]
fn the_server_refuses_what_the_token_does_not_allow_before_running_it() {
    let (_, mut server) = setup();
    let only_add = Some(Arc::new(Permit { raw: false, calls: Some(vec!["add".into()]) }));
    let origin = Origin { subject: "ann".into(), received_ms: Some(1), permit: only_add };
    let timeline = pagesync::TimelineId::from_u128(9);
    let wrap = |body: Vec<u8>| Mutation { client_time_ms: 2_000, seed: 0, body }.encode().expect("encode");
    let sent = vec![
        wrap(SqlMutation::one("DELETE FROM t", vec![]).encode()),
        wrap(call("del", vec![Value::Integer(1)], "ann")),
        wrap(call("add", vec!["as bob".into()], "bob")),
        wrap(call("add", vec!["tea".into()], "ann")),
    ];
    server.receive_from(timeline, Lsn::FIRST, sent, &origin);
    let step = server.step(2_000).expect("step").expect("a step");
    assert_eq!(step.rejected, 3);
    assert!(step.rejections.iter().all(|r| r.rejection.code == RejectionCode::Forbidden), "{step:?}");
    let rows = server
        .database()
        .conn()
        .query_row("SELECT group_concat(title) FROM t", [], |r| r.get::<_, String>(0));
    assert_eq!(rows.expect("rows"), "tea", "only the allowed call ran");
}

#[test]
fn a_pending_call_runs_again_under_new_definitions() {
    let (mut client, _server) = setup();
    let added = client.mutate(call("add", vec!["milk".into()], "ann"), 5_000, 1).expect("call");
    assert!(added.local.is_ok());
    let shout = DEFS.replace("VALUES (:title,", "VALUES (upper(:title),");
    client.set_mutators(defs(&shout)).expect("new defs");
    let rows = client.query("SELECT title FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::from("MILK")]], "re-run under the new definitions");
    client.set_mutators(defs("-- mutator: other()\nSELECT 1")).expect("defs without it");
    assert!(client.query("SELECT title FROM t", &[]).expect("query").rows.is_empty(), "its mutator is gone");
    assert_eq!(client.pending_count(), 1, "still pending: the server decides");
}

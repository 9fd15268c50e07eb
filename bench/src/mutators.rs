//! Server-defined mutators (`pagesync::mutators`): what calling one costs against sending the
//! same SQL raw, on a client (the optimistic local write, memory journals so the disk does not
//! hide it) and on the server (a step of 1,000 of them).

use std::sync::Arc;
use std::time::Instant;

use pagesync::history::Origin;
use pagesync::journal::{JournalId, Lsn, MemoryJournal};
use pagesync::mutators::{Call, Mutators, Permit};
use pagesync::{ClientDocument, Mutation, ServerDocument, SqlMutation, TimelineId, Value};

use crate::Config;
use crate::report::{Better, Pair, Target, interleave};

const SCHEMA: &str = "CREATE TABLE todos(id INTEGER PRIMARY KEY, title TEXT NOT NULL, owner TEXT NOT NULL)";
const INSERT: &str = "INSERT INTO todos(title, owner) VALUES (:title, :subject)";
const DEFS: &str =
    "-- mutator: add_todo(title)\nINSERT INTO todos(title, owner) VALUES (:title, :subject);\n";
const T0: i64 = 1_700_000_000_000;

fn mem(id: u128) -> Box<dyn pagesync::journal::Journal> {
    Box::new(MemoryJournal::new(JournalId::from_u128(id)))
}

fn defs() -> Option<Arc<Mutators>> {
    Some(Arc::new(Mutators::parse(DEFS).expect("defs")))
}

/// The body of write `i`: the call, or the same SQL raw.
fn body(i: u64, call: bool) -> Vec<u8> {
    let title = Value::Text(format!("todo {i}"));
    if call {
        Call { name: "add_todo".into(), args: vec![title], subject: "ann".into() }.encode()
    } else {
        SqlMutation::one(INSERT.replace(":title", "?1").replace(":subject", "?2"), vec![title, "ann".into()])
            .encode()
    }
}

pub fn run(cfg: &Config) -> Vec<Pair> {
    vec![local(cfg), server(cfg)]
}

/// Microseconds per local write of `n`.
fn local_micros(n: u64, call: bool) -> f64 {
    let mut c = ClientDocument::open(mem(1), mem(2)).expect("client");
    c.set_mutators(defs()).expect("defs");
    c.mutate(SqlMutation::one(SCHEMA, vec![]).encode(), T0, 0).expect("schema");
    let start = Instant::now();
    for i in 0..n {
        let done = c.mutate(body(i, call), T0, i).expect("mutate");
        assert!(done.local.is_ok(), "{:?}", done.local);
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn local(cfg: &Config) -> Pair {
    let n = if cfg.quick { 500 } else { 4_000 };
    let (a, b) = interleave(cfg.reps, || local_micros(n, true), || local_micros(n, false));
    Pair::new(
        "mutators",
        "a mutator call, local write (client, memory journals)",
        "us/write",
        Better::Lower,
        a,
        "the same SQL sent raw",
        b,
        Some(Target::RatioAtMost(1.10)),
    )
}

/// Milliseconds for one server step of `n` writes from one timeline, checked against a token
/// that may call the mutator (for calls) or send SQL (raw).
fn server_ms(n: u64, call: bool) -> f64 {
    let mut s = ServerDocument::open(mem(3)).expect("server");
    s.set_mutators(Box::new(defs));
    let schema = Mutation { client_time_ms: T0, seed: 0, body: SqlMutation::one(SCHEMA, vec![]).encode() };
    s.receive(TimelineId::from_u128(1), Lsn::FIRST, vec![schema.encode().expect("encode")]);
    s.step(T0).expect("schema");
    let permit = match call {
        true => Permit { raw: false, calls: Some(vec!["add_todo".into()]) },
        false => Permit { raw: true, calls: None },
    };
    let origin = Origin { subject: "ann".into(), received_ms: Some(T0), permit: Some(Arc::new(permit)) };
    let entries: Vec<Vec<u8>> = (0..n)
        .map(|i| Mutation { client_time_ms: T0, seed: i, body: body(i, call) }.encode().expect("encode"))
        .collect();
    s.receive_from(TimelineId::from_u128(2), Lsn::FIRST, entries, &origin);
    let start = Instant::now();
    let step = s.step(T0 + 1).expect("step").expect("a step");
    let ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!((step.applied, step.rejected), (n as usize, 0));
    ms
}

fn server(cfg: &Config) -> Pair {
    let n = if cfg.quick { 200 } else { 1_000 };
    let (a, b) = interleave(cfg.reps, || server_ms(n, true), || server_ms(n, false));
    Pair::new(
        "mutators",
        &format!("a server step of {n} mutator calls, each checked against the token"),
        "ms",
        Better::Lower,
        a,
        "the same SQL sent raw",
        b,
        Some(Target::RatioAtMost(1.10)),
    )
}

//! Server-defined mutators through the real binaries: a mutator-only token cannot send raw
//! SQL; a mutator's own check rejects another subject's row with the app's message, on the
//! server and already in the caller's optimistic state; a call outside the token's grant is
//! refused; a reload (SIGHUP) reaches connected clients, which call the new mutator; the
//! replicas stay byte-identical.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use pagesync::{DocId, MutationState, RejectionCode, Value};
use pagesync_client::{Client, Document};
use pagesync_server::auth::{Claims, mint};
use support::{cli_as, start_on_any_port};

const SECRET: &[u8] = b"a mutators test secret of at least 32 bytes";
const WAIT: Duration = Duration::from_secs(20);

const MUTATORS: &str = "\
-- The todo list: anyone adds, only the owner deletes.
-- mutator: add_todo(title)
INSERT INTO todos(title, owner, created_ms) VALUES (:title, :subject, :now);

-- mutator: delete_own(id)
SELECT reject('only its owner may delete a todo') FROM todos WHERE id = :id AND owner IS NOT :subject;
DELETE FROM todos WHERE id = :id;
";

fn token(doc: DocId, sub: &str, write: bool, call: Option<&[&str]>) -> String {
    let call = call.map(|names| names.iter().map(|n| n.to_string()).collect());
    let claims = Claims {
        doc: doc.to_string(),
        write,
        exp: 4_000_000_000,
        sub: Some(sub.into()),
        call,
        ..Claims::default()
    };
    mint(SECRET, &claims)
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn rejected(d: &Document, lsn: pagesync::journal::Lsn) -> pagesync::Rejection {
    match d.state(lsn).expect("state") {
        MutationState::Rejected(r) => r,
        other => panic!("mutation {lsn} is {other:?}, not rejected"),
    }
}

fn titles(d: &Document) -> Vec<Vec<Value>> {
    d.query("SELECT title, owner FROM todos ORDER BY id", &[]).expect("query").rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_decides_what_each_subject_may_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let defs = dir.path().join("mutators.sql");
    std::fs::write(&defs, MUTATORS).expect("mutators");
    let journal = format!("file://{}", dir.path().join("server").display());
    let flags =
        ["--auth-secret-file", &secret.display().to_string(), "--mutators", &defs.display().to_string()];
    let (server, port) = start_on_any_port(&journal, &flags);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let doc = DocId::from_u128(0x70d0);

    // The app's own tool sets the schema up with a raw-SQL token.
    let admin =
        Client::connect(&url, &token(doc, "admin", true, None), dir.path().join("admin")).expect("admin");
    let ad = admin.open(doc).expect("open");
    let schema = "CREATE TABLE todos(id INTEGER PRIMARY KEY, title TEXT NOT NULL, owner TEXT NOT NULL, created_ms INTEGER, done INTEGER NOT NULL DEFAULT 0)";
    ad.execute(schema, vec![]).expect("schema");
    ad.sync(WAIT).await.expect("synced");

    // Ann may call both mutators and nothing else.
    let both: &[&str] = &["add_todo", "delete_own"];
    let ann =
        Client::connect(&url, &token(doc, "ann", false, Some(both)), dir.path().join("ann")).expect("ann");
    let a = ann.open(doc).expect("open");
    a.sync(WAIT).await.expect("synced");
    until("ann has the definitions", || a.mutators().is_some()).await;
    let milk = a.call("add_todo", vec![Value::from("milk")]).expect("call");
    assert!(milk.local.is_ok(), "{:?}", milk.local);
    a.sync(WAIT).await.expect("synced");
    assert_eq!(a.state(milk.lsn).expect("state"), MutationState::Confirmed);
    assert_eq!(titles(&a), vec![vec![Value::from("milk"), Value::from("ann")]], "owner = :subject");
    // Raw SQL with a mutator-only token: the server never runs it.
    let wipe = a.execute("DELETE FROM todos", vec![]).expect("queued");
    a.sync(WAIT).await.expect("synced");
    let r = rejected(&a, wipe.lsn);
    assert_eq!(r.code, RejectionCode::Forbidden, "{r}");
    assert_eq!(titles(&a).len(), 1, "the optimistic delete is rolled back");

    // Bob, through the CLI: adds, then tries to delete ann's todo: the app's message.
    let bob = token(doc, "bob", false, Some(both));
    let out = cli_as(port, &dir.path().join("bob-cli"), doc, &bob, &["call", "add_todo", "eggs"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli_as(port, &dir.path().join("bob-cli"), doc, &bob, &["call", "delete_own", "1"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("denied") && said.contains("only its owner may delete a todo"), "{said}");
    // And through the Rust API: rejected already in bob's optimistic state, then by the server.
    let bobs = Client::connect(&url, &bob, dir.path().join("bob")).expect("bob");
    let b = bobs.open(doc).expect("open");
    b.sync(WAIT).await.expect("synced");
    until("bob has the definitions", || b.mutators().is_some()).await;
    let theft = b.call("delete_own", vec![Value::Integer(1)]).expect("call");
    let local = theft.local.as_ref().expect_err("rejected locally");
    assert_eq!(
        (local.code.clone(), local.message.as_str()),
        (RejectionCode::Denied, "only its owner may delete a todo")
    );
    b.sync(WAIT).await.expect("synced");
    assert_eq!(rejected(&b, theft.lsn).message, "only its owner may delete a todo");
    // Bob's own todo he may delete.
    let own = b.call("delete_own", vec![Value::Integer(2)]).expect("call");
    b.sync(WAIT).await.expect("synced");
    assert_eq!(b.state(own.lsn).expect("state"), MutationState::Confirmed);

    // Carol may only add: calling delete_own is refused for her grant, unknown names too.
    let carol = token(doc, "carol", false, Some(&["add_todo"]));
    let cc = Client::connect(&url, &carol, dir.path().join("carol")).expect("carol");
    let c = cc.open(doc).expect("open");
    c.sync(WAIT).await.expect("synced");
    let outside = c.call("delete_own", vec![Value::Integer(1)]).expect("call");
    let unknown = c.call("drop_everything", vec![]).expect("call");
    c.sync(WAIT).await.expect("synced");
    assert_eq!(rejected(&c, outside.lsn).code, RejectionCode::Forbidden);
    assert_eq!(rejected(&c, unknown.lsn).code, RejectionCode::Forbidden, "outside the grant");
    // A raw-SQL token without a `call` claim calls nothing either.
    let raw_only = ad.call("add_todo", vec![Value::from("x")]).expect("call");
    ad.sync(WAIT).await.expect("synced");
    assert_eq!(rejected(&ad, raw_only.lsn).code, RejectionCode::Forbidden);

    // A reload reaches the connected clients: ann calls the new mutator.
    let before = a.mutators().expect("defs").version().to_owned();
    let toggle = "\n-- mutator: toggle(id)\nUPDATE todos SET done = 1 - done WHERE id = :id;\n";
    std::fs::write(&defs, format!("{MUTATORS}{toggle}")).expect("rewrite");
    let ann_all = token(doc, "ann", false, Some(&["*"]));
    let kill = Command::new("kill").args(["-HUP", &server.0.id().to_string()]).status().expect("kill -HUP");
    assert!(kill.success());
    until("the new definitions reach ann", || a.mutators().is_some_and(|m| m.version() != before)).await;
    assert!(a.mutators().expect("defs").get("toggle").is_some());
    let every = Client::connect(&url, &ann_all, dir.path().join("ann-all")).expect("ann, every mutator");
    let a2 = every.open(doc).expect("open");
    a2.sync(WAIT).await.expect("synced");
    until("new clients get them too", || a2.mutators().is_some_and(|m| m.get("toggle").is_some())).await;
    let t = a2.call("toggle", vec![Value::Integer(1)]).expect("call");
    a2.sync(WAIT).await.expect("synced");
    assert_eq!(a2.state(t.lsn).expect("state"), MutationState::Confirmed);

    // The history names each call, its subject and what became of it.
    let history = a2.history(pagesync::history::HistoryQuery::default()).await.expect("history").records;
    let theft_record = history
        .iter()
        .find(|r| {
            r.subject == "bob"
                && r.call.as_ref().is_some_and(|(n, args)| n == "delete_own" && args == &[Value::Integer(1)])
        })
        .expect("bob's attempt is in the history");
    assert!(matches!(&theft_record.outcome, pagesync::history::HistoryOutcome::Rejected { code, message }
        if code == "denied" && message == "only its owner may delete a todo"));
    assert!(theft_record.to_string().contains("delete_own(1)"), "{theft_record}");

    // Every replica holds the same bytes.
    for d in [&a, &b, &c, &ad, &a2] {
        d.sync(WAIT).await.expect("synced");
    }
    let export = |d: &Document, name: &str| {
        let path = dir.path().join(name);
        d.export(&path).expect("export");
        std::fs::read(path).expect("read")
    };
    let reference = export(&a2, "a2.sqlite");
    for (d, name) in [(&a, "a"), (&b, "b"), (&c, "c"), (&ad, "ad")] {
        assert!(export(d, name) == reference, "replica {name} differs");
    }
    let done = a2.query("SELECT done FROM todos WHERE id = 1", &[]).expect("query").rows;
    assert_eq!(done, vec![vec![Value::Integer(1)]]);

    // Offline, a later run has the definitions it was last sent: calls apply locally at once.
    let version = a2.mutators().expect("defs").version().to_owned();
    drop((a2, every));
    let nowhere = format!("ws://127.0.0.1:{}/v1/sync", support::free_port());
    let offline = Client::connect(&nowhere, &ann_all, dir.path().join("ann-all")).expect("offline");
    let o = offline.open(doc).expect("open");
    assert_eq!(o.mutators().map(|m| m.version().to_owned()), Some(version), "remembered");
    let later = o.call("toggle", vec![Value::Integer(1)]).expect("call");
    assert!(later.local.is_ok(), "{:?}", later.local);
    let done = o.query("SELECT done FROM todos WHERE id = 1", &[]).expect("query").rows;
    assert_eq!(done, vec![vec![Value::Integer(0)]], "applied locally, offline");
}

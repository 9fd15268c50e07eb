//! The mutation sandbox, in process: each hostile class of SQL is refused or stopped with a
//! typed code, on the client's optimistic run and on the server, and changes nothing for anyone
//! else. `server/tests/hostile_sql.rs` runs the same classes through the real binaries.

use std::time::{Duration, Instant};

use pagesync::journal::Lsn;
use pagesync::server::MAX_STEP_PAGES;
use pagesync::{
    Budget, ClientDocument, Error, Mutation, MutationState, RejectionCode, ServerDocument, SqlReducer,
    StepLimits, TimelineId, Value,
};
use pagesync_tests::{drain, integrity_ok, memory_journal, pages_of, pull, push, sql};

const T0: i64 = 1_700_000_000_000;

fn setup() -> (ServerDocument, ClientDocument) {
    let server = ServerDocument::open(memory_journal(1)).expect("server");
    let client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    (server, client)
}

/// `setup` with the schema applied, and each mutation's CPU time on the server bounded to `ms`.
fn with_schema_and_cpu_bound(ms: u64) -> (ServerDocument, ClientDocument) {
    let limits = StepLimits { max_mutation_cpu: Some(Duration::from_millis(ms)), ..StepLimits::default() };
    let mut server =
        ServerDocument::with_reducer(memory_journal(1), SqlReducer::default(), limits).expect("server");
    let mut client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    schema(&mut client, &mut server);
    (server, client)
}

/// Sends `statements` to the server as a raw timeline entry, as a hostile client that skips
/// its own local checks would, and returns the server's verdict.
fn raw_verdict(
    server: &mut ServerDocument,
    timeline: u128,
    lsn: u64,
    body: Vec<u8>,
) -> Option<(String, String)> {
    let tl = TimelineId(timeline.to_le_bytes());
    let m = Mutation { client_time_ms: T0, seed: 7, body }.encode().expect("encode");
    server.receive(tl, Lsn::new(lsn).expect("lsn"), vec![m]);
    drain(server, T0);
    server
        .database()
        .conn()
        .query_row(
            "SELECT code, message FROM _pagesync_rejections WHERE timeline = ?1 AND lsn = ?2",
            rusqlite::params![&tl.0[..], lsn as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .ok()
}

/// Writes `text` on the client, syncs both ways, and checks it confirmed and the pages agree.
fn confirmed(client: &mut ClientDocument, server: &mut ServerDocument, text: &str, seed: u64) {
    let m = client.mutate(sql(text, vec![]), T0, seed).expect("queued");
    push(client, server);
    drain(server, T0);
    pull(client, server);
    assert_eq!(client.state(m.lsn).expect("state"), MutationState::Confirmed, "{text}");
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

fn schema(client: &mut ClientDocument, server: &mut ServerDocument) {
    let ddl = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL CHECK (length(body) <= 10))";
    client.mutate(sql(ddl, vec![]), T0, 1).expect("ddl");
    push(client, server);
    drain(server, T0);
    pull(client, server);
}

#[test]
fn connection_pragmas_are_refused_everywhere() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let hostile = [
        "PRAGMA ignore_check_constraints = ON",
        "PRAGMA max_page_count = 2147483646",
        "PRAGMA hard_heap_limit = 100000",
        "PRAGMA soft_heap_limit = 1000",
        "PRAGMA cache_size = 1",
        "PRAGMA reverse_unordered_selects = ON",
        "PRAGMA secure_delete = ON",
        "PRAGMA defer_foreign_keys = ON",
        "PRAGMA foreign_keys = ON",
        "PRAGMA recursive_triggers = ON",
        "PRAGMA writable_schema = ON",
        "PRAGMA cell_size_check = ON",
        "PRAGMA automatic_index = OFF",
        "PRAGMA threads = 4",
        "PRAGMA optimize",
        "PRAGMA integrity_check",
        "PRAGMA compile_options",
        "SELECT * FROM pragma_compile_options",
        "SELECT cache_size FROM pragma_cache_size",
        "PRAGMA data_version",
        "PRAGMA page_size = 8192",
        "PRAGMA journal_mode = WAL",
        "PRAGMA temp_store = MEMORY",
    ];
    for (i, sql_text) in hostile.iter().enumerate() {
        let local = client.mutate(sql(sql_text, vec![]), T0, 10 + i as u64);
        assert!(matches!(local, Err(Error::Refused(_))), "{sql_text}: the client accepted it: {local:?}");
        let verdict = raw_verdict(&mut server, 99, 1 + i as u64, sql(sql_text, vec![]));
        let (code, message) = verdict.unwrap_or_else(|| panic!("{sql_text}: the server applied it"));
        assert_eq!(code, "refused", "{sql_text}: {message}");
    }
    // The CHECK still holds for everyone, on the client and on the server.
    let long = client.mutate(sql("INSERT INTO notes(body) VALUES ('far too long a note')", vec![]), T0, 90);
    assert_eq!(long.expect("queued").local.map_err(|r| r.code), Err(RejectionCode::Constraint));
    let verdict = raw_verdict(
        &mut server,
        98,
        1,
        sql("INSERT INTO notes(body) VALUES ('far too long a note')", vec![]),
    );
    assert_eq!(verdict.map(|v| v.0).as_deref(), Some("constraint"));
    // Harmless pragmas work.
    let ok = client.mutate(sql("PRAGMA user_version = 7", vec![]), T0, 91).expect("user_version");
    assert_eq!(ok.local, Ok(()));
    let info =
        client.query("SELECT name FROM pragma_table_info('notes') ORDER BY cid", &[]).expect("table_info");
    assert_eq!(info.rows.len(), 2);
    assert!(integrity_ok(server.database()));
}

/// A query is authorized like any app SQL, whatever its wording: one worded as a statement
/// pagesync keeps prepared (`SAVEPOINT _pagesync_mutation`, run outside the sandbox) was served
/// from the connection's statement cache unauthorized, and any `SAVEPOINT` passed as a read:
/// either left the replica inside a transaction, and every local write after it failed to
/// begin.
#[test]
fn a_query_cannot_leave_the_replica_inside_a_transaction() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    confirmed(&mut client, &mut server, "INSERT INTO notes(body) VALUES ('a')", 2);
    let worded_as_pagesyncs = ["SAVEPOINT _pagesync_mutation", "SAVEPOINT pagesync_index_flush", "COMMIT"];
    let transactions = ["BEGIN IMMEDIATE", "BEGIN", "SAVEPOINT s", "RELEASE s", "ROLLBACK"];
    for text in worded_as_pagesyncs.into_iter().chain(transactions) {
        assert!(client.query(text, &[]).is_err(), "{text}: a query ran it");
    }
    confirmed(&mut client, &mut server, "INSERT INTO notes(body) VALUES ('b')", 3);
    let n = client.query("SELECT count(*) FROM notes", &[]).expect("count").rows;
    assert_eq!(n, vec![vec![Value::Integer(2)]]);
}

#[test]
fn temp_objects_and_connection_state_are_refused() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let hostile = [
        "CREATE TEMP TABLE t(x)",
        "CREATE TABLE temp.t(x)",
        "CREATE TEMP VIEW v AS SELECT 1",
        "CREATE TEMP TRIGGER tr AFTER INSERT ON main.notes BEGIN UPDATE notes SET body = 'pwned'; END",
        "INSERT INTO notes(body) VALUES (changes())",
        "INSERT INTO notes(body) VALUES (total_changes())",
        "INSERT INTO notes(body) VALUES (sqlite_version())",
        "INSERT INTO notes(body) VALUES (load_extension('x'))",
        "ATTACH 'other.db' AS other",
        "ANALYZE",
        "SELECT * FROM dbstat",
        "BEGIN",
        "INSERT INTO _pagesync_timelines VALUES (x'00', 1)",
        "CREATE VIRTUAL TABLE s USING dbstat",
        "PRAGMA temp.user_version = 42",
        "CREATE VIEW _pagesync_v AS SELECT 1",
        "CREATE INDEX _pagesync_i ON notes(body)",
        "CREATE TRIGGER _pagesync_t AFTER INSERT ON notes BEGIN SELECT 1; END",
        // SQLite never shows VACUUM to the authorizer; `VACUUM INTO` would write a file.
        "VACUUM",
        "/* shrink */ VACUUM INTO 'stolen.db'",
    ];
    for (i, sql_text) in hostile.iter().enumerate() {
        let local = client.mutate(sql(sql_text, vec![]), T0, 10 + i as u64);
        assert!(matches!(local, Err(Error::Refused(_))), "{sql_text}: the client accepted it: {local:?}");
        let (code, message) = raw_verdict(&mut server, 99, 1 + i as u64, sql(sql_text, vec![]))
            .unwrap_or_else(|| panic!("{sql_text}: the server applied it"));
        assert_eq!(code, "refused", "{sql_text}: {message}");
    }
    // A statement pagesync prepares outside the sandbox cannot be borrowed by its text.
    let own = "INSERT OR REPLACE INTO _pagesync_timelines(timeline, applied_lsn) VALUES (?1, ?2)";
    let body = sql(own, vec![Value::Blob(vec![0; 16]), Value::Integer(1_000_000)]);
    let (code, _) = raw_verdict(&mut server, 97, 1, body).expect("the server applied it");
    assert_eq!(code, "refused");
    // Reads of TEMP and connection state are refused in queries too.
    for q in ["SELECT * FROM temp.sqlite_master", "PRAGMA ignore_check_constraints = ON", "SELECT changes()"]
    {
        assert!(matches!(client.query(q, &[]), Err(Error::Refused(_))), "{q}");
    }
    // last_insert_rowid() starts at 0 in every mutation: the same on every replica.
    let m = client
        .mutate(sql("INSERT INTO notes(id, body) VALUES (last_insert_rowid() + 100, 'a')", vec![]), T0, 80)
        .expect("insert");
    assert_eq!(m.local, Ok(()));
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.state(m.lsn).expect("state"), MutationState::Confirmed);
    let ids = client.query("SELECT id FROM notes", &[]).expect("query").rows;
    assert_eq!(ids, vec![vec![Value::Integer(100)]]);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn an_endless_query_is_too_expensive_and_costs_a_bounded_time() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let start = Instant::now();
    let local = client.mutate(sql(endless, vec![]), T0, 5).expect("queued");
    let local_ms = start.elapsed().as_millis();
    assert_eq!(local.local.as_ref().map_err(|r| r.code.clone()), Err(RejectionCode::TooExpensive));
    let ok = client.mutate(sql("INSERT INTO notes(body) VALUES ('fine')", vec![]), T0, 6).expect("ok");
    // A write stopped by the budget ends its whole transaction in SQLite: the step restarts
    // without it, and the rest of the step still applies.
    let endless_write = "INSERT INTO notes(body) SELECT 'x' FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c)";
    let write = client.mutate(sql(endless_write, vec![]), T0, 7).expect("queued");
    assert_eq!(write.local.as_ref().map_err(|r| r.code.clone()), Err(RejectionCode::TooExpensive));
    let after = client.mutate(sql("INSERT INTO notes(body) VALUES ('after')", vec![]), T0, 8).expect("ok");
    push(&client, &mut server);
    let start = Instant::now();
    drain(&mut server, T0);
    let server_ms = start.elapsed().as_millis();
    pull(&mut client, &server);
    match client.state(local.lsn).expect("state") {
        MutationState::Rejected(r) => assert_eq!(r.code, RejectionCode::TooExpensive, "{r}"),
        other => panic!("expected too_expensive, got {other:?}"),
    }
    assert_eq!(client.state(ok.lsn).expect("state"), MutationState::Confirmed);
    match client.state(write.lsn).expect("state") {
        MutationState::Rejected(r) => assert_eq!(r.code, RejectionCode::TooExpensive, "{r}"),
        other => panic!("expected too_expensive, got {other:?}"),
    }
    assert_eq!(client.state(after.lsn).expect("state"), MutationState::Confirmed);
    let bodies = client.query("SELECT body FROM notes ORDER BY id", &[]).expect("query").rows;
    assert_eq!(bodies, vec![vec![Value::Text("fine".into())], vec![Value::Text("after".into())]]);
    eprintln!("a budget-exhausting mutation took {local_ms} ms on the client, {server_ms} ms on the server");
    assert!(server_ms < 20_000, "the budget bounds the time: {server_ms} ms");
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

/// A budget-exhausting mutation behind another one in a step is rejected in that step: the
/// restart after it ended the transaction does not leave it for a later step to run again.
#[test]
fn a_budget_exhausting_mutation_runs_once() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) INSERT INTO notes(body) SELECT 'x' FROM c";
    for (tl, text) in [(1u8, "INSERT INTO notes(body) VALUES ('first')"), (2, endless)] {
        let m = Mutation { client_time_ms: T0, seed: 1, body: sql(text, vec![]) }.encode().expect("encode");
        server.receive(TimelineId([tl; 16]), Lsn::FIRST, vec![m]);
    }
    let outcome = server.step(T0).expect("step").expect("a step");
    assert_eq!((outcome.applied, outcome.rejected), (2, 1), "{outcome:?}");
    assert_eq!(outcome.rejections[0].rejection.code, RejectionCode::TooExpensive);
    assert_eq!(server.queued(), 0);
}

#[test]
fn oversized_values_temp_files_and_growth_are_too_big() {
    let budget = Budget { max_temp_bytes: 4 << 20, max_added_bytes: 2 << 20, ..Budget::default() };
    let limits = StepLimits { budget, ..StepLimits::default() };
    let mut server =
        ServerDocument::with_reducer(memory_journal(1), SqlReducer::default(), limits).expect("server");
    let mut client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    schema(&mut client, &mut server);
    client.mutate(sql("CREATE TABLE big(b BLOB)", vec![]), T0, 2).expect("ddl");
    push(&client, &mut server);
    drain(&mut server, T0);
    let cases = [
        ("INSERT INTO big VALUES (zeroblob(80000000))", "string or blob"),
        // Grown by `replace`, which runs on another connection (a costly built-in): the same code.
        (
            "INSERT INTO big VALUES (replace(replace(replace(printf('%.*c', 4000, 'x'), 'x', printf('%.*c', 4000, 'y')), 'y', 'zz'), 'z', 'ww'))",
            "string or blob",
        ),
        (
            "INSERT INTO big SELECT randomblob(1000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000) SELECT x FROM c)",
            "add more than 2097152 bytes",
        ),
        (
            "SELECT * FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000) SELECT randomblob(200) AS r FROM c) ORDER BY r",
            "temporary storage",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let (code, message) =
            raw_verdict(&mut server, 50, 1 + i as u64, sql(text, vec![])).expect("the server applied it");
        assert_eq!(code, "too_big", "{text}: {message}");
        assert!(message.contains(needle), "{text}: {message}");
    }
    assert!(server.database().store().size_bytes() < 1 << 20);
}

#[test]
fn a_step_too_large_for_one_entry_rejects_its_mutation_and_applies_the_rest() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    // Four mutations of 24 MiB each fill a table with more pages than one step may change.
    client.mutate(sql("CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)", vec![]), T0, 2).expect("ddl");
    let fill = "INSERT INTO big(b) SELECT randomblob(3000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 6000) SELECT x FROM c)";
    let fills: Vec<Lsn> =
        (0..4).map(|i| client.mutate(sql(fill, vec![]), T0, 3 + i).expect("fill").lsn).collect();
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    for lsn in &fills {
        assert_eq!(client.state(*lsn).expect("state"), MutationState::Confirmed);
    }
    let pages = server.database().store().page_count() as usize;
    assert!(pages > MAX_STEP_PAGES, "{pages} pages");
    // One mutation rewrites all of them; another client's small write shares its step.
    let rewrite = client.mutate(sql("UPDATE big SET b = zeroblob(3000)", vec![]), T0, 10).expect("queued");
    push(&client, &mut server);
    let other = Mutation {
        client_time_ms: T0,
        seed: 1,
        body: sql("INSERT INTO notes(body) VALUES ('other')", vec![]),
    };
    server.receive(TimelineId([77; 16]), Lsn::FIRST, vec![other.encode().expect("encode")]);
    let mut rejections = Vec::new();
    while let Some(outcome) = server.step(T0).expect("step") {
        rejections.extend(outcome.rejections);
    }
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert!(rejections[0].isolated, "reported as a step that could not hold it: {rejections:?}");
    pull(&mut client, &server);
    match client.state(rewrite.lsn).expect("state") {
        MutationState::Rejected(r) => {
            assert_eq!(r.code, RejectionCode::TooBig, "{r}");
            assert!(r.message.contains("pages"), "{r}");
        }
        other => panic!("expected too_big, got {other:?}"),
    }
    assert_eq!(server.queued(), 0, "nothing is retried forever");
    let rows = client.query("SELECT body FROM notes", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Text("other".into())]]);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn a_hundred_thousand_row_import_in_one_mutation_is_confirmed() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    client
        .mutate(sql("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER)", vec![]), T0, 2)
        .expect("ddl");
    // 100,000 rows do not fit one mutation's 1 MiB as parameters: an import generates them.
    let import = "INSERT INTO items SELECT x, 'item ' || x, x % 17 FROM (WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x < 99999) SELECT x FROM c)";
    let m = client.mutate(sql(import, vec![]), T0, 3).expect("import");
    eprintln!("the import ran {} VM instructions", client.database().last_vm_steps());
    assert_eq!(m.local, Ok(()));
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.state(m.lsn).expect("state"), MutationState::Confirmed);
    let n = client.query("SELECT count(*) FROM items", &[]).expect("count").rows;
    assert_eq!(n, vec![vec![Value::Integer(100_000)]]);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

/// What ordinary apps do stays allowed: DDL, upserts, RETURNING, JSON, window functions,
/// FTS5 and R*Tree tables, user_version, table introspection.
#[test]
fn ordinary_app_sql_is_allowed() {
    let (mut server, mut client) = setup();
    let script = [
        "CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT UNIQUE, tags TEXT, at TEXT DEFAULT CURRENT_TIMESTAMP)",
        "CREATE INDEX IF NOT EXISTS items_name ON items(name)",
        "ALTER TABLE items ADD COLUMN qty INTEGER NOT NULL DEFAULT 0",
        "INSERT INTO items(name, tags) VALUES ('a', json_array('x', 'y')) ON CONFLICT(name) DO UPDATE SET qty = qty + 1",
        "INSERT INTO items(name, tags) VALUES ('a', '[]') ON CONFLICT(name) DO UPDATE SET qty = qty + 1 RETURNING id",
        "UPDATE items SET tags = json_insert(tags, '$[#]', 'z'), at = datetime('now', '+1 day') WHERE tags ->> '$[0]' = 'x'",
        "CREATE VIEW ranked AS SELECT name, row_number() OVER (ORDER BY qty DESC) AS r FROM items",
        "CREATE TRIGGER items_log AFTER DELETE ON items BEGIN INSERT INTO items(name) VALUES ('deleted ' || old.name); END",
        "CREATE VIRTUAL TABLE notes USING fts5(body)",
        "INSERT INTO notes(body) VALUES ('the quick brown fox'), ('lazy dogs')",
        "CREATE VIRTUAL TABLE boxes USING rtree(id, minx, maxx, miny, maxy)",
        "INSERT INTO boxes VALUES (1, 0, 10, 0, 10)",
        "PRAGMA user_version = 3",
        "INSERT INTO items(name, qty) SELECT 'n' || value, value FROM json_each('[1,2,3]')",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) INSERT INTO items(name) SELECT 'r' || x FROM c",
        "DELETE FROM items WHERE name = 'r5'",
        "INSERT INTO items(name, qty) VALUES ('rand', abs(random()) % 10 + length(randomblob(4)))",
        // Every ALTER TABLE SQLite has (renames and drops were refused: SQLite rewrites the
        // schema with internal functions, and names the dropped column where the schema goes).
        "CREATE TABLE old_name(a, b, c)",
        "INSERT INTO old_name VALUES (1, 2, 3)",
        "ALTER TABLE old_name RENAME TO renamed",
        "ALTER TABLE renamed RENAME COLUMN a TO first",
        "ALTER TABLE renamed DROP COLUMN b",
        "ALTER TABLE main.renamed ADD COLUMN d DEFAULT 4",
    ];
    let mut lsns = Vec::new();
    for (i, text) in script.iter().enumerate() {
        let m = client.mutate(sql(text, vec![]), T0, i as u64).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(m.local, Ok(()), "{text}");
        lsns.push(m.lsn);
    }
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    for (lsn, text) in lsns.iter().zip(script) {
        assert_eq!(client.state(*lsn).expect("state"), MutationState::Confirmed, "{text}");
    }
    let q = |sql: &str| client.query(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).rows;
    assert_eq!(q("SELECT count(*) FROM notes WHERE notes MATCH 'fox'"), vec![vec![Value::Integer(1)]]);
    assert_eq!(q("SELECT id FROM boxes WHERE minx >= 0 AND maxx <= 20"), vec![vec![Value::Integer(1)]]);
    assert_eq!(q("PRAGMA user_version"), vec![vec![Value::Integer(3)]]);
    assert_eq!(q("SELECT name FROM ranked WHERE r = 1").len(), 1);
    assert_eq!(q("SELECT count(*) FROM items WHERE name = 'deleted r5'"), vec![vec![Value::Integer(1)]]);
    assert!(!q("SELECT name FROM pragma_table_info('items')").is_empty());
    assert_eq!(
        q("SELECT first, c, d FROM renamed"),
        vec![vec![Value::Integer(1), Value::Integer(3), Value::Integer(4)]]
    );
    assert!(integrity_ok(server.database()));
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

#[test]
fn rejection_codes_have_stable_strings() {
    for code in [
        RejectionCode::Refused,
        RejectionCode::Constraint,
        RejectionCode::TooExpensive,
        RejectionCode::TooBig,
        RejectionCode::DocFull,
        RejectionCode::Malformed,
        RejectionCode::Mismatch,
        RejectionCode::Range,
        RejectionCode::Error,
    ] {
        assert_eq!(RejectionCode::parse(code.as_str()), code);
    }
    assert_eq!(RejectionCode::parse("something_new"), RejectionCode::Other("something_new".into()));
    assert_eq!(RejectionCode::TooExpensive.as_str(), "too_expensive");
}

/// One call of a pattern match, a search, a replace, a trim or a JSON merge patch compares its
/// arguments at up to every pair of positions: a mutation pays for that by its arguments'
/// lengths before the call runs (one such `LIKE` over 16 MB held its document for 555 s inside
/// the instruction budget). The server rejects it `too_expensive` at once, and each still
/// answers as SQLite's own does.
#[test]
fn pattern_matches_searches_and_replaces_pay_for_their_lengths() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let costly = [
        "INSERT INTO notes(body) SELECT 'x' WHERE hex(zeroblob(4000000)) LIKE '%' || hex(zeroblob(20000)) || '1'",
        "INSERT INTO notes(body) SELECT 'x' WHERE hex(zeroblob(4000000)) GLOB '*' || hex(zeroblob(20000)) || '1'",
        "INSERT INTO notes(body) SELECT 'x' WHERE instr(hex(zeroblob(4000000)), hex(zeroblob(2000000)) || '1') > 0",
        "INSERT INTO notes(body) SELECT substr(replace(hex(zeroblob(4000000)), hex(zeroblob(2000000)) || '1', 'y'), 1, 1)",
        "INSERT INTO notes(body) SELECT length(trim(printf('%.*c', 200000, 'a'), printf('%.*c', 200000, 'b') || 'a'))",
        "INSERT INTO notes(body) SELECT length(rtrim(printf('%.*c', 200000, 'a'), printf('%.*c', 200000, 'b') || 'a'))",
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 40000), \
         a(o) AS (SELECT json_group_object('a' || n, 0) FROM c), b(o) AS (SELECT json_group_object('b' || n, 0) FROM c) \
         INSERT INTO notes(body) SELECT length(json_patch(a.o, b.o)) FROM a, b",
    ];
    for (i, text) in costly.iter().enumerate() {
        let start = Instant::now();
        let verdict = raw_verdict(&mut server, 90 + i as u128, 1, sql(text, vec![]));
        let took = start.elapsed();
        assert_eq!(
            verdict.as_ref().map(|(code, _)| code.as_str()),
            Some("too_expensive"),
            "{text}: {verdict:?}"
        );
        assert!(took.as_secs() < 5, "{text} took {took:?}");
    }
    // Ordinary uses, answered as stock SQLite answers them, and confirmed.
    let cases = "SELECT 'Hello' LIKE 'h%', 'a_c' LIKE 'a\\_c' ESCAPE '\\', like('%b%', 'abc'), \
                 'abc' GLOB 'a*', glob('[a-c]?c', 'abc'), NULL LIKE 'a', 'a' LIKE NULL, \
                 12345 LIKE '%34%', x'616263' LIKE 'abc', instr('héllo', 'llo'), instr(x'00010203', x'0203'), \
                 instr(12345, 34), instr(NULL, 'a'), instr('abc', ''), replace('hello', 'l', 'L'), \
                 replace(12.5, '.', ','), replace('abc', '', 'x'), replace(NULL, 'a', 'b'), replace('aaa', 'a', NULL), \
                 trim('xxhixx', 'x'), ltrim('  hi '), rtrim('hi!?!', '!?'), trim('héé', 'é'), trim(NULL, 'a'), \
                 trim(1200, '0'), json_patch('{\"a\":1,\"b\":{\"c\":2}}', '{\"b\":{\"c\":null,\"d\":3}}'), \
                 json(jsonb_patch('{\"a\":1}', '{\"a\":[1,2]}')), json_patch('[1]', 'null'), \
                 json_object('k', json_patch('{\"a\":1}', '{\"b\":2}')), json_array(json_patch('{}', '{}')), \
                 json_set('{}', '$.k', json_patch('{\"a\":1}', '{}'))";
    let answers = |conn: &rusqlite::Connection| -> Vec<rusqlite::types::Value> {
        conn.query_row(cases, [], |r| (0..31).map(|i| r.get(i)).collect()).expect("answers")
    };
    let stock = rusqlite::Connection::open_in_memory().expect("stock SQLite");
    assert_eq!(answers(client.database().conn()), answers(&stock));
    confirmed(
        &mut client,
        &mut server,
        "INSERT INTO notes(body) SELECT 'ok' WHERE 'Hello' LIKE 'h%' AND instr('abc', 'c') = 3 AND replace('a', 'a', 'b') = 'b' AND trim('xax', 'x') = 'a' AND json_patch('{}', '{\"a\":1}') = '{\"a\":1}'",
        9,
    );
}

/// After a row with the largest rowid, SQLite picks later rowids from its own random
/// generator, which no mutation's seed reaches: the client's run and the server's chose
/// different rowids. A mutation that writes that rowid is refused, on both sides alike.
#[test]
fn the_largest_rowid_is_refused_so_rowids_are_never_random() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let hostile = [
        "INSERT INTO notes(id, body) VALUES (9223372036854775807, 'max')",
        "INSERT INTO notes(body) VALUES ('a'); UPDATE notes SET id = 9223372036854775807",
        "CREATE TABLE r(x); INSERT INTO r(rowid, x) VALUES (9223372036854775807, 1)",
    ];
    for (i, text) in hostile.iter().enumerate() {
        let verdict = raw_verdict(&mut server, 70 + i as u128, 1, sql(text, vec![]));
        let (code, why) = verdict.unwrap_or_else(|| panic!("{text}: accepted"));
        assert_eq!(code, "refused", "{text}: {why}");
        assert!(why.contains("9223372036854775807"), "{why}");
    }
    // The client refuses it alike, before it is queued; one below it is an ordinary rowid.
    let refused = client.mutate(sql(hostile[0], vec![]), T0, 2).expect_err("refused locally");
    assert!(refused.to_string().contains("9223372036854775807"), "{refused}");
    let ok = client
        .mutate(sql("INSERT INTO notes(id, body) VALUES (9223372036854775806, 'near')", vec![]), T0, 3)
        .expect("queued");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    assert_eq!(client.state(ok.lsn).expect("state"), MutationState::Confirmed);
    let rows: i64 =
        server.database().conn().query_row("SELECT count(*) FROM notes", [], |r| r.get(0)).expect("count");
    assert_eq!(rows, 1);
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

/// The peak resident memory of this process so far, in bytes (`VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") << 10
}

/// Work that runs no VM instruction, or one instruction's worth, can still hold memory: a
/// statement over views that each name other views eight times is copied out view by view
/// before it runs (1.2 GB from a 30-byte `SELECT`, five layers deep), and one row of many
/// 16 MB columns holds them all. What a mutation makes SQLite hold is bounded: past it, the
/// allocation fails and the mutation is rejected `too_big`, the server none the worse.
#[test]
fn what_a_mutation_makes_sqlite_hold_is_bounded() {
    assert!(pagesync::install_memory_meter(), "SQLite started before its allocator could be metered");
    // Without the bound on CPU time, which would stop the copying of views too, a little later.
    let limits = StepLimits { max_mutation_cpu: None, ..StepLimits::default() };
    let mut server =
        ServerDocument::with_reducer(memory_journal(1), SqlReducer::default(), limits).expect("server");
    let mut client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    schema(&mut client, &mut server);
    let cases = (0..1000).map(|i| format!("WHEN {i} THEN {i}")).collect::<Vec<_>>().join(" ");
    let mut ddl = vec!["CREATE TABLE et(a)".to_owned()];
    for k in 0..8 {
        ddl.push(format!("CREATE VIEW v1_{k} AS SELECT CASE a {cases} END AS a FROM et"));
    }
    for layer in 2..=5 {
        for k in 0..8 {
            let from = (0..8).map(|x| format!("v{}_{x} AS x{x}", layer - 1)).collect::<Vec<_>>().join(", ");
            ddl.push(format!("CREATE VIEW v{layer}_{k} AS SELECT max(x0.a) AS a FROM {from}"));
        }
    }
    assert_eq!(raw_verdict(&mut server, 60, 1, sql(&ddl.join(";\n"), vec![])), None, "the views");
    let columns = (0..40).map(|i| format!("printf('%.*c', 16000000 + n + {i}, 'x')")).collect::<Vec<_>>();
    let hostile = [
        "INSERT INTO notes(body) SELECT count(*) FROM v5_0".to_owned(),
        format!("INSERT INTO notes(body) SELECT length(concat({})) FROM (SELECT 1 AS n)", columns.join(", ")),
    ];
    for (i, text) in hostile.iter().enumerate() {
        let start = Instant::now();
        let verdict = raw_verdict(&mut server, 61 + i as u128, 1, sql(text, vec![]));
        let (code, why) = verdict.unwrap_or_else(|| panic!("case {i}: accepted"));
        assert_eq!(code, "too_big", "case {i}: {why}");
        assert!(why.contains("memory"), "case {i}: {why}");
        assert!(start.elapsed() < Duration::from_secs(20), "case {i} took {:?}", start.elapsed());
    }
    // An honest client's own run of the same is bounded too (at twice the server's bound): a
    // planted view or trigger cannot make its writes hold gigabytes. Stopped, the write stays
    // queued, and the server decides.
    pull(&mut client, &server);
    for (i, text) in hostile.iter().enumerate() {
        let m = client.mutate(sql(text, vec![]), T0, 70 + i as u64).expect("queued");
        let local = m.local.expect_err("the client's run finished");
        // Its memory bound, or on a busy machine its CPU bound first: either way bounded (the
        // peak below says how much it held).
        let bounded = match local.code {
            RejectionCode::TooBig => local.message.contains("memory"),
            RejectionCode::TooExpensive => local.message.contains("CPU"),
            _ => false,
        };
        assert!(bounded, "case {i}: {local}");
    }
    let peak = peak_rss();
    assert!(peak < 800 << 20, "the process held {} MB at its peak", peak >> 20);
    // The document carries on.
    confirmed(&mut client, &mut server, "INSERT INTO notes(body) VALUES ('after')", 2);
}

/// One instruction may work through a whole value (a `printf`, a comparison, a `length()` of
/// 16 MB takes milliseconds), so a mutation well inside its instruction budget ran for 35 s
/// on the server, holding its document. The server bounds each mutation's CPU time too: past
/// it, the mutation is interrupted and rejected `too_expensive`.
#[test]
fn the_server_bounds_a_mutations_cpu_time() {
    let (mut server, mut client) = with_schema_and_cpu_bound(300);
    let slow = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 3000) \
                INSERT INTO notes(body) SELECT 'x' FROM c WHERE length(printf('%.*c', 16000000 + n, 'x')) < 0";
    let start = Instant::now();
    let verdict = raw_verdict(&mut server, 80, 1, sql(slow, vec![]));
    let took = start.elapsed();
    let (code, why) = verdict.expect("rejected");
    assert_eq!(code, "too_expensive", "{why}");
    assert!(why.contains("300 ms") && why.contains("CPU"), "{why}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // What runs within it is untouched, and the connection is not left interrupted.
    confirmed(&mut client, &mut server, "INSERT INTO notes(body) VALUES ('after')", 2);
}

/// A step ends once its mutations have spent one mutation's CPU time, as it ends at one
/// mutation's instructions: a queue of mutations that each stay inside both bounds but run
/// instructions that work through large values (4,096 in a step, 1 s each) held a step
/// thread, and the documents waiting for it, for an hour.
#[test]
fn a_step_ends_at_one_mutations_cpu_time() {
    let (mut server, _) = setup();
    let slow = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 8) \
                SELECT count(*) FROM c WHERE length(printf('%.*c', 16000000 + n, 'x')) < 0";
    let batch: Vec<_> = (0..40)
        .map(|_| Mutation { client_time_ms: T0, seed: 1, body: sql(slow, vec![]) }.encode().expect("encode"))
        .collect();
    server.receive(TimelineId([9; 16]), Lsn::FIRST, batch);
    let mut steps = Vec::new();
    while server.queued() > 0 {
        let start = Instant::now();
        let outcome = server.step(T0).expect("step").expect("a step");
        assert_eq!(outcome.rejected, 0, "each stays inside the bounds: {outcome:?}");
        steps.push((outcome.applied, start.elapsed()));
    }
    assert!(steps.len() > 1 && steps[0].0 < 40, "one step ran them all: {steps:?}");
    assert_eq!(steps.iter().map(|s| s.0).sum::<usize>(), 40);
    let longest = steps.iter().map(|s| s.1).max().expect("steps");
    assert!(longest < Duration::from_secs(3), "a step took {longest:?}: {steps:?}");
}

/// One client's queue of mutations that each run to the CPU bound does not hold up another's:
/// a mutation that arrives behind them runs in the next step or the one after, not after them all.
#[test]
fn a_queue_of_costly_mutations_does_not_hold_up_another_timeline() {
    // The honest timeline sorts before the costly one, and after it.
    for honest in [TimelineId([3; 16]), TimelineId([12; 16])] {
        costly_queue_then(honest);
    }
}

fn costly_queue_then(honest: TimelineId) {
    let (mut server, _) = with_schema_and_cpu_bound(150);
    let heavy = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 3000) \
                 SELECT sum(length(printf('%.*c', 16000000 - x, 'x'))) FROM c";
    let batch: Vec<_> = (0..8)
        .map(|_| Mutation { client_time_ms: T0, seed: 1, body: sql(heavy, vec![]) }.encode().expect("encode"))
        .collect();
    let attacker = TimelineId([9; 16]);
    server.receive(attacker, Lsn::FIRST, batch);
    // The first step has begun on them when the honest write arrives.
    server.step(T0).expect("step").expect("a step");
    let write = sql("INSERT INTO notes(body) VALUES ('honest')", vec![]);
    let m = Mutation { client_time_ms: T0, seed: 2, body: write }.encode().expect("encode");
    server.receive(honest, Lsn::FIRST, vec![m]);
    let mut steps = 0;
    while server.applied_lsn(honest).is_none() {
        server.step(T0).expect("step").expect("a step");
        steps += 1;
        assert!(steps <= 2, "the honest write waited {steps} steps behind the costly ones");
    }
    assert!(server.queued() > 0, "the costly ones were not all run first");
}

/// Clients that never acknowledge their rejections (hostile ones: each empty entry of a frame
/// is one) cannot grow a document with them: a timeline past `MAX_TIMELINE_REJECTIONS` has no
/// more mutations taken, nor does any timeline with one once the document is past
/// `MAX_DOC_REJECTIONS`; no rejection is deleted before its client acknowledged it; a client
/// that acknowledges goes on; and a replay gives the same pages. (At a size cap:
/// `rejections_of_many_timelines_never_wedge_a_document_at_its_size_cap`.)
#[test]
fn unacknowledged_rejections_hold_their_timeline_back_and_bound_the_document() {
    use pagesync::journal::Journal;
    use pagesync::server::{MAX_DOC_REJECTIONS, MAX_TIMELINE_REJECTIONS};
    use pagesync_tests::SharedJournal;
    let limits = StepLimits::default;
    let storage = SharedJournal::new(1);
    let mut server =
        ServerDocument::with_reducer(storage.boxed(), SqlReducer::default(), limits()).expect("server");
    let mut sent = std::collections::HashMap::new();
    let mut send = |server: &mut ServerDocument, tl: TimelineId, first: u64, entries: Vec<Vec<u8>>| {
        for (i, e) in entries.iter().enumerate() {
            sent.insert((tl, first + i as u64), e.clone());
        }
        let taken = server.receive(tl, Lsn::new(first).expect("lsn"), entries).accepted;
        drain(server, T0);
        taken
    };
    let owner = TimelineId([1; 16]);
    let write =
        |i: u64, text: &str| Mutation { client_time_ms: T0, seed: i, body: sql(text, vec![]) }.encode();
    send(&mut server, owner, 1, vec![write(1, "CREATE TABLE t(b BLOB)").expect("encode")]);
    // Nine rows, then a rejection of the owner's.
    let mut fills: Vec<_> =
        (2..11).map(|i| write(i, "INSERT INTO t VALUES (zeroblob(2000))").expect("encode")).collect();
    fills.push(write(11, "SELECT reject('no')").expect("encode"));
    send(&mut server, owner, 2, fills);
    let count = |server: &ServerDocument, sql: &str, tl: &TimelineId| -> i64 {
        let conn = server.database().conn();
        let mut stmt = conn.prepare(sql).expect("prepare");
        if stmt.parameter_count() == 1 {
            stmt.query_row([&tl.0[..]], |r| r.get(0)).expect("count")
        } else {
            stmt.query_row([], |r| r.get(0)).expect("count")
        }
    };
    let of_timeline = "SELECT count(*) FROM _pagesync_rejections WHERE timeline = ?1";
    assert_eq!(count(&server, of_timeline, &owner), 1, "the owner's rejection");
    // Twenty timelines, 400 empty entries each, in frames of 100.
    let hostile: Vec<TimelineId> = (0..20u8).map(|i| TimelineId([0x80 + i; 16])).collect();
    for _ in 0..4 {
        for tl in &hostile {
            let first = server.next_expected(*tl).get();
            send(&mut server, *tl, first, vec![Vec::new(); 100]);
        }
    }
    let total = count(&server, "SELECT count(*) FROM _pagesync_rejections", &owner) as usize;
    assert!(total <= MAX_DOC_REJECTIONS + MAX_TIMELINE_REJECTIONS, "{total} rejections kept, of 8,000 sent");
    for tl in &hostile {
        let held = count(&server, of_timeline, tl) as usize;
        assert!(held <= MAX_TIMELINE_REJECTIONS, "{held} for one timeline");
        // None deleted: every mutation taken of it has its rejection.
        let applied = server.applied_lsn(*tl).map_or(0, Lsn::get) as usize;
        assert_eq!(held, applied, "a rejection was deleted unacknowledged");
        // Held back: nothing more is taken.
        let next = server.next_expected(*tl).get();
        assert_eq!(send(&mut server, *tl, next, vec![Vec::new(); 10]), 0, "taken past its bound");
    }
    // An acknowledgement that deletes nothing (below the rows) lets no held timeline in.
    let sly = TimelineId([0x7f; 16]);
    let fine: Vec<_> = (1..=10).map(|i| write(i, "SELECT 1").expect("encode")).collect();
    assert_eq!(send(&mut server, sly, 1, fine), 10);
    send(&mut server, sly, 11, vec![Vec::new(); 100]);
    let next = server.next_expected(sly).get();
    assert_eq!(send(&mut server, sly, next, vec![Vec::new(); 10]), 0, "held back");
    server.forget_rejections(sly, Lsn::new(5).expect("lsn"));
    assert_eq!(send(&mut server, sly, next, vec![Vec::new(); 10]), 0, "let in by an empty acknowledgement");
    // The owner is held back too (one unacknowledged rejection, on a crowded document) until
    // it acknowledges it; then it writes as before.
    let rows = count(&server, "SELECT count(*) FROM t", &owner);
    let delete = || vec![write(12, "DELETE FROM t WHERE rowid = 1").expect("encode")];
    assert_eq!(send(&mut server, owner, 12, delete()), 0, "held back");
    server.forget_rejections(owner, Lsn::new(11).expect("lsn"));
    assert_eq!(send(&mut server, owner, 12, delete()), 1, "taken once acknowledged");
    assert_eq!(server.applied_lsn(owner), Lsn::new(12));
    assert_eq!(count(&server, "SELECT count(*) FROM t", &owner), rows - 1);
    // The same pages again from the same mutations.
    let mut replica =
        ServerDocument::with_reducer(memory_journal(9), SqlReducer::default(), limits()).expect("replica");
    for lsn in storage.range().iter().skip(1) {
        let header = pagesync::storage::decode(&storage.read(lsn).expect("entry")).expect("decode");
        let recorded: Vec<_> =
            header.applied.iter().map(|a| (*a, sent[&(a.timeline, a.lsn.get())].clone())).collect();
        replica.replay_step(&recorded, &header.forgotten, header.time_ms).expect("replay");
    }
    assert!(pages_of(replica.database()) == pages_of(server.database()), "the replay diverged");

    // An acknowledgement of part of a held timeline's rejections lets one more of its
    // mutations in; rejected, it is held again, and what was queued of it is dropped (its
    // client told): nothing is left queued that no step would take.
    let tl = hostile[0];
    server.take_dropped();
    server.forget_rejections(tl, Lsn::FIRST);
    let next = server.next_expected(tl);
    assert_eq!(server.receive(tl, next, vec![Vec::new(); 10]).accepted, 10, "an acknowledgement is due");
    drain(&mut server, T0);
    assert_eq!(server.queued(), 0, "a held queue stays");
    assert_eq!(server.take_dropped(), vec![tl]);
    assert_eq!(server.next_expected(tl), next.next(), "one was taken");

    // A reopen carries over what was queued and what was acknowledged; a held timeline's
    // queue goes at the next step, its client told.
    let owner_next = server.next_expected(owner);
    server.forget_rejections(tl, next);
    assert_eq!(server.receive(tl, next.next(), vec![Vec::new(); 3]).accepted, 3);
    let late = write(13, "DELETE FROM t WHERE rowid = 2").expect("encode");
    assert_eq!(server.receive(owner, owner_next, vec![late]).accepted, 1);
    let mut reopened =
        ServerDocument::with_reducer(storage.boxed(), SqlReducer::default(), limits()).expect("reopen");
    reopened.carry_over(&mut server);
    assert_eq!(reopened.queued(), 4, "what was queued came over");
    drain(&mut reopened, T0);
    assert_eq!(reopened.queued(), 0);
    assert_eq!(reopened.applied_lsn(owner), Some(owner_next), "the owner's write was applied");
    let after = count(&reopened, of_timeline, &tl) as usize;
    assert!(after <= MAX_TIMELINE_REJECTIONS, "{after}: the acknowledgement came over");
}

/// Rejections of 1 KiB from thousands of timelines (each a new client, one rejection each)
/// fill the room a document at its size cap keeps for pagesync's rows: the timelines that find
/// none wait (their clients told), and the document goes on: no step fails, and a client
/// whose rejections were acknowledged writes as before.
#[test]
fn rejections_of_many_timelines_never_wedge_a_document_at_its_size_cap() {
    let limits = StepLimits { max_doc_bytes: Some(1 << 20), ..StepLimits::default() };
    let mut server =
        ServerDocument::with_reducer(memory_journal(31), SqlReducer::default(), limits).expect("server");
    let write = |i: u64, text: &str| {
        Mutation { client_time_ms: T0, seed: i, body: sql(text, vec![]) }.encode().expect("encode")
    };
    // Steps until nothing is left that a step would take; none may fail.
    let settle = |server: &mut ServerDocument| {
        for _ in 0..10_000 {
            server.step(T0).expect("a step failed");
            if server.queued() == 0 {
                return;
            }
        }
        panic!("{} still queued", server.queued());
    };
    let owner = TimelineId([1; 16]);
    let mut owner_writes = vec![write(1, "CREATE TABLE t(b BLOB)")];
    owner_writes.extend((2..12).map(|i| write(i, "INSERT INTO t VALUES (zeroblob(200000))")));
    assert_eq!(server.receive(owner, Lsn::FIRST, owner_writes).accepted, 11);
    settle(&mut server);
    server.forget_rejections(owner, Lsn::new(11).expect("lsn"));
    let bad = "SELECT reject(replace(hex(zeroblob(500)), '0', 'x'))";
    let mut waited = 0;
    for i in 0..3_000u64 {
        let mut id = [0x40; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        server.receive(TimelineId(id), Lsn::FIRST, vec![write(i, bad)]);
        if i % 100 == 99 {
            settle(&mut server);
            waited += server.take_dropped().len();
        }
    }
    let kept: i64 = server
        .database()
        .conn()
        .query_row("SELECT count(*) FROM _pagesync_rejections", [], |r| r.get(0))
        .expect("count");
    assert!(waited > 0, "the room never ran out: {kept} rejections kept");
    // A timeline with a rejection in the table acknowledges it, on a quiet document: a step of
    // that alone deletes it, and a timeline held for want of room is let in again.
    let sybil = |i: u64| {
        let mut id = [0x40; 16];
        id[..8].copy_from_slice(&i.to_be_bytes());
        TimelineId(id)
    };
    let (recorded, starved): (Vec<u64>, Vec<u64>) =
        (0..3_000).partition(|i| server.applied_lsn(sybil(*i)).is_some());
    assert!(!recorded.is_empty() && !starved.is_empty());
    let starved = sybil(starved[0]);
    assert_eq!(server.receive(starved, Lsn::FIRST, vec![write(0, bad)]).accepted, 0, "held for want of room");
    server.forget_rejections(sybil(recorded[0]), Lsn::FIRST);
    assert!(server.forget_due(), "an acknowledgement that makes room is due on its own");
    let min = pagesync::server::NO_ROOM_MIN_MS;
    let freed = server.step(T0 + min).expect("step").expect("a step of the acknowledgement alone");
    assert_eq!((freed.applied, freed.forgotten), (0, 1));
    assert_eq!(server.receive(starved, Lsn::FIRST, vec![write(0, bad)]).accepted, 1, "let in again");
    settle(&mut server);
    assert_eq!(server.applied_lsn(starved), Some(Lsn::FIRST), "its rejection found room");
    // The room it took was the last: a new timeline finds none and is held; it is tried
    // again after `NO_ROOM_RETRY_MS` (room may come from the app's deletes too).
    server.take_dropped();
    let later = (0..200u8)
        .map(|k| TimelineId([0x41, k, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
        .find(|tl| {
            assert_eq!(server.receive(*tl, Lsn::FIRST, vec![write(0, bad)]).accepted, 1);
            settle(&mut server);
            server.take_dropped() == vec![*tl]
        })
        .expect("a new timeline held for want of room");
    let retry = pagesync::server::NO_ROOM_RETRY_MS;
    let at = |ms: i64| pagesync::history::Origin { received_ms: Some(T0 + min + ms), ..Default::default() };
    assert_eq!(server.receive_from(later, Lsn::FIRST, vec![write(0, bad)], &at(retry - 1)).accepted, 0);
    assert_eq!(server.receive_from(later, Lsn::FIRST, vec![write(0, bad)], &at(retry + 1)).accepted, 1);
    server.step(T0 + min + retry + 1).expect("the retry fails no step");
    // The owner goes on.
    let rows = |server: &ServerDocument| -> i64 {
        server.database().conn().query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count")
    };
    let before = rows(&server);
    let next = server.next_expected(owner);
    assert_eq!(server.receive(owner, next, vec![write(99, "DELETE FROM t WHERE rowid = 1")]).accepted, 1);
    settle(&mut server);
    assert_eq!(server.applied_lsn(owner), Some(next));
    assert_eq!(rows(&server), before - 1, "the owner's write was applied");
}

/// SQLite reads the whole schema again whenever a schema change is rolled back, outside any
/// budget (7 MB of schema made each tiny rejected `CREATE TABLE` cost the server 250 ms): the
/// schema's SQL is bounded, and a mutation that would grow it past the bound is `too_big`.
#[test]
fn the_schema_is_bounded() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let table = |i: usize| format!("CREATE TABLE s{i}(a CHECK (a != '{}'))", "x".repeat(900_000));
    assert_eq!(raw_verdict(&mut server, 50, 1, sql(&table(1), vec![])), None);
    assert_eq!(raw_verdict(&mut server, 51, 1, sql(&table(2), vec![])), None);
    let (code, why) = raw_verdict(&mut server, 52, 1, sql(&table(3), vec![])).expect("rejected");
    assert_eq!(code, "too_big", "{why}");
    assert!(why.contains("schema"), "{why}");
    // Below the bound, and what does not grow the schema, still apply.
    assert_eq!(raw_verdict(&mut server, 53, 1, sql("CREATE TABLE small(a)", vec![])), None);
    assert_eq!(raw_verdict(&mut server, 54, 1, sql("DROP TABLE s1", vec![])), None);
    assert_eq!(raw_verdict(&mut server, 55, 1, sql(&table(4), vec![])), None);
}

/// The authorizer sees only the old name of a renamed table: renaming a table to pagesync's
/// prefix (`_pagesync_once`, on a document older than that table) would forge pagesync's rows.
/// It is refused; other renames apply.
#[test]
fn a_table_cannot_be_renamed_into_pagesyncs_names() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let hostile = [
        "CREATE TABLE x(key TEXT PRIMARY KEY, applied_ms INT) WITHOUT ROWID; INSERT INTO x VALUES ('k', 1); \
         ALTER TABLE x RENAME TO _pagesync_once",
        "CREATE TABLE y(a); CREATE INDEX y_a ON y(a); ALTER TABLE y ReNaMe TO \"_pagesync_mine\"",
        // SQLite's names are alike in any case: this one would be read-only to everyone after.
        "CREATE TABLE w(a); ALTER TABLE \"w\" RENAME TO \"_PAGESYNC_Mine2\"",
    ];
    for (i, text) in hostile.iter().enumerate() {
        let (code, why) = raw_verdict(&mut server, 40 + i as u128, 1, sql(text, vec![])).expect("rejected");
        // Where `_pagesync_once` exists SQLite itself refuses the first, as a name taken.
        assert!(code == "refused" || (i == 0 && code == "error"), "{text}: {code} {why}");
        assert!(why.contains("_pagesync_"), "{why}");
    }
    let tables: i64 = server
        .database()
        .conn()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name IN ('x', 'y', 'y_a', 'w', '_pagesync_mine') \
             OR name LIKE '\\_pagesync\\_mine%' ESCAPE '\\'",
            [],
            |r| r.get(0),
        )
        .expect("schema");
    assert_eq!(tables, 0, "the refused mutations left nothing behind");
    confirmed(&mut client, &mut server, "CREATE TABLE z(a); ALTER TABLE z RENAME TO zz", 2);
}

/// A contentless FTS5 table's insert writes little itself: its index waits in memory until the
/// next savepoint or COMMIT. That write is the mutation's own, inside its bounds: near a
/// document's size limit it is rejected `doc_full`, where it once failed the step's COMMIT, with
/// no mutation to blame, at every retry (the document took no write again).
#[test]
fn an_fts5_index_write_counts_against_the_mutation_that_caused_it() {
    let limits = StepLimits { max_doc_bytes: Some(3 << 20), ..StepLimits::default() };
    let mut server =
        ServerDocument::with_reducer(memory_journal(1), SqlReducer::default(), limits).expect("server");
    let mut client = ClientDocument::open(memory_journal(2), memory_journal(3)).expect("client");
    schema(&mut client, &mut server);
    confirmed(&mut client, &mut server, "CREATE VIRTUAL TABLE ft USING fts5(x, content='')", 2);
    confirmed(&mut client, &mut server, "CREATE TABLE filler(b BLOB)", 3);
    confirmed(&mut client, &mut server, "INSERT INTO filler VALUES (zeroblob(2500000))", 4);
    // About 1 MB of distinct words, each a few bytes of index.
    let words = "INSERT INTO ft(rowid, x) SELECT 1, group_concat('w' || x, ' ') FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 120000) SELECT x FROM c)";
    let (code, message) = raw_verdict(&mut server, 60, 1, sql(words, vec![])).expect("rejected");
    assert_eq!(code, "doc_full", "{message}");
    // The document takes writes, the client's among them.
    confirmed(&mut client, &mut server, "INSERT INTO notes(body) VALUES ('after')", 5);
    assert!(integrity_ok(server.database()));
}

/// A client's own run of such a mutation fails inside the mutation too: the write stays
/// pending for the server to decide, and the replica goes on working (its COMMIT, and every
/// reopen that replays the pending write, once failed "database or disk is full" for good).
#[test]
fn a_replica_whose_fts5_index_write_fails_locally_goes_on_working() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    confirmed(&mut client, &mut server, "CREATE VIRTUAL TABLE ft USING fts5(x, content='')", 2);
    client.set_budget(Budget { max_added_bytes: 1 << 20, ..Budget::default() }).expect("budget");
    let words = "INSERT INTO ft(rowid, x) SELECT 1, group_concat('w' || x, ' ') FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000) SELECT x FROM c)";
    let m = client.mutate(sql(words, vec![]), T0, 3).expect("queued");
    let local = m.local.expect_err("over the local growth bound");
    assert_eq!(local.code, RejectionCode::TooBig, "{local}");
    confirmed(&mut client, &mut server, "INSERT INTO notes(body) VALUES ('next')", 4);
    let rows = client.query("SELECT count(*) FROM notes", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(1)]]);
}

/// A step that fails at its COMMIT with no mutation to blame, and not for I/O (here a deferred
/// foreign key, checked only at COMMIT), is not retried as it was forever: its first mutation
/// goes alone, and failing alone it is rejected; the others apply.
#[test]
fn a_step_that_cannot_commit_rejects_the_mutation_that_stops_it() {
    let (mut server, _client) = setup();
    let ddl = "CREATE TABLE parent(id INTEGER PRIMARY KEY); CREATE TABLE child(p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED); CREATE TABLE notes(body TEXT)";
    assert_eq!(raw_verdict(&mut server, 70, 1, sql(ddl, vec![])), None);
    // Foreign keys are the connection's setting, which app SQL may not change: set here, on
    // the server alone, as a stand-in for any check SQLite makes only at COMMIT.
    server.database().conn().execute_batch("PRAGMA foreign_keys = ON").expect("pragma");
    let tl = TimelineId(71u128.to_le_bytes());
    let bodies = [
        "INSERT INTO notes VALUES ('before')",
        "INSERT INTO child VALUES (42)",
        "INSERT INTO notes VALUES ('after')",
    ];
    let entries = bodies
        .iter()
        .map(|b| Mutation { client_time_ms: T0, seed: 1, body: sql(b, vec![]) }.encode().expect("encode"))
        .collect();
    server.receive(tl, Lsn::FIRST, entries);
    let mut rejections = Vec::new();
    for _ in 0..10 {
        match server.step(T0).expect("a step that commits") {
            Some(outcome) => rejections.extend(outcome.rejections),
            None => break,
        }
    }
    assert_eq!(server.queued(), 0, "nothing is retried forever");
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].lsn, Lsn::new(2).expect("2"));
    assert!(rejections[0].rejection.message.contains("FOREIGN KEY"), "{:?}", rejections[0].rejection);
    let notes: i64 =
        server.database().conn().query_row("SELECT count(*) FROM notes", [], |r| r.get(0)).expect("count");
    assert_eq!(notes, 2);
}

/// A client's own run of a mutation is bounded in CPU time too (`CLIENT_MUTATION_CPU`): a
/// table another writer trapped (a trigger whose every statement works through a large value
/// or table in one instruction) held an honest app's one-row write for 48 s on its client,
/// within the instruction budget. Stopped, the write is pending for the server to decide.
#[test]
fn a_clients_own_run_is_bounded_in_cpu_time() {
    let (mut server, mut client) = setup();
    schema(&mut client, &mut server);
    let trap = "CREATE TABLE h(x); CREATE TABLE sink(n); \
                CREATE TRIGGER trap AFTER INSERT ON h BEGIN \
                INSERT INTO sink WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 3000) \
                SELECT length(printf('%.*c', 16000000 + n, 'x')) FROM c; END";
    confirmed(&mut client, &mut server, trap, 2);
    let start = Instant::now();
    let m = client.mutate(sql("INSERT INTO h VALUES (1)", vec![]), T0, 3).expect("queued");
    let took = start.elapsed();
    let local = m.local.expect_err("stopped");
    assert_eq!(local.code, RejectionCode::TooExpensive, "{local}");
    assert!(local.message.contains("CPU time"), "{local}");
    assert!(took < pagesync::sandbox::CLIENT_MUTATION_CPU * 3, "took {took:?}");
    assert_eq!(client.state(m.lsn).expect("state"), MutationState::Pending);
    let rows = client.query("SELECT count(*) FROM notes", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(0)]]);
}

/// The functions pagesync stands in for (the costly ones it charges for, `random`,
/// `randomblob`) and its own `reject` can be used in a schema, as SQLite's built-ins can: a
/// CHECK, a generated column, a partial index, an index on an expression, a view, a DEFAULT,
/// a trigger. (They were not innocuous, so each such table refused every write.)
#[test]
fn the_functions_pagesync_provides_work_in_schemas_and_triggers() {
    let (mut server, mut client) = setup();
    for (i, ddl) in [
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT CHECK (name NOT LIKE '%bad%' AND name NOT GLOB '*evil*'), \
         tag TEXT DEFAULT (hex(randomblob(4))), r INTEGER DEFAULT (random()), \
         short TEXT AS (replace(trim(name, ' '), 'o', '0')), \
         j TEXT AS (json_patch('{\"a\":1}', '{\"b\":2}')))",
        "CREATE INDEX t_o ON t(instr(name, 'o'))",
        "CREATE INDEX t_a ON t(name) WHERE ltrim(name, 'x') LIKE 'a%'",
        "CREATE VIEW v AS SELECT rtrim(name, 'z') AS n, instr(name, 'o') AS at FROM t",
        "CREATE TRIGGER no_zed BEFORE INSERT ON t WHEN new.name LIKE 'z%' BEGIN SELECT reject('no names with z'); END",
    ]
    .iter()
    .enumerate()
    {
        confirmed(&mut client, &mut server, ddl, 1 + i as u64);
    }
    confirmed(&mut client, &mut server, "INSERT INTO t(name) VALUES ('  good one ')", 10);
    let rows = client.query("SELECT n, at FROM v", &[]).expect("the view reads").rows;
    assert_eq!(rows, vec![vec![Value::Text("  good one ".into()), Value::Integer(4)]]);
    let short = client.query("SELECT short, j FROM t", &[]).expect("query").rows;
    assert_eq!(short, vec![vec![Value::Text("g00d 0ne".into()), Value::Text("{\"a\":1,\"b\":2}".into())]]);
    // The CHECK and the trigger still hold: each write they refuse is rejected with its reason.
    for (i, (name, code, needle)) in
        [("bad apple", RejectionCode::Constraint, "CHECK"), ("zed", RejectionCode::Denied, "no names with z")]
            .into_iter()
            .enumerate()
    {
        let body = sql("INSERT INTO t(name) VALUES (?1)", vec![Value::Text(name.into())]);
        let m = client.mutate(body, T0, 20 + i as u64).expect("queued");
        push(&client, &mut server);
        drain(&mut server, T0);
        pull(&mut client, &server);
        match client.state(m.lsn).expect("state") {
            MutationState::Rejected(r) => {
                assert_eq!(r.code, code, "{name}: {}", r.message);
                assert!(r.message.contains(needle), "{name}: {}", r.message);
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    assert_eq!(pages_of(client.database()), pages_of(server.database()));
}

/// The math functions on the allow-list run the same on every replica, as SQLite's math
/// extension defines them (the native SQLite has none, the browser's has: pagesync brings its
/// own), and may be used in a schema; `soundex`, which only the native SQLite has, is refused.
#[test]
fn math_functions_are_the_same_everywhere() {
    let (mut server, mut client) = setup();
    let ddl = "CREATE TABLE m(k INTEGER PRIMARY KEY, v, CHECK (floor(k) = k))";
    confirmed(&mut client, &mut server, ddl, 1);
    let insert = "INSERT INTO m(v) VALUES (sqrt(2)), (sqrt(-1)), (floor(-1.5)), (ceil(1.2)), (ceiling(7)), \
                  (trunc(-2.7)), (mod(7.5, 2)), (mod(1, 0)), (pi()), (floor(' 2.5 ')), (ceil('x')), \
                  (sqrt(x'00')), (floor('12')), (sqrt(NULL))";
    confirmed(&mut client, &mut server, insert, 2);
    let got = client.query("SELECT v FROM m ORDER BY k", &[]).expect("query").rows;
    let want = [
        Value::Real(std::f64::consts::SQRT_2),
        Value::Null,
        Value::Real(-2.0),
        Value::Real(2.0),
        Value::Integer(7),
        Value::Real(-2.0),
        Value::Real(1.5),
        Value::Null,
        Value::Real(std::f64::consts::PI),
        Value::Real(2.0),
        Value::Null,
        Value::Null,
        Value::Integer(12),
        Value::Null,
    ];
    assert_eq!(got, want.into_iter().map(|v| vec![v]).collect::<Vec<_>>());
    let local = client.mutate(sql("INSERT INTO m(v) VALUES (soundex('pagesync'))", vec![]), T0, 3);
    assert!(matches!(local, Err(Error::Refused(ref why)) if why.contains("soundex")), "{local:?}");
}

/// `'localtime'` and `'utc'` read the host's time zone, which differs between replicas (a
/// server's is not a browser's): a mutation that reaches either fails, however it spells the
/// modifier, on the client and on the server, saying why (`error`, not `refused`: whether it
/// reaches local time depends on its data, so the client queues it and the server decides);
/// a query may still show local time.
#[test]
fn local_time_is_refused_in_mutations_and_shown_in_queries() {
    let (mut server, mut client) = setup();
    confirmed(&mut client, &mut server, "CREATE TABLE z(v)", 1);
    for (i, text) in [
        "INSERT INTO z VALUES (datetime(0, 'unixepoch', 'localtime'))",
        "INSERT INTO z VALUES (datetime('2020-01-01 00:00', 'UTC'))",
        "INSERT INTO z SELECT strftime('%H', 'now', 'local' || 'time')",
        "INSERT INTO z VALUES (unixepoch('now', 'LocalTime'))",
    ]
    .into_iter()
    .enumerate()
    {
        let local = client.mutate(sql(text, vec![]), T0, 10 + i as u64).expect("queued").local;
        let local = local.expect_err("it ran locally");
        assert_eq!(local.code, RejectionCode::Error, "{text}: {local}");
        assert!(local.message.contains("time zone"), "{text}: {local}");
        let (code, message) = raw_verdict(&mut server, 99, 1 + i as u64, sql(text, vec![]))
            .unwrap_or_else(|| panic!("{text}: the server applied it"));
        assert_eq!(code, "error", "{text}: {message}");
        assert!(message.contains("time zone"), "{text}: {message}");
    }
    // UTC needs no time zone; a local query shows local time, and the next mutation is held
    // to UTC again.
    confirmed(
        &mut client,
        &mut server,
        "INSERT INTO z VALUES (datetime('now')), (datetime(0, 'unixepoch'))",
        20,
    );
    let shown = client.query("SELECT datetime(v, 'localtime') FROM z", &[]).expect("a query may").rows;
    assert_eq!(shown.len(), 2);
    assert!(matches!(&shown[1][0], Value::Text(t) if t.starts_with("19")), "{shown:?}");
    let again = client.mutate(sql("INSERT INTO z VALUES (date('now', 'localtime'))", vec![]), T0, 21);
    assert!(again.expect("queued").local.is_err_and(|r| r.message.contains("time zone")));
}

/// SQLite answers `SQLITE_FULL` when an AUTOINCREMENT table has used its last rowid, as it
/// does at a page cap: said as what it is (`range`), not as a cap the document is far from.
#[test]
fn an_exhausted_autoincrement_is_said_as_that() {
    let (mut server, mut client) = setup();
    confirmed(&mut client, &mut server, "CREATE TABLE ai(id INTEGER PRIMARY KEY AUTOINCREMENT, x)", 1);
    confirmed(&mut client, &mut server, "INSERT INTO ai(x) VALUES (1)", 2);
    let last = format!("UPDATE sqlite_sequence SET seq = {} WHERE name = 'ai'", i64::MAX);
    confirmed(&mut client, &mut server, &last, 3);
    let m = client.mutate(sql("INSERT INTO ai(x) VALUES (2)", vec![]), T0, 4).expect("queued");
    let local = m.local.expect_err("the insert ran");
    assert_eq!(local.code, RejectionCode::Range, "{local}");
    assert!(local.message.contains("AUTOINCREMENT") && local.message.contains("ai"), "{local}");
    push(&client, &mut server);
    drain(&mut server, T0);
    pull(&mut client, &server);
    match client.state(m.lsn).expect("state") {
        MutationState::Rejected(r) => assert_eq!(r.code, RejectionCode::Range, "{r}"),
        other => panic!("{other:?}"),
    }
}

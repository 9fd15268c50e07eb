//! Reducers turn a mutation into changes to the database, the same way on every replica.
//!
//! The built-in [`SqlReducer`] runs the statements of a [`SqlMutation`]. An app can supply its
//! own [`Reducer`] with typed mutations (`enum Mutation { AddTodo { .. } }`) and write SQL for
//! each. Either way, `apply_mutation` runs it inside a SAVEPOINT, under the mutation's clock and
//! seed and the authorizer: an error rolls back that mutation alone.

use rusqlite::Connection;
use rusqlite::fallible_iterator::FallibleIterator;

use crate::db::Database;
use crate::error::{Error, sqlite_code};
use crate::mutation::{Mutation, SqlMutation};

/// Why a mutation was rejected; replicated to its client through `_pagesync_rejections`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// A short, stable name (`constraint`, `refused`, `malformed`, ...).
    pub code: String,
    /// The message a person can act on.
    pub message: String,
}

impl Rejection {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Rejection {
        Rejection { code: code.into(), message: message.into() }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Applies mutation bodies to a database. Must be deterministic: no clock, no randomness, no
/// I/O beyond the connection (the connection's `datetime('now')`, `random()` and
/// `randomblob()` are already deterministic).
pub trait Reducer: Send {
    fn apply(&mut self, conn: &Connection, body: &[u8]) -> Result<(), Rejection>;

    /// A key that makes this mutation apply at most once per document (see
    /// [`SqlMutation::once`]); `apply_mutation` keeps the keys in `_pagesync_once`.
    fn once_key(&self, body: &[u8]) -> Option<String> {
        let _ = body;
        None
    }
}

/// The built-in reducer: bodies are `SqlMutation`s.
#[derive(Debug, Default, Clone, Copy)]
pub struct SqlReducer;

impl Reducer for SqlReducer {
    fn apply(&mut self, conn: &Connection, body: &[u8]) -> Result<(), Rejection> {
        let m: SqlMutation = postcard::from_bytes(body)
            .map_err(|e| Rejection::new("malformed", format!("not a SQL mutation: {e}")))?;
        for st in &m.statements {
            run_statement(conn, &st.sql, &st.params)
                .map_err(|e| Rejection::new(sqlite_code(&e), e.to_string()))?;
        }
        Ok(())
    }

    fn once_key(&self, body: &[u8]) -> Option<String> {
        postcard::from_bytes::<SqlMutation>(body).ok()?.once
    }
}

/// Whether a mutation with `once` key `key` has applied to this database.
pub fn once_applied(conn: &Connection, key: &str) -> rusqlite::Result<bool> {
    if !crate::db::table_exists(conn, "_pagesync_once")? {
        return Ok(false);
    }
    conn.query_row("SELECT EXISTS(SELECT 1 FROM _pagesync_once WHERE key = ?1)", [key], |r| r.get(0))
}

/// Runs one statement with parameters, or, without parameters, every statement in `sql`.
/// Rows a statement returns are read and dropped.
fn run_statement(conn: &Connection, sql: &str, params: &[crate::mutation::Value]) -> rusqlite::Result<()> {
    if params.is_empty() {
        let mut batch = rusqlite::Batch::new(conn, sql);
        while let Some(mut stmt) = batch.next()? {
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
        }
        return Ok(());
    }
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// The keys of `once` mutations that have applied (migrations among them).
pub const ONCE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS _pagesync_once(key TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL) WITHOUT ROWID;";

/// Savepoint name for one mutation; `_pagesync_` names are refused to app SQL.
const SAVEPOINT: &str = "_pagesync_mutation";

/// Runs one encoded mutation in a SAVEPOINT inside the caller's transaction. `time_ms` is the
/// clock it sees (the server's clamped value, or the client's own). On rejection, the
/// mutation's changes are rolled back and the rest of the transaction stands. An `Err` is
/// either `TransactionLost` (the mutation's statement rolled back the whole transaction; the
/// caller restarts its batch without it) or an infrastructure failure (I/O): the caller must
/// abandon the transaction.
pub fn apply_mutation(
    db: &Database,
    reducer: &mut dyn Reducer,
    mutation: &Mutation,
    time_ms: i64,
) -> Result<Result<(), Rejection>, Error> {
    let conn = db.conn();
    conn.execute_batch(&format!("SAVEPOINT {SAVEPOINT}"))?;
    let once = reducer.once_key(&mutation.body);
    if let Some(key) = &once
        && once_applied(conn, key)?
    {
        conn.execute_batch(&format!("RELEASE {SAVEPOINT}"))?;
        return Ok(Ok(()));
    }
    let outcome = db.run_guarded(time_ms, mutation.seed, |c| reducer.apply(c, &mutation.body));
    let Err(mut rejection) = outcome else {
        if let Some(key) = &once {
            // Unguarded: the system table is ours. Created here for documents older than it.
            conn.execute_batch(ONCE_SCHEMA)?;
            conn.execute(
                "INSERT INTO _pagesync_once(key, applied_ms) VALUES (?1, ?2)",
                rusqlite::params![key, time_ms],
            )?;
        }
        conn.execute_batch(&format!("RELEASE {SAVEPOINT}"))?;
        return Ok(Ok(()));
    };
    if let Some(reason) = db.take_refusal() {
        rejection = Rejection::new("refused", reason);
    }
    if let Some(io) = db.store().take_last_error() {
        return Err(io.into());
    }
    if conn.is_autocommit() {
        return Err(Error::TransactionLost(rejection));
    }
    conn.execute_batch(&format!("ROLLBACK TO {SAVEPOINT}; RELEASE {SAVEPOINT}"))?;
    Ok(Err(rejection))
}

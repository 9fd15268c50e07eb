//! Reducers turn a mutation into changes to the database, the same way on every replica.
//!
//! The built-in [`SqlReducer`] runs the statements of a [`SqlMutation`](crate::SqlMutation). An app can supply its
//! own [`Reducer`] with typed mutations (`enum Mutation { AddTodo { .. } }`) and write SQL for
//! each. Either way, `apply_mutation` runs it inside a SAVEPOINT, under the mutation's clock and
//! seed and the authorizer: an error rolls back that mutation alone.

use rusqlite::Connection;
use rusqlite::fallible_iterator::FallibleIterator;

use crate::db::Database;
use crate::error::Error;
use crate::mutation::{Mutation, SqlMutationView};
use crate::mutators::{Call, Mutators};
use crate::store::StoreError;

/// Why a mutation was rejected, as a stable code. The string forms (`as_str`) are what the
/// replicated `_pagesync_rejections` table, the CLI and the JS API carry; they never change.
/// SQLite errors are classified by their result code, never by message text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionCode {
    /// The sandbox refused the SQL (a PRAGMA, a TEMP object, a function, a system table...).
    Refused,
    /// A constraint failed (CHECK, NOT NULL, UNIQUE, FOREIGN KEY, `RAISE(ABORT, ..)`).
    Constraint,
    /// The mutation ran out of its VM instruction budget.
    TooExpensive,
    /// Too large: the encoded mutation, a value, the bytes it adds, its temp files, or the
    /// pages one step may change.
    TooBig,
    /// The document reached the server's `--max-doc-bytes`.
    DocFull,
    /// The body did not decode.
    Malformed,
    /// A value had the wrong type (`SQLITE_MISMATCH`).
    Mismatch,
    /// A parameter index was out of range (`SQLITE_RANGE`).
    Range,
    /// Any other SQL error (syntax, no such table, ...).
    Error,
    /// The app's own check said no: a mutator (or any SQL) called `reject(message)`; the
    /// message is the app's.
    Denied,
    /// The caller's token does not allow it (raw SQL with a mutator-only token, a mutator
    /// outside its grant, another subject's call): the server never ran it.
    Forbidden,
    /// No mutator of that name (or not with those arguments) in the definitions in force.
    NoSuchMutator,
    /// A code this build does not know (a newer server's, or an app reducer's own).
    Other(String),
}

impl RejectionCode {
    pub fn as_str(&self) -> &str {
        match self {
            RejectionCode::Refused => "refused",
            RejectionCode::Constraint => "constraint",
            RejectionCode::TooExpensive => "too_expensive",
            RejectionCode::TooBig => "too_big",
            RejectionCode::DocFull => "doc_full",
            RejectionCode::Malformed => "malformed",
            RejectionCode::Mismatch => "mismatch",
            RejectionCode::Range => "range",
            RejectionCode::Error => "error",
            RejectionCode::Denied => "denied",
            RejectionCode::Forbidden => "forbidden",
            RejectionCode::NoSuchMutator => "no_such_mutator",
            RejectionCode::Other(s) => s,
        }
    }

    /// The code for a string form; unknown strings are kept as `Other`.
    pub fn parse(s: &str) -> RejectionCode {
        match s {
            "refused" => RejectionCode::Refused,
            "constraint" => RejectionCode::Constraint,
            "too_expensive" => RejectionCode::TooExpensive,
            "too_big" => RejectionCode::TooBig,
            "doc_full" => RejectionCode::DocFull,
            "malformed" => RejectionCode::Malformed,
            "mismatch" => RejectionCode::Mismatch,
            "range" => RejectionCode::Range,
            "error" => RejectionCode::Error,
            "denied" => RejectionCode::Denied,
            "forbidden" => RejectionCode::Forbidden,
            "no_such_mutator" => RejectionCode::NoSuchMutator,
            other => RejectionCode::Other(other.to_owned()),
        }
    }

    /// The code of a SQLite error, by its primary result code.
    pub fn of_sqlite(e: &rusqlite::Error) -> RejectionCode {
        use rusqlite::ffi::ErrorCode as C;
        let rusqlite::Error::SqliteFailure(f, _) = e else {
            return match e {
                rusqlite::Error::InvalidParameterCount(..) | rusqlite::Error::InvalidParameterName(_) => {
                    RejectionCode::Range
                }
                _ => RejectionCode::Error,
            };
        };
        match f.code {
            C::ConstraintViolation => RejectionCode::Constraint,
            C::AuthorizationForStatementDenied | C::ReadOnly => RejectionCode::Refused,
            C::TypeMismatch => RejectionCode::Mismatch,
            C::TooBig => RejectionCode::TooBig,
            C::DiskFull => RejectionCode::DocFull,
            C::OperationInterrupted => RejectionCode::TooExpensive,
            C::ParameterOutOfRange => RejectionCode::Range,
            _ => RejectionCode::Error,
        }
    }
}

impl std::fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a mutation was rejected; replicated to its client through `_pagesync_rejections`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectionCode,
    /// The message a person can act on.
    pub message: String,
}

/// The longest rejection message kept: 1 KiB, cut at a character boundary. A message is
/// replicated (`_pagesync_rejections`) and kept in the history, and `reject(message)` lets a
/// mutation choose it: without a bound, one small mutation could make a step too large.
pub const MAX_REJECTION_MESSAGE_BYTES: usize = 1 << 10;

impl Rejection {
    pub fn new(code: RejectionCode, message: impl Into<String>) -> Rejection {
        let mut message = message.into();
        if message.len() > MAX_REJECTION_MESSAGE_BYTES {
            let mut end = MAX_REJECTION_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Rejection { code, message }
    }

    /// A rejection for a SQLite error: its code and SQLite's message, said once.
    pub fn of_sqlite(e: &rusqlite::Error) -> Rejection {
        let message = match e {
            rusqlite::Error::SqliteFailure(_, Some(msg)) => msg.clone(),
            rusqlite::Error::SqliteFailure(f, None) => f.to_string(),
            other => other.to_string(),
        };
        // `reject(message)`: the app's own words.
        if let Some(app) = message.strip_prefix(REJECT_MARK) {
            return Rejection::new(RejectionCode::Denied, app);
        }
        Rejection::new(RejectionCode::of_sqlite(e), message)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// What the error of `reject(message)` starts with, so the rejection carries the app's words.
pub(crate) const REJECT_MARK: &str = "pagesync-reject: ";

/// Applies mutation bodies to a database. Must be deterministic: no clock, no randomness, no
/// I/O beyond the connection (the connection's `datetime('now')`, `random()` and
/// `randomblob()` are already deterministic).
pub trait Reducer: Send {
    fn apply(&mut self, conn: &Connection, body: &[u8]) -> Result<(), Rejection>;

    /// `apply`, knowing the mutation's time (ms since the Unix epoch, the clock the
    /// connection's `datetime('now')` reads). `apply_mutation` calls this one.
    fn apply_at(&mut self, conn: &Connection, body: &[u8], time_ms: i64) -> Result<(), Rejection> {
        let _ = time_ms;
        self.apply(conn, body)
    }

    /// The mutator definitions in force from now on (`None`: none). Reducers without
    /// mutators ignore them.
    fn set_mutators(&mut self, mutators: Option<std::sync::Arc<Mutators>>) {
        let _ = mutators;
    }

    /// A key that makes this mutation apply at most once per document (see
    /// [`SqlMutation::once`](crate::SqlMutation::once)); `apply_mutation` keeps the keys in `_pagesync_once`.
    fn once_key(&self, body: &[u8]) -> Option<String> {
        let _ = body;
        None
    }
}

/// The built-in reducer: bodies are `SqlMutation`s, or calls of the mutators in force
/// (`mutators::Call`).
#[derive(Debug, Default, Clone)]
pub struct SqlReducer {
    mutators: Option<std::sync::Arc<Mutators>>,
}

impl Reducer for SqlReducer {
    fn apply(&mut self, conn: &Connection, body: &[u8]) -> Result<(), Rejection> {
        self.apply_at(conn, body, 0)
    }

    fn apply_at(&mut self, conn: &Connection, body: &[u8], time_ms: i64) -> Result<(), Rejection> {
        if let Some(call) = Call::decode(body) {
            let call = call.map_err(|e| Rejection::new(RejectionCode::Malformed, e))?;
            return run_call(conn, self.mutators.as_deref(), &call, time_ms);
        }
        let m = SqlMutationView::decode(body)
            .map_err(|e| Rejection::new(RejectionCode::Malformed, format!("not a SQL mutation: {e}")))?;
        for st in &m.statements {
            run_statement(conn, st.sql, &st.params)?;
        }
        Ok(())
    }

    fn set_mutators(&mut self, mutators: Option<std::sync::Arc<Mutators>>) {
        self.mutators = mutators;
    }

    fn once_key(&self, body: &[u8]) -> Option<String> {
        SqlMutationView::decode(body).ok()?.once.map(str::to_owned)
    }
}

/// Whether a mutation with `once` key `key` has applied to this database.
pub fn once_applied(conn: &Connection, key: &str) -> rusqlite::Result<bool> {
    if !crate::db::table_exists(conn, "_pagesync_once")? {
        return Ok(false);
    }
    conn.query_row("SELECT EXISTS(SELECT 1 FROM _pagesync_once WHERE key = ?1)", [key], |r| r.get(0))
}

/// Runs a mutator's statements in order, binding its arguments, `:subject` and `:now` by name.
fn run_call(
    conn: &Connection,
    mutators: Option<&Mutators>,
    call: &Call,
    time_ms: i64,
) -> Result<(), Rejection> {
    let missing = |why: String| Rejection::new(RejectionCode::NoSuchMutator, why);
    let Some(set) = mutators else {
        return Err(missing(format!("no mutators are defined here: {} cannot run", call.name)));
    };
    let Some(m) = set.get(&call.name) else {
        return Err(missing(format!("no mutator {} (definitions {})", call.name, set.version())));
    };
    if m.args.len() != call.args.len() {
        let why = format!(
            "{}({}) takes {} arguments, not {}",
            m.name,
            m.args.join(", "),
            m.args.len(),
            call.args.len()
        );
        return Err(missing(why));
    }
    let subject = crate::mutation::Value::Text(call.subject.clone());
    let now = crate::mutation::Value::Integer(time_ms);
    for sql in &m.statements {
        refuse_unauthorized(sql)?;
        let run = || -> rusqlite::Result<()> {
            // App SQL: cached under keys of its own (see `run_statement`).
            let mut stmt = conn.prepare_cached(&format!("{sql}\n-- app"))?;
            for i in 1..=stmt.parameter_count() {
                let name = stmt.parameter_name(i).unwrap_or("?");
                let value = match name.strip_prefix([':', '@', '$']) {
                    Some("subject") => &subject,
                    Some("now") => &now,
                    Some(arg) if let Some(j) = m.args.iter().position(|a| a == arg) => &call.args[j],
                    _ => return Err(rusqlite::Error::InvalidParameterName(name.to_owned())),
                };
                stmt.raw_bind_parameter(i, value)?;
            }
            let mut rows = stmt.raw_query();
            while rows.next()?.is_some() {}
            Ok(())
        };
        run().map_err(|e| match e {
            rusqlite::Error::InvalidParameterName(p) => Rejection::new(
                RejectionCode::Range,
                format!("mutator {}: {p} is not one of its arguments (nor :subject, :now)", m.name),
            ),
            e => Rejection::of_sqlite(&e),
        })?;
    }
    Ok(())
}

/// Runs one statement with parameters, or, without parameters, every statement in `sql`.
/// Rows a statement returns are read and dropped.
fn run_statement(conn: &Connection, sql: &str, params: &[impl rusqlite::ToSql]) -> Result<(), Rejection> {
    // A count of parameters the statement does not take fails the same way on every replica:
    // refused, so a client says so at once rather than queueing it.
    let sqlite = |e: rusqlite::Error| match e {
        rusqlite::Error::InvalidParameterCount(given, takes) => Rejection::new(
            RejectionCode::Refused,
            format!("the statement takes {takes} parameters, and {given} were given"),
        ),
        e => Rejection::of_sqlite(&e),
    };
    if params.is_empty() {
        let mut batch = rusqlite::Batch::new(conn, sql);
        while let Some(mut stmt) = batch.next().map_err(sqlite)? {
            refuse_unauthorized(stmt.expanded_sql().as_deref().unwrap_or(""))?;
            let mut rows = stmt.query([]).map_err(sqlite)?;
            while rows.next().map_err(sqlite)?.is_some() {}
        }
        return Ok(());
    }
    // One statement with parameters: `sql` is that statement (the first, if there are more;
    // SQLite ignores the rest).
    refuse_unauthorized(sql)?;
    // The statement cache is the connection's, and a cached statement is not authorized
    // again: app SQL gets keys of its own, so it can never reuse a statement pagesync
    // prepared outside the sandbox (say, the one that writes `_pagesync_timelines`).
    let mut stmt = conn.prepare_cached(&format!("{sql}\n-- app")).map_err(sqlite)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params)).map_err(sqlite)?;
    while rows.next().map_err(sqlite)?.is_some() {}
    Ok(())
}

/// Refuses a statement the authorizer never sees (`sandbox::unauthorized_statement`).
fn refuse_unauthorized(sql: &str) -> Result<(), Rejection> {
    match crate::sandbox::unauthorized_statement(sql) {
        Some(why) => Err(Rejection::new(RejectionCode::Refused, why)),
        None => Ok(()),
    }
}

/// The keys of `once` mutations that have applied (migrations among them).
pub const ONCE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS _pagesync_once(key TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL) WITHOUT ROWID;";

/// On a store with a step cap (the server's), writes SQLite's unwritten pages into the
/// overlay once the step could be near the cap, so a step over it fails at the mutation that
/// caused it, never at COMMIT. Far from the cap (the common case) it does nothing.
fn flush_if_near_step_cap(db: &Database) -> Result<(), Rejection> {
    let near = {
        let store = db.store();
        store.max_overlay_pages().is_some_and(|max| store.overlay_pages() + crate::db::CACHE_PAGES >= max)
    };
    if !near {
        return Ok(());
    }
    db.conn().cache_flush().map_err(|e| Rejection::of_sqlite(&e))
}

/// FTS5 keeps what a mutation adds to its index in memory and writes it out (merging segments
/// as its settings say) at the next savepoint or at COMMIT. A savepoint opened and released
/// here, still inside the mutation's bounds (instructions, CPU time, memory, pages), makes it
/// write them now: the work is the mutation's, rejected with it when too large, never left to
/// the step's COMMIT, where no mutation could be blamed and the whole step would fail again
/// and again (or a replica fail to reopen). Not a `_pagesync_` name: those are refused to what
/// runs in the sandbox, and SQLite prepares a statement again after a schema change.
fn write_pending_indexes(conn: &Connection) -> Result<(), Rejection> {
    crate::db::run_cached(conn, "SAVEPOINT pagesync_index_flush")
        .and_then(|()| crate::db::run_cached(conn, "RELEASE pagesync_index_flush"))
        .map_err(|e| Rejection::of_sqlite(&e))
}

/// Savepoint name for one mutation; `_pagesync_` names are refused to app SQL.
/// The savepoint around each mutation, as statements prepared once per connection.
const SAVEPOINT: &str = "SAVEPOINT _pagesync_mutation";
const RELEASE: &str = "RELEASE _pagesync_mutation";
const ROLLBACK_TO: &str = "ROLLBACK TO _pagesync_mutation";

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
    // An I/O error that an earlier statement returned as a bare SQLite error is still kept:
    // it is not this mutation's, whose own is taken below.
    db.store().take_last_error();
    if mutation.is_fill() {
        db.clear_vm_steps(); // not the mutation before it's, for the step's budget
        return Ok(Ok(()));
    }
    let conn = db.conn();
    crate::db::run_cached(conn, SAVEPOINT)?;
    let once = reducer.once_key(&mutation.body);
    if let Some(key) = &once
        && once_applied(conn, key)?
    {
        crate::db::run_cached(conn, RELEASE)?;
        return Ok(Ok(()));
    }
    db.note_system_names(&mutation.body)?;
    let outcome = db.run_guarded(time_ms, mutation.seed, |c| {
        reducer.apply_at(c, &mutation.body, time_ms).and_then(|()| write_pending_indexes(c))
    });
    let outcome = outcome.and_then(|()| db.check_written()).and_then(|()| flush_if_near_step_cap(db));
    let Err(mut rejection) = outcome else {
        if let Some(key) = &once {
            // Unguarded: the system table is ours. Created here for documents older than it.
            conn.execute_batch(ONCE_SCHEMA)?;
            conn.execute(
                "INSERT INTO _pagesync_once(key, applied_ms) VALUES (?1, ?2)",
                rusqlite::params![key, time_ms],
            )?;
        }
        crate::db::run_cached(conn, RELEASE)?;
        return Ok(Ok(()));
    };
    // The store's lock is let go first: a verdict may read the database.
    let store_error = db.store().take_last_error();
    match store_error {
        Some(StoreError::StepFull { max_pages }) => {
            let _ = db.sandbox_verdict(&rejection.code);
            return Err(Error::StepFull { max_pages });
        }
        Some(io) => return Err(io.into()),
        None => {}
    }
    if let Some(verdict) = db.sandbox_verdict(&rejection.code) {
        rejection = verdict;
    }
    if conn.is_autocommit() {
        return Err(Error::TransactionLost(rejection));
    }
    crate::db::run_cached(conn, ROLLBACK_TO)?;
    crate::db::run_cached(conn, RELEASE)?;
    Ok(Err(rejection))
}

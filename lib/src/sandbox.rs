//! The mutation sandbox: what app SQL may do, and the budget it runs under.
//!
//! A mutation is untrusted code that runs on every replica, the server's included. So what it
//! may do is an **allow-list**, checked by SQLite's authorizer while the statement is prepared:
//! anything not named here (a PRAGMA, a function, a virtual-table module, or an action a later
//! SQLite adds) is refused. What is allowed depends only on the statement, the document's
//! pages, the mutation's clock and seed, never on the connection's history:
//! - reading and writing the document's own (main-schema) tables, creating, altering and
//!   dropping main tables, indexes, views and triggers;
//! - the functions in [`ALLOWED_FUNCTIONS`], whose results depend only on their arguments
//!   (`random()`/`randomblob()` draw from the mutation's seed, `datetime('now')` is the
//!   mutation's time, `last_insert_rowid()` starts at 0 in every mutation);
//! - the PRAGMAs in [`ALLOWED_PRAGMAS`] (introspection, and `user_version`/`application_id`,
//!   which live in the database header and so replicate).
//!
//! Refused, among everything else: every other PRAGMA (they change the connection, which is
//! shared by every writer of a document on the server), TEMP objects (they live outside the
//! replicated pages), ATTACH, `changes()`/`total_changes()` (connection history),
//! `sqlite_version()` (the browser build may differ), floating-point library functions
//! (`sin`, `exp`, `pow`, ...: libm differs between targets), ANALYZE (plans would depend on
//! when a connection loaded statistics), transaction control, VACUUM (which the authorizer
//! never sees: [`unauthorized_statement`]) and local time (`vfs/localtime.rs`).
//!
//! Queries ([`Mode::Query`]) get the same lists; `ClientDocument::query` refuses any statement
//! that writes (`sqlite3_stmt_readonly`).
//!
//! The budget ([`Budget`]) bounds what one mutation may cost, in units that are the same on
//! every replica: VM instructions (SQLite's progress handler), pages added to the document,
//! bytes of temp files (statement journals, sorter spills), and the size of one value.

use rusqlite::hooks::{AuthAction, AuthContext};

use crate::db::SYSTEM_PREFIX;
use crate::page::PAGE_SIZE;

/// What the statement being prepared is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// pagesync's own SQL: not checked.
    System,
    /// A mutation's SQL: the allow-list.
    Mutation,
    /// A local read-only query: the allow-list, without writes.
    Query,
}

/// What a PRAGMA on the allow-list may be given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PragmaArg {
    /// Nothing: a read of a fixed or replicated value (`PRAGMA page_count`).
    None,
    /// The name of a table or index to describe (`PRAGMA table_info(t)`).
    Name,
    /// A new value, stored in the database header, so it replicates (`PRAGMA user_version = 3`).
    Value,
}

/// PRAGMAs app SQL may run. Every other pragma is refused, read or set.
pub const ALLOWED_PRAGMAS: &[(&str, PragmaArg)] = &[
    ("application_id", PragmaArg::Value),
    ("user_version", PragmaArg::Value),
    ("foreign_key_check", PragmaArg::Name),
    ("foreign_key_list", PragmaArg::Name),
    ("index_info", PragmaArg::Name),
    ("index_list", PragmaArg::Name),
    ("index_xinfo", PragmaArg::Name),
    ("table_info", PragmaArg::Name),
    ("table_xinfo", PragmaArg::Name),
    ("table_list", PragmaArg::Name),
    ("freelist_count", PragmaArg::None),
    ("page_count", PragmaArg::None),
    ("page_size", PragmaArg::None),
    ("schema_version", PragmaArg::None),
];

/// PRAGMAs a local query may also run: checks that read the whole document in one VM
/// instruction, so a mutation's instruction budget could not bound them.
pub const QUERY_ONLY_PRAGMAS: &[&str] = &["integrity_check", "quick_check"];

/// Functions app SQL may call: SQLite's built-ins whose result depends only on their arguments
/// (and, for the date functions, on the mutation's clock), the aggregate and window functions,
/// and JSON. Every other function is refused.
pub const ALLOWED_FUNCTIONS: &[&str] = &[
    // Core scalar functions.
    "abs",
    "char",
    "coalesce",
    "concat",
    "concat_ws",
    "format",
    "glob",
    "hex",
    "if",
    "ifnull",
    "iif",
    "instr",
    "last_insert_rowid",
    "length",
    "like",
    "likelihood",
    "likely",
    "lower",
    "ltrim",
    "max",
    "min",
    "nullif",
    "octet_length",
    "printf",
    "quote",
    "random",
    "randomblob",
    "reject",
    "replace",
    "round",
    "rtrim",
    "sign",
    "substr",
    "substring",
    "trim",
    "typeof",
    "unhex",
    "unicode",
    "unistr",
    "unistr_quote",
    "unlikely",
    "upper",
    "zeroblob",
    // Exact arithmetic from the math extension (IEEE-exact on every target), pagesync's own
    // implementations (`Database::install_math`): the native SQLite has no math extension.
    "ceil",
    "ceiling",
    "floor",
    "mod",
    "sqrt",
    "trunc",
    "pi",
    // Dates: 'now' is the mutation's time.
    "date",
    "time",
    "datetime",
    "julianday",
    "unixepoch",
    "strftime",
    "timediff",
    "current_date",
    "current_time",
    "current_timestamp",
    // Aggregates.
    "avg",
    "count",
    "group_concat",
    "string_agg",
    "sum",
    "total",
    // Window functions.
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // JSON (`->` and `->>` are functions too).
    "->",
    "->>",
    "json_array_insert",
    "jsonb_array_insert",
    "json",
    "jsonb",
    "json_array",
    "jsonb_array",
    "json_array_length",
    "json_error_position",
    "json_extract",
    "jsonb_extract",
    "json_insert",
    "jsonb_insert",
    "json_object",
    "jsonb_object",
    "json_patch",
    "jsonb_patch",
    "json_pretty",
    "json_quote",
    "json_remove",
    "jsonb_remove",
    "json_replace",
    "jsonb_replace",
    "json_set",
    "jsonb_set",
    "json_type",
    "json_valid",
    "json_group_array",
    "jsonb_group_array",
    "json_group_object",
    "jsonb_group_object",
    // Full-text search (FTS5): ranking and markup of the document's own rows.
    "match",
    "bm25",
    "highlight",
    "snippet",
    // What SQLite's own `ALTER TABLE` (RENAME, RENAME COLUMN, DROP COLUMN) runs to rewrite the
    // schema's text. Internal: app SQL that names them gets "no such function".
    "sqlite_rename_column",
    "sqlite_rename_table",
    "sqlite_rename_test",
    "sqlite_rename_quotefix",
    "sqlite_drop_column",
];

/// Functions SQLite has that app SQL may not call, and why. Together with
/// `ALLOWED_FUNCTIONS` this names every function of the build
/// (`tests::every_function_is_classified`), so an upgrade that adds one fails a test until
/// someone decides.
pub const REFUSED_FUNCTIONS: &[(&str, &str)] = &[
    ("changes", HISTORY),
    ("total_changes", HISTORY),
    ("sqlite_version", BUILD),
    ("sqlite_source_id", BUILD),
    ("sqlite_compileoption_get", BUILD),
    ("sqlite_compileoption_used", BUILD),
    ("fts5_source_id", BUILD),
    ("load_extension", "extensions cannot be replayed on the server"),
    ("soundex", "the browser's SQLite has no soundex()"),
    ("sqlite_log", "it writes to the host's log"),
    ("fts3_tokenizer", "it hands out native pointers"),
    ("fts5", "it hands out native pointers"),
    ("fts5_get_locale", NOT_NEEDED),
    ("fts5_locale", NOT_NEEDED),
    ("fts5_insttoken", NOT_NEEDED),
    ("matchinfo", NOT_NEEDED),
    ("offsets", NOT_NEEDED),
    ("optimize", NOT_NEEDED),
    ("rtreecheck", NOT_NEEDED),
    ("rtreedepth", NOT_NEEDED),
    ("rtreenode", NOT_NEEDED),
    ("subtype", NOT_NEEDED),
    ("acos", LIBM),
    ("acosh", LIBM),
    ("asin", LIBM),
    ("asinh", LIBM),
    ("atan", LIBM),
    ("atan2", LIBM),
    ("atanh", LIBM),
    ("cos", LIBM),
    ("cosh", LIBM),
    ("degrees", LIBM),
    ("exp", LIBM),
    ("ln", LIBM),
    ("log", LIBM),
    ("log10", LIBM),
    ("log2", LIBM),
    ("pow", LIBM),
    ("power", LIBM),
    ("radians", LIBM),
    ("sin", LIBM),
    ("sinh", LIBM),
    ("tan", LIBM),
    ("tanh", LIBM),
];

const HISTORY: &str = "its value depends on the connection's history";
const BUILD: &str = "replicas may run different SQLite builds";
const NOT_NEEDED: &str = "an extension's internals, not on the allow-list";
const LIBM: &str = "floating-point library functions may round differently on other targets";

/// Table-valued functions (eponymous virtual tables) app SQL may read.
const ALLOWED_TABLE_FUNCTIONS: &[&str] = &["json_each", "json_tree"];

/// Virtual-table modules app SQL may create tables with: both keep their data in ordinary
/// main-schema tables, so it replicates.
pub const ALLOWED_VTAB_MODULES: &[&str] = &["fts5", "rtree"];

/// The budget of one mutation. Every limit is counted in units that are the same on every
/// replica, so the client's optimistic run and the server's reach the same verdict (for the
/// same SQLite build: a browser's SQLite may count instructions a little differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// SQLite VM instructions. Over it: `too_expensive`.
    pub max_vm_steps: u64,
    /// Bytes the mutation may add to the database (growth of the page count). Over it:
    /// `too_big`.
    pub max_added_bytes: u64,
    /// Bytes of temp files (statement journals, sort spills, temp b-trees) in use at once.
    /// Over it: `too_big`.
    pub max_temp_bytes: u64,
    /// The largest string or blob a statement may make (`SQLITE_LIMIT_LENGTH`). Over it:
    /// `too_big`.
    pub max_value_bytes: u32,
}

/// VM instructions per mutation by default: 10 million, about 130 ms of the slowest kind of
/// work (a recursive CTE) on one core here. A 100,000-row import in one statement runs about
/// 3 million (`tests/tests/sandbox.rs` prints it).
pub const DEFAULT_MAX_VM_STEPS: u64 = 10_000_000;
/// Bytes one mutation may add by default: 32 MiB, half of what one storage entry may hold.
pub const DEFAULT_MAX_ADDED_BYTES: u64 = 32 << 20;
/// Temp-file bytes by default: 64 MiB, a sort of a few hundred thousand rows.
pub const DEFAULT_MAX_TEMP_BYTES: u64 = 64 << 20;
/// The largest value by default: 16 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: u32 = 16 << 20;

/// Bytes one mutation may make SQLite hold at once, above what it held when the mutation
/// began (`db::Database::run_guarded`): 128 MiB, or eight of the largest values if that is
/// more. Over it: `too_big`. Counted by SQLite's allocator, so a mutation near it may pass on
/// one replica and not on another (what a connection has cached counts): the server decides.
/// A server runs at most one mutation per step thread, so all of them hold at most eight
/// times this (and their temp files, `DEFAULT_MAX_TEMP_BYTES` each): 1.5 GiB by default.
pub const MAX_MUTATION_MEMORY_BYTES: i64 = 128 << 20;

/// The SQL text a document's schema may hold (`sqlite_schema.sql`): 2 MiB, hundreds of tables.
/// SQLite reads the whole schema again whenever a schema change is rolled back (a rejected
/// mutation that created a table), outside any budget: with 7 MB of schema that cost 250 ms of
/// the server's CPU per tiny mutation. A mutation that would grow it past this: `too_big`.
pub const MAX_SCHEMA_BYTES: i64 = 2 << 20;

/// CPU time one mutation may take on the server by default: 1 s, about eight times what the
/// instruction budget allows the slowest kind of instruction. Past it: `too_expensive`. The
/// machine decides it (see `vfs::watchdog`): the server's verdict is the one replicas keep.
pub const DEFAULT_MAX_MUTATION_CPU: std::time::Duration = std::time::Duration::from_secs(1);

/// CPU time a client's own run of a mutation may take: twice the server's default. A statement
/// that works through a whole table in one instruction (`count(*)`, in a trigger another
/// writer planted) would otherwise hold an honest app's write for as long as its instruction
/// budget lasts, a minute and more. Stopped, the write stays pending and the server decides;
/// twice the server's bound, so what the server completes a client rarely stops (when it does,
/// the client takes the server's pages). Native clients where a thread's CPU clock can be read
/// (Linux, Android, FreeBSD); not in the browser.
pub const CLIENT_MUTATION_CPU: std::time::Duration = std::time::Duration::from_secs(2);

/// A client's bound on one mutation's memory, in times the server's
/// (`MAX_MUTATION_MEMORY_BYTES`): a trigger someone planted cannot make an honest app's write
/// hold gigabytes, and what the server completes a client rarely stops (stopped, the write
/// stays pending and the server decides, as with `CLIENT_MUTATION_CPU`). Native clients and the
/// browser alike.
pub const CLIENT_MEMORY_TIMES: u32 = 2;

/// How many VM instructions pass between two calls of the progress handler. Small enough that
/// an over-budget mutation stops within a millisecond of its budget, large enough that the
/// handler costs nothing measurable.
pub const PROGRESS_INTERVAL_OPS: i32 = 10_000;

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_vm_steps: DEFAULT_MAX_VM_STEPS,
            max_added_bytes: DEFAULT_MAX_ADDED_BYTES,
            max_temp_bytes: DEFAULT_MAX_TEMP_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl Budget {
    /// No limits at all: only for measuring what the budget costs, never for app SQL.
    pub const UNLIMITED: Budget = Budget {
        max_vm_steps: u64::MAX,
        max_added_bytes: u64::MAX,
        max_temp_bytes: u64::MAX,
        max_value_bytes: i32::MAX as u32,
    };

    /// The pages a mutation may add.
    pub fn max_added_pages(&self) -> u32 {
        u32::try_from(self.max_added_bytes / PAGE_SIZE as u64).unwrap_or(u32::MAX)
    }
}

fn named(list: &[&str], name: &str) -> bool {
    list.iter().any(|n| n.eq_ignore_ascii_case(name))
}

fn is_system(name: &str) -> bool {
    name.len() >= SYSTEM_PREFIX.len() && name[..SYSTEM_PREFIX.len()].eq_ignore_ascii_case(SYSTEM_PREFIX)
}

fn is_main(db: Option<&str>) -> bool {
    db.is_none_or(|d| d.eq_ignore_ascii_case("main"))
}

/// What SQLite's own `ALTER TABLE` does besides the main schema: it reads and rewrites the temp
/// schema's text (`sqlite_temp_master`), which is empty here since app SQL cannot create TEMP
/// objects. Allowed only after an `ALTER TABLE` was (`db.rs`).
pub fn alter_bookkeeping(ctx: &AuthContext<'_>) -> bool {
    let temp_schema = |t: &str| t.eq_ignore_ascii_case("sqlite_temp_master");
    ctx.database_name.is_some_and(|d| d.eq_ignore_ascii_case("temp"))
        && match ctx.action {
            AuthAction::Read { table_name, .. } | AuthAction::Update { table_name, .. } => {
                temp_schema(table_name)
            }
            _ => false,
        }
}

/// Why app SQL in `mode` may not do what `ctx` describes, or `None` if it may.
pub fn refusal(mode: Mode, ctx: &AuthContext<'_>) -> Option<String> {
    use AuthAction as A;
    if mode == Mode::System {
        return None;
    }
    let db = ctx.database_name;
    // A query's writes are refused after preparing (`stmt.readonly()`, in `ClientDocument::
    // query`), not here: a virtual table (R*Tree) prepares its own write statements when a
    // query first reads it, and never runs them for a read.
    let write = |what: &str| -> Option<String> {
        if !is_main(db) {
            return Some(format!("{what}: only the document's own (main) schema replicates"));
        }
        None
    };
    // A table's schema is where the action names it: for ALTER TABLE, its first argument (the
    // last is the column a DROP COLUMN drops).
    let table = |table_name: &str, schema: Option<&str>| -> Option<String> {
        if is_system(table_name) {
            return Some(format!("{table_name} is maintained by pagesync and read-only to apps"));
        }
        (!is_main(schema))
            .then(|| format!("writing {table_name}: only the document's own (main) schema replicates"))
    };
    match ctx.action {
        A::Select | A::Recursive => None,
        A::Read { table_name, .. } => read(db, table_name),
        A::Function { function_name } => function(function_name),
        // `PRAGMA temp.user_version = 1` would set the connection's TEMP database.
        A::Pragma { pragma_name, .. } if db.is_some() && !is_main(db) => Some(format!(
            "PRAGMA {}.{pragma_name}: only the document's own (main) schema replicates",
            db.unwrap_or_default()
        )),
        A::Pragma { pragma_name, pragma_value } => pragma(mode, pragma_name, pragma_value),
        // pagesync's names are its own, for every kind of object (a view or an index named
        // like a table pagesync adds later would collide with it).
        A::CreateIndex { index_name: name, .. }
        | A::CreateTrigger { trigger_name: name, .. }
        | A::CreateView { view_name: name }
            if is_system(name) =>
        {
            Some(format!("{name}: names starting with {SYSTEM_PREFIX} are reserved for pagesync"))
        }
        A::Insert { table_name }
        | A::Update { table_name, .. }
        | A::Delete { table_name }
        | A::CreateTable { table_name }
        | A::DropTable { table_name }
        | A::CreateIndex { table_name, .. }
        | A::DropIndex { table_name, .. }
        | A::CreateTrigger { table_name, .. }
        | A::DropTrigger { table_name, .. } => table(table_name, db),
        A::AlterTable { database_name, table_name } => table(table_name, Some(database_name)),
        A::CreateView { view_name } | A::DropView { view_name } => write(&format!("view {view_name}")),
        A::CreateVtable { table_name, module_name } | A::DropVtable { table_name, module_name } => {
            if !named(ALLOWED_VTAB_MODULES, module_name) {
                return Some(format!(
                    "virtual table {table_name} USING {module_name}: only {ALLOWED_VTAB_MODULES:?} replicate"
                ));
            }
            write(&format!("virtual table {table_name}"))
        }
        A::Reindex { .. } => write("REINDEX"),
        A::CreateTempIndex { .. }
        | A::CreateTempTable { .. }
        | A::CreateTempTrigger { .. }
        | A::CreateTempView { .. }
        | A::DropTempIndex { .. }
        | A::DropTempTable { .. }
        | A::DropTempTrigger { .. }
        | A::DropTempView { .. } => {
            Some("TEMP objects live outside the replicated pages: create them in the main schema".into())
        }
        A::Attach { .. } | A::Detach { .. } => {
            Some("ATTACH/DETACH: a mutation sees only its document".into())
        }
        A::Analyze { .. } => {
            Some("ANALYZE: query plans would depend on when each replica loaded the statistics".into())
        }
        A::Transaction { .. } => {
            Some("BEGIN/COMMIT/ROLLBACK: each mutation already runs in its own transaction".into())
        }
        A::Savepoint { savepoint_name, .. } if is_system(savepoint_name) => {
            Some(format!("savepoint {savepoint_name}: names starting with {SYSTEM_PREFIX} are reserved"))
        }
        // A query's SAVEPOINT passes `readonly()` (transaction control counts as reading) and
        // would leave the replica's connection inside a transaction: every write after it
        // failed to begin.
        A::Savepoint { .. } if mode == Mode::Query => {
            Some("SAVEPOINT/RELEASE: a query may not open or close a transaction".into())
        }
        A::Savepoint { .. } => write("SAVEPOINT"),
        _ => Some("this statement is not on pagesync's allow-list for app SQL".into()),
    }
}

/// Eponymous virtual tables that exist in every schema without being created, and that read
/// (or write) something other than the document's rows: connection state, raw pages, or the
/// compiled program. `tests::every_module_is_classified` fails when a SQLite upgrade adds one
/// that is neither here nor allowed.
pub const REFUSED_TABLE_FUNCTIONS: &[&str] =
    &["bytecode", "dbstat", "sqlite_dbdata", "sqlite_dbpage", "sqlite_dbptr", "sqlite_stmt", "tables_used"];

/// Virtual-table modules app SQL may not use (they are compiled in, but keep data outside the
/// document's rows, or are superseded by FTS5).
pub const REFUSED_VTAB_MODULES: &[&str] =
    &["fts3", "fts3tokenize", "fts4", "fts4aux", "fts5vocab", "rtree_i32", "pragma_module_list"];

/// Why app SQL may not run the statement `sql` begins with, for statements SQLite never shows
/// the authorizer: VACUUM (and `VACUUM INTO`, which writes a file of the asker's choosing). The
/// server compacts documents itself; every mutation runs inside a transaction, where SQLite
/// could not vacuum anyway. Called on each statement as it is prepared.
pub fn unauthorized_statement(sql: &str) -> Option<String> {
    first_keyword(sql)
        .eq_ignore_ascii_case("VACUUM")
        .then(|| "VACUUM: the server compacts documents; app SQL may not (nor VACUUM INTO a file)".into())
}

/// Refuses app SQL that holds no statement: only whitespace, comments and `;`. Run, it would
/// do nothing, yet it would go up as a mutation and be reported applied; a caller (a CLI
/// `exec` of a line commented out, say) is told instead.
pub fn require_statement(sql: &str) -> crate::Result<()> {
    if skip_blank(sql, true).is_empty() {
        return Err(crate::Error::Refused(
            "the SQL holds no statement (only whitespace, comments or `;`): nothing to run".into(),
        ));
    }
    Ok(())
}

/// The first word of `sql` after whitespace and comments (`-- ...` to the line's end,
/// `/* ... */`), as SQLite's tokenizer skips them.
fn first_keyword(sql: &str) -> &str {
    let sql = skip_blank(sql, false);
    let end = sql.find(|c: char| !c.is_ascii_alphanumeric() && c != '_').unwrap_or(sql.len());
    &sql[..end]
}

/// `sql` from its first token on: whitespace and comments skipped as SQLite's tokenizer skips
/// them (an unterminated `/*` runs to the end), and empty statements (`;`) too if asked.
fn skip_blank(sql: &str, semicolons: bool) -> &str {
    // SQLite reads a statement's text up to its first NUL.
    let mut sql = sql.split('\0').next().unwrap_or_default();
    loop {
        sql = sql.trim_start_matches(|c: char| c.is_whitespace() || (semicolons && c == ';'));
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(rest) = sql.strip_prefix("/*") {
            sql = rest.split_once("*/").map_or("", |(_, after)| after);
        } else {
            return sql;
        }
    }
}

fn read(db: Option<&str>, table: &str) -> Option<String> {
    if named(REFUSED_TABLE_FUNCTIONS, table) {
        return Some(format!("{table}: it reads the connection or raw pages, not the document's rows"));
    }
    if is_main(db) {
        if let Some(pragma) = table.strip_prefix("pragma_") {
            return ALLOWED_PRAGMAS
                .iter()
                .all(|(p, _)| !p.eq_ignore_ascii_case(pragma))
                .then(|| format!("{table}: PRAGMA {pragma} is not on pagesync's allow-list"));
        }
        return None;
    }
    if named(ALLOWED_TABLE_FUNCTIONS, table) {
        return None;
    }
    Some(format!("reading {}.{table}: only the document's own (main) schema replicates", db.unwrap_or("?")))
}

fn function(name: &str) -> Option<String> {
    if named(ALLOWED_FUNCTIONS, name) {
        return None;
    }
    let why = REFUSED_FUNCTIONS
        .iter()
        .find(|(f, _)| f.eq_ignore_ascii_case(name))
        .map_or("it is not on pagesync's allow-list of deterministic functions", |(_, why)| why);
    Some(format!("{name}(): {why}"))
}

fn pragma(mode: Mode, name: &str, value: Option<&str>) -> Option<String> {
    if mode == Mode::Query && named(QUERY_ONLY_PRAGMAS, name) {
        return None;
    }
    let Some((_, arg)) = ALLOWED_PRAGMAS.iter().find(|(p, _)| p.eq_ignore_ascii_case(name)) else {
        return Some(format!(
            "PRAGMA {name}: pragmas change the connection, which every writer shares; only {:?} are allowed",
            ALLOWED_PRAGMAS.iter().map(|(p, _)| *p).collect::<Vec<_>>()
        ));
    };
    match (arg, value) {
        (PragmaArg::None, Some(_)) => Some(format!("PRAGMA {name} = ...: pagesync fixes this setting")),
        (PragmaArg::Value, Some(_)) if mode == Mode::Query => {
            Some(format!("PRAGMA {name} = ...: a query is read-only; use a mutation to write"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Vec<String> {
        let conn = rusqlite::Connection::open_in_memory().expect("memory database");
        let mut stmt = conn.prepare(sql).expect("prepare");
        stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
    }

    /// A SQLite upgrade that adds a function fails here until it is put on one list or the
    /// other.
    #[test]
    fn every_function_is_classified() {
        for f in names("SELECT DISTINCT name FROM pragma_function_list") {
            let allowed = named(ALLOWED_FUNCTIONS, &f);
            let refused = REFUSED_FUNCTIONS.iter().any(|(r, _)| r.eq_ignore_ascii_case(&f));
            assert!(
                allowed != refused,
                "{f}() is on {} of the lists",
                if allowed { "both" } else { "neither" }
            );
        }
    }

    #[test]
    fn vacuum_is_refused_however_it_is_spelled() {
        for sql in ["VACUUM", "vacuum main", " /* a */ -- b\n\tVacuum INTO 'x'", "VACUUM;", "/*x*/VACUUM"] {
            assert!(unauthorized_statement(sql).is_some(), "{sql:?} passed");
        }
        for sql in ["SELECT 'VACUUM'", "INSERT INTO vacuum VALUES (1)", "vacuums", "-- VACUUM\nSELECT 1", ""]
        {
            assert_eq!(unauthorized_statement(sql), None, "{sql:?} refused");
        }
    }

    #[test]
    fn sql_of_comments_and_semicolons_alone_holds_no_statement() {
        let nothing = [
            "",
            " ;\n; ",
            "-- a line commented out",
            "/* all */ ; -- of it\n",
            "/* open; SELECT 1",
            "\0SELECT 1",
        ];
        for sql in nothing {
            assert!(require_statement(sql).is_err(), "{sql:?} passed");
        }
        for sql in
            ["SELECT 1", "; -- x\n INSERT INTO t VALUES (1)", "/**/x", "'-- a string'", "-- c\nDELETE FROM t"]
        {
            assert!(require_statement(sql).is_ok(), "{sql:?} refused");
        }
    }

    #[test]
    fn every_module_is_classified() {
        for m in names("SELECT name FROM pragma_module_list") {
            let lists = [
                ALLOWED_VTAB_MODULES,
                REFUSED_VTAB_MODULES,
                REFUSED_TABLE_FUNCTIONS,
                ALLOWED_TABLE_FUNCTIONS,
            ];
            let n = lists.iter().filter(|l| named(l, &m)).count();
            assert_eq!(n, 1, "module {m} is on {n} lists");
        }
    }
}

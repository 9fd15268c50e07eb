//! `Database`: one SQLite connection over one `PageStore`, set up for deterministic replay.
//!
//! - `random()` and `randomblob(n)` are replaced by functions drawing from a SplitMix64 stream
//!   seeded per mutation; `datetime('now')` and friends read the clock the reducer sets (the VFS
//!   `xCurrentTime`).
//! - App SQL runs in the sandbox (`crate::sandbox`): while a mutation or a query runs, the
//!   authorizer allows only what is on the allow-list, the progress handler counts the
//!   mutation's VM instructions against its budget, `max_page_count` caps what it may add,
//!   and the VFS caps its temp files. The reason for a refusal or a stop is kept, so the
//!   rejection says what was refused and why, with a typed code.
//! - The connection runs in SQLite's defensive mode, with `SQLITE_LIMIT_*` bounds on what one
//!   statement may build, and no ATTACH.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::page::PAGE_SIZE;
use crate::reducer::{Rejection, RejectionCode};
use crate::sandbox::{Budget, Mode, PROGRESS_INTERVAL_OPS};
use crate::store::{PageStore, StoreError};
use crate::vfs::{Registration, TempBudget};

/// Prefix of the tables pagesync owns inside every replicated database.
pub const SYSTEM_PREFIX: &str = "_pagesync_";

/// SQLite's page cache per connection, in KiB (SQLite's default, made explicit: the server's
/// step cap counts on at most this much unwritten change in the cache).
const CACHE_KIB: usize = 2_000;

/// The most pages SQLite's cache can hold unwritten: `CACHE_KIB` over the page size, with room
/// to spare.
pub(crate) const CACHE_PAGES: usize = CACHE_KIB * 1024 / PAGE_SIZE + 16;

/// Pages past the document's cap that pagesync's own rows (applied LSNs, rejections) may use:
/// 6 MiB, room for `server::MAX_DOC_REJECTIONS` rejections of the longest message (1 KiB, a
/// row of about 4.6 KiB with its overflow page) and some 250 more (new timelines add one each
/// past that bound; once they fill it, a rejection waits for room). With 256 KiB, one client's
/// 256 unacknowledged rejections of 1 KiB filled it, and no other client's rejection had room.
const SYSTEM_SLACK_PAGES: u32 = 1_536;

/// Of `SYSTEM_SLACK_PAGES`, the pages rejections may not use: room for the deletes of
/// acknowledged rejections (a delete can split a page) and for the applied LSNs of new
/// timelines (about 6,000 of them; rows that are never deleted, so thousands of new timelines
/// on a document at its cap can fill it, and new timelines then wait for room).
pub(crate) const SYSTEM_RESERVE_PAGES: u32 = 64;

/// Limits on what one statement may build, whoever wrote it (`sqlite3_limit`); the length of a
/// value comes from the budget. Each is far above what an app's statement needs.
const STATEMENT_LIMITS: &[(Limit, i32)] = &[
    // VACUUM attaches one database of its own; app SQL may attach none (the authorizer).
    (Limit::SQLITE_LIMIT_ATTACHED, 1),
    (Limit::SQLITE_LIMIT_SQL_LENGTH, 1 << 20),
    (Limit::SQLITE_LIMIT_COLUMN, 2_000),
    (Limit::SQLITE_LIMIT_EXPR_DEPTH, 1_000),
    (Limit::SQLITE_LIMIT_COMPOUND_SELECT, 500),
    (Limit::SQLITE_LIMIT_VDBE_OP, 250_000),
    (Limit::SQLITE_LIMIT_FUNCTION_ARG, 127),
    (Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 50_000),
    (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 32_766),
    (Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 100),
    (Limit::SQLITE_LIMIT_WORKER_THREADS, 0),
];

/// Built-in functions (name, arguments) one call of which may cost far more than one VM
/// instruction: a pattern match, a search or a replace compares its first two arguments at up
/// to every pair of positions. With values of 16 MiB and a 50,000-byte pattern, one `LIKE` ran
/// for 555 s on the server, holding its document, inside a budget of 10 million instructions.
/// Each call is charged its first two arguments' lengths multiplied (so many byte pairs to an
/// instruction) before it runs, and runs on `Database::costly`, so its result is the built-in's.
/// `trim(X, Y)` compares each end character of X with each of Y's (40,000 by 40,000 bytes: 2 s
/// in one call); a JSON merge patch looks each of the patch's keys up among the target's (two
/// objects of 40,000 keys: 11.5 s).
const COSTLY: &[(&str, i32, u64)] = &[
    ("like", 2, BYTE_PAIRS_PER_STEP),
    ("like", 3, BYTE_PAIRS_PER_STEP),
    ("glob", 2, BYTE_PAIRS_PER_STEP),
    ("instr", 2, BYTE_PAIRS_PER_STEP),
    ("replace", 3, BYTE_PAIRS_PER_STEP),
    ("trim", 2, BYTE_PAIRS_PER_STEP),
    ("ltrim", 2, BYTE_PAIRS_PER_STEP),
    ("rtrim", 2, BYTE_PAIRS_PER_STEP),
    ("json_patch", 2, JSON_BYTE_PAIRS_PER_STEP),
    ("jsonb_patch", 2, JSON_BYTE_PAIRS_PER_STEP),
];

/// What SQLite's `sqlite3_value_numeric_type` makes of a value for the math functions: a
/// number as it is, text that is wholly a decimal number (spaces around it allowed) as that
/// number, anything else (a blob, other text, NULL) `None`.
fn numeric(v: rusqlite::types::ValueRef<'_>) -> Option<rusqlite::types::Value> {
    use rusqlite::types::{Value as V, ValueRef as R};
    match v {
        R::Integer(i) => Some(V::Integer(i)),
        R::Real(x) => Some(V::Real(x)),
        R::Text(t) => {
            let text = std::str::from_utf8(t).ok()?.trim_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
            // Digits, a sign, a point, an exponent: not Rust's `inf`, `NaN` or `0x10`.
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) {
                return None;
            }
            match text.parse::<i64>() {
                Ok(i) => Some(V::Integer(i)),
                Err(_) => text.parse::<f64>().ok().map(V::Real),
            }
        }
        R::Blob(_) | R::Null => None,
    }
}

fn as_f64(v: &rusqlite::types::Value) -> f64 {
    match *v {
        rusqlite::types::Value::Integer(i) => i as f64,
        rusqlite::types::Value::Real(x) => x,
        _ => f64::NAN,
    }
}

/// How many byte comparisons cost one VM instruction: about what the slowest kind of
/// instruction takes (13 ns), at about 1.4 ns a comparison here.
const BYTE_PAIRS_PER_STEP: u64 = 8;

/// The subtype SQLite's JSON functions give JSON text (`'J'`).
const JSON_SUBTYPE: std::ffi::c_uint = 74;

/// A merge patch compares keys, not bytes: about 7 ns for each pair of entries (of 10 bytes or
/// so) here, so one instruction for every 128 pairs of bytes.
const JSON_BYTE_PAIRS_PER_STEP: u64 = 128;

/// What a metered mutation may leave SQLite holding when it ends (mostly its cached statements'
/// compiled programs) before the connection's statement cache is emptied.
#[cfg(not(target_arch = "wasm32"))]
const RETAINED_STATEMENT_BYTES: i64 = 8 << 20;

/// A seeded SplitMix64 stream: small, fast, and the same on every target.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What the sandbox's callbacks share with the database: the mode, the instruction budget,
/// and why the last guarded run was stopped.
#[derive(Debug, Default)]
struct SandboxState {
    /// A `Mode` as its discriminant (`mode_of`).
    mode: AtomicU8,
    /// The running mutation's budget of VM instructions.
    max_steps: AtomicU64,
    /// Progress-handler calls in the running mutation (each is `PROGRESS_INTERVAL_OPS` steps).
    ticks: AtomicU64,
    exhausted: AtomicBool,
    refusal: Mutex<Option<String>>,
    /// The running mutation wrote a row whose rowid is the largest there is (`MAX_ROWID`).
    wrote_max_rowid: AtomicBool,
    /// The running mutation spent its CPU time (`Database::set_cpu_limit`).
    cpu_exceeded: AtomicBool,
    /// An allocation of the running mutation was refused (`vfs::meter`).
    memory_exceeded: AtomicBool,
    /// The running mutation or query was allowed an `ALTER TABLE` (`sandbox::alter_bookkeeping`).
    altering: AtomicBool,
    /// The running mutation was allowed a statement that may grow the schema.
    schema_grew: AtomicBool,
    /// The running mutation renamed a table (`ALTER TABLE ... RENAME TO`).
    renamed_table: AtomicBool,
}

/// After a row with this rowid, SQLite picks the rowids of later inserts at random from its
/// own generator, which the seed of a mutation does not reach: they would differ between the
/// client's run and the server's. A mutation that writes it is refused, so no table holds it.
const MAX_ROWID: i64 = i64::MAX;

impl SandboxState {
    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::Relaxed) {
            m if m == Mode::Mutation as u8 => Mode::Mutation,
            m if m == Mode::Query as u8 => Mode::Query,
            _ => Mode::System,
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// Charges a mutation `steps` VM instructions' worth of work done in one (`COSTLY`):
    /// `false` once that takes it to its budget.
    fn charge(&self, steps: u64) -> bool {
        if self.mode() != Mode::Mutation {
            return true;
        }
        let ticks = steps / PROGRESS_INTERVAL_OPS as u64;
        let total = self.ticks.fetch_add(ticks, Ordering::Relaxed).saturating_add(ticks);
        if total.saturating_mul(PROGRESS_INTERVAL_OPS as u64) >= self.max_steps.load(Ordering::Relaxed) {
            self.exhausted.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The progress handler: `true` stops the statement once the mutation's instructions
    /// reach its budget.
    fn tick(&self) -> bool {
        if self.mode() != Mode::Mutation {
            return false;
        }
        let ticks = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if ticks.saturating_mul(PROGRESS_INTERVAL_OPS as u64) >= self.max_steps.load(Ordering::Relaxed) {
            self.exhausted.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// One connection over one page store. Field order matters: the connection drops before the
/// VFS it uses.
pub struct Database {
    conn: Connection,
    /// An empty in-memory connection that evaluates the built-in functions whose one call may
    /// cost far more than one VM instruction (`COSTLY`), once the mutation has paid for them.
    costly: Arc<Mutex<Connection>>,
    _vfs: Registration,
    store: Arc<Mutex<PageStore>>,
    clock_ms: Arc<AtomicI64>,
    rng: Arc<Mutex<Rng>>,
    sandbox: Arc<SandboxState>,
    temp: Arc<TempBudget>,
    budget: Budget,
    /// The document's size cap in pages (the server's `--max-doc-bytes`), if any.
    max_doc_pages: Option<u32>,
    /// The `max_page_count` in force, so it is set only when it changes.
    page_cap: Cell<u32>,
    /// CPU time one mutation may take (`set_cpu_limit`), if bounded.
    cpu_limit: Option<std::time::Duration>,
    /// How many times `MAX_MUTATION_MEMORY_BYTES` a mutation may make SQLite hold
    /// (`meter_memory`); 0: unbounded.
    metered: u32,
    /// The schema's objects named with `SYSTEM_PREFIX` before the running mutation, if it may
    /// rename a table (`note_system_names`).
    system_names: std::cell::RefCell<Option<Vec<String>>>,
}

/// What a connection keeps in memory for speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnMemory {
    /// SQLite's lookaside allocator off, about 120 KiB less per connection: a server keeps
    /// thousands of documents open.
    Lean,
    /// SQLite's default lookaside: a client holds few replicas, and a statement on one
    /// allocates its small objects from it instead of `malloc` (a point lookup runs a few
    /// percent faster).
    Fast,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database").field("vfs", &self._vfs.name()).finish()
    }
}

impl Database {
    // On wasm32 a journal may hold browser handles, so the store is not `Send`; there is one
    // thread there, and the `Arc` only shares the store with the VFS registration.
    #[cfg_attr(target_arch = "wasm32", allow(clippy::arc_with_non_send_sync))]
    pub fn open(store: PageStore, memory: ConnMemory) -> Result<Database> {
        // Before SQLite starts, if it has not: the bound on a mutation's memory.
        #[cfg(not(target_arch = "wasm32"))]
        crate::vfs::meter::install();
        let budget = Budget::default();
        let store = Arc::new(Mutex::new(store));
        let clock_ms = Arc::new(AtomicI64::new(0));
        let temp = Arc::new(TempBudget::new(budget.max_temp_bytes));
        let vfs = Registration::register(store.clone(), clock_ms.clone(), temp.clone()).map_err(|rc| {
            Error::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rc), None))
        })?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags_and_vfs("main.db", flags, vfs.name())?;
        if memory == ConnMemory::Lean {
            crate::vfs::disable_lookaside(&conn);
        }
        let costly = Connection::open_with_flags_and_vfs(":memory:", flags, vfs.name())?;
        crate::vfs::disable_lookaside(&costly);
        let mut db = Database {
            conn,
            costly: Arc::new(Mutex::new(costly)),
            _vfs: vfs,
            store,
            clock_ms,
            rng: Arc::new(Mutex::new(Rng(0))),
            sandbox: Arc::default(),
            temp,
            budget,
            max_doc_pages: None,
            page_cap: Cell::new(0),
            cpu_limit: None,
            metered: 0,
            system_names: std::cell::RefCell::new(None),
        };
        db.configure()?;
        Ok(db)
    }

    fn configure(&mut self) -> Result<()> {
        // Takes effect only on an empty database; then asserted below for existing ones.
        self.conn.execute_batch(&format!(
            "PRAGMA page_size = 4096; PRAGMA journal_mode = MEMORY; PRAGMA cache_size = -{CACHE_KIB};"
        ))?;
        if self.store().journal().reads_from_memory() {
            // A replica's journal is mapped: SQLite reads its pages in place there (`xFetch`),
            // not copied into its cache. Any size turns that on; ours is SQLite's largest.
            self.conn.execute_batch("PRAGMA mmap_size = 2147418112;")?;
        }
        let page_size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        if page_size != PAGE_SIZE as i64 {
            return Err(Error::PageSize { found: page_size });
        }
        use rusqlite::config::DbConfig as C;
        self.conn.set_db_config(C::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        self.conn.set_db_config(C::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)?;
        let costly = self.costly.clone();
        for (limit, value) in STATEMENT_LIMITS {
            self.conn.set_limit(*limit, *value)?;
            costly.lock().expect("BUG: lock poisoned").set_limit(*limit, *value)?;
        }
        self.set_budget(self.budget)?;
        self.install_functions()?;
        let sandbox = self.sandbox.clone();
        let handle = crate::vfs::DbHandle::of(&self.conn);
        self.conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            let mode = sandbox.mode();
            // FTS5 reads `PRAGMA data_version` from inside a running statement to see whether
            // its caches are stale: that one read is allowed there, and only there (app SQL
            // is prepared between statements).
            let vtab_bookkeeping = matches!(
                ctx.action,
                rusqlite::hooks::AuthAction::Pragma { pragma_name, pragma_value: None }
                    if pragma_name.eq_ignore_ascii_case("data_version")
            );
            if vtab_bookkeeping && mode != Mode::System && crate::vfs::statement_running(handle) {
                return Authorization::Allow;
            }
            // An ALTER TABLE rewrites the temp schema's text too (always empty here: app SQL
            // cannot create TEMP objects): allowed once an ALTER was, for the rest of the run.
            if sandbox.altering.load(Ordering::Relaxed) && crate::sandbox::alter_bookkeeping(&ctx) {
                return Authorization::Allow;
            }
            match crate::sandbox::refusal(mode, &ctx) {
                None => {
                    // What the mutation did that `check_written` looks at afterwards.
                    use rusqlite::hooks::AuthAction as A;
                    let flag = match ctx.action {
                        A::AlterTable { .. } => {
                            sandbox.altering.store(true, Ordering::Relaxed);
                            Some(&sandbox.schema_grew)
                        }
                        A::CreateTable { .. }
                        | A::CreateIndex { .. }
                        | A::CreateTrigger { .. }
                        | A::CreateView { .. }
                        | A::CreateVtable { .. } => Some(&sandbox.schema_grew),
                        A::Function { function_name }
                            if function_name.eq_ignore_ascii_case("sqlite_rename_table") =>
                        {
                            Some(&sandbox.renamed_table)
                        }
                        _ => None,
                    };
                    if let Some(flag) = flag {
                        flag.store(true, Ordering::Relaxed);
                    }
                    Authorization::Allow
                }
                Some(reason) => {
                    *sandbox.refusal.lock().expect("BUG: lock poisoned") = Some(reason);
                    Authorization::Deny
                }
            }
        }))?;
        let sandbox = self.sandbox.clone();
        self.conn.progress_handler(PROGRESS_INTERVAL_OPS, Some(move || sandbox.tick()))?;
        let sandbox = self.sandbox.clone();
        // Inserts and updates: a document that held the rowid before this rule may delete it.
        self.conn.update_hook(Some(
            move |action: rusqlite::hooks::Action, _: &str, _: &str, rowid: i64| {
                let writes = !matches!(action, rusqlite::hooks::Action::SQLITE_DELETE);
                if writes && rowid == MAX_ROWID && sandbox.mode() == Mode::Mutation {
                    sandbox.wrote_max_rowid.store(true, Ordering::Relaxed);
                }
            },
        ))?;
        Ok(())
    }

    /// Refuses the mutation that just ran if it wrote a row with rowid `MAX_ROWID`, or grew the
    /// schema past `MAX_SCHEMA_BYTES`.
    pub fn check_written(&self) -> std::result::Result<(), Rejection> {
        // It ran to its end: a bound that fired as it ended does not label a later rejection.
        self.sandbox.cpu_exceeded.store(false, Ordering::Relaxed);
        self.sandbox.memory_exceeded.store(false, Ordering::Relaxed);
        if self.sandbox.wrote_max_rowid.swap(false, Ordering::Relaxed) {
            let why = format!(
                "a rowid of {MAX_ROWID} is refused: after it SQLite picks rowids at random, differently on every replica"
            );
            return Err(Rejection::new(RejectionCode::Refused, why));
        }
        let before = self.system_names.take();
        // The authorizer sees only a renamed table's old name: a table renamed to pagesync's
        // prefix (`_pagesync_once`, on a document older than it) would forge its rows.
        if self.sandbox.renamed_table.swap(false, Ordering::Relaxed)
            && before.is_none_or(|b| self.names_with_system_prefix().map_or(true, |now| now != b))
        {
            let why = format!(
                "a table may not be renamed to a name starting with {SYSTEM_PREFIX}: those are pagesync's"
            );
            return Err(Rejection::new(RejectionCode::Refused, why));
        }
        if self.sandbox.schema_grew.swap(false, Ordering::Relaxed) {
            let max = crate::sandbox::MAX_SCHEMA_BYTES;
            let size: i64 = self
                .conn
                .query_row("SELECT coalesce(sum(length(CAST(sql AS BLOB))), 0) FROM sqlite_schema", [], |r| {
                    r.get(0)
                })
                .map_err(|e| Rejection::of_sqlite(&e))?;
            if size > max {
                let why = format!("the schema would hold {size} bytes of SQL, more than {max}");
                return Err(Rejection::new(RejectionCode::TooBig, why));
            }
        }
        Ok(())
    }

    /// Sets the budget every later mutation runs under. `Budget::UNLIMITED` also removes the
    /// progress handler (for measuring what the budget costs).
    pub fn set_budget(&mut self, budget: Budget) -> Result<()> {
        if budget.max_vm_steps == u64::MAX {
            self.conn.progress_handler(0, None::<fn() -> bool>)?;
        } else if self.budget.max_vm_steps == u64::MAX {
            let sandbox = self.sandbox.clone();
            self.conn.progress_handler(PROGRESS_INTERVAL_OPS, Some(move || sandbox.tick()))?;
        }
        self.budget = budget;
        self.temp.set_max(budget.max_temp_bytes);
        let value_bytes = i32::try_from(budget.max_value_bytes).unwrap_or(i32::MAX);
        self.conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, value_bytes)?;
        self.costly.lock().expect("BUG: lock poisoned").set_limit(Limit::SQLITE_LIMIT_LENGTH, value_bytes)?;
        Ok(())
    }

    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Before a mutation that may rename a table (its text says `rename`): notes the schema's
    /// objects named with `SYSTEM_PREFIX`, which `check_written` compares after it.
    pub fn note_system_names(&self, body: &[u8]) -> Result<()> {
        // The SIMD search for an `r` first: this runs before every mutation, every replay.
        let may_rename = memchr::memchr2_iter(b'r', b'R', body)
            .any(|i| body[i..].get(..6).is_some_and(|w| w.eq_ignore_ascii_case(b"rename")));
        let names = if may_rename { Some(self.names_with_system_prefix()?) } else { None };
        self.system_names.replace(names);
        Ok(())
    }

    fn names_with_system_prefix(&self) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT type || ' ' || name || ' ' || tbl_name FROM sqlite_schema \
             WHERE substr(name, 1, {n}) = '{SYSTEM_PREFIX}' COLLATE NOCASE \
             OR substr(tbl_name, 1, {n}) = '{SYSTEM_PREFIX}' COLLATE NOCASE ORDER BY 1",
            n = SYSTEM_PREFIX.len()
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let names = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(names)
    }

    /// Bounds the CPU time of every later mutation (`None`: unbounded): past it, the mutation
    /// is interrupted and rejected `too_expensive` (`vfs::watchdog`). The machine decides the
    /// verdict: the server's is what every replica keeps; a client's (`CLIENT_MUTATION_CPU`)
    /// only ends its own optimistic run.
    pub fn set_cpu_limit(&mut self, limit: Option<std::time::Duration>) {
        self.cpu_limit = limit;
    }

    /// Bounds what every later mutation makes SQLite hold (`memory_bound`; `vfs::meter`) at
    /// `times` the server's bound (0: unbounded): past it, the mutation is stopped `too_big`.
    /// What a mutation allocates depends a little on what the connection has cached, so the
    /// server's verdict is the one kept (like `set_cpu_limit`); a client's bound is
    /// `CLIENT_MEMORY_TIMES` the server's, so a planted trigger cannot exhaust an honest app's
    /// memory, and what the server completes a client rarely stops.
    pub fn meter_memory(&mut self, times: u32) {
        self.metered = times;
    }

    /// Bytes one mutation may make SQLite hold above what it held before (`vfs::meter`):
    /// `MAX_MUTATION_MEMORY_BYTES`, or eight of the largest values if that is more, times
    /// `meter_memory`'s.
    fn memory_bound(&self) -> i64 {
        let values = i64::from(self.budget.max_value_bytes).saturating_mul(8);
        values.max(crate::sandbox::MAX_MUTATION_MEMORY_BYTES).saturating_mul(i64::from(self.metered.max(1)))
    }

    /// Caps the database at `max_pages` (`None`: no cap). No mutation can lift it: every
    /// mutation runs with `max_page_count` at or below it, set outside the sandbox.
    pub fn set_max_doc_pages(&mut self, max_pages: Option<u32>) {
        self.max_doc_pages = max_pages;
    }

    fn install_functions(&self) -> Result<()> {
        // Innocuous, as the built-ins they stand for are: with `TRUSTED_SCHEMA` off, SQLite
        // refuses any other function in a CHECK, an index, a generated column, a view or a
        // trigger ("unsafe use of LIKE()"), which made a table with `CHECK (x NOT LIKE ...)`
        // unwritable and `reject()` unusable in the triggers it is for.
        let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_INNOCUOUS;
        // One call of these takes time in proportion to its first two arguments' lengths
        // multiplied, not one VM instruction: a mutation pays for it before it runs.
        for &(name, args, pairs_per_step) in COSTLY {
            let (sandbox, costly) = (self.sandbox.clone(), self.costly.clone());
            let sql = format!(
                "SELECT {name}({})",
                (1..=args).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
            );
            // `json_patch` returns JSON text: with SQLite's JSON subtype, as the built-in does,
            // so `json_object('k', json_patch(...))` nests an object, not a string.
            let json_text = name == "json_patch";
            let mut deterministic = flags | FunctionFlags::SQLITE_DETERMINISTIC;
            if json_text {
                deterministic |= FunctionFlags::SQLITE_RESULT_SUBTYPE;
            }
            self.conn.create_scalar_function(name, args, deterministic, move |ctx| {
                let len = |i: usize| match ctx.get_raw(i) {
                    rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => b.len() as u64,
                    rusqlite::types::ValueRef::Null => 0,
                    _ => 24, // a number as text
                };
                let pairs = len(0).saturating_add(1).saturating_mul(len(1).saturating_add(1));
                if !sandbox.charge(pairs / pairs_per_step) {
                    let why = format!(
                        "{name}() over {} and {} bytes is past the mutation's budget",
                        len(0),
                        len(1)
                    );
                    return Err(rusqlite::Error::UserFunctionError(why.into()));
                }
                let costly = costly.lock().expect("BUG: lock poisoned");
                let mut stmt = costly.prepare_cached(&sql)?;
                let values = (0..ctx.len()).map(|i| rusqlite::types::ToSqlOutput::Borrowed(ctx.get_raw(i)));
                let value = stmt
                    .query_row(rusqlite::params_from_iter(values), |r| r.get::<_, rusqlite::types::Value>(0))
                    // Without its message: SQLite keeps a function's error code only when none
                    // is set after it, and the code says what it was (`too_big`, not `error`).
                    .map_err(|e| match e {
                        rusqlite::Error::SqliteFailure(code, _) => rusqlite::Error::SqliteFailure(code, None),
                        e => e,
                    })?;
                let subtype =
                    (json_text && matches!(value, rusqlite::types::Value::Text(_))).then_some(JSON_SUBTYPE);
                Ok((value, subtype))
            })?;
        }
        let rng = self.rng.clone();
        self.conn.create_scalar_function("random", 0, flags, move |_| {
            Ok(rng.lock().expect("BUG: lock poisoned").next_u64() as i64)
        })?;
        // `reject(message)`: the mutation is rejected with code `denied` and the app's message.
        self.conn.create_scalar_function(
            "reject",
            1,
            flags | FunctionFlags::SQLITE_DETERMINISTIC,
            |ctx| {
                // Only as much as a rejection keeps is copied.
                let message = match ctx.get_raw(0) {
                    rusqlite::types::ValueRef::Text(t) => {
                        let cut = &t[..t.len().min(crate::reducer::MAX_REJECTION_MESSAGE_BYTES)];
                        String::from_utf8_lossy(cut).into_owned()
                    }
                    _ => "rejected".to_owned(),
                };
                let why = format!("{}{message}", crate::reducer::REJECT_MARK);
                Err::<i64, _>(rusqlite::Error::UserFunctionError(why.into()))
            },
        )?;
        let rng = self.rng.clone();
        self.conn.create_scalar_function("randomblob", 1, flags, move |ctx| {
            let n = ctx.get::<i64>(0).unwrap_or(1).clamp(1, crate::mutation::MAX_MUTATION_BYTES as i64);
            let mut rng = rng.lock().expect("BUG: lock poisoned");
            let mut out = Vec::with_capacity(n as usize + 8);
            while out.len() < n as usize {
                out.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
            out.truncate(n as usize);
            Ok(out)
        })?;
        self.install_math()
    }

    /// The exact functions of SQLite's math extension (`ceil`, `ceiling`, `floor`, `trunc`,
    /// `sqrt`, `mod`, `pi`), as SQLite defines them, in Rust: the native build of SQLite has
    /// no math extension and the browser's has, so without these a mutation using one ran in
    /// the browser and failed on the server. Each is IEEE-exact, so every target agrees.
    fn install_math(&self) -> Result<()> {
        use rusqlite::types::Value as V;
        let flags = FunctionFlags::SQLITE_UTF8
            | FunctionFlags::SQLITE_INNOCUOUS
            | FunctionFlags::SQLITE_DETERMINISTIC;
        // An integer stays itself; a real is rounded; anything else is NULL.
        let ceil = f64::ceil as fn(f64) -> f64;
        for (name, round) in [("ceil", ceil), ("ceiling", ceil), ("floor", f64::floor), ("trunc", f64::trunc)]
        {
            self.conn.create_scalar_function(name, 1, flags, move |ctx| {
                Ok(match numeric(ctx.get_raw(0)) {
                    Some(V::Real(x)) => V::Real(round(x)),
                    other => other.unwrap_or(V::Null),
                })
            })?;
        }
        // NaN (the root of a negative, a remainder by zero) is NULL, as SQLite makes it.
        let real = |x: f64| if x.is_nan() { V::Null } else { V::Real(x) };
        self.conn.create_scalar_function("sqrt", 1, flags, move |ctx| {
            Ok(numeric(ctx.get_raw(0)).map_or(V::Null, |x| real(as_f64(&x).sqrt())))
        })?;
        self.conn.create_scalar_function("mod", 2, flags, move |ctx| {
            Ok(match (numeric(ctx.get_raw(0)), numeric(ctx.get_raw(1))) {
                (Some(x), Some(y)) => real(as_f64(&x) % as_f64(&y)),
                _ => V::Null,
            })
        })?;
        self.conn.create_scalar_function("pi", 0, flags, |_| Ok(std::f64::consts::PI))?;
        Ok(())
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn store(&self) -> MutexGuard<'_, PageStore> {
        self.store.lock().expect("BUG: page store lock poisoned")
    }

    /// Runs `f` as a mutation: with the mutation's clock and seed, in the sandbox, under the
    /// budget. `max_page_count` is set first (outside the sandbox) to what the mutation may
    /// grow the database to: the budget's added bytes past its current size, at most the
    /// document's cap.
    pub fn run_guarded<T>(&self, time_ms: i64, seed: u64, f: impl FnOnce(&Connection) -> T) -> T {
        self.clock_ms.store(time_ms, Ordering::Relaxed);
        *self.rng.lock().expect("BUG: lock poisoned") = Rng(seed);
        self.reset_verdict();
        self.set_page_cap(self.growth_cap(), false);
        crate::vfs::set_last_insert_rowid(&self.conn, 0);
        self.sandbox.max_steps.store(self.budget.max_vm_steps, Ordering::Relaxed);
        self.sandbox.ticks.store(0, Ordering::Relaxed);
        self.sandbox.set_mode(Mode::Mutation);
        let local_time = crate::vfs::localtime::enter();
        // Where a thread's CPU clock can be read (not macOS: a server there has no CPU bound).
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        let cpu = self.cpu_limit.and_then(|limit| {
            let (sandbox, interrupt) = (self.sandbox.clone(), self.conn.get_interrupt_handle());
            let on_expiry = Box::new(move || {
                sandbox.cpu_exceeded.store(true, Ordering::Relaxed);
                interrupt.interrupt();
            });
            crate::vfs::watchdog::watch(limit, on_expiry)
        });
        #[cfg(not(target_arch = "wasm32"))]
        let memory = (self.metered > 0).then(|| crate::vfs::meter::Metered::start(self.memory_bound()));
        #[cfg(target_arch = "wasm32")]
        let heap = (self.metered > 0).then(|| crate::vfs::heap::Limited::start(self.memory_bound()));
        let out = f(&self.conn);
        #[cfg(target_arch = "wasm32")]
        if heap.is_some_and(|heap| heap.refused()) {
            self.sandbox.memory_exceeded.store(true, Ordering::Relaxed);
        }
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        drop(cpu);
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(memory) = memory {
            let (refused, held) = (memory.refused(), memory.held());
            drop(memory);
            // Its statements stay in the connection's cache, each with its compiled program
            // (up to `SQLITE_LIMIT_VDBE_OP` instructions): not when they hold this much.
            if held > RETAINED_STATEMENT_BYTES {
                self.conn.flush_prepared_statement_cache();
            }
            if refused {
                self.sandbox.memory_exceeded.store(true, Ordering::Relaxed);
                // What it held was mostly small allocations, now free but kept by the allocator.
                #[cfg(unix)]
                pagesync_journal::release_free_memory();
            }
        }
        drop(local_time);
        self.sandbox.set_mode(Mode::System);
        out
    }

    /// Runs `f` as a local query: the allow-list, read-only.
    pub fn run_query<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        self.reset_verdict();
        self.sandbox.set_mode(Mode::Query);
        let out = f(&self.conn);
        self.sandbox.set_mode(Mode::System);
        out
    }

    /// VM instructions the last mutation ran, in whole `PROGRESS_INTERVAL_OPS`.
    pub fn last_vm_steps(&self) -> u64 {
        self.sandbox.ticks.load(Ordering::Relaxed) * PROGRESS_INTERVAL_OPS as u64
    }

    /// Says the last mutation ran no VM instruction (a fill, which runs nothing).
    pub(crate) fn clear_vm_steps(&self) {
        self.sandbox.ticks.store(0, Ordering::Relaxed);
    }

    fn reset_verdict(&self) {
        *self.sandbox.refusal.lock().expect("BUG: lock poisoned") = None;
        self.sandbox.exhausted.store(false, Ordering::Relaxed);
        self.sandbox.wrote_max_rowid.store(false, Ordering::Relaxed);
        self.sandbox.cpu_exceeded.store(false, Ordering::Relaxed);
        self.sandbox.memory_exceeded.store(false, Ordering::Relaxed);
        self.sandbox.altering.store(false, Ordering::Relaxed);
        self.sandbox.schema_grew.store(false, Ordering::Relaxed);
        self.sandbox.renamed_table.store(false, Ordering::Relaxed);
        self.temp.take_exceeded();
    }

    /// The page count the running mutation may grow the database to.
    fn growth_cap(&self) -> u32 {
        let pages = (self.store().size_bytes() / PAGE_SIZE as u64) as u32;
        let cap = pages.saturating_add(self.budget.max_added_pages()).max(1);
        self.max_doc_pages.map_or(cap, |doc| cap.min(doc.max(1)))
    }

    fn set_page_cap(&self, pages: u32, cached: bool) {
        if self.page_cap.get() == pages {
            return;
        }
        // Outside the sandbox (mode System). SQLite never sets it below the current size, and
        // caps it at 2^32 - 2; what was asked is kept, so the same ask is not repeated.
        let sql = format!("PRAGMA max_page_count = {pages}");
        // The lifted caps (two per document) are kept prepared: a server's step sets one after
        // its mutations' every time, and parsing it again cost tens of microseconds. A
        // mutation's cap changes as the document grows: cached, each would push a statement
        // used every step out of the connection's cache.
        let set = if cached {
            self.conn.prepare_cached(&sql).and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
        } else {
            self.conn.query_row(&sql, [], |r| r.get::<_, i64>(0))
        };
        if set.is_ok() {
            self.page_cap.set(pages);
        }
    }

    /// Lifts the mutation's page cap to the document's plus room for pagesync's own rows, so
    /// recording a step never fails for want of a page, leaving the last `reserve` pages of
    /// that room unused (what a rejection may not take: `SYSTEM_RESERVE_PAGES`).
    pub fn lift_page_cap_leaving(&self, reserve: u32) {
        let slack = SYSTEM_SLACK_PAGES - reserve.min(SYSTEM_SLACK_PAGES);
        let cap = self.max_doc_pages.map_or(u32::MAX - 1, |doc| doc.saturating_add(slack));
        self.set_page_cap(cap, true);
    }

    /// Why the sandbox stopped the last mutation or query, as a rejection, if it did: a
    /// refusal, the instruction budget, the temp-file cap, or a size cap (told apart from the
    /// document's `max_doc_bytes`). `code` is what SQLite's result code said.
    pub fn sandbox_verdict(&self, code: &RejectionCode) -> Option<Rejection> {
        if let Some(reason) = self.take_refusal() {
            return Some(Rejection::new(RejectionCode::Refused, reason));
        }
        if crate::vfs::localtime::take_asked() {
            // Not `refused`: whether a mutation reaches local time depends on the data (a
            // trigger's WHEN, an UPDATE's WHERE), so a client queues it and the server decides.
            return Some(Rejection::new(RejectionCode::Error, crate::vfs::localtime::LOCAL_TIME.to_owned()));
        }
        if self.sandbox.exhausted.swap(false, Ordering::Relaxed) {
            let max = self.budget.max_vm_steps;
            let why = format!("the mutation ran past its budget of {max} SQLite VM instructions");
            return Some(Rejection::new(RejectionCode::TooExpensive, why));
        }
        if self.sandbox.cpu_exceeded.swap(false, Ordering::Relaxed) {
            let ms = self.cpu_limit.map_or(0, |l| l.as_millis());
            let why = format!("the mutation used more than {ms} {CPU_TIME}");
            return Some(Rejection::new(RejectionCode::TooExpensive, why));
        }
        if self.sandbox.memory_exceeded.swap(false, Ordering::Relaxed) {
            let max = self.memory_bound();
            let why = format!("the mutation needed SQLite to hold more than {max} {MEMORY_HELD}");
            return Some(Rejection::new(RejectionCode::TooBig, why));
        }
        if self.temp.take_exceeded() {
            let max = self.temp.max_bytes();
            let why = format!(
                "the mutation needed more than {max} bytes of temporary storage (sorts, statement journals)"
            );
            return Some(Rejection::new(RejectionCode::TooBig, why));
        }
        match code {
            RejectionCode::DocFull => Some(self.full_verdict()),
            _ => None,
        }
    }

    /// `SQLITE_FULL` from `max_page_count`: the document's cap or the mutation's own.
    fn full_verdict(&self) -> Rejection {
        // SQLite answers `SQLITE_FULL` too when an AUTOINCREMENT table has used its last rowid
        // (it never reuses one): said as that, not as a cap the document is nowhere near.
        let exhausted = self.conn.query_row(
            "SELECT name FROM sqlite_sequence WHERE seq >= ?1 LIMIT 1",
            [MAX_ROWID],
            |r| r.get::<_, String>(0),
        );
        if let Ok(table) = exhausted {
            let why = format!("table {table} has used every AUTOINCREMENT rowid (the last is {MAX_ROWID})");
            return Rejection::new(RejectionCode::Range, why);
        }
        match self.max_doc_pages {
            Some(doc) if self.page_cap.get() >= doc => {
                let max = u64::from(doc) * PAGE_SIZE as u64;
                let why =
                    format!("the mutation would grow the document past this server's limit of {max} bytes");
                Rejection::new(RejectionCode::DocFull, why)
            }
            _ => {
                let max = self.budget.max_added_bytes;
                Rejection::new(
                    RejectionCode::TooBig,
                    format!("the mutation would add more than {max} bytes to the document"),
                )
            }
        }
    }

    /// The reason the authorizer gave for its last refusal, if any.
    pub fn take_refusal(&self) -> Option<String> {
        self.sandbox.refusal.lock().expect("BUG: lock poisoned").take()
    }

    /// Turns a SQLite error into the most useful error: an I/O error carries the page store's
    /// cause, a denied statement carries the refusal reason.
    pub fn explain(&self, e: rusqlite::Error) -> Error {
        if let Some(reason) = self.take_refusal() {
            return Error::Refused(reason);
        }
        if let Some(cause) = self.store().take_last_error() {
            return match cause {
                StoreError::StepFull { max_pages } => Error::StepFull { max_pages },
                cause => Error::Store(cause),
            };
        }
        Error::Sqlite(e)
    }
}

/// How a rejection at the memory bound ends (`stopped_locally`).
const MEMORY_HELD: &str = "bytes of memory at once";

/// How a rejection at the CPU-time bound ends (`stopped_for_cpu_time`).
const CPU_TIME: &str = "ms of CPU time";

/// Whether `r` is a rejection at the CPU-time bound: a verdict of the machine that ran it,
/// not of what the mutation does.
pub fn stopped_for_cpu_time(r: &Rejection) -> bool {
    r.code == RejectionCode::TooExpensive && r.message.ends_with(CPU_TIME)
}

/// Whether a rejection is a stop at a bound that may differ between machines (CPU time, or
/// the memory SQLite holds): a client that meets one where the server did not has not found
/// nondeterminism.
pub fn stopped_locally(r: &Rejection) -> bool {
    stopped_for_cpu_time(r) || (r.code == RejectionCode::TooBig && r.message.contains(MEMORY_HELD))
}

/// Runs one of pagesync's own statements (no parameters, no rows: `BEGIN`, `SAVEPOINT`,
/// `COMMIT`, ...), prepared once per connection rather than parsed on every mutation. Never
/// app SQL: a cached statement is not authorized again.
pub(crate) fn run_cached(conn: &Connection, sql: &'static str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.raw_execute()?;
    Ok(())
}

/// Whether the database has a table (or other schema object) named `name`.
pub fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare_cached("SELECT EXISTS(SELECT 1 FROM sqlite_schema WHERE name = ?1)")?;
    stmt.query_row([name], |r| r.get(0))
}

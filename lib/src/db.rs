//! `Database`: one SQLite connection over one `PageStore`, set up for deterministic replay.
//!
//! - `random()` and `randomblob(n)` are replaced by functions drawing from a SplitMix64 stream
//!   seeded per mutation; `datetime('now')` and friends read the clock the reducer sets (the VFS
//!   `xCurrentTime`).
//! - While app SQL runs (`guarded`), an authorizer refuses what cannot be replayed: ATTACH and
//!   DETACH, `load_extension`, writes to `_pagesync_*`, transaction control, and pragmas that
//!   change the file format or the connection (page_size, journal_mode, ...). The reason is kept
//!   so the error says what was refused and why.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};
use crate::page::PAGE_SIZE;
use crate::store::PageStore;
use crate::vfs::Registration;

/// Prefix of the tables pagesync owns inside every replicated database.
pub const SYSTEM_PREFIX: &str = "_pagesync_";

/// Pragmas an app may read but not set: they change the file format, the journal, or how the
/// connection behaves in ways a replay would not reproduce.
const REFUSED_PRAGMAS: &[&str] = &[
    "page_size",
    "journal_mode",
    "locking_mode",
    "writable_schema",
    "temp_store",
    "temp_store_directory",
    "data_store_directory",
    "mmap_size",
    "schema_version",
    "auto_vacuum",
    "wal_checkpoint",
    "wal_autocheckpoint",
    "query_only",
    "foreign_keys",
    "recursive_triggers",
    "case_sensitive_like",
    "legacy_alter_table",
    "trusted_schema",
];

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

/// One connection over one page store. Field order matters: the connection drops before the
/// VFS it uses.
pub struct Database {
    conn: Connection,
    _vfs: Registration,
    store: Arc<Mutex<PageStore>>,
    clock_ms: Arc<AtomicI64>,
    rng: Arc<Mutex<Rng>>,
    guarded: Arc<AtomicBool>,
    refusal: Arc<Mutex<Option<String>>>,
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
    pub fn open(store: PageStore) -> Result<Database> {
        let store = Arc::new(Mutex::new(store));
        let clock_ms = Arc::new(AtomicI64::new(0));
        let vfs = Registration::register(store.clone(), clock_ms.clone()).map_err(|rc| {
            Error::Sqlite(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rc), None))
        })?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags_and_vfs("main.db", flags, vfs.name())?;
        crate::vfs::disable_lookaside(&conn);
        let mut db = Database {
            conn,
            _vfs: vfs,
            store,
            clock_ms,
            rng: Arc::new(Mutex::new(Rng(0))),
            guarded: Arc::new(AtomicBool::new(false)),
            refusal: Arc::new(Mutex::new(None)),
        };
        db.configure()?;
        Ok(db)
    }

    fn configure(&mut self) -> Result<()> {
        // Takes effect only on an empty database; then asserted below for existing ones.
        self.conn.execute_batch("PRAGMA page_size = 4096; PRAGMA journal_mode = MEMORY;")?;
        let page_size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        if page_size != PAGE_SIZE as i64 {
            return Err(Error::PageSize { found: page_size });
        }
        self.install_functions()?;
        let (guarded, refusal) = (self.guarded.clone(), self.refusal.clone());
        self.conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            if !guarded.load(Ordering::Relaxed) {
                return Authorization::Allow;
            }
            match refusal_reason(&ctx.action) {
                None => Authorization::Allow,
                Some(reason) => {
                    *refusal.lock().expect("BUG: lock poisoned") = Some(reason);
                    Authorization::Deny
                }
            }
        }))?;
        Ok(())
    }

    fn install_functions(&self) -> Result<()> {
        let flags = FunctionFlags::SQLITE_UTF8;
        let rng = self.rng.clone();
        self.conn.create_scalar_function("random", 0, flags, move |_| {
            Ok(rng.lock().expect("BUG: lock poisoned").next_u64() as i64)
        })?;
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
        Ok(())
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn store(&self) -> MutexGuard<'_, PageStore> {
        self.store.lock().expect("BUG: page store lock poisoned")
    }

    /// Runs `f` as app code: with the mutation's clock and seed, under the authorizer.
    pub fn run_guarded<T>(&self, time_ms: i64, seed: u64, f: impl FnOnce(&Connection) -> T) -> T {
        self.clock_ms.store(time_ms, Ordering::Relaxed);
        *self.rng.lock().expect("BUG: lock poisoned") = Rng(seed);
        *self.refusal.lock().expect("BUG: lock poisoned") = None;
        self.guarded.store(true, Ordering::Relaxed);
        let out = f(&self.conn);
        self.guarded.store(false, Ordering::Relaxed);
        out
    }

    /// The reason the authorizer gave for its last refusal, if any.
    pub fn take_refusal(&self) -> Option<String> {
        self.refusal.lock().expect("BUG: lock poisoned").take()
    }

    /// Turns a SQLite error into the most useful error: an I/O error carries the page store's
    /// cause, a denied statement carries the refusal reason.
    pub fn explain(&self, e: rusqlite::Error) -> Error {
        if let Some(reason) = self.take_refusal() {
            return Error::Refused(reason);
        }
        if let Some(cause) = self.store().take_last_error() {
            return Error::Store(cause);
        }
        Error::Sqlite(e)
    }
}

fn is_system(name: &str) -> bool {
    name.len() >= SYSTEM_PREFIX.len() && name[..SYSTEM_PREFIX.len()].eq_ignore_ascii_case(SYSTEM_PREFIX)
}

/// Whether the database has a table (or other schema object) named `name`.
pub fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row("SELECT EXISTS(SELECT 1 FROM sqlite_schema WHERE name = ?1)", [name], |r| r.get(0))
}

/// Why app SQL may not do `action`, or `None` if it may.
fn refusal_reason(action: &AuthAction<'_>) -> Option<String> {
    use AuthAction as A;
    let deterministic = "it cannot be replayed deterministically on the server";
    match *action {
        A::Attach { filename } => Some(format!("ATTACH {filename:?}: {deterministic}")),
        A::Detach { .. } => Some(format!("DETACH: {deterministic}")),
        A::Function { function_name } if function_name.eq_ignore_ascii_case("load_extension") => {
            Some(format!("load_extension(): {deterministic}"))
        }
        A::Pragma { pragma_name, pragma_value: Some(_) }
            if REFUSED_PRAGMAS.iter().any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
        {
            Some(format!("PRAGMA {pragma_name} = ...: pagesync fixes this setting"))
        }
        A::Transaction { .. } => {
            Some("BEGIN/COMMIT/ROLLBACK: each mutation already runs in its own transaction".into())
        }
        A::Savepoint { savepoint_name, .. } if is_system(savepoint_name) => {
            Some(format!("savepoint {savepoint_name}: names starting with {SYSTEM_PREFIX} are reserved"))
        }
        A::Insert { table_name }
        | A::Update { table_name, .. }
        | A::Delete { table_name }
        | A::CreateTable { table_name }
        | A::DropTable { table_name }
        | A::CreateIndex { table_name, .. }
        | A::DropIndex { table_name, .. }
        | A::CreateTrigger { table_name, .. }
        | A::DropTrigger { table_name, .. }
        | A::AlterTable { table_name, .. }
            if is_system(table_name) =>
        {
            Some(format!("{table_name} is maintained by pagesync and read-only to apps"))
        }
        _ => None,
    }
}

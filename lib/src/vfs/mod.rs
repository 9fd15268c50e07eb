//! The SQLite VFS, with the allocator that meters a mutation's memory (`meter`) and the
//! watchdog on its CPU time (`watchdog`): the only unsafe code in this crate (the journal
//! crate's `os` module is its one).
//!
//! Each open database registers its own VFS (`pagesync-<n>`) whose app data is a `VfsState`:
//! - the main database file is the document's `PageStore` (behind a mutex shared with the
//!   document, which only touches it between SQLite calls);
//! - every other file (rollback journal, statement journals, temp databases, sorter spills) is
//!   a byte vector in memory; named ones live in a per-VFS map so `xAccess`/`xDelete` work;
//! - `xCurrentTime` returns the time the reducer set for the running mutation, never the host
//!   clock; `xRandomness` and `xSleep` delegate to the default VFS (they never touch pages:
//!   `random()` and `randomblob()` are replaced by seeded functions, see `reducer`).
//!
//! Locks are tracked but never contended: one connection per VFS.
//!
//! Every `unsafe` block says why it is sound in a `// SAFETY:` line.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::ffi;

use crate::store::PageStore;

#[cfg(target_arch = "wasm32")]
pub mod heap;
pub mod localtime;
#[cfg(not(target_arch = "wasm32"))]
pub mod meter;
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub mod watchdog;

/// Longest path SQLite may hand us; ours are short names.
const MAX_PATHNAME: c_int = 512;
/// Unix epoch as a Julian day number in milliseconds (SQLite's `xCurrentTimeInt64` unit).
const UNIX_EPOCH_JULIAN_MS: i64 = 210_866_760_000_000;

/// Shared state of one registered VFS.
pub(crate) struct VfsState {
    pub store: Arc<Mutex<PageStore>>,
    /// The store's count of pages SQLite reads in place, given back without its lock.
    fetched: Arc<AtomicUsize>,
    /// Milliseconds since the Unix epoch that SQLite's clock reports.
    pub clock_ms: Arc<AtomicI64>,
    temp: Arc<TempBudget>,
    named: Mutex<HashMap<String, Arc<Mutex<Vec<u8>>>>>,
    /// How many files `named` holds, so `xAccess` (twice per transaction: a hot journal? a
    /// WAL?) answers without a lock or a string while there are none, as almost always (the
    /// rollback journal is in memory; statement journals and temp files have no name).
    named_count: AtomicUsize,
}

/// The bytes a connection's temp files (statement journals, sorter spills, temp b-trees) hold
/// together, and their cap: a write past it fails with `SQLITE_FULL` and sets `exceeded`.
#[derive(Debug)]
pub(crate) struct TempBudget {
    used_bytes: AtomicU64,
    max_bytes: AtomicU64,
    exceeded: AtomicBool,
}

impl TempBudget {
    pub fn new(max_bytes: u64) -> TempBudget {
        TempBudget {
            used_bytes: AtomicU64::new(0),
            max_bytes: AtomicU64::new(max_bytes),
            exceeded: AtomicBool::new(false),
        }
    }

    pub fn set_max(&self, max_bytes: u64) {
        self.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// Whether a write was refused since the last call.
    pub fn take_exceeded(&self) -> bool {
        self.exceeded.swap(false, Ordering::Relaxed)
    }

    fn grow(&self, by: u64) -> bool {
        let used = self.used_bytes.load(Ordering::Relaxed);
        if used.saturating_add(by) > self.max_bytes.load(Ordering::Relaxed) {
            self.exceeded.store(true, Ordering::Relaxed);
            return false;
        }
        self.used_bytes.store(used + by, Ordering::Relaxed);
        true
    }

    fn shrink(&self, by: u64) {
        let used = self.used_bytes.load(Ordering::Relaxed);
        self.used_bytes.store(used.saturating_sub(by), Ordering::Relaxed);
    }
}

enum FileKind {
    /// The store, and its count of pages SQLite reads in place (`PageStore::fetched_pages`).
    Main(Arc<Mutex<PageStore>>, Arc<AtomicUsize>),
    /// A file in memory; `named` ones outlive their handle (until `xDelete`).
    Memory { data: Arc<Mutex<Vec<u8>>>, named: bool },
}

struct Handle {
    kind: FileKind,
    temp: Arc<TempBudget>,
    lock: c_int,
}

/// The `sqlite3_file` SQLite allocates for us (`szOsFile` bytes).
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    handle: *mut Handle,
}

/// A registered VFS; unregisters and frees it on drop. Drop every connection using it first.
pub(crate) struct Registration {
    vfs: *mut ffi::sqlite3_vfs,
    name: CString,
}

// SAFETY: the pointers are owned by this value and only dereferenced by SQLite while a
// connection using the VFS exists; `VfsState` itself is Send + Sync (mutexes and atomics).
unsafe impl Send for Registration {}

static NEXT_VFS: AtomicU64 = AtomicU64::new(1);

impl Registration {
    pub fn register(
        store: Arc<Mutex<PageStore>>,
        clock_ms: Arc<AtomicI64>,
        temp: Arc<TempBudget>,
    ) -> Result<Registration, c_int> {
        // SAFETY: sqlite3_initialize is idempotent and thread-safe.
        let rc = unsafe { ffi::sqlite3_initialize() };
        if rc != ffi::SQLITE_OK {
            return Err(rc);
        }
        let n = NEXT_VFS.fetch_add(1, Ordering::Relaxed);
        let name = CString::new(format!("pagesync-{n}")).expect("BUG: no NUL in the name");
        let fetched = store.lock().expect("BUG: page store lock poisoned").fetched_pages();
        let state = Box::new(VfsState {
            store,
            fetched,
            clock_ms,
            temp,
            named: Mutex::new(HashMap::new()),
            named_count: AtomicUsize::new(0),
        });
        let vfs = Box::new(ffi::sqlite3_vfs {
            iVersion: 2,
            szOsFile: std::mem::size_of::<File>() as c_int,
            mxPathname: MAX_PATHNAME,
            pNext: ptr::null_mut(),
            zName: name.as_ptr(),
            pAppData: Box::into_raw(state).cast(),
            xOpen: Some(x_open),
            xDelete: Some(x_delete),
            xAccess: Some(x_access),
            xFullPathname: Some(x_full_pathname),
            xDlOpen: Some(x_dl_open),
            xDlError: Some(x_dl_error),
            xDlSym: Some(x_dl_sym),
            xDlClose: Some(x_dl_close),
            xRandomness: Some(x_randomness),
            xSleep: Some(x_sleep),
            xCurrentTime: Some(x_current_time),
            xGetLastError: Some(x_get_last_error),
            xCurrentTimeInt64: Some(x_current_time_int64),
            xSetSystemCall: None,
            xGetSystemCall: None,
            xNextSystemCall: None,
        });
        let vfs = Box::into_raw(vfs);
        // SAFETY: `vfs` is a valid, fully initialised sqlite3_vfs that lives until `Drop`
        // unregisters it; its name points into `name`, which lives as long.
        let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
        if rc != ffi::SQLITE_OK {
            // SAFETY: registration failed, so SQLite holds no pointer to it; we own both boxes.
            unsafe { free_vfs(vfs) };
            return Err(rc);
        }
        Ok(Registration { vfs, name })
    }

    pub fn name(&self) -> &str {
        self.name.to_str().expect("BUG: the name is ASCII")
    }
}

/// Turns off SQLite's per-connection lookaside allocator (about 120 KiB per connection by
/// default). A server keeps thousands of documents open, each with its own connection, and
/// lookaside is a small speed-up for one busy connection. Call right after opening; if
/// lookaside memory is already in use SQLite refuses, and the connection keeps it.
pub(crate) fn disable_lookaside(conn: &rusqlite::Connection) {
    // SAFETY: the handle is valid for the duration of the call (we borrow the connection), and
    // SQLITE_DBCONFIG_LOOKASIDE takes exactly (void*, int, int); a null buffer with zero sizes
    // disables lookaside.
    unsafe {
        ffi::sqlite3_db_config(
            conn.handle(),
            ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<c_void>(),
            0,
            0,
        );
    }
}

/// A connection's handle, kept by callbacks the connection owns (so it outlives them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DbHandle(usize);

impl DbHandle {
    pub fn of(conn: &rusqlite::Connection) -> DbHandle {
        // SAFETY: only the address is taken; it is dereferenced by `statement_running`, whose
        // callers are owned by this connection and so never outlive it.
        DbHandle(unsafe { conn.handle() } as usize)
    }
}

/// Whether a statement of the connection is running (stepped, not yet reset): a statement
/// prepared meanwhile comes from inside it (FTS5 reads `PRAGMA data_version` while it runs),
/// whereas the SQL reducer prepares app SQL between statements.
pub(crate) fn statement_running(db: DbHandle) -> bool {
    let db = db.0 as *mut ffi::sqlite3;
    // SAFETY: `db` is a live connection (see `DbHandle::of`), used on the thread that is
    // inside one of its calls (the authorizer runs within `sqlite3_prepare`), so its statement
    // list is stable while we walk it.
    unsafe {
        let mut stmt = ffi::sqlite3_next_stmt(db, ptr::null_mut());
        while !stmt.is_null() {
            if ffi::sqlite3_stmt_busy(stmt) != 0 {
                return true;
            }
            stmt = ffi::sqlite3_next_stmt(db, stmt);
        }
    }
    false
}

/// Sets what `last_insert_rowid()` returns, so each mutation starts from the same value (0)
/// whatever ran on the connection before it.
pub(crate) fn set_last_insert_rowid(conn: &rusqlite::Connection, rowid: i64) {
    // SAFETY: the handle is valid for the duration of the call (we borrow the connection).
    unsafe { ffi::sqlite3_set_last_insert_rowid(conn.handle(), rowid) }
}

/// Frees a VFS allocated by `register`.
///
/// # Safety
/// `vfs` came from `register` and SQLite no longer references it.
unsafe fn free_vfs(vfs: *mut ffi::sqlite3_vfs) {
    // SAFETY: per the contract, we own the box and its app data box.
    unsafe {
        let vfs = Box::from_raw(vfs);
        drop(Box::from_raw(vfs.pAppData.cast::<VfsState>()));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: the owner dropped every connection on this VFS before us (field order in
        // `Database`), so unregistering leaves no dangling users; then we free what we own.
        unsafe {
            ffi::sqlite3_vfs_unregister(self.vfs);
            free_vfs(self.vfs);
        }
    }
}

/// # Safety
/// `vfs` is one of ours (registered by `Registration::register`).
unsafe fn state<'a>(vfs: *mut ffi::sqlite3_vfs) -> &'a VfsState {
    // SAFETY: per the contract, pAppData is a live Box<VfsState>.
    unsafe { &*((*vfs).pAppData as *const VfsState) }
}

/// # Safety
/// `name` is null or a NUL-terminated string.
unsafe fn name_of(name: *const c_char) -> Option<String> {
    // SAFETY: per the contract.
    (!name.is_null()).then(|| unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned())
}

/// Version 3, for `xFetch`: SQLite reads pages in place in a replica's journal map when its
/// `mmap_size` is set (`Database`). No `xShm*` methods: SQLite then refuses WAL mode.
static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite passes our VFS, a NUL-terminated name or null, and `szOsFile` bytes.
    let (st, name) = unsafe { (state(vfs), name_of(name)) };
    let kind = if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        FileKind::Main(st.store.clone(), st.fetched.clone())
    } else {
        match name {
            Some(n) => {
                let mut named = st.named.lock().expect("BUG: lock poisoned");
                let data = named.entry(n).or_default().clone();
                st.named_count.store(named.len(), Ordering::Relaxed);
                FileKind::Memory { data, named: true }
            }
            None => FileKind::Memory { data: Arc::default(), named: false },
        }
    };
    let handle = Box::into_raw(Box::new(Handle { kind, temp: st.temp.clone(), lock: ffi::SQLITE_LOCK_NONE }));
    // SAFETY: `file` points to szOsFile = size_of::<File>() writable bytes.
    unsafe {
        file.cast::<File>().write(File { base: ffi::sqlite3_file { pMethods: &IO_METHODS }, handle });
        if !out_flags.is_null() {
            *out_flags = flags;
        }
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, _sync_dir: c_int) -> c_int {
    // SAFETY: our VFS, a NUL-terminated name.
    let (st, name) = unsafe { (state(vfs), name_of(name)) };
    let Some(n) = name else { return ffi::SQLITE_OK };
    let mut named = st.named.lock().expect("BUG: lock poisoned");
    if let Some(data) = named.remove(&n) {
        st.named_count.store(named.len(), Ordering::Relaxed);
        st.temp.shrink(data.lock().expect("BUG: lock poisoned").len() as u64);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    _flags: c_int,
    res_out: *mut c_int,
) -> c_int {
    // SAFETY: our VFS, a NUL-terminated name or null, a writable int. SQLite asks at every
    // transaction (is there a hot journal? a WAL?): no files, no lock; else no allocation.
    unsafe {
        let st = state(vfs);
        let exists = st.named_count.load(Ordering::Relaxed) > 0 && {
            let name = (!name.is_null()).then(|| CStr::from_ptr(name).to_str().ok()).flatten();
            name.is_some_and(|n| st.named.lock().expect("BUG: lock poisoned").contains_key(n))
        };
        *res_out = exists as c_int;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: `name` is NUL-terminated and `out` has `n_out` bytes; we copy at most n_out - 1
    // bytes and a NUL.
    unsafe {
        let src = CStr::from_ptr(name).to_bytes();
        if src.len() + 1 > n_out as usize {
            return ffi::SQLITE_CANTOPEN;
        }
        ptr::copy_nonoverlapping(src.as_ptr().cast::<c_char>(), out, src.len());
        *out.add(src.len()) = 0;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_dl_open(_vfs: *mut ffi::sqlite3_vfs, _name: *const c_char) -> *mut c_void {
    ptr::null_mut() // extensions are refused: they could not be replayed deterministically
}

unsafe extern "C" fn x_dl_error(_vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    let msg = b"pagesync does not load extensions\0";
    let len = msg.len().min(n.max(0) as usize);
    if len > 0 {
        // SAFETY: `out` has `n` bytes; we write `len <= n` and end with NUL.
        unsafe {
            ptr::copy_nonoverlapping(msg.as_ptr().cast::<c_char>(), out, len);
            *out.add(len - 1) = 0;
        }
    }
}

unsafe extern "C" fn x_dl_sym(
    _vfs: *mut ffi::sqlite3_vfs,
    _handle: *mut c_void,
    _sym: *const c_char,
) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> {
    None
}

unsafe extern "C" fn x_dl_close(_vfs: *mut ffi::sqlite3_vfs, _handle: *mut c_void) {}

/// The platform's default VFS (never one of ours: they are registered as non-default).
fn default_vfs() -> *mut ffi::sqlite3_vfs {
    // SAFETY: sqlite3_vfs_find(NULL) only reads SQLite's VFS list.
    unsafe { ffi::sqlite3_vfs_find(ptr::null()) }
}

unsafe extern "C" fn x_randomness(_vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let d = default_vfs();
    // SAFETY: `d` is null or a live VFS; `out` has `n` bytes for either path.
    unsafe {
        match (!d.is_null()).then(|| (*d).xRandomness).flatten() {
            Some(f) => f(d, n, out),
            None => {
                ptr::write_bytes(out, 0, n.max(0) as usize);
                n
            }
        }
    }
}

unsafe extern "C" fn x_sleep(_vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    let d = default_vfs();
    // SAFETY: `d` is null or a live VFS.
    unsafe {
        match (!d.is_null()).then(|| (*d).xSleep).flatten() {
            Some(f) => f(d, micros),
            None => micros,
        }
    }
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let mut ms = 0;
    // SAFETY: our VFS; `out` is a writable double.
    unsafe {
        x_current_time_int64(vfs, &mut ms);
        *out = ms as f64 / 86_400_000.0;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut ffi::sqlite3_int64) -> c_int {
    // SAFETY: our VFS; `out` is a writable i64.
    unsafe {
        *out = state(vfs).clock_ms.load(Ordering::Relaxed) + UNIX_EPOCH_JULIAN_MS;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_get_last_error(_vfs: *mut ffi::sqlite3_vfs, _n: c_int, _out: *mut c_char) -> c_int {
    0
}

/// # Safety
/// `file` was opened by `x_open` and not yet closed.
unsafe fn handle<'a>(file: *mut ffi::sqlite3_file) -> &'a mut Handle {
    // SAFETY: per the contract, `handle` is a live Box<Handle> that SQLite uses from one
    // thread at a time (the connection's mutex).
    unsafe { &mut *(*file.cast::<File>()).handle }
}

/// Runs `op` on the page store; on failure keeps the cause for the document (SQLite only sees
/// `err_rc`) and returns `Err(err_rc)`.
fn on_store<T>(
    store: &Mutex<PageStore>,
    err_rc: c_int,
    op: impl FnOnce(&mut PageStore) -> Result<T, crate::store::StoreError>,
) -> Result<T, c_int> {
    let mut store = store.lock().expect("BUG: page store lock poisoned");
    op(&mut store).map_err(|e| {
        // A step at its page cap is full, not broken: SQLite rolls back and says so.
        let rc =
            if matches!(e, crate::store::StoreError::StepFull { .. }) { ffi::SQLITE_FULL } else { err_rc };
        store.set_last_error(e);
        rc
    })
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes each file once; we free the handle and clear the pointer.
    let handle = unsafe {
        let f = file.cast::<File>();
        let handle = Box::from_raw((*f).handle);
        (*f).handle = ptr::null_mut();
        handle
    };
    if let FileKind::Memory { data, named: false } = &handle.kind {
        handle.temp.shrink(data.lock().expect("BUG: lock poisoned").len() as u64);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: an open file; `buf` has `amt` writable bytes.
    let (h, buf) = unsafe { (handle(file), std::slice::from_raw_parts_mut(buf.cast::<u8>(), amt as usize)) };
    match &h.kind {
        FileKind::Main(store, _) => {
            let full = on_store(store, ffi::SQLITE_IOERR_READ, |s| s.read(offset as u64, buf));
            full.map_or_else(|rc| rc, |full| if full { ffi::SQLITE_OK } else { ffi::SQLITE_IOERR_SHORT_READ })
        }
        FileKind::Memory { data, .. } => {
            let data = data.lock().expect("BUG: lock poisoned");
            let start = (offset as usize).min(data.len());
            let n = (data.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&data[start..start + n]);
            buf[n..].fill(0);
            if n < buf.len() { ffi::SQLITE_IOERR_SHORT_READ } else { ffi::SQLITE_OK }
        }
    }
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: an open file; `buf` has `amt` readable bytes.
    let (h, buf) = unsafe { (handle(file), std::slice::from_raw_parts(buf.cast::<u8>(), amt as usize)) };
    match &h.kind {
        FileKind::Main(store, _) => on_store(store, ffi::SQLITE_IOERR_WRITE, |s| s.write(offset as u64, buf))
            .map_or_else(|rc| rc, |()| ffi::SQLITE_OK),
        FileKind::Memory { data, .. } => {
            let mut data = data.lock().expect("BUG: lock poisoned");
            let end = offset as usize + buf.len();
            if data.len() < end {
                if !h.temp.grow((end - data.len()) as u64) {
                    return ffi::SQLITE_FULL;
                }
                data.resize(end, 0);
            }
            data[offset as usize..end].copy_from_slice(buf);
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: an open file.
    let h = unsafe { handle(file) };
    match &h.kind {
        FileKind::Main(store, _) => on_store(store, ffi::SQLITE_IOERR_TRUNCATE, |s| s.truncate(size as u64))
            .map_or_else(|rc| rc, |()| ffi::SQLITE_OK),
        FileKind::Memory { data, .. } => {
            let mut data = data.lock().expect("BUG: lock poisoned");
            h.temp.shrink((data.len() as u64).saturating_sub(size as u64));
            data.truncate(size as usize);
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn x_sync(_file: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    // Durability is the document's job: it appends the overlay to the journal after COMMIT.
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_size(file: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    // SAFETY: an open file; `out` is a writable i64.
    let h = unsafe { handle(file) };
    let size = match &h.kind {
        FileKind::Main(store, _) => store.lock().expect("BUG: page store lock poisoned").size_bytes(),
        FileKind::Memory { data, .. } => data.lock().expect("BUG: lock poisoned").len() as u64,
    };
    // SAFETY: see above.
    unsafe { *out = size as i64 };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file.
    let h = unsafe { handle(file) };
    h.lock = h.lock.max(level);
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file.
    let h = unsafe { handle(file) };
    h.lock = h.lock.min(level);
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: an open file; `out` is a writable int.
    unsafe { *out = (handle(file).lock >= ffi::SQLITE_LOCK_RESERVED) as c_int };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_control(_file: *mut ffi::sqlite3_file, _op: c_int, _arg: *mut c_void) -> c_int {
    ffi::SQLITE_NOTFOUND
}

/// A page in place in the store's journal map (`PageStore::fetch`), or null (SQLite then
/// reads a copy with `xRead`). SQLite only reads through it, and gives it back (`xUnfetch`)
/// before its statement ends; the store changes nothing the pointer reaches while any is out.
unsafe extern "C" fn x_fetch(
    file: *mut ffi::sqlite3_file,
    offset: i64,
    amt: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: an open file; `out` is a writable pointer.
    let h = unsafe { handle(file) };
    let page = match (&h.kind, u64::try_from(offset), usize::try_from(amt)) {
        (FileKind::Main(store, _), Ok(offset), Ok(len)) => {
            store.lock().expect("BUG: page store lock poisoned").fetch(offset, len)
        }
        _ => None,
    };
    // SAFETY: see above.
    unsafe { *out = page.map_or(ptr::null_mut(), |p| p.as_ptr().cast()) };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_unfetch(file: *mut ffi::sqlite3_file, _offset: i64, page: *mut c_void) -> c_int {
    // SAFETY: an open file.
    let h = unsafe { handle(file) };
    if let (FileKind::Main(_, fetched), false) = (&h.kind, page.is_null()) {
        crate::store::give_back(fetched); // `PageStore::unfetch`, without the store's lock
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_sector_size(_file: *mut ffi::sqlite3_file) -> c_int {
    crate::page::PAGE_SIZE as c_int
}

unsafe extern "C" fn x_device_characteristics(_file: *mut ffi::sqlite3_file) -> c_int {
    ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE
}

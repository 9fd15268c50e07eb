//! A bound on the memory one mutation makes SQLite hold.
//!
//! The instruction budget counts VM instructions, but some work allocates without running any:
//! preparing a statement over views that each name other views several times copies each view
//! once per mention (eight views deep and eight wide: 1.2 GB from a 30-byte `SELECT`, before
//! the first instruction), and a row of 100 columns of 16 MB values holds 1.6 GB. SQLite's
//! allocations go through the `sqlite3_mem_methods` installed here (`install`, before SQLite
//! starts), which hand each call to SQLite's own allocator and, on the thread of a running
//! mutation (`Metered`), count the bytes it holds above what it held when the mutation began.
//! An allocation that would take that past the mutation's bound fails: SQLite answers
//! `SQLITE_NOMEM`, rolls the statement back, and the mutation is rejected `too_big`.
//!
//! Other threads, and this one outside a mutation, pay one thread-local read per call. What a
//! mutation allocates depends a little on what its connection has cached (a cold document
//! reads pages a warm one has), so the server's verdict is the one every replica keeps; clients
//! meter at twice its bound (`Database::meter_memory`), so that a planted trigger cannot make
//! an honest app's write hold gigabytes. (The browser uses `vfs/heap.rs`.)

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

thread_local! {
    /// This thread's running mutation, if any: its bound (0: none running), the bytes it holds,
    /// and whether an allocation was refused.
    static BOUND: Cell<i64> = const { Cell::new(0) };
    static HELD: Cell<i64> = const { Cell::new(0) };
    static REFUSED: Cell<bool> = const { Cell::new(false) };
}

/// SQLite's own allocator, which ours hands every call to.
struct System {
    malloc: unsafe extern "C" fn(c_int) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
    realloc: unsafe extern "C" fn(*mut c_void, c_int) -> *mut c_void,
    size: unsafe extern "C" fn(*mut c_void) -> c_int,
    roundup: unsafe extern "C" fn(c_int) -> c_int,
}

static SYSTEM: OnceLock<System> = OnceLock::new();

/// Installs the metering allocator. Must come before SQLite starts (any connection or VFS
/// registration starts it): `false` if it came too late, and then nothing is metered.
/// Repeated calls answer the first one's outcome.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let mut system = ffi::sqlite3_mem_methods {
            xMalloc: None,
            xFree: None,
            xRealloc: None,
            xSize: None,
            xRoundup: None,
            xInit: None,
            xShutdown: None,
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: `GETMALLOC` fills the struct it is given; `MALLOC` copies the one it is given.
        // Both fail (and change nothing) once SQLite has started.
        unsafe {
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETMALLOC, &mut system as *mut ffi::sqlite3_mem_methods)
                != ffi::SQLITE_OK
            {
                return false;
            }
            let (Some(malloc), Some(free), Some(realloc), Some(size), Some(roundup)) =
                (system.xMalloc, system.xFree, system.xRealloc, system.xSize, system.xRoundup)
            else {
                return false;
            };
            if SYSTEM.set(System { malloc, free, realloc, size, roundup }).is_err() {
                return false;
            }
            let metered = ffi::sqlite3_mem_methods {
                xMalloc: Some(metered_malloc),
                xFree: Some(metered_free),
                xRealloc: Some(metered_realloc),
                xSize: system.xSize,
                xRoundup: system.xRoundup,
                xInit: system.xInit,
                xShutdown: system.xShutdown,
                pAppData: system.pAppData,
            };
            ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &metered as *const ffi::sqlite3_mem_methods)
                == ffi::SQLITE_OK
        }
    })
}

static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Meters this thread's allocations while it lives: at most `bound` bytes above what the thread
/// held when it began. Not nested.
pub struct Metered(());

impl Metered {
    pub fn start(bound: i64) -> Metered {
        HELD.with(|h| h.set(0));
        REFUSED.with(|r| r.set(false));
        BOUND.with(|b| b.set(bound.max(1)));
        Metered(())
    }

    /// Whether an allocation was refused since `start`.
    pub fn refused(&self) -> bool {
        REFUSED.with(Cell::get)
    }

    /// Bytes held now above what the thread held at `start`.
    pub fn held(&self) -> i64 {
        HELD.with(Cell::get)
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        BOUND.with(|b| b.set(0));
    }
}

fn system() -> &'static System {
    SYSTEM.get().expect("BUG: the metering allocator runs only once installed")
}

/// The size SQLite's allocator gives `p` (0 for null).
unsafe fn size_of(p: *mut c_void) -> i64 {
    if p.is_null() {
        return 0;
    }
    // SAFETY: `p` came from the system allocator (every allocation goes through it).
    i64::from(unsafe { (system().size)(p) })
}

/// Takes `bytes` more for the running mutation, if any: `false` if that is past its bound.
fn take(bytes: i64) -> bool {
    let bound = BOUND.with(Cell::get);
    if bound == 0 {
        return true;
    }
    let held = HELD.with(Cell::get).saturating_add(bytes);
    if bytes > 0 && held > bound {
        REFUSED.with(|r| r.set(true));
        return false;
    }
    HELD.with(|h| h.set(held));
    true
}

unsafe extern "C" fn metered_malloc(n: c_int) -> *mut c_void {
    if BOUND.with(Cell::get) == 0 {
        // SAFETY: SQLite's own allocator, called as SQLite would.
        return unsafe { (system().malloc)(n) };
    }
    let roundup = unsafe { (system().roundup)(n) };
    if !take(i64::from(roundup)) {
        return std::ptr::null_mut();
    }
    // SAFETY: SQLite's own allocator, called as SQLite would.
    let p = unsafe { (system().malloc)(n) };
    if p.is_null() {
        take(-i64::from(roundup));
    }
    p
}

unsafe extern "C" fn metered_free(p: *mut c_void) {
    if BOUND.with(Cell::get) != 0 {
        // SAFETY: as in `size_of`.
        take(-unsafe { size_of(p) });
    }
    // SAFETY: SQLite's own allocator, called as SQLite would.
    unsafe { (system().free)(p) }
}

unsafe extern "C" fn metered_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    if BOUND.with(Cell::get) == 0 {
        // SAFETY: SQLite's own allocator, called as SQLite would.
        return unsafe { (system().realloc)(p, n) };
    }
    // SAFETY: as in `size_of`.
    let old = unsafe { size_of(p) };
    let roundup = i64::from(unsafe { (system().roundup)(n) });
    if !take(roundup - old) {
        return std::ptr::null_mut();
    }
    // SAFETY: SQLite's own allocator, called as SQLite would.
    let q = unsafe { (system().realloc)(p, n) };
    if q.is_null() {
        take(old - roundup);
    }
    q
}

//! Local time in mutations: refused. SQLite's `'localtime'` and `'utc'` date modifiers read
//! the host's time zone, which differs between replicas (a server's is not a browser's), so
//! the same mutation would write different rows on each. SQLite reads local time through one
//! hook for the whole process (`SQLITE_TESTCTRL_LOCALTIME_FAULT`): pagesync's answers
//! "unavailable" to a thread running a mutation, which fails the statement, and the host's
//! local time to everything else (a query may show local time as the app expects).

use std::cell::Cell;
use std::ffi::{c_int, c_void};

use rusqlite::ffi;

thread_local! {
    static IN_MUTATION: Cell<bool> = const { Cell::new(false) };
    static ASKED: Cell<bool> = const { Cell::new(false) };
}

/// Why a mutation that asked for local time is refused.
pub const LOCAL_TIME: &str = "'localtime' and 'utc' depend on each replica's time zone: \
     a mutation stores UTC (datetime('now')), and a query converts it for display";

type Hook = unsafe extern "C" fn(*const c_void, *mut c_void) -> c_int;

/// This thread runs a mutation until the guard drops: SQLite's local time is unavailable to it.
#[must_use]
pub struct InMutation(());

pub fn enter() -> InMutation {
    ASKED.set(false);
    IN_MUTATION.set(true);
    install();
    InMutation(())
}

impl Drop for InMutation {
    fn drop(&mut self) {
        IN_MUTATION.set(false);
        // Where the hook cannot give the host's local time, it is there only for a mutation.
        #[cfg(not(unix))]
        unsafe {
            ffi::sqlite3_test_control(ffi::SQLITE_TESTCTRL_LOCALTIME_FAULT, 0 as c_int);
        }
    }
}

/// Whether the last mutation on this thread asked for local time (and was refused it).
pub fn take_asked() -> bool {
    ASKED.replace(false)
}

/// The hook's answer for a mutation: unavailable, noted.
fn refuse() -> c_int {
    let _ = ASKED.try_with(|a| a.set(true));
    1
}

/// On Unix, the hook stays for the process's life: unavailable on a thread in a mutation, and
/// what SQLite would have done elsewhere (`localtime_r`).
#[cfg(unix)]
fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        ffi::sqlite3_test_control(ffi::SQLITE_TESTCTRL_LOCALTIME_FAULT, 2 as c_int, hook as Hook);
    });
}

#[cfg(unix)]
unsafe extern "C" fn hook(t: *const c_void, tm: *mut c_void) -> c_int {
    if IN_MUTATION.try_with(Cell::get).unwrap_or(false) {
        return refuse();
    }
    // SAFETY: SQLite passes its `time_t` and the `struct tm` it fills.
    unsafe { libc::localtime_r(t.cast::<libc::time_t>(), tm.cast::<libc::tm>()).is_null() as c_int }
}

/// Elsewhere (the browser, whose one thread runs one thing at a time) the hook is set for the
/// mutation only. (On Windows, threads would share that: pagesync's servers run on Unix.)
#[cfg(not(unix))]
fn install() {
    unsafe {
        ffi::sqlite3_test_control(ffi::SQLITE_TESTCTRL_LOCALTIME_FAULT, 2 as c_int, hook as Hook);
    }
}

#[cfg(not(unix))]
unsafe extern "C" fn hook(_: *const c_void, _: *mut c_void) -> c_int {
    refuse()
}

//! A bound on the CPU time one mutation takes on the server.
//!
//! The instruction budget is the deterministic bound, but one instruction may do work in
//! proportion to a value's size: a comparison, a `length()` or a `printf` over a 16 MB value
//! takes milliseconds, so a loop of a few million cheap-looking instructions over one ran for
//! an hour. A thread of its own (`pagesync-watchdog`) reads the CPU clock of each thread that
//! runs a watched mutation every `TICK`, and calls the mutation's `on_expiry` (which interrupts
//! its connection: SQLite checks between instructions, and in its sorters) once that thread
//! has spent the mutation's allowance since it began, and again at every tick after: SQLite
//! clears an interrupt when a statement starts with none running, so a mutation of several
//! statements would otherwise run the rest unbounded. Time spent waiting (for a page from
//! S3, for a lock) is not counted. Whether a mutation near the bound passes depends on the
//! machine, so only the server uses it, and its verdict is the one every replica keeps.

use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How often the watchdog reads the clocks while a watched mutation runs.
const TICK: Duration = Duration::from_millis(10);

/// Ticks without a watch before the watchdog sleeps until the next one (1 s): while mutations
/// come, it ticks on, so starting a watch wakes no thread.
const PARK_AFTER_IDLE_TICKS: u32 = 100;

/// What runs when a mutation has spent its CPU time, at every tick until it ends: set a flag,
/// interrupt its connection.
pub type OnExpiry = Box<dyn Fn() + Send>;

struct Watched {
    id: u64,
    clock: libc::clockid_t,
    limit_ns: i64,
    /// The thread's CPU time when the watchdog first saw the watch: read there, not by the
    /// watched thread, whose every mutation would otherwise pay a system call.
    start_ns: Option<i64>,
    on_expiry: OnExpiry,
}

/// The watches, the last id given, and whether the watchdog sleeps until a watch comes.
#[derive(Default)]
struct Watches {
    last_id: u64,
    watched: Vec<Watched>,
    parked: bool,
}

#[derive(Default)]
struct Dog {
    watches: Mutex<Watches>,
    wake: Condvar,
}

fn dog() -> Option<&'static Dog> {
    static DOG: OnceLock<Option<&'static Dog>> = OnceLock::new();
    *DOG.get_or_init(|| {
        let dog: &'static Dog = Box::leak(Box::default());
        std::thread::Builder::new().name("pagesync-watchdog".into()).spawn(move || run(dog)).ok()?;
        Some(dog)
    })
}

fn run(dog: &'static Dog) {
    let mut idle = 0;
    loop {
        {
            let mut guard = dog.watches.lock().unwrap_or_else(|p| p.into_inner());
            idle = if guard.watched.is_empty() { idle + 1 } else { 0 };
            if idle > PARK_AFTER_IDLE_TICKS {
                guard.parked = true;
                while guard.watched.is_empty() {
                    guard = dog.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                guard.parked = false;
                idle = 0;
            }
            for w in guard.watched.iter_mut() {
                let Some(now) = cpu_ns(w.clock) else { continue };
                match w.start_ns {
                    None => w.start_ns = Some(now),
                    // Under the lock: the mutation's `Watch` is not yet dropped, so it still runs.
                    Some(start) if now.saturating_sub(start) >= w.limit_ns => (w.on_expiry)(),
                    Some(_) => {}
                }
            }
        }
        std::thread::sleep(TICK);
    }
}

/// The CPU clock of the calling thread (asked once per thread).
fn this_thread_clock() -> Option<libc::clockid_t> {
    thread_local! {
        static CLOCK: std::cell::Cell<Option<Option<libc::clockid_t>>> = const { std::cell::Cell::new(None) };
    }
    CLOCK.with(|c| {
        if let Some(known) = c.get() {
            return known;
        }
        let mut clock: libc::clockid_t = 0;
        // SAFETY: asks for the CPU clock of this thread, written to `clock`.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        let known = (rc == 0).then_some(clock);
        c.set(Some(known));
        known
    })
}

/// Nanoseconds on `clock` (a thread's CPU time).
fn cpu_ns(clock: libc::clockid_t) -> Option<i64> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: reads a clock into `t`; a thread that has exited gives an error, not a read.
    let rc = unsafe { libc::clock_gettime(clock, &mut t) };
    #[allow(clippy::useless_conversion)] // `time_t` and `c_long` are i32 on 32-bit targets
    (rc == 0).then(|| i64::from(t.tv_sec).saturating_mul(1_000_000_000).saturating_add(i64::from(t.tv_nsec)))
}

/// Watches the calling thread while it lives: once the thread has spent `cpu` (counted from
/// when the watchdog first sees the watch, within a `TICK`), `on_expiry` runs (on the
/// watchdog's thread, at every tick until the watch ends). `None` if the thread's CPU clock
/// cannot be read, and then nothing is watched. Costs the caller no system call.
pub fn watch(cpu: Duration, on_expiry: OnExpiry) -> Option<Watch> {
    let clock = this_thread_clock()?;
    let dog = dog()?;
    let limit_ns = i64::try_from(cpu.as_nanos()).unwrap_or(i64::MAX);
    let mut guard = dog.watches.lock().unwrap_or_else(|p| p.into_inner());
    guard.last_id += 1;
    let id = guard.last_id;
    guard.watched.push(Watched { id, clock, limit_ns, start_ns: None, on_expiry });
    if guard.parked {
        dog.wake.notify_one();
    }
    Some(Watch { id, dog })
}

/// A watched mutation; dropping it ends the watch (after which `on_expiry` never runs).
pub struct Watch {
    id: u64,
    dog: &'static Dog,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("id", &self.id).finish()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut guard = self.dog.watches.lock().unwrap_or_else(|p| p.into_inner());
        guard.watched.retain(|w| w.id != self.id);
    }
}

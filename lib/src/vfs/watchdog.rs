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

/// What runs when a mutation has spent its CPU time, at every tick until it ends: set a flag,
/// interrupt its connection.
pub type OnExpiry = Box<dyn Fn() + Send>;

struct Watched {
    id: u64,
    clock: libc::clockid_t,
    deadline_ns: i64,
    on_expiry: OnExpiry,
}

#[derive(Default)]
struct Dog {
    watched: Mutex<(u64, Vec<Watched>)>,
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
    loop {
        {
            let mut guard = dog.watched.lock().unwrap_or_else(|p| p.into_inner());
            while guard.1.is_empty() {
                guard = dog.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            for w in guard.1.iter() {
                // Under the lock: the mutation's `Watch` is not yet dropped, so it still runs.
                if cpu_ns(w.clock).is_some_and(|now| now >= w.deadline_ns) {
                    (w.on_expiry)();
                }
            }
        }
        std::thread::sleep(TICK);
    }
}

/// The CPU clock of the calling thread.
fn this_thread_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: asks for the CPU clock of this thread, written to `clock`.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (rc == 0).then_some(clock)
}

/// Nanoseconds on `clock` (a thread's CPU time).
fn cpu_ns(clock: libc::clockid_t) -> Option<i64> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: reads a clock into `t`; a thread that has exited gives an error, not a read.
    let rc = unsafe { libc::clock_gettime(clock, &mut t) };
    #[allow(clippy::useless_conversion)] // `time_t` and `c_long` are i32 on 32-bit targets
    (rc == 0).then(|| i64::from(t.tv_sec).saturating_mul(1_000_000_000).saturating_add(i64::from(t.tv_nsec)))
}

/// The CPU time the calling thread has spent, in nanoseconds.
pub fn this_thread_cpu_ns() -> Option<i64> {
    cpu_ns(this_thread_clock()?)
}

/// Watches the calling thread while it lives: once the thread has spent `cpu` since now,
/// `on_expiry` runs (on the watchdog's thread, at every tick until the watch ends). `None` if the thread's CPU clock
/// cannot be read, and then nothing is watched.
pub fn watch(cpu: Duration, on_expiry: OnExpiry) -> Option<Watch> {
    let clock = this_thread_clock()?;
    let start = cpu_ns(clock)?;
    let dog = dog()?;
    let deadline_ns = start.saturating_add(i64::try_from(cpu.as_nanos()).unwrap_or(i64::MAX));
    let mut guard = dog.watched.lock().unwrap_or_else(|p| p.into_inner());
    guard.0 += 1;
    let id = guard.0;
    guard.1.push(Watched { id, clock, deadline_ns, on_expiry });
    if guard.1.len() == 1 {
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
        let mut guard = self.dog.watched.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.retain(|w| w.id != self.id);
    }
}

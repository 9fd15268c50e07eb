//! The hub: one thread that owns the `ServerSession` and every open document.
//!
//! Documents do blocking work (SQLite, fsync), so the hub runs on a thread of its own rather
//! than on the async runtime. Connection tasks send it frames over a channel; it drains
//! everything queued before it steps, so mutations arriving together share a step (and an
//! fsync). Outgoing messages go back over each connection's channel, encoded by the
//! connection's writer, not here: a download's megabytes are copied into a frame on the
//! runtime's threads, so one client pulling a large document at full speed does not take the
//! thread every document's progress goes through. Their unwritten bytes (the backlog, counted
//! as encoded) the hub reports to the session after every frame it queues, and again when the
//! writer has drained them: the session stops sending to a connection whose peer does not read
//! (`MAX_SEND_BACKLOG_BYTES`) and closes it after a while. Incoming frames carry semaphore
//! permits for their bytes, released once handled, so a connection is read only as fast as the
//! hub handles its frames.
//!
//! A panic while handling one connection's frame closes that connection (logged at ERROR); a
//! panic in a document's step is caught by the session, which closes that document.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use pagesync::protocol::{ConnId, DocJob, Event, ExportError, JobDone, Message, ServerSession};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};

use crate::Metrics;

/// The longest the hub sleeps with nothing to do; it also re-reads the clock then.
const IDLE_WAKE_MS: i64 = 1_000;

/// How often the hub wakes at the least while the server is short of send memory.
const PRESSED_WAKE_MS: i64 = 100;

/// Permits for an incoming frame's bytes (the connection's and the server's), held until the
/// hub has handled it.
pub type FramePermits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// The hub's end of a connection's outgoing channel.
#[derive(Debug)]
pub struct ConnSender {
    /// Boxed: an idle connection's channel holds a block of slots, and a `Message` is 88 bytes.
    tx: mpsc::UnboundedSender<Box<Message>>,
    /// Bytes queued and not yet written by the connection's writer.
    backlog: Arc<AtomicUsize>,
    /// Set when the session was told of a backlog: the writer then says when it has drained.
    watched: Arc<AtomicBool>,
    /// Dropped with this sender: tells the writer at once, even in the middle of a write.
    _closed: tokio::sync::oneshot::Sender<()>,
    /// When its socket last took bytes to send (`crate::mono_ms`; 0 before it ever did), for
    /// a connection that has a socket.
    took_bytes_at: Option<Arc<AtomicI64>>,
}

/// The writer's end: messages to encode and write, and `written` after each.
#[derive(Debug)]
pub struct ConnReceiver {
    rx: mpsc::UnboundedReceiver<Box<Message>>,
    backlog: Arc<AtomicUsize>,
    watched: Arc<AtomicBool>,
    conn: ConnId,
    hub: std_mpsc::Sender<HubMsg>,
    /// `None` once it has fired.
    closed: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl ConnReceiver {
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await.map(|m| *m)
    }

    /// Resolves once the hub is done with the connection (it closed it, or the peer left):
    /// a write in progress to a peer that does not read is abandoned then, and with it the
    /// message it held, instead of at the write's own deadline.
    pub async fn closed(&mut self) {
        if let Some(closed) = &mut self.closed {
            let _ = closed.await;
            // A oneshot must not be polled once it is done: remember instead.
            self.closed = None;
        }
    }

    /// A message of `len` bytes encoded was written (or dropped); wakes the hub when the backlog it was
    /// told of has drained.
    pub fn written(&self, len: usize) {
        let before = self.backlog.fetch_sub(len, Ordering::AcqRel);
        if before == len && self.watched.swap(false, Ordering::AcqRel) {
            let _ = self.hub.send(HubMsg::Drained { conn: self.conn });
        }
    }
}

enum HubMsg {
    Connect {
        conn: ConnId,
        tx: ConnSender,
    },
    Frame {
        conn: ConnId,
        bytes: Vec<u8>,
        _permits: FramePermits,
    },
    Drained {
        conn: ConnId,
    },
    Disconnect {
        conn: ConnId,
    },
    Export {
        doc: pagesync::DocId,
        reply: ExportReply,
    },
    /// A document was deleted: close it (`ServerSession::close_deleted`); the reply says
    /// whether the session let go of it.
    CloseDeleted {
        doc: pagesync::DocId,
        reply: oneshot::Sender<bool>,
    },
    /// The mutator definitions were reloaded: subscribers get the new ones.
    MutatorsChanged,
    /// A worker finished a document's job (open, step, read-ahead, export).
    JobDone(Box<JobDone>),
    Shutdown(oneshot::Sender<()>),
}

/// A handle to the hub thread.
#[derive(Clone, Debug)]
pub struct Hub {
    tx: std_mpsc::Sender<HubMsg>,
    next_conn: Arc<AtomicU64>,
}

use crate::wall_ms as now_ms;

impl Hub {
    /// Starts the hub thread and `step_threads` workers that run documents' jobs (opens, steps,
    /// reads, exports), so that the hub (every connection's frames) and the other documents
    /// never wait for one.
    pub fn spawn(session: ServerSession, metrics: Arc<Metrics>, step_threads: usize) -> Hub {
        Hub::spawn_watching(session, metrics, step_threads, None)
    }

    /// `spawn`, with a counter that says when every open document must be closed: when it
    /// changes, the hub closes them all and tells their clients the server is `unavailable`
    /// for them now (a cluster server whose membership lapsed: it may no longer write them).
    pub fn spawn_watching(
        session: ServerSession,
        metrics: Arc<Metrics>,
        step_threads: usize,
        generation: Option<Generation>,
    ) -> Hub {
        let (tx, rx) = std_mpsc::channel();
        let (jobs, jobs_rx) = std_mpsc::channel::<DocJob>();
        let jobs_rx = Arc::new(std::sync::Mutex::new(jobs_rx));
        for i in 0..step_threads.max(1) {
            let (jobs_rx, done) = (jobs_rx.clone(), tx.clone());
            std::thread::Builder::new()
                .name(format!("pagesync-step-{i}"))
                .spawn(move || job_worker(&jobs_rx, &done))
                .expect("BUG: cannot spawn a step thread");
        }
        let session = session.with_external_jobs();
        std::thread::Builder::new()
            .name("pagesync-hub".into())
            .spawn(move || run(session, rx, jobs, metrics, generation))
            .expect("BUG: cannot spawn the hub thread");
        Hub { tx, next_conn: Arc::new(AtomicU64::new(1)) }
    }

    /// Registers a connection; its outgoing frames arrive on the returned receiver, which
    /// closes when the server wants the connection closed.
    pub fn connect(&self, took_bytes_at: Option<Arc<AtomicI64>>) -> (ConnId, ConnReceiver) {
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        let (backlog, watched) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        let (backlog_, watched_) = (backlog.clone(), watched.clone());
        let sender =
            ConnSender { tx, backlog: backlog_, watched: watched_, _closed: closed_tx, took_bytes_at };
        let _ = self.tx.send(HubMsg::Connect { conn, tx: sender });
        (conn, ConnReceiver { rx, backlog, watched, conn, hub: self.tx.clone(), closed: Some(closed) })
    }

    /// Hands the hub a frame; `permits` are released once it is handled.
    pub fn frame(&self, conn: ConnId, bytes: Vec<u8>, permits: FramePermits) {
        let _ = self.tx.send(HubMsg::Frame { conn, bytes, _permits: permits });
    }

    pub fn disconnect(&self, conn: ConnId) {
        let _ = self.tx.send(HubMsg::Disconnect { conn });
    }

    /// The document as a `.sqlite` file, consistent as of its last durable step.
    pub async fn export(&self, doc: pagesync::DocId) -> Result<Vec<u8>, ExportError> {
        let (reply, rx) = oneshot::channel();
        let down = || ExportError::Unavailable("the server is shutting down".to_owned());
        self.tx.send(HubMsg::Export { doc, reply }).map_err(|_| down())?;
        rx.await.map_err(|_| down())?
    }

    /// Closes a deleted document, telling its subscribers; waits (up to `within`) while a job
    /// has it out. Whether the session let go of it.
    pub async fn close_deleted(&self, doc: pagesync::DocId, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(HubMsg::CloseDeleted { doc, reply }).is_err() {
                return false;
            }
            match rx.await {
                Ok(true) => return true,
                Ok(false) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                _ => return false,
            }
        }
    }

    /// The mutator definitions were reloaded: every subscriber whose document's changed is
    /// sent them.
    pub fn mutators_changed(&self) {
        let _ = self.tx.send(HubMsg::MutatorsChanged);
    }

    /// Applies what is queued, then stops the hub.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(HubMsg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A job thread: takes jobs until the hub is gone.
fn job_worker(jobs: &std::sync::Mutex<std_mpsc::Receiver<DocJob>>, done: &std_mpsc::Sender<HubMsg>) {
    loop {
        let job = jobs.lock().expect("BUG: job queue lock poisoned").recv();
        let Ok(job) = job else { return };
        if done.send(HubMsg::JobDone(Box::new(job.run()))).is_err() {
            return;
        }
    }
}

/// The session's events, written to the log. Failures that repeat (a step retried on storage
/// that does not answer, a client asking again and again of a document whose storage failed)
/// are written at most once per `REPEAT_EVERY` for each document and kind (and those past
/// `MAX_REMEMBERED` kinds at once, together), with how many like them were not, so no client
/// can flood the log.
#[derive(Default)]
struct EventLog {
    /// For each document and kind of failure: when it was last written, and how many since.
    written: HashMap<(pagesync::DocId, &'static str), (std::time::Instant, u64)>,
    /// The same for every failure past `MAX_REMEMBERED` kinds.
    others: Option<(std::time::Instant, u64)>,
    /// When `written` was last rid of what has not repeated for `REPEAT_EVERY`.
    swept: Option<std::time::Instant>,
}

const REPEAT_EVERY: Duration = Duration::from_secs(1);

/// Kinds of failure (document and kind) remembered at once; the failures of others share one
/// allowance until some are forgotten.
const MAX_REMEMBERED: usize = 4_096;

/// Counts `*quiet` one more unless `REPEAT_EVERY` has passed since `*at`: then it is due, with
/// how many were not written.
fn due(at: &mut std::time::Instant, quiet: &mut u64, now: std::time::Instant) -> Option<u64> {
    if now.duration_since(*at) < REPEAT_EVERY {
        *quiet += 1;
        return None;
    }
    *at = now;
    Some(std::mem::take(quiet))
}

impl EventLog {
    /// Whether a failure of `doc` of this `kind` is written now, and how many like it were
    /// not since the last that was.
    fn admit(&mut self, doc: pagesync::DocId, kind: &'static str, now: std::time::Instant) -> Option<u64> {
        if let Some((at, quiet)) = self.written.get_mut(&(doc, kind)) {
            return due(at, quiet, now);
        }
        let sweep = self.swept.is_none_or(|t| now.duration_since(t) >= REPEAT_EVERY);
        if self.written.len() >= MAX_REMEMBERED && sweep {
            self.swept = Some(now);
            self.written.retain(|_, (at, quiet)| *quiet > 0 || now.duration_since(*at) < REPEAT_EVERY);
        }
        if self.written.len() >= MAX_REMEMBERED {
            return match &mut self.others {
                Some((at, quiet)) => due(at, quiet, now),
                None => {
                    self.others = Some((now, 0));
                    Some(0)
                }
            };
        }
        self.written.insert((doc, kind), (now, 0));
        Some(0)
    }

    fn write(&mut self, event: Event) {
        let also =
            |n: u64| if n == 0 { String::new() } else { format!(" (and {n} more like it not logged)") };
        match event {
            Event::StepFailed { doc, error, retry_in_ms } => {
                let Some(quiet) = self.admit(doc, "step", std::time::Instant::now()) else { return };
                let also = also(quiet);
                tracing::warn!(%doc, retry_in_ms, "a step failed; its mutations stay queued: {error}{also}");
            }
            Event::Failed { doc, doing, error } => {
                let Some(quiet) = self.admit(doc, doing, std::time::Instant::now()) else { return };
                tracing::warn!(%doc, "{doing} {doc} failed: {error}{}", also(quiet));
            }
            Event::MutationIsolated { doc, step_lsn, timeline, lsn, rejection } => {
                // A client may send such mutations one after another.
                if self.admit(doc, "isolated", std::time::Instant::now()).is_none() {
                    return;
                }
                tracing::warn!(%doc, %step_lsn, %timeline, %lsn, code = rejection.code.as_str(), "mutation rejected because its step could not hold it: {}", rejection.message);
            }
            Event::DocumentFailed { doc, error } => {
                tracing::error!(%doc, "a step panicked; the document was closed and reopens on next use: {error}");
            }
            Event::DocumentMoved { doc, owner } => {
                tracing::info!(%doc, %owner, "another server holds the document's lease now; closed here, its clients sent there");
            }
            other => tracing::warn!("{other:?}"),
        }
    }
}

/// Read by the hub every turn: see `Hub::spawn_watching`.
pub type Generation = Arc<dyn Fn() -> u64 + Send + Sync>;

fn run(
    mut session: ServerSession,
    rx: std_mpsc::Receiver<HubMsg>,
    jobs: std_mpsc::Sender<DocJob>,
    metrics: Arc<Metrics>,
    generation: Option<Generation>,
) {
    let mut seen_generation = generation.as_ref().map(|g| g());
    let mut conns: HashMap<ConnId, ConnSender> = HashMap::new();
    let mut exports: HashMap<pagesync::DocId, Vec<ExportReply>> = HashMap::new();
    let mut stopping = None;
    let mut events = EventLog::default();
    while stopping.is_none() {
        let wait = session
            .poll_timeout()
            .map_or(IDLE_WAKE_MS, |t| t.saturating_sub(now_ms()).clamp(0, IDLE_WAKE_MS));
        // Under send pressure the sockets' progress is looked at often (`report_send_progress`).
        let wait = if session.send_pressed() { wait.min(PRESSED_WAKE_MS) } else { wait };
        let first = match rx.recv_timeout(Duration::from_millis(wait as u64)) {
            Ok(m) => Some(m),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // A job came back this turn: what its document has for its subscribers goes out first.
        let mut came_back = false;
        for msg in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            came_back |= matches!(msg, HubMsg::JobDone(_));
            match msg {
                HubMsg::Connect { conn, tx } => {
                    session.connect(conn);
                    conns.insert(conn, tx);
                }
                HubMsg::Frame { conn, bytes, _permits } => {
                    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        session.handle_frame(conn, now_ms(), &bytes)
                    }));
                    if handled.is_err() {
                        tracing::error!(?conn, "handling a frame panicked; closing that connection");
                        metrics.frames_panicked.fetch_add(1, Ordering::Relaxed);
                        session.disconnect(conn);
                        conns.remove(&conn);
                    }
                }
                HubMsg::Drained { conn } => {
                    if let Some(c) = conns.get(&conn) {
                        session.set_send_backlog(conn, c.backlog.load(Ordering::Acquire));
                    }
                }
                HubMsg::Disconnect { conn } => {
                    session.disconnect(conn);
                    conns.remove(&conn);
                }
                HubMsg::Export { doc, reply } => {
                    exports.entry(doc).or_default().push(reply);
                    session.request_export(doc);
                }
                HubMsg::CloseDeleted { doc, reply } => {
                    let _ = reply.send(session.close_deleted(doc));
                }
                HubMsg::MutatorsChanged => session.mutators_changed(),
                HubMsg::JobDone(done) => session.job_done(*done, now_ms()),
                HubMsg::Shutdown(done) => stopping = Some(done),
            }
        }
        if let Some(g) = generation.as_ref().map(|g| g())
            && Some(g) != seen_generation
        {
            seen_generation = Some(g);
            let why = "this server lost its place in the cluster for a moment and may no longer write its documents: subscribe again";
            session.close_all(pagesync::protocol::codes::UNAVAILABLE, why);
            tracing::warn!(
                "closed every open document: this server's cluster membership lapsed or was buried"
            );
        }
        answer_exports(&mut session, &mut exports);
        if session.send_pressed() {
            report_send_progress(&mut session, &conns);
        }
        session.handle_timeout(now_ms());
        // What a document that came back from a job has for its subscribers goes before it is
        // taken out again: while it is out nothing is sent from it, and a document with a
        // backlog of steps (each up to a mutation's CPU time) would be out again at once, its
        // subscribers (the authors of the mutations it applied among them) waiting for every
        // step of the backlog.
        if came_back {
            flush_outgoing(&mut session, &mut conns, &metrics, &mut events);
        }
        while let Some(job) = session.poll_job(now_ms()) {
            if let Err(std_mpsc::SendError(job)) = jobs.send(job) {
                // No workers left (only at exit): run it here.
                session.job_done(job.run(), now_ms());
            }
        }
        flush_outgoing(&mut session, &mut conns, &metrics, &mut events);
    }
    // Shutdown: every step out on a worker comes back, then what is queued is applied, for at
    // most `SHUTDOWN_FLUSH`.
    while session.jobs_out() > 0 {
        match rx.recv() {
            Ok(HubMsg::JobDone(done)) => session.job_done(*done, now_ms()),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let deadline = std::time::Instant::now() + SHUTDOWN_FLUSH;
    session.flush_while(now_ms(), || std::time::Instant::now() < deadline);
    flush_outgoing(&mut session, &mut conns, &metrics, &mut events);
    if let Some(done) = stopping {
        let _ = done.send(());
    }
}

/// How long a shutdown goes on applying queued mutations (each bounded by its CPU time): what
/// is still queued after it stays unacknowledged, and its clients send it again.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

type ExportReply = oneshot::Sender<Result<Vec<u8>, ExportError>>;

/// Answers the exports that are done.
fn answer_exports(session: &mut ServerSession, exports: &mut HashMap<pagesync::DocId, Vec<ExportReply>>) {
    while let Some((doc, exported)) = session.poll_export() {
        // A copy for each waiter but the last, which takes the file itself.
        let mut replies = exports.remove(&doc).unwrap_or_default();
        let last = replies.pop();
        for reply in replies {
            let _ = reply.send(exported.clone());
        }
        if let Some(reply) = last {
            let _ = reply.send(exported);
        }
    }
}

/// Tells the session how long ago the socket of each connection last took bytes (see
/// `pagesync::protocol::PRESSURE_IDLE_MS`), measured on a clock that never steps.
fn report_send_progress(session: &mut ServerSession, conns: &HashMap<ConnId, ConnSender>) {
    let (now, mono) = (now_ms(), crate::mono_ms());
    for (conn, c) in conns {
        let at = c.took_bytes_at.as_ref().map_or(0, |at| at.load(Ordering::Relaxed));
        if at > 0 {
            session.set_send_progress(*conn, now, mono - at);
        }
    }
}

/// Logs the session's events, hands its frames to the connections (reporting each one's
/// backlog), closes the connections it is done with, and updates the metrics.
fn flush_outgoing(
    session: &mut ServerSession,
    conns: &mut HashMap<ConnId, ConnSender>,
    metrics: &Metrics,
    events: &mut EventLog,
) {
    while let Some(event) = session.poll_event() {
        events.write(event);
    }
    while let Some((conn, msg)) = session.poll_transmit() {
        if let Some(c) = conns.get(&conn) {
            // Counted, not copied: the writer encodes it.
            let len = msg.encoded_len();
            c.backlog.fetch_add(len, Ordering::AcqRel);
            c.watched.store(true, Ordering::Release);
            if c.tx.send(Box::new(msg)).is_err() {
                c.backlog.fetch_sub(len, Ordering::AcqRel);
            }
            session.set_send_backlog(conn, c.backlog.load(Ordering::Acquire));
        }
    }
    let closing: Vec<ConnId> = conns.keys().copied().filter(|c| session.should_close(*c)).collect();
    for conn in closing {
        session.disconnect(conn);
        conns.remove(&conn); // dropping the sender closes the websocket
    }
    let open = session.document_count();
    metrics.open_documents.store(open as u64, Ordering::Relaxed);
    metrics.session.lock().expect("BUG: metrics lock poisoned").clone_from(session.stats());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_repeats_is_logged_once_a_second_with_its_count() {
        let mut log = EventLog::default();
        let (a, b) = (pagesync::DocId::from_u128(1), pagesync::DocId::from_u128(2));
        let start = std::time::Instant::now();
        assert_eq!(log.admit(a, "reading", start), Some(0));
        for _ in 0..1_000 {
            assert_eq!(log.admit(a, "reading", start), None);
        }
        assert_eq!(log.admit(a, "mapping", start), Some(0), "another kind");
        assert_eq!(log.admit(b, "reading", start), Some(0), "another document");
        assert_eq!(log.admit(a, "reading", start + REPEAT_EVERY), Some(1_000));
        assert_eq!(log.admit(a, "reading", start + REPEAT_EVERY), None);
        // Past the kinds remembered, the others share one allowance.
        let written = (0..10 * MAX_REMEMBERED as u128)
            .filter(|doc| log.admit(pagesync::DocId::from_u128(doc + 100), "reading", start).is_some())
            .count();
        assert!(log.written.len() <= MAX_REMEMBERED, "{} remembered", log.written.len());
        assert!(written <= MAX_REMEMBERED + 1, "{written} written at once");
    }
}

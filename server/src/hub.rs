//! The hub: one thread that owns the `ServerSession` and every open document.
//!
//! Documents do blocking work (SQLite, fsync), so the hub runs on a thread of its own rather
//! than on the async runtime. Connection tasks send it frames over a channel; it drains
//! everything queued before it steps, so mutations arriving together share a step (and an
//! fsync). Outgoing frames go back over each connection's unbounded channel: what is in flight
//! is bounded by the protocol's byte windows, not by the channel.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pagesync::protocol::{ConnId, Event, ServerSession};
use tokio::sync::{mpsc, oneshot};

use crate::Metrics;

/// The longest the hub sleeps with nothing to do; it also re-reads the clock then.
const IDLE_WAKE_MS: i64 = 1_000;

enum HubMsg {
    Connect { conn: ConnId, tx: mpsc::UnboundedSender<Vec<u8>> },
    Frame { conn: ConnId, bytes: Vec<u8> },
    Disconnect { conn: ConnId },
    Export { doc: pagesync::DocId, reply: oneshot::Sender<Result<Vec<u8>, String>> },
    Shutdown(oneshot::Sender<()>),
}

/// A handle to the hub thread.
#[derive(Clone, Debug)]
pub struct Hub {
    tx: std_mpsc::Sender<HubMsg>,
    next_conn: Arc<AtomicU64>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Hub {
    pub fn spawn(session: ServerSession, metrics: Arc<Metrics>) -> Hub {
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("pagesync-hub".into())
            .spawn(move || run(session, rx, metrics))
            .expect("BUG: cannot spawn the hub thread");
        Hub { tx, next_conn: Arc::new(AtomicU64::new(1)) }
    }

    /// Registers a connection; its outgoing frames arrive on the returned receiver, which
    /// closes when the server wants the connection closed.
    pub fn connect(&self) -> (ConnId, mpsc::UnboundedReceiver<Vec<u8>>) {
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.tx.send(HubMsg::Connect { conn, tx });
        (conn, rx)
    }

    pub fn frame(&self, conn: ConnId, bytes: Vec<u8>) {
        let _ = self.tx.send(HubMsg::Frame { conn, bytes });
    }

    pub fn disconnect(&self, conn: ConnId) {
        let _ = self.tx.send(HubMsg::Disconnect { conn });
    }

    /// The document as a `.sqlite` file, consistent as of its last durable step.
    pub async fn export(&self, doc: pagesync::DocId) -> Result<Vec<u8>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(HubMsg::Export { doc, reply }).map_err(|_| "the server is shutting down".to_owned())?;
        rx.await.map_err(|_| "the server is shutting down".to_owned())?
    }

    /// Applies what is queued, then stops the hub.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(HubMsg::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn log(event: Event) {
    match event {
        Event::StepFailed { doc, error, retry_in_ms } => {
            tracing::warn!(%doc, retry_in_ms, "a step failed; its mutations stay queued: {error}");
        }
        Event::MutationIsolated { doc, step_lsn, timeline, lsn, rejection } => {
            tracing::warn!(%doc, %step_lsn, %timeline, %lsn, code = rejection.code.as_str(), "mutation rejected because its step could not hold it: {}", rejection.message);
        }
        other => tracing::warn!("{other:?}"),
    }
}

fn run(mut session: ServerSession, rx: std_mpsc::Receiver<HubMsg>, metrics: Arc<Metrics>) {
    let mut conns: HashMap<ConnId, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
    let mut stopping = None;
    while stopping.is_none() {
        let wait = session.poll_timeout().map_or(IDLE_WAKE_MS, |t| (t - now_ms()).clamp(0, IDLE_WAKE_MS));
        let first = match rx.recv_timeout(Duration::from_millis(wait as u64)) {
            Ok(m) => Some(m),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        for msg in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match msg {
                HubMsg::Connect { conn, tx } => {
                    session.connect(conn);
                    conns.insert(conn, tx);
                }
                HubMsg::Frame { conn, bytes } => session.handle_frame(conn, now_ms(), &bytes),
                HubMsg::Disconnect { conn } => {
                    session.disconnect(conn);
                    conns.remove(&conn);
                }
                HubMsg::Export { doc, reply } => {
                    let _ = reply.send(session.export(doc).map_err(|e| e.to_string()));
                }
                HubMsg::Shutdown(done) => stopping = Some(done),
            }
        }
        session.handle_timeout(now_ms());
        while let Some(event) = session.poll_event() {
            log(event);
        }
        while let Some((conn, msg)) = session.poll_transmit() {
            if let Some(tx) = conns.get(&conn) {
                let _ = tx.send(msg.encode());
            }
        }
        let closing: Vec<ConnId> = conns.keys().copied().filter(|c| session.should_close(*c)).collect();
        for conn in closing {
            session.disconnect(conn);
            conns.remove(&conn); // dropping the sender closes the websocket
        }
        metrics.open_documents.store(session.documents().count() as u64, Ordering::Relaxed);
        metrics.session.lock().expect("BUG: metrics lock poisoned").clone_from(session.stats());
    }
    if let Some(done) = stopping {
        let _ = done.send(());
    }
}

//! `ClientSession`: the client side of one connection, multiplexing many documents (the
//! LinkManager role), sans-io.
//!
//! Per document it keeps the subscription's state (`SubState`), the upload's `SendWindow` and
//! whether a storage acknowledgement is due. Losses are repaired by timeouts (`RETRANSMIT_MS`
//! rewinds the upload to what the server acknowledged; `KEEPALIVE_MS` of silence
//! re-subscribes, which makes the server resend from what the client holds). Acknowledgements
//! never rewind anything, so pipelined batches are not resent.
//!
//! Routes: a document syncs with the session's home server (the URL its driver was given)
//! until a `Redirect` names the server that holds its lease; from then on its messages go
//! over a connection to that server (`poll_transmit_on`), which the driver keeps open beside
//! the home one (`routes`). A document whose server cannot be reached goes home again
//! (`route_failed`), and the home server redirects it once more or serves it itself.

use std::collections::BTreeMap;

use pagesync_journal::{DetachedSync, Lsn, LsnRange};

use super::window::{SendWindow, round_robin};
use super::{
    KEEPALIVE_MS, MAX_BATCH_BYTES, Message, PROTOCOL_VERSION, Peer, RETRANSMIT_MS, UPLOAD_WINDOW_BYTES,
};
use crate::client::{ClientDocument, Submitted};
use crate::error::{Error, Result};
use crate::ids::DocId;

/// Where a document's subscription stands on the current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubState {
    /// A `Subscribe` is due.
    Unsubscribed,
    /// Sent at `sent_ms`; the server has not said yet what it holds of our timeline, and
    /// uploading now could resend what it already has.
    Subscribing { sent_ms: i64 },
    /// The server answered the `Subscribe` sent at `sent_ms`: uploads flow.
    Live { sent_ms: i64 },
    /// The server closed the subscription (`unavailable`: it lost its cluster lease;
    /// `internal`): a `Subscribe` is due at `until_ms`, not at once, since a server that cannot
    /// serve the document answers every `Subscribe` so. Answers before it are an older
    /// subscription's.
    Closed { until_ms: i64 },
}

/// What moves a `SubState`.
#[derive(Clone, Copy, Debug)]
enum SubEvent {
    /// A new connection, or the server lost our Hello: everything is said again.
    Reset,
    /// A `Subscribe` went out.
    Sent { now_ms: i64 },
    /// The server acknowledged the subscription (`MutationsAck`).
    Acked,
    /// Storage arrived past what we hold: ask again, at most once per retransmit period.
    Gap { now_ms: i64 },
    /// Nothing heard for `KEEPALIVE_MS`.
    Silent,
    /// The server said it closed the subscription.
    Ended { now_ms: i64 },
    /// The timer ran at `now_ms`.
    Tick { now_ms: i64 },
}

impl SubState {
    /// Every transition of a subscription, in one place.
    fn on(self, event: SubEvent) -> SubState {
        use SubEvent::*;
        use SubState::*;
        match (self, event) {
            (_, Reset) => Unsubscribed,
            (Closed { until_ms }, Silent) => Closed { until_ms },
            (_, Silent) => Unsubscribed,
            (_, Ended { now_ms }) => Closed { until_ms: now_ms + KEEPALIVE_MS },
            (Closed { until_ms }, Tick { now_ms }) if now_ms >= until_ms => Unsubscribed,
            (_, Tick { .. }) => self,
            (_, Sent { now_ms }) => Subscribing { sent_ms: now_ms },
            (Subscribing { sent_ms } | Live { sent_ms }, Acked) => Live { sent_ms },
            (Unsubscribed | Closed { .. }, Acked) => self, // an older subscription's answer
            (Closed { .. }, Gap { .. }) => self,
            (Subscribing { sent_ms } | Live { sent_ms }, Gap { now_ms })
                if now_ms < sent_ms + RETRANSMIT_MS =>
            {
                self
            }
            (_, Gap { .. }) => Unsubscribed,
        }
    }
}

/// Which server a document syncs with: `None` is the session's home (the server its driver
/// connects to first); `Some(url)` a server that a `Redirect` named.
pub type Route = Option<String>;

/// A connected route: what its connection still has to say.
#[derive(Debug)]
struct Conn {
    hello_due: bool,
    /// Round-robin position among the route's documents.
    cursor: Option<DocId>,
}

struct Link {
    doc: ClientDocument,
    /// The server it syncs with.
    route: Route,
    state: SubState,
    /// The upload of our timeline.
    up: SendWindow,
    ack_due: bool,
    last_heard_ms: i64,
    /// The server's storage head as last reported.
    server_storage_next: Lsn,
    /// The last error the server reported for this document.
    error: Option<(String, String)>,
    /// Subscribe taking confirmations by digest: until one cannot be kept on this connection.
    digests: bool,
    /// Who else has the document open, by peer id (`Message::Presence`); cleared on a reset.
    presence: BTreeMap<u64, Peer>,
    /// This client's last broadcast, said again on every new subscription.
    mine: Option<Vec<u8>>,
    /// `mine` is due to be sent.
    broadcast_due: bool,
    /// The server deleted the document: nothing more is sent for it, and no write is taken.
    deleted: bool,
    /// Its `Subscribe` asks the server to create the document if it does not exist (see
    /// `ClientSession::set_create`); one holding writes not yet confirmed asks either way.
    create: bool,
    /// The last `Subscribe` asked to create the document.
    asked_create: bool,
    /// The server answered `not_found` to a `Subscribe` that did not ask to create it: one
    /// that asks goes as soon as it would (a write was made, or `set_create`). (One that
    /// asked and got `not_found`, from a grant that may not write, is not asked again before
    /// the keepalive: the answer would be the same.)
    missing: bool,
    /// When the last broadcast went: the next waits `BROADCAST_PACE_MS`, so the server (which
    /// refuses more than one per `MIN_BROADCAST_MS`) never drops the latest value.
    broadcast_at: Option<i64>,
    /// Head requests (`ask_head`): the newest id asked, the newest answered, and the one in
    /// flight with when it went (sent again after `HEAD_RESEND_MS`, and on a new
    /// subscription). One is in flight at a time; the next carries the newest id asked, so
    /// however often `sync` is called, each caller's ask is answered within two round trips.
    head_asked: u64,
    head_answered: u64,
    head_in_flight: Option<(u64, i64)>,
}

/// A head request unanswered this long is sent again (the server may have dropped it while
/// the document was away, past its deferred-message bound).
const HEAD_RESEND_MS: i64 = 1_000;

impl Link {
    /// Whether its `Subscribe` asks the server to create a missing document.
    fn asks_create(&self) -> bool {
        self.create || self.doc.pending_count() > 0
    }

    /// Answered `not_found` without asking to create, and now it would ask: a `Subscribe`
    /// that does is due.
    fn asks_again(&self) -> bool {
        self.missing && self.asks_create()
    }

    /// A new connection for this document: everything is said again.
    fn reset(&mut self, now_ms: i64) {
        self.state = self.state.on(SubEvent::Reset);
        self.up = SendWindow::new(self.doc.pending_range().first());
        (self.ack_due, self.last_heard_ms, self.digests) = (false, now_ms, true);
        // A head request not answered yet is asked again on the new subscription.
        self.head_in_flight = None;
        // A new subscription: the server says who is there, and hears from us again.
        self.presence.clear();
        self.broadcast_due = self.mine.is_some();
    }
}

/// What a client knows about one document's sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocStatus {
    pub pending: usize,
    pub storage_next: Lsn,
    /// The server's storage head as it last reported it (`Lsn::FIRST` before it has).
    pub server_storage_next: Lsn,
    /// The server's last error for this document: (code, message).
    pub error: Option<(String, String)>,
    /// The server deleted the document: it no longer syncs, and takes no writes.
    pub deleted: bool,
    /// How the replica fared with confirmations by digest.
    pub confirms: crate::ConfirmStats,
}

impl DocStatus {
    /// The replica holds nothing: no entry from the server, no write of its own.
    pub fn holds_nothing(&self) -> bool {
        self.pending == 0 && self.storage_next == Lsn::FIRST
    }
}

pub struct ClientSession {
    token: String,
    links: BTreeMap<DocId, Link>,
    /// The routes connected now.
    conns: BTreeMap<Route, Conn>,
    /// The URL the home route is connected to, if the driver said: a redirect there is home.
    home_url: Option<String>,
    /// Redirects followed.
    redirects: u64,
    /// Documents that changed route, for whatever reason (`reroutes`).
    reroutes: u64,
    /// See `presence_changes`.
    presence_changes: u64,
    /// See `mutator_changes`.
    mutator_changes: u64,
    /// Documents the server said were deleted, so far (`deletions`).
    deletions: u64,
    now_ms: i64,
    /// The last connection-level error from the server: (code, message).
    conn_error: Option<(String, String)>,
    /// Confirmations whose replay gave other pages (`digest_mismatches`).
    digest_mismatches: u64,
    /// Documents that took storage in the messages being handled, whose pending mutations
    /// re-run once after the last of them (`run_held_replays`).
    replays_held: Vec<DocId>,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("docs", &self.links.len())
            .field("routes", &self.conns.len())
            .finish()
    }
}

impl ClientSession {
    pub fn new(token: impl Into<String>) -> ClientSession {
        ClientSession {
            token: token.into(),
            links: BTreeMap::new(),
            conns: BTreeMap::new(),
            home_url: None,
            redirects: 0,
            reroutes: 0,
            presence_changes: 0,
            mutator_changes: 0,
            deletions: 0,
            now_ms: 0,
            conn_error: None,
            digest_mismatches: 0,
            replays_held: Vec::new(),
        }
    }

    /// Adds a document to sync over this session.
    pub fn add_document(&mut self, id: DocId, doc: ClientDocument) {
        let first = doc.pending_range().first();
        let link = Link {
            doc,
            route: None,
            state: SubState::Unsubscribed,
            up: SendWindow::new(first),
            ack_due: false,
            last_heard_ms: self.now_ms,
            server_storage_next: Lsn::FIRST,
            error: None,
            digests: true,
            presence: BTreeMap::new(),
            mine: None,
            broadcast_due: false,
            deleted: false,
            create: true,
            asked_create: false,
            missing: false,
            broadcast_at: None,
            head_asked: 0,
            head_answered: 0,
            head_in_flight: None,
        };
        self.links.insert(id, link);
    }

    /// Every document, with its id.
    pub fn documents(&self) -> impl Iterator<Item = (DocId, &ClientDocument)> {
        self.links.iter().map(|(id, l)| (*id, &l.doc))
    }

    pub fn document(&self, id: DocId) -> Option<&ClientDocument> {
        self.links.get(&id).map(|l| &l.doc)
    }

    /// Connected, the server acknowledged the subscription, and this replica holds at least
    /// the storage the server had when it last reported.
    pub fn caught_up(&self, id: DocId) -> bool {
        self.links.get(&id).is_some_and(|l| {
            self.conns.contains_key(&l.route)
                && matches!(l.state, SubState::Live { .. })
                && l.doc.storage_range().next() >= l.server_storage_next
        })
    }

    /// Asks the server for its storage head now (`HeadAsk`, answered by `Head`); returns the
    /// ask's id. Once `head_answered` reaches it, `caught_up` means "holds everything the
    /// server had committed after this call". Without it a replica with nothing of its own
    /// pending would judge itself against the head the server last reported, which may
    /// predate entries written since (`Document::sync` asks first).
    pub fn ask_head(&mut self, id: DocId) -> u64 {
        self.links.get_mut(&id).map_or(0, |l| {
            l.head_asked += 1;
            l.head_asked
        })
    }

    /// The newest head request answered (see `ask_head`).
    pub fn head_answered(&self, id: DocId) -> u64 {
        self.links.get(&id).map_or(0, |l| l.head_answered)
    }

    /// Whether the document's `Subscribe` asks the server to create it when it does not
    /// exist (`true` from `add_document`). A replica opened only to read, show or export sets
    /// `false`, so a mistyped id is answered `not_found` (in `DocStatus::error`) and leaves no
    /// document behind; a replica holding writes not yet confirmed asks to create either way
    /// (its writes create it), subscribing again if it was answered `not_found`.
    pub fn set_create(&mut self, id: DocId, create: bool) {
        if let Some(l) = self.links.get_mut(&id) {
            l.create = create;
        }
    }

    pub fn has_document(&self, id: DocId) -> bool {
        self.links.contains_key(&id)
    }

    /// Takes the document out of the session (e.g. to close it).
    pub fn remove_document(&mut self, id: DocId) -> Option<ClientDocument> {
        self.links.remove(&id).map(|l| l.doc)
    }

    pub fn status(&self, id: DocId) -> Option<DocStatus> {
        self.links.get(&id).map(|l| DocStatus {
            pending: l.doc.pending_count(),
            storage_next: l.doc.storage_range().next(),
            server_storage_next: l.server_storage_next,
            error: l.error.clone(),
            deleted: l.deleted,
            confirms: l.doc.confirm_stats(),
        })
    }

    /// Confirmations by digest whose replay gave other pages, over every document, on this
    /// session: a determinism failure each (see `ConfirmStats::mismatches`). Log when it grows.
    pub fn digest_mismatches(&self) -> u64 {
        self.digest_mismatches
    }

    pub fn connection_error(&self) -> Option<&(String, String)> {
        self.conn_error.as_ref()
    }

    /// Says `Hello` with `token` from now on, at once on every connection (the server takes
    /// a second `Hello` on a connection as a new grant): a token that replaces one about to
    /// expire, or one that did. A refusal of the old token is moot.
    pub fn set_token(&mut self, token: impl Into<String>) {
        self.token = token.into();
        for conn in self.conns.values_mut() {
            conn.hello_due = true;
        }
        if self.refused_for_good() {
            self.conn_error = None;
        }
    }

    /// The server refused the connection for what it is (`unauthorized`: a token that is
    /// wrong or expired; `version`): connecting again at once would be refused the same way,
    /// so a driver keeps backing off.
    pub fn refused_for_good(&self) -> bool {
        self.conn_error
            .as_ref()
            .is_some_and(|(code, _)| code == super::codes::UNAUTHORIZED || code == super::codes::VERSION)
    }

    /// The error shown for `id`: the document's, else the connection's.
    pub fn shown_error(&self, id: DocId) -> Option<&(String, String)> {
        self.errors(id).next()
    }

    /// The error that ends a wait for `id` to sync: the document's, else the connection's,
    /// unless it passes on its own (`codes::passes`; `shown_error` still shows it).
    pub fn sync_error(&self, id: DocId) -> Option<&(String, String)> {
        self.errors(id).find(|(code, _)| !super::codes::passes(code))
    }

    /// The document's error, then the connection's, where there are.
    fn errors(&self, id: DocId) -> impl Iterator<Item = &(String, String)> {
        // A `not_found` about to be asked again, asking to create, is moot already.
        let doc = self.links.get(&id).filter(|l| !l.asks_again()).and_then(|l| l.error.as_ref());
        [doc, self.conn_error.as_ref()].into_iter().flatten()
    }

    /// An open document, to write to (not one the server deleted).
    fn open_document(&mut self, id: DocId) -> Result<&mut ClientDocument> {
        let link =
            self.links.get_mut(&id).ok_or_else(|| Error::Malformed(format!("document {id} is not open")))?;
        if link.deleted {
            return Err(Error::Deleted);
        }
        Ok(&mut link.doc)
    }

    /// Marks a document deleted (the server said so, now or in an earlier run): it stops
    /// syncing and takes no more writes.
    pub fn mark_deleted(&mut self, id: DocId) {
        if let Some(link) = self.links.get_mut(&id) {
            link.deleted = true;
            let text = format!("document {id} was deleted on the server");
            link.error = Some((super::codes::DELETED.into(), text));
        }
    }

    /// How many documents the server said were deleted so far: when it moves, `deleted`.
    pub fn deletions(&self) -> u64 {
        self.deletions
    }

    /// Documents the server said were deleted.
    pub fn deleted(&self) -> Vec<DocId> {
        self.links.iter().filter(|(_, l)| l.deleted).map(|(id, _)| *id).collect()
    }

    /// Runs a mutation locally; it is sent when the link allows.
    pub fn mutate(&mut self, id: DocId, body: Vec<u8>, time_ms: i64, seed: u64) -> Result<Submitted> {
        self.open_document(id)?.mutate(body, time_ms, seed)
    }

    /// Runs several mutations locally with one durability barrier (see
    /// `ClientDocument::mutate_many`); they are sent when the link allows.
    pub fn mutate_many(
        &mut self,
        id: DocId,
        bodies: Vec<Vec<u8>>,
        time_ms: i64,
        seed: u64,
    ) -> Result<Vec<Submitted>> {
        self.open_document(id)?.mutate_many(bodies, time_ms, seed)
    }

    /// Runs independent writers' mutations locally with one durability barrier (see
    /// `ClientDocument::mutate_group`); each gets its own answer.
    pub fn mutate_group(
        &mut self,
        id: DocId,
        mutations: Vec<crate::Mutation>,
    ) -> Result<Vec<Result<Submitted>>> {
        self.open_document(id)?.mutate_group(mutations)
    }

    /// `mutate_group`, sent before its barrier when the replica may (`ClientDocument::
    /// send_before_durable`): the mutations are appended without one, every message then due
    /// on `id`'s route (its `Mutations` among them) goes to `send` (a driver queues them on
    /// that connection, in order), and only then are they made durable, so the fsync runs
    /// while they travel. The answers come once they are durable; if that fails, none is
    /// acknowledged, each answer is that error (the server may still apply them, as after a
    /// crash).
    pub fn mutate_group_sending(
        &mut self,
        id: DocId,
        mutations: Vec<crate::Mutation>,
        now_ms: i64,
        send: &mut dyn FnMut(&Route, Message),
    ) -> Result<Vec<Result<Submitted>>> {
        let doc = self.open_document(id)?;
        if !doc.sends_before_durable() {
            return doc.mutate_group(mutations);
        }
        let answers = doc.mutate_group_deferred(mutations)?;
        self.now_ms = self.now_ms.max(now_ms);
        let route = self.links.get(&id).map(|l| l.route.clone()).expect("BUG: opened above");
        while let Some(message) = self.poll_transmit_on(&route) {
            send(&route, message);
        }
        let doc = self.open_document(id)?;
        let barrier = doc.deferred_barrier();
        Ok(failed_barrier(doc, barrier, answers))
    }

    /// `mutate_group` with its barrier detached: the mutations run locally and are appended,
    /// and the fsync that makes them durable comes back to run with the session's lock let go
    /// (`DetachedGroup::run`), so deliveries and rebases go on meanwhile; its outcome goes to
    /// `finish_group`, which gives the answers. Nothing of them is sent before it ends, unless
    /// the replica's sent mark covers them (`ClientDocument::send_before_durable`).
    pub fn mutate_group_detached(
        &mut self,
        id: DocId,
        mutations: Vec<crate::Mutation>,
    ) -> Result<DetachedGroup> {
        let doc = self.open_document(id)?;
        let answers = doc.mutate_group_deferred(mutations)?;
        let sent_early = doc.sendable_range().next() == doc.pending_range().next();
        match doc.detach_barrier() {
            Ok(sync) => Ok(DetachedGroup { id, answers, sync, sent_early }),
            Err(e) => Ok(DetachedGroup {
                id,
                answers: failed_barrier(doc, Err(e), answers),
                sync: None,
                sent_early: false,
            }),
        }
    }

    /// The answers of a `mutate_group_detached` once its fsync ran (`outcome`): as they were
    /// if the writes are durable; otherwise each is the failure (a retry would run them twice;
    /// the server may still apply them, as after a crash).
    pub fn finish_group(
        &mut self,
        group: DetachedGroup,
        outcome: std::io::Result<()>,
    ) -> Vec<Result<Submitted>> {
        let DetachedGroup { id, answers, sync, .. } = group;
        let Some(sync) = sync else { return answers };
        let Some(doc) = self.links.get_mut(&id).map(|l| &mut l.doc) else {
            // Closed meanwhile: not acknowledged, whatever reached the disk.
            let gone =
                || Error::Malformed(format!("document {id} was closed before its writes were durable"));
            return answers.into_iter().map(|_| Err(gone())).collect();
        };
        let barrier = doc.finish_detached_barrier(sync, outcome);
        failed_barrier(doc, barrier, answers)
    }

    /// Sets when `id`'s local writes are durable (see `Durability`).
    pub fn set_durability(&mut self, id: DocId, durability: crate::client::Durability) -> Result<()> {
        self.open_document(id)?.set_durability(durability)
    }

    /// Whether some document's local writes wait for `sync_timelines`.
    pub fn needs_sync(&self) -> bool {
        self.links.values().any(|l| l.doc.needs_sync())
    }

    /// Makes every document's local writes durable (one fsync each that has new ones), so
    /// they can be sent. The first error is returned after every document was tried. A
    /// document whose group commit's fsync runs detached is left to it: its caller answers
    /// once they are durable (`mutate_group_detached`), and they go up then.
    pub fn sync_timelines(&mut self) -> Result<()> {
        self.on_every_replica(|d| if d.barrier_detached() { Ok(()) } else { d.sync_timeline() })
    }

    /// Lowers every replica's sent mark once its writes are durable (a clean close:
    /// `ClientDocument::settle_sent_mark`).
    pub fn settle_sent_marks(&mut self) -> Result<()> {
        self.on_every_replica(ClientDocument::settle_sent_mark)
    }

    /// Makes the server's entries every replica received durable (`ClientDocument::sync_storage`).
    pub fn sync_storage(&mut self) -> Result<()> {
        self.on_every_replica(ClientDocument::sync_storage)
    }

    /// `sync_storage` in two halves, so that its waits hold nothing (not this session): the
    /// barriers of every replica that has received entries since its last, each to `run`
    /// on any thread and hand back to `finish_storage_syncs`. Replicas whose backend made
    /// them durable here are done. The first error is returned after every one was tried.
    pub fn detach_storage_syncs(&mut self) -> (Vec<(DocId, DetachedSync)>, Result<()>) {
        let mut detached = Vec::new();
        let outcome = self.on_every_link(|id, doc| {
            detached.extend(doc.detach_storage_sync()?.map(|sync| (id, sync)));
            Ok(())
        });
        (detached, outcome)
    }

    /// Runs barriers from `detach_storage_syncs`, each paired with its outcome for
    /// `finish_storage_syncs`. Blocking, and needs no session: on any thread, holding nothing.
    pub fn run_storage_syncs(
        detached: Vec<(DocId, DetachedSync)>,
    ) -> Vec<(DocId, DetachedSync, std::io::Result<()>)> {
        detached
            .into_iter()
            .map(|(id, sync)| {
                let outcome = sync.run();
                (id, sync, outcome)
            })
            .collect()
    }

    /// The outcomes of barriers from `detach_storage_syncs`. A replica closed meanwhile is
    /// skipped: its close made it durable itself. The first error is returned after every
    /// one was recorded.
    pub fn finish_storage_syncs(
        &mut self,
        done: impl IntoIterator<Item = (DocId, DetachedSync, std::io::Result<()>)>,
    ) -> Result<()> {
        let mut first_error = None;
        for (id, sync, outcome) in done {
            let Some(l) = self.links.get_mut(&id) else { continue };
            if let Err(e) = l.doc.finish_storage_sync(sync, outcome) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs `f` on every replica; the first error is returned after every one was tried.
    fn on_every_replica(&mut self, mut f: impl FnMut(&mut ClientDocument) -> Result<()>) -> Result<()> {
        self.on_every_link(|_, doc| f(doc))
    }

    /// `on_every_replica`, with each replica's id.
    fn on_every_link(&mut self, mut f: impl FnMut(DocId, &mut ClientDocument) -> Result<()>) -> Result<()> {
        let mut first_error = None;
        for (id, l) in &mut self.links {
            if let Err(e) = f(*id, &mut l.doc) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Submits the migrations this replica has not applied yet (see `ClientDocument::migrate`).
    pub fn migrate(
        &mut self,
        id: DocId,
        migrations: &[(u32, &str)],
        time_ms: i64,
        seed: u64,
    ) -> Result<Vec<Submitted>> {
        self.open_document(id)?.migrate(migrations, time_ms, seed)
    }

    /// The home transport is up: start with Hello, re-subscribe everything, resend what is
    /// unacked.
    pub fn connected(&mut self, now_ms: i64) {
        self.connected_on(&None, now_ms)
    }

    /// `route`'s transport is up: Hello, then its documents subscribe and resend.
    pub fn connected_on(&mut self, route: &Route, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.conns.insert(route.clone(), Conn { hello_due: true, cursor: None });
        self.links.values_mut().filter(|l| l.route == *route).for_each(|l| l.reset(now_ms));
    }

    pub fn disconnected(&mut self) {
        self.disconnected_on(&None)
    }

    pub fn disconnected_on(&mut self, route: &Route) {
        self.conns.remove(route);
    }

    /// Whether the home route is connected.
    pub fn is_connected(&self) -> bool {
        self.conns.contains_key(&None)
    }

    /// Tells the session which URL its home connection uses now: a `Redirect` naming it is
    /// home, and documents routed there come home.
    pub fn set_home_url(&mut self, url: &str) {
        self.home_url = Some(url.to_owned());
        let (now, reroutes) = (self.now_ms, &mut self.reroutes);
        let there = Some(url.to_owned());
        self.links.values_mut().filter(|l| l.route == there).for_each(|l| {
            l.route = None;
            *reroutes += 1;
            l.reset(now);
        });
    }

    /// Every route a connection is wanted for: home, and each server a document was
    /// redirected to.
    pub fn routes(&self) -> std::collections::BTreeSet<Route> {
        std::iter::once(None).chain(self.links.values().map(|l| l.route.clone())).collect()
    }

    /// Sends a document to the server at `url` (a route remembered from an earlier run), as a
    /// redirect there would; a URL a redirect could not name is ignored.
    pub fn route_to(&mut self, id: DocId, url: &str) {
        let to = route_for(self.home_url.as_deref(), url);
        let allowed = redirect_allowed(self.home_url.as_deref(), url).is_ok();
        let now = self.now_ms;
        if let Some(link) = self.links.get_mut(&id).filter(|l| allowed && l.route != to) {
            link.route = to;
            self.reroutes += 1;
            link.reset(now);
        }
    }

    /// The server a document syncs with.
    pub fn route_of(&self, id: DocId) -> Option<&Route> {
        self.links.get(&id).map(|l| &l.route)
    }

    /// `route`'s server cannot be reached: its documents go home, whose server redirects
    /// them again or serves them itself (once the unreachable one's lease lapsed).
    pub fn route_failed(&mut self, route: &Route) {
        if route.is_none() {
            return;
        }
        self.conns.remove(route);
        let (now, reroutes) = (self.now_ms, &mut self.reroutes);
        self.links.values_mut().filter(|l| l.route == *route).for_each(|l| {
            l.route = None;
            *reroutes += 1;
            l.reset(now);
        });
    }

    /// The URL the home route is connected to, as the driver said (`set_home_url`).
    pub fn home_url(&self) -> Option<&str> {
        self.home_url.as_deref()
    }

    /// Sends `value` to everyone else with the document open (presence), as soon as the
    /// document is subscribed, and again after every reconnect; a newer value replaces one not
    /// sent yet. Never written anywhere.
    pub fn broadcast(&mut self, id: DocId, value: Vec<u8>) -> Result<()> {
        if value.len() > super::MAX_BROADCAST_BYTES {
            let why = format!("a broadcast of {} bytes; at most {}", value.len(), super::MAX_BROADCAST_BYTES);
            return Err(Error::Refused(why));
        }
        let link =
            self.links.get_mut(&id).ok_or_else(|| Error::Refused(format!("document {id} is not open")))?;
        (link.mine, link.broadcast_due) = (Some(value), true);
        self.presence_changes += 1;
        Ok(())
    }

    /// Who else has the document open, with what each broadcast last, by peer id.
    pub fn presence(&self, id: DocId) -> Vec<Peer> {
        self.links.get(&id).map(|l| l.presence.values().cloned().collect()).unwrap_or_default()
    }

    /// Whether this client's last broadcast on `id` has gone out.
    pub fn broadcast_sent(&self, id: DocId) -> bool {
        self.links.get(&id).is_some_and(|l| !l.broadcast_due)
    }

    /// Bumped whenever some document's presence changed (a peer came, went or broadcast).
    pub fn presence_changes(&self) -> u64 {
        self.presence_changes
    }

    /// Bumped whenever a document's mutator definitions arrived (its pending calls ran again
    /// under them): a driver that keeps them elsewhere looks again.
    pub fn mutator_changes(&self) -> u64 {
        self.mutator_changes
    }

    /// Redirects followed so far.
    pub fn redirects(&self) -> u64 {
        self.redirects
    }

    /// Route changes so far (redirects, and documents sent home): when it moves, a driver
    /// looks at which connections it needs.
    pub fn reroutes(&self) -> u64 {
        self.reroutes
    }

    /// Handles one message from the server. An `Err` is local trouble (the document's journals);
    /// protocol errors from the server are recorded in `status` / `connection_error`.
    pub fn handle_message(&mut self, now_ms: i64, msg: Message) -> Result<()> {
        self.handle_message_on(&None, now_ms, msg)
    }

    /// Handles one message that came over `route`'s connection. Messages about a document
    /// that syncs elsewhere now are stale and dropped.
    pub fn handle_message_on(&mut self, route: &Route, now_ms: i64, msg: Message) -> Result<()> {
        let handled = self.handle_message_held(route, now_ms, msg);
        let replayed = self.run_held_replays();
        handled.and(replayed)
    }

    /// Re-runs the pending mutations of the documents that took storage since the last call,
    /// once each (`ClientDocument::receive_wire_held`). The first failure is returned after
    /// every document was tried; a document whose re-run failed stays due (the timer tries
    /// again).
    fn run_held_replays(&mut self) -> Result<()> {
        let mut first = Ok(());
        for id in std::mem::take(&mut self.replays_held) {
            if let Some(link) = self.links.get_mut(&id)
                && let Err(e) = link.doc.rebase_if_due()
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    /// `handle_message_on`, leaving the re-run of pending mutations after storage to
    /// `run_held_replays`.
    fn handle_message_held(&mut self, route: &Route, now_ms: i64, msg: Message) -> Result<()> {
        self.now_ms = self.now_ms.max(now_ms);
        if let Message::Error { doc: None, code, message } = &msg {
            if code == super::codes::NOT_HELLO
                && let Some(conn) = self.conns.get_mut(route)
            {
                // Our Hello was lost or overtaken: say it again, and everything after it.
                conn.hello_due = true;
                let on_route = self.links.values_mut().filter(|l| l.route == *route);
                on_route.for_each(|l| l.state = l.state.on(SubEvent::Reset));
                return Ok(());
            }
            self.conn_error = Some((code.clone(), message.clone()));
            // A server a redirect named that will not have us: its documents go home.
            self.route_failed(route);
            return Ok(());
        }
        // A redirect to a server no document syncs with yet needs a connection more: at most
        // `MAX_ROUTES` of them, whatever servers say.
        let routes_full = match &msg {
            Message::Redirect { url, .. } => {
                let routes: std::collections::BTreeSet<&String> =
                    self.links.values().filter_map(|l| l.route.as_ref()).collect();
                Some(url) != self.home_url.as_ref() && !routes.contains(url) && routes.len() >= MAX_ROUTES
            }
            _ => false,
        };
        let Some(link) = msg.doc().and_then(|d| self.links.get_mut(&d)).filter(|l| l.route == *route) else {
            return Ok(());
        };
        link.last_heard_ms = now_ms;
        match msg {
            Message::Redirect { url, .. } => {
                let allowed = redirect_allowed(self.home_url.as_deref(), &url).and(if routes_full {
                    Err("it would be one server too many")
                } else {
                    Ok(())
                });
                if let Err(why) = allowed {
                    let shown: String = url.chars().take(200).collect();
                    link.error = Some(("redirect".into(), format!("refused a redirect to {shown:?}: {why}")));
                    return Ok(());
                }
                let to = route_for(self.home_url.as_deref(), &url);
                if to != link.route {
                    link.route = to;
                    self.reroutes += 1;
                    link.reset(now_ms);
                    self.redirects += 1;
                }
            }
            // A server a redirect named cannot serve it now: home, which redirects again or
            // serves it, after a pause (home may name the same server at once, and each round
            // costs both servers an open).
            Message::Error { code, message, .. } if code == super::codes::UNAVAILABLE && route.is_some() => {
                link.route = None;
                self.reroutes += 1;
                link.reset(now_ms);
                link.state = link.state.on(SubEvent::Ended { now_ms });
                link.error = Some((code, message));
            }
            Message::MutationsAck { next_expected, storage_next, .. } => {
                // The server accepted our Hello and subscription: older refusals are moot.
                self.conn_error = None;
                (link.error, link.missing) = (None, false);
                match link.state {
                    // An older subscription's answer: what it says the server holds may be gone.
                    SubState::Unsubscribed | SubState::Closed { .. } => {}
                    SubState::Subscribing { .. } => {
                        // A new subscription's answer: what the server held queued before it
                        // may be gone (it closed the document, say for a lapsed cluster lease,
                        // and dropped mutations it had acknowledged but not applied): upload
                        // from what it says now, not from what it said then. The rejections
                        // it was told we copied may be forgotten too (a restart): said again.
                        link.up = SendWindow::new(link.doc.pending_range().first());
                        link.up.ack(next_expected);
                        link.ack_due |= link.doc.outcomes_through().is_some();
                    }
                    // Below what it said before: it dropped mutations it had queued and not
                    // applied (a timeline held back for its unacknowledged rejections): they go
                    // up again from there, and it hears which rejections we copied.
                    SubState::Live { .. } if next_expected < link.up.acked => {
                        let from = next_expected.max(link.doc.pending_range().first());
                        link.up.taken_back(from, now_ms);
                        link.ack_due |= link.doc.outcomes_through().is_some();
                    }
                    SubState::Live { .. } => {
                        // Nothing taken of what was sent (a full queue, or a hold whose
                        // acknowledgement the server lost): it hears which rejections we
                        // copied again. Not for an answer that took some: uploads in flight
                        // are answered one by one.
                        let stuck = next_expected <= link.up.acked && next_expected < link.up.next;
                        link.ack_due |= stuck && link.doc.outcomes_through().is_some();
                        link.up.ack(next_expected);
                    }
                }
                link.state = link.state.on(SubEvent::Acked);
                link.server_storage_next = link.server_storage_next.max(storage_next);
            }
            Message::Storage { doc: id, first, entries } => {
                // Past what we hold, only a checkpoint's first part is taken (the replica
                // restarts there); anything else is a gap.
                if !self.replays_held.contains(&id) {
                    self.replays_held.push(id);
                }
                match link.doc.receive_wire_held(first, entries) {
                    Err(crate::Error::Gap { .. }) => {
                        link.state = link.state.on(SubEvent::Gap { now_ms });
                        return Ok(());
                    }
                    Err(e @ crate::Error::ConfirmMismatch { replayed, .. }) => {
                        // The entries before it are kept; it and the rest come again with
                        // their pages, on a subscription without confirmations.
                        link.digests = false;
                        link.state = SubState::Unsubscribed;
                        link.ack_due = true;
                        if replayed {
                            link.error = Some((super::codes::NONDETERMINISM.into(), e.to_string()));
                            self.digest_mismatches += 1;
                        }
                        return Ok(());
                    }
                    Err(e) if is_local_io(&e) => {
                        // Not the server's doing, and no wait for the document to sync may
                        // end as a timeout that blames the network: the status says why.
                        let why = format!("this replica could not keep what the server sent: {e}");
                        link.error = Some((super::codes::LOCAL_STORAGE.into(), why));
                        return Err(e);
                    }
                    result => result?,
                }
                link.ack_due = true;
                // What the storage confirmed, the server holds.
                link.up.ack(link.doc.pending_range().first());
                // Storage arrived: a failed step or read the server was retrying went through
                // (or this replica's own write did), so its error no longer describes the
                // document.
                let passed = [super::codes::STORAGE, super::codes::LOCAL_STORAGE];
                if link.error.as_ref().is_some_and(|(code, _)| passed.contains(&code.as_str())) {
                    link.error = None;
                }
            }
            Message::Mutators { version, source, .. } => {
                let parsed = match version.is_empty() {
                    true => Ok(None),
                    false => crate::mutators::Mutators::parse(&source).map(|m| Some(std::sync::Arc::new(m))),
                };
                match parsed {
                    Ok(m) => {
                        link.doc.set_mutators(m)?;
                        self.mutator_changes += 1;
                    }
                    Err(why) => {
                        link.error = Some(("mutators".into(), format!("the server's mutators: {why}")))
                    }
                }
            }
            Message::Presence { peer, .. } => {
                link.presence.insert(peer.id, peer);
                self.presence_changes += 1;
            }
            Message::PeerLeft { peer, .. } => {
                link.presence.remove(&peer);
                self.presence_changes += 1;
            }
            // The server's head after ask `id` was made: it answers every ask up to `id`.
            Message::Head { id, storage_next, .. } if id > link.head_answered && id <= link.head_asked => {
                link.head_answered = id;
                link.server_storage_next = link.server_storage_next.max(storage_next);
                link.head_in_flight = link.head_in_flight.filter(|(sent, _)| *sent > id);
            }
            // The server has no subscription for it here (it closed the document, or never
            // had one): subscribe again, and what was unanswered goes again.
            Message::Error { code, .. } if code == super::codes::NOT_SUBSCRIBED => {
                link.reset(now_ms);
            }
            // The server closed the document under its subscribers (it lost its cluster lease,
            // or an internal error): subscribe again after a pause, and upload from what the
            // new subscription says the server holds.
            Message::Error { code, message, .. }
                if code == super::codes::UNAVAILABLE || code == super::codes::INTERNAL =>
            {
                link.state = link.state.on(SubEvent::Ended { now_ms });
                link.up = SendWindow::new(link.doc.pending_range().first());
                link.error = Some((code, message));
            }
            Message::Error { code, message, .. } => {
                if code == super::codes::DELETED && !link.deleted {
                    link.deleted = true;
                    self.deletions += 1;
                }
                link.missing = code == super::codes::NOT_FOUND && !link.asked_create;
                link.error = Some((code, message));
            }
            _ => {}
        }
        Ok(())
    }

    /// Decodes and handles a frame; a frame that does not decode is a connection error.
    pub fn handle_frame(&mut self, now_ms: i64, frame: &[u8]) -> Result<()> {
        self.handle_frames(now_ms, [frame])
    }

    /// Handles frames that arrived together. Consecutive `Storage` messages of one document
    /// are applied as one batch: one durability barrier and one rebase of the pending
    /// mutations for all of them, so a client that fell behind catches up in fewer, larger
    /// steps instead of rebasing once per message.
    pub fn handle_frames<F: AsRef<[u8]>>(
        &mut self,
        now_ms: i64,
        frames: impl IntoIterator<Item = F>,
    ) -> Result<()> {
        self.handle_frames_on(&None, now_ms, frames)
    }

    /// `handle_frames` for frames that came over `route`'s connection.
    pub fn handle_frames_on<F: AsRef<[u8]>>(
        &mut self,
        route: &Route,
        now_ms: i64,
        frames: impl IntoIterator<Item = F>,
    ) -> Result<()> {
        self.handle_decoded_on(route, now_ms, frames.into_iter().map(|f| Message::decode(f.as_ref())))
    }

    /// `handle_frames_on` for frames already decoded (`Message::decode`, which needs no
    /// session: a driver can decode on another thread while this applies the frames before).
    /// A frame that did not decode is a connection error; the frames after it are dropped.
    pub fn handle_decoded_on(
        &mut self,
        route: &Route,
        now_ms: i64,
        decoded: impl IntoIterator<Item = std::result::Result<Message, super::DecodeError>>,
    ) -> Result<()> {
        let mut merged: Vec<Message> = Vec::new();
        for msg in decoded {
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    self.conn_error = Some((super::codes::MALFORMED.into(), e.to_string()));
                    break;
                }
            };
            if let (Some(Message::Storage { doc, first, entries }), Message::Storage { doc: d, first: f, .. }) =
                (merged.last_mut(), &msg)
                && doc == d
                && first.get() + entries.len() as u64 == f.get()
            {
                let Message::Storage { entries: more, .. } = msg else { unreachable!("BUG: matched above") };
                entries.extend(more);
                continue;
            }
            merged.push(msg);
        }
        // Storage for a document in several of these messages (acknowledgements between them,
        // say): its pending mutations re-run once, after the last.
        let handled = merged.into_iter().try_for_each(|msg| self.handle_message_held(route, now_ms, msg));
        let replayed = self.run_held_replays();
        handled.and(replayed)
    }

    /// Runs what is due by `now_ms`. `true` when a document's state changed (a rebase that
    /// had failed ran now): tell whoever shows it.
    pub fn handle_timeout(&mut self, now_ms: i64) -> bool {
        self.now_ms = self.now_ms.max(now_ms);
        let mut changed = false;
        for l in self.links.values_mut() {
            // A failure (the replica's storage) leaves it due: the next timer tries again.
            changed |= l.doc.rebase_if_due().unwrap_or(false);
            let _ = l.doc.trim_if_due();
        }
        let conns = &self.conns;
        for l in self.links.values_mut().filter(|l| conns.contains_key(&l.route)) {
            l.up.rewind_if_due(now_ms);
            l.state = l.state.on(SubEvent::Tick { now_ms });
            if now_ms >= l.last_heard_ms + KEEPALIVE_MS {
                l.state = l.state.on(SubEvent::Silent);
                l.last_heard_ms = now_ms;
            }
        }
        changed
    }

    pub fn poll_timeout(&self) -> Option<i64> {
        let links = self.links.values().filter(|l| self.conns.contains_key(&l.route));
        let broadcast = |l: &Link| l.broadcast_at.filter(|_| l.broadcast_due).map(|t| t + BROADCAST_PACE_MS);
        // Only where `next_message` would send it: a deadline it cannot act on would spin.
        let head = |l: &Link| {
            let live = matches!(l.state, SubState::Live { .. }) && !l.deleted;
            l.head_in_flight.filter(|_| live).map(|(_, t)| t + HEAD_RESEND_MS)
        };
        links
            .flat_map(|l| {
                let closed = match l.state {
                    SubState::Closed { until_ms } => Some(until_ms),
                    _ => None,
                };
                [Some(l.last_heard_ms + KEEPALIVE_MS), l.up.resend_at(), broadcast(l), head(l), closed]
            })
            .flatten()
            .min()
    }

    /// The next message to send home: Hello first, then round-robin over documents.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.poll_transmit_on(&None)
    }

    /// The next message for `route`'s connection: Hello first, then round-robin over the
    /// documents that sync there.
    pub fn poll_transmit_on(&mut self, route: &Route) -> Option<Message> {
        let conn = self.conns.get_mut(route)?;
        if conn.hello_due {
            conn.hello_due = false;
            return Some(Message::Hello { version: PROTOCOL_VERSION, token: self.token.clone() });
        }
        let links = &mut self.links;
        let on_route = links.iter().filter(|(_, l)| l.route == *route).map(|(id, _)| *id);
        for id in round_robin(on_route, conn.cursor) {
            let link = links.get_mut(&id).expect("BUG: id from keys");
            if let Some(msg) = next_message(id, link, self.now_ms) {
                conn.cursor = Some(id);
                return Some(msg);
            }
        }
        None
    }
}

/// A client sends one document's broadcasts at most this often: twice the server's bound, so
/// that network jitter never brings two within `MIN_BROADCAST_MS` of each other there.
pub const BROADCAST_PACE_MS: i64 = 2 * super::MIN_BROADCAST_MS;

/// Servers besides home that one client syncs with at most: a redirect to one more is refused.
pub const MAX_ROUTES: usize = 64;

/// Whether `e` is this replica's own storage failing (a full disk, an I/O error, a journal
/// that refuses writes after a failed fsync), not something the server sent.
fn is_local_io(e: &Error) -> bool {
    use crate::store::StoreError;
    use pagesync_journal::JournalError;
    let io = |j: &JournalError| matches!(j, JournalError::Io { .. } | JournalError::Poisoned { .. });
    match e {
        Error::Journal(j) | Error::Store(StoreError::Journal(j)) => io(j),
        _ => false,
    }
}

/// A group commit whose fsync waits to run with no lock held (`ClientSession::
/// mutate_group_detached`).
#[derive(Debug)]
pub struct DetachedGroup {
    id: DocId,
    answers: Vec<Result<Submitted>>,
    sync: Option<DetachedSync>,
    /// Every pending write of the document may be sent before the fsync ends (the sent mark
    /// covers them): the fsync makes none sendable.
    sent_early: bool,
}

impl DetachedGroup {
    /// Runs the fsync (blocking; holds nothing). `Ok` at once when there is none to run.
    pub fn run(&self) -> std::io::Result<()> {
        self.sync.as_ref().map_or(Ok(()), DetachedSync::run)
    }

    /// Whether the document's writes could all be sent before this group's fsync ran: a
    /// connection woken then sent them, and one woken after it would find nothing new.
    pub fn sendable_before_fsync(&self) -> bool {
        self.sent_early
    }
}

/// `answers` if `barrier` made them durable; otherwise each is its failure.
fn failed_barrier(
    doc: &ClientDocument,
    barrier: Result<()>,
    answers: Vec<Result<Submitted>>,
) -> Vec<Result<Submitted>> {
    let Err(e) = barrier else { return answers };
    let journal = doc.timeline_id().journal_id();
    let message = format!("the write could not be made durable: {e}");
    let failed =
        || Error::Journal(pagesync_journal::JournalError::Backend { journal, message: message.clone() });
    answers.iter().map(|_| Err(failed())).collect()
}

/// The route of the server at `url`: home if the home connection uses that URL.
fn route_for(home: Option<&str>, url: &str) -> Route {
    (home != Some(url)).then(|| url.to_owned())
}

/// The longest URL a redirect may name.
pub const MAX_REDIRECT_URL_BYTES: usize = 2048;

/// Whether a client follows a redirect to `url`: a websocket URL of bounded length, and never
/// from `wss://` down to `ws://` (the token and the mutations would go in the clear).
fn redirect_allowed(home: Option<&str>, url: &str) -> std::result::Result<(), &'static str> {
    if url.len() > MAX_REDIRECT_URL_BYTES {
        return Err("too long");
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("not a URL");
    }
    let secure = has_scheme(url, "wss://");
    if !secure && !has_scheme(url, "ws://") {
        return Err("not a ws:// or wss:// URL");
    }
    if home.is_some_and(|h| has_scheme(h, "wss://")) && !secure {
        return Err("it would leave wss:// for ws://");
    }
    Ok(())
}

/// Whether `url` starts with `scheme` (`"wss://"`), in any case: `WSS://` is TLS too.
pub fn has_scheme(url: &str, scheme: &str) -> bool {
    url.get(..scheme.len()).is_some_and(|s| s.eq_ignore_ascii_case(scheme))
}

fn next_message(id: DocId, l: &mut Link, now_ms: i64) -> Option<Message> {
    if l.deleted {
        return None;
    }
    if l.asks_again() {
        l.error = None;
        l.reset(now_ms);
    }
    if l.state == SubState::Unsubscribed {
        let Some(key) = l.doc.timeline_key() else {
            // The server would refuse it: no subscription, and the status says why.
            let text = "this replica has no timeline key (ClientDocument::set_timeline_key): it cannot sync";
            l.error = Some(("timeline".into(), text.into()));
            return None;
        };
        l.state = l.state.on(SubEvent::Sent { now_ms });
        // Its answer says anew whether the document is missing: a `not_found` to an earlier
        // one that arrives after a `Subscribe` asking to create would otherwise be taken
        // for this one's.
        let create = l.asks_create();
        (l.asked_create, l.missing) = (create, false);
        let storage_next = l.doc.storage_range().next();
        return Some(Message::Subscribe { doc: id, key, storage_next, digests: l.digests, create });
    }
    if l.ack_due {
        l.ack_due = false;
        let (next, outcomes_through) = (l.doc.storage_range().next(), l.doc.outcomes_through());
        return Some(Message::StorageAck { doc: id, next, outcomes_through });
    }
    if !matches!(l.state, SubState::Live { .. }) {
        return None;
    }
    if l.broadcast_due
        && l.broadcast_at.is_none_or(|t| now_ms >= t + BROADCAST_PACE_MS)
        && let Some(value) = l.mine.clone()
    {
        (l.broadcast_due, l.broadcast_at) = (false, Some(now_ms));
        return Some(Message::Broadcast { doc: id, value });
    }
    let head_due = match l.head_in_flight {
        None => l.head_asked > l.head_answered,
        Some((_, sent_ms)) => now_ms >= sent_ms + HEAD_RESEND_MS,
    };
    if head_due {
        l.head_in_flight = Some((l.head_asked, now_ms));
        return Some(Message::HeadAsk { doc: id, id: l.head_asked });
    }
    upload_batch(id, l, now_ms)
}

/// The next `Mutations` message, within the upload window and the batch size.
fn upload_batch(id: DocId, l: &mut Link, now_ms: i64) -> Option<Message> {
    // Durable entries, and those whose barrier runs while they travel (the sent mark covers
    // them): see `ClientDocument::sendable_range`.
    let pending = l.doc.sendable_range();
    let window = l.up.room(UPLOAD_WINDOW_BYTES);
    let first = l.up.next.max(pending.first());
    if first >= pending.next() || window == 0 {
        return None;
    }
    let (mut entries, mut bytes, mut lsn) = (Vec::new(), 0, first);
    while lsn < pending.next() && bytes < MAX_BATCH_BYTES.min(window) {
        let mut one = match l.doc.read_pending(LsnRange::inclusive(lsn, lsn)) {
            Ok(one) => one,
            Err(e) => {
                // A damaged timeline must not stop uploads in silence: the document's status
                // carries the error, and what was read so far still goes.
                let text = format!("cannot read pending mutation {lsn} from the local timeline: {e}");
                l.error = Some(("timeline".into(), text));
                break;
            }
        };
        let e = one.remove(0);
        bytes += e.len();
        entries.push(e);
        lsn = lsn.next();
    }
    if entries.is_empty() {
        return None;
    }
    l.up.sent(lsn, bytes, now_ms);
    Some(Message::Mutations { doc: id, timeline: l.doc.timeline_id(), first, entries })
}

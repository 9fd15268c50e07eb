//! The sync protocol, sans-io: messages, their codec, and the two state machines
//! ([`ClientSession`], [`ServerSession`]) that drivers (tokio, the browser, the simulator) feed
//! with bytes and time.
//!
//! Reliability: every message is idempotent and carries absolute positions (LSNs), never
//! deltas of counters, so duplicates change nothing and losses are repaired by retransmission
//! on timeout. A receiver that sees a gap asks again from what it has. A reconnect starts with
//! `Subscribe { storage_next }` and a `MutationsAck { next_expected }` in reply, so each side
//! resumes from what the other already holds.

mod client;
mod job;
mod server;
pub(crate) mod window;

pub use client::{ClientSession, DocStatus, Route, has_scheme};
pub use job::{DocJob, Exists, FETCH_BYTES, JobDone, MAX_FETCHED_BYTES, Opener};
pub use server::{
    Authenticator, Clock, ConnId, Event, ExportError, Grant, MAX_ASKS_PER_CONNECTION, MAX_ASKS_PER_DOC,
    MAX_DEFERRED_BYTES, MAX_DEFERRED_TOTAL_BYTES, MAX_EVENTS, MAX_OUTBOX_MESSAGES, MAX_SEND_BACKLOG_BYTES,
    MAX_SEND_BACKLOG_TOTAL_BYTES, MutatorsFor, OPENS_PER_STEP, PRESSURE_CLOSE_MS, PRESSURE_IDLE_MS,
    SLOW_READER_CLOSE_MS, STEP_MICROS_BUCKETS, STEP_RETRY_MS, ServerSession, SessionOptions, SessionStats,
};

use pagesync_journal::Lsn;
use serde::{Deserialize, Serialize};

use crate::ids::{DocId, TimelineId, TimelineKey};
use crate::wire::WireEntry;

/// Bumped on any incompatible change to the messages below.
pub const PROTOCOL_VERSION: u32 = 14;

/// The largest frame either side accepts: one maximal storage entry plus headroom.
pub const MAX_FRAME_BYTES: usize = pagesync_journal::codec::MAX_ENTRY_BYTES + (1 << 20);

/// A `Mutations` or `Storage` message is cut once its entries pass this many bytes, so one
/// document cannot hold the connection for long (fairness is per message, round-robin).
pub const MAX_BATCH_BYTES: usize = 256 << 10;

/// The largest frame a client ever sends: a `Mutations` batch is cut past `MAX_BATCH_BYTES`,
/// so it holds at most that plus one largest mutation, and a little for the message itself.
/// A server need accept no more from a client (its `--max-frame-bytes` default), which bounds
/// what one connection's read can take to about 1.3 MiB.
pub const MAX_UPLOAD_FRAME_BYTES: usize = MAX_BATCH_BYTES + crate::mutation::MAX_MUTATION_BYTES + (64 << 10);

/// Bytes of storage sent to one document's subscriber and not yet acknowledged: 16 MiB, four
/// of the largest entries (a checkpoint part), so a download streams while the receiver
/// writes what it has, with no round trip per entry. It costs the server no memory of its
/// own: what it has not written to a socket is bounded by `MAX_SEND_BACKLOG_BYTES`, what it
/// read ahead by `MAX_FETCHED_BYTES`.
pub const DOC_WINDOW_BYTES: usize = 16 << 20;

/// Bytes of timeline entries a client sends ahead of the server's acknowledgement, per
/// document. 4 MiB, a step's `max_bytes`: a burst of writes reaches the server whole, to be
/// applied in one step.
pub const UPLOAD_WINDOW_BYTES: usize = 4 << 20;

/// Unacknowledged data is resent after this long. Loopback and LAN round trips are far below;
/// a lossy WAN link recovers within a second.
pub const RETRANSMIT_MS: i64 = 200;

/// A connected client re-subscribes to a document it has heard nothing about for this long,
/// which repairs any lost `Subscribe` or acknowledgement.
pub const KEEPALIVE_MS: i64 = 1_000;

/// Documents one connection may subscribe to. Bounds the server's per-connection state.
pub const MAX_DOCS_PER_CONNECTION: usize = 10_000;

/// Ends what a client is told of a failure the server met on its own storage or state, in
/// place of the details (paths, buckets, endpoints, panic messages), which it logs instead.
pub const SEE_THE_LOG: &str = "(the server's log has the details)";

/// Machine-readable error codes in `Message::Error`.
pub mod codes {
    pub const VERSION: &str = "version";
    pub const MALFORMED: &str = "malformed";
    pub const TOO_LARGE: &str = "too_large";
    pub const NOT_HELLO: &str = "hello_required";
    pub const DOCUMENT: &str = "document";
    pub const LIMIT: &str = "limit";
    pub const STORAGE: &str = "storage";
    pub const SNAPSHOT_REQUIRED: &str = "snapshot_required";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const FORBIDDEN: &str = "forbidden";
    /// The document does not exist and the grant may not create it.
    pub const NOT_FOUND: &str = "not_found";
    /// A page request (`ReadPages`) for bytes the document's storage does not hold: an LSN
    /// before its oldest kept entry (trimmed at a newer checkpoint) or after its newest, or
    /// bytes past the end of the entry. Nothing is read; the client maps the pages again.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// The peer stopped reading; the connection is closed.
    pub const SLOW_READER: &str = "slow_reader";
    /// The server could not keep serving the document after an internal error.
    pub const INTERNAL: &str = "internal";
    /// Client-side only, in a document's status: replaying a step confirmed by digest gave
    /// other pages than the server's (see `Error::ConfirmMismatch`).
    pub const NONDETERMINISM: &str = "nondeterminism";
    /// Client-side only, in a document's status: this replica could not write what the
    /// server sent to its own disk (full, failing, or refusing writes after a failed fsync;
    /// the message says which). A wait for the document to sync ends with it at once, since
    /// someone must act; it clears once the replica keeps the server's entries again.
    pub const LOCAL_STORAGE: &str = "local_storage";
    /// This server cannot serve the document now (it is leaving its cluster, or lost its
    /// place in it, or its storage did not answer when it opened the document); the client
    /// tries again after a pause, at another server if it knows one.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The document was deleted (`DELETE /v1/docs/{id}`, `pagesync-server delete`): it is not
    /// served, not created again, and its replicas stop syncing.
    pub const DELETED: &str = "deleted";
    /// `Mutations` or `HeadAsk` on a connection not subscribed to the document (as that
    /// timeline, for `Mutations`): nothing is taken. A client subscribes again and resends; a
    /// client without the timeline's key cannot (see `TimelineKey`).
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";

    /// Whether an error with `code` passes on its own: the client subscribes (or connects)
    /// again by itself, or the server retries, so a wait for the document to sync goes on
    /// instead of failing (a server that lost its cluster lease for a moment, a step that
    /// failed on its storage, a document closed after an internal error, a connection cut for
    /// reading slowly). Every other code ends the wait: it needs someone to act. A step
    /// fenced by another writer is `storage` too: the server reopens the document and tries
    /// again (in a cluster the lease decides; two servers on one bucket without one take
    /// turns), and the status shows the conflict meanwhile. A confirmation by digest the
    /// replica could not keep (`nondeterminism`: its replay gave other pages, from a
    /// determinism failure or a budget other than the server's) passes too: the replica
    /// subscribes again without confirmations and takes the server's pages (the status shows
    /// it until the new subscription is acknowledged; `digest_mismatches` counts them).
    pub fn passes(code: &str) -> bool {
        matches!(code, UNAVAILABLE | SLOW_READER | NOT_SUBSCRIBED | INTERNAL | STORAGE | NONDETERMINISM)
    }
}

/// Everything that crosses a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// First message of a connection, client to server.
    Hello { version: u32, token: String },
    /// Client: "I hold storage before `storage_next`; send me the rest, and tell me where my
    /// timeline stands". With `digests`, an entry that applied only this timeline's mutations
    /// may come as a confirmation by digest (`wire::Confirm`); a client whose replay did not
    /// match subscribes again without. `key` is the timeline's key (its id is `key.id()`):
    /// the server takes mutations for a timeline only on a connection subscribed with its key.
    /// With `create`, a token that may write creates the document if it does not exist;
    /// without, a missing document is answered `not_found` (a read, a status, an export of a
    /// mistyped id leaves nothing behind). `Mutations` always create.
    Subscribe { doc: DocId, key: TimelineKey, storage_next: Lsn, digests: bool, create: bool },
    /// Client: timeline entries `first, first+1, ...`.
    Mutations {
        doc: DocId,
        timeline: TimelineId,
        first: Lsn,
        #[serde(with = "crate::bytes::vec")]
        entries: Vec<Vec<u8>>,
    },
    /// Server: the next timeline LSN it needs (everything before is applied or queued), and
    /// the storage LSN it will write next (so the client knows when it has caught up).
    MutationsAck { doc: DocId, timeline: TimelineId, next_expected: Lsn, storage_next: Lsn },
    /// Server: storage entries `first, first+1, ...` in wire form.
    Storage { doc: DocId, first: Lsn, entries: Vec<WireEntry> },
    /// Client: it holds storage before `next`, and has copied the server's rejections of its
    /// timeline's mutations through `outcomes_through` (the server may delete those rows).
    StorageAck { doc: DocId, next: Lsn, outcomes_through: Option<Lsn> },
    /// Either side: something went wrong; `doc` is `None` for the whole connection.
    Error { doc: Option<DocId>, code: String, message: String },
    /// Client: where each page of the document's committed state lives now (see
    /// `PageMap`), to read it on demand before its download ends. Needs a read grant; never
    /// creates the document.
    MapPages { doc: DocId, id: u64 },
    /// Server: the answer to `MapPages { id }`.
    PageMap { doc: DocId, id: u64, map: PageMap },
    /// Client: `pages` pages of entry `lsn`, from byte `offset` of its payload (where a
    /// `PageMap` run says they are). At most `MAX_READ_PAGES`.
    ReadPages { doc: DocId, id: u64, lsn: Lsn, offset: u32, pages: u32 },
    /// Server: the answer to `ReadPages { id }`: the bytes asked for, exactly.
    Pages {
        doc: DocId,
        id: u64,
        lsn: Lsn,
        offset: u32,
        #[serde(with = "crate::bytes")]
        data: Vec<u8>,
    },
    /// Server: another server serves `doc` (it holds the document's lease): sync it with the
    /// server at `url` (its websocket URL, `ws://host:port/v1/sync`). Every message the
    /// client sent about `doc` on this connection was dropped; it sends them there again.
    Redirect { doc: DocId, url: String },
    /// Client: an ephemeral value for everyone subscribed to `doc` (presence: who is here,
    /// what they look at, that they type). Never journaled: the server keeps each
    /// subscriber's last one only while it is subscribed. At most `MAX_BROADCAST_BYTES`, told
    /// at most once per `MIN_BROADCAST_MS`; only from a subscriber.
    Broadcast {
        doc: DocId,
        #[serde(with = "crate::bytes")]
        value: Vec<u8>,
    },
    /// Server: `peer` is subscribed to `doc`, with its last broadcast: to every other
    /// subscriber when it subscribes or broadcasts, and to a new subscriber for each peer.
    Presence { doc: DocId, peer: Peer },
    /// Server: `peer` is no longer subscribed to `doc` (its connection closed).
    PeerLeft { doc: DocId, peer: u64 },
    /// Client: a page of `doc`'s history (see `history`): its mutations, who sent each, when,
    /// and what became of it. Needs a read grant (an admin one where the server says so);
    /// never creates the document. Answered like a page request (the same bounds).
    ReadHistory { doc: DocId, id: u64, query: crate::history::HistoryQuery },
    /// Server: the answer to `ReadHistory { id }`.
    History { doc: DocId, id: u64, page: crate::history::HistoryPage },
    /// Server: the mutator definitions in force for `doc` (see `mutators`), `version` their
    /// content's: when a client subscribes, and again when they change. Empty: none.
    Mutators { doc: DocId, version: String, source: String },
    /// Client: "what is your storage head now?" for a document this connection subscribed
    /// to (`ClientSession::ask_head`, as `Document::sync` does); answered by `Head { id }`.
    HeadAsk { doc: DocId, id: u64 },
    /// Server: the answer to `HeadAsk { id }`: its storage head (`storage_next`) when it
    /// handled the ask. The entries before it that this subscriber does not hold yet come in
    /// `Storage` as usual; the client is caught up once it holds them.
    Head { doc: DocId, id: u64, storage_next: Lsn },
}

/// The largest `Broadcast` value: 8 KiB (a cursor, a selection, a name and a color).
pub const MAX_BROADCAST_BYTES: usize = 8 << 10;

/// A subscriber's broadcasts on one document are told at most this often (40 a second); one
/// that comes sooner waits (a newer one replacing it), so one peer cannot flood the others.
pub const MIN_BROADCAST_MS: i64 = 25;

/// Another client with the document open, as presence shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Its connection, unique on its server while it lasts.
    pub id: u64,
    /// Its token's `sub` claim (empty without one).
    pub subject: String,
    /// The timeline its replica writes.
    pub timeline: TimelineId,
    /// Its last broadcast (empty: none yet).
    #[serde(with = "crate::bytes")]
    pub value: Vec<u8>,
}

/// The most pages one `ReadPages` may ask for: 256 (1 MiB), so one answer is one bounded frame.
pub const MAX_READ_PAGES: u32 = 256;

/// Runs a `PageMap` may hold: a document whose pages are scattered over more entries than this
/// is not mapped (its clients wait for the download). 64 Ki runs, about 1 MiB on the wire; a
/// checkpointed document needs one run per 4 MiB part (a few hundred for 1 GB), and a run per
/// entry written since.
pub const MAX_MAP_RUNS: usize = 1 << 16;

/// Where every page of a document's committed state lives in its storage journal, as of the
/// entry before `at`: runs of pages that lie side by side in one entry. A checkpoint's part is
/// one run, so a 1 GB document maps in a few hundred runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageMap {
    /// The state is every entry before this LSN.
    pub at: Lsn,
    pub page_count: u32,
    /// Ascending by `first_page`, not overlapping; pages in no run are zeros.
    pub runs: Vec<PageRun>,
}

/// Pages `first_page..first_page + pages` at byte `offset..` of entry `lsn`'s payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub first_page: u32,
    pub pages: u32,
    pub lsn: Lsn,
    pub offset: u32,
}

/// A postcard output into a buffer the caller sized (`Message::encode`).
struct Presized(Vec<u8>);

impl postcard::ser_flavors::Flavor for Presized {
    type Output = Vec<u8>;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge { len: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl Message {
    /// The frame, in a buffer allocated once at its exact size: a storage message of many
    /// megabytes is copied into it once, where a growing buffer would copy it about twice and
    /// touch twice the fresh memory.
    pub fn encode(&self) -> Vec<u8> {
        let out = Presized(Vec::with_capacity(self.encoded_len()));
        postcard::serialize_with_flavor(self, out).expect("BUG: messages always serialize")
    }

    /// `encode().len()`, counted without encoding (a walk of the message, no copy of its bytes).
    pub fn encoded_len(&self) -> usize {
        postcard::experimental::serialized_size(self).expect("BUG: messages always serialize")
    }

    /// `decode`, where the storage entries of a `Storage` message are views of `frame`, not
    /// copies (`crate::bytes::shared`): for a receiver that applies them and drops them.
    pub fn decode_shared(frame: &bytes::Bytes) -> Result<Message, DecodeError> {
        crate::bytes::shared::within(frame, || Message::decode(frame))
    }

    /// Decodes one frame. Never panics; allocation is bounded by the frame's own length.
    pub fn decode(frame: &[u8]) -> Result<Message, DecodeError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge { len: frame.len() });
        }
        let (msg, rest) =
            postcard::take_from_bytes(frame).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Malformed(format!("{} trailing bytes", rest.len())));
        }
        Ok(msg)
    }

    /// The document a message concerns, if any.
    pub fn doc(&self) -> Option<DocId> {
        match self {
            Message::Hello { .. } => None,
            Message::Subscribe { doc, .. }
            | Message::Mutations { doc, .. }
            | Message::MutationsAck { doc, .. }
            | Message::Storage { doc, .. }
            | Message::StorageAck { doc, .. }
            | Message::MapPages { doc, .. }
            | Message::PageMap { doc, .. }
            | Message::ReadPages { doc, .. }
            | Message::Pages { doc, .. }
            | Message::Redirect { doc, .. }
            | Message::Broadcast { doc, .. }
            | Message::Presence { doc, .. }
            | Message::PeerLeft { doc, .. }
            | Message::ReadHistory { doc, .. }
            | Message::History { doc, .. }
            | Message::Mutators { doc, .. }
            | Message::HeadAsk { doc, .. }
            | Message::Head { doc, .. } => Some(*doc),
            Message::Error { doc, .. } => *doc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_trailing_bytes() {
        let m = Message::Mutations {
            doc: DocId::from_u128(1),
            timeline: TimelineId::from_u128(2),
            first: Lsn::FIRST,
            entries: vec![vec![1, 2, 3]],
        };
        let mut bytes = m.encode();
        assert_eq!(Message::decode(&bytes), Ok(m));
        bytes.push(0);
        assert!(matches!(Message::decode(&bytes), Err(DecodeError::Malformed(_))));
        assert!(Message::decode(&[]).is_err());
    }

    /// One of each message, every field set. `kind` is an exhaustive match: a message added
    /// without a sample here does not compile.
    fn samples() -> Vec<Message> {
        let (doc, tl, lsn) =
            (DocId::from_u128(0x0102), TimelineId::from_u128(0x0304), Lsn::new(5).expect("5"));
        let entry = WireEntry { kind: crate::wire::WireKind::Delta, data: vec![9, 8, 7].into() };
        let run = PageRun { first_page: 1, pages: 2, lsn, offset: 3 };
        let cursor = crate::history::HistoryCursor { entry: lsn, index: 6 };
        let query = crate::history::HistoryQuery { since_ms: Some(7), after: Some(cursor), limit: 8 };
        let page = crate::history::HistoryPage { records: Vec::new(), next: Some(cursor) };
        let peer = Peer { id: 9, subject: "s".into(), timeline: tl, value: vec![1] };
        let samples = vec![
            Message::Hello { version: PROTOCOL_VERSION, token: "t".into() },
            Message::Subscribe {
                doc,
                key: TimelineKey([4; 32]),
                storage_next: lsn,
                digests: true,
                create: true,
            },
            Message::Mutations { doc, timeline: tl, first: lsn, entries: vec![vec![1, 2]] },
            Message::MutationsAck { doc, timeline: tl, next_expected: lsn, storage_next: lsn },
            Message::Storage { doc, first: lsn, entries: vec![entry] },
            Message::StorageAck { doc, next: lsn, outcomes_through: Some(lsn) },
            Message::Error { doc: Some(doc), code: "c".into(), message: "m".into() },
            Message::MapPages { doc, id: 1 },
            Message::PageMap { doc, id: 1, map: PageMap { at: lsn, page_count: 4, runs: vec![run] } },
            Message::ReadPages { doc, id: 1, lsn, offset: 2, pages: 3 },
            Message::Pages { doc, id: 1, lsn, offset: 2, data: vec![5, 6] },
            Message::Redirect { doc, url: "ws://x".into() },
            Message::Broadcast { doc, value: vec![7] },
            Message::Presence { doc, peer },
            Message::PeerLeft { doc, peer: 9 },
            Message::ReadHistory { doc, id: 1, query },
            Message::History { doc, id: 1, page },
            Message::Mutators { doc, version: "v".into(), source: "src".into() },
            Message::HeadAsk { doc, id: 1 },
            Message::Head { doc, id: 1, storage_next: lsn },
        ];
        let kinds: std::collections::BTreeSet<usize> = samples.iter().map(kind).collect();
        assert_eq!(kinds.len(), samples.len(), "one sample of each message");
        samples
    }

    fn kind(m: &Message) -> usize {
        match m {
            Message::Hello { .. } => 0,
            Message::Subscribe { .. } => 1,
            Message::Mutations { .. } => 2,
            Message::MutationsAck { .. } => 3,
            Message::Storage { .. } => 4,
            Message::StorageAck { .. } => 5,
            Message::Error { .. } => 6,
            Message::MapPages { .. } => 7,
            Message::PageMap { .. } => 8,
            Message::ReadPages { .. } => 9,
            Message::Pages { .. } => 10,
            Message::Redirect { .. } => 11,
            Message::Broadcast { .. } => 12,
            Message::Presence { .. } => 13,
            Message::PeerLeft { .. } => 14,
            Message::ReadHistory { .. } => 15,
            Message::History { .. } => 16,
            Message::Mutators { .. } => 17,
            Message::HeadAsk { .. } => 18,
            Message::Head { .. } => 19,
        }
    }

    /// `decode_shared` decodes every message as `decode` does, and a storage entry it decodes is
    /// a view of the frame, not a copy.
    #[test]
    fn shared_decoding_gives_the_same_messages_and_views_of_the_frame() {
        for m in samples() {
            assert_eq!(m.encoded_len(), m.encode().len());
            let frame = bytes::Bytes::from(m.encode());
            assert_eq!(Message::decode_shared(&frame).as_ref(), Ok(&m));
            if let Ok(Message::Storage { entries, .. }) = Message::decode_shared(&frame) {
                let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
                let at = entries[0].data.as_ptr() as usize;
                assert!(start <= at && at + entries[0].data.len() <= end, "a view of the frame");
            }
            // Decoded outside `decode_shared`, an entry owns its bytes.
            if let Ok(Message::Storage { entries, .. }) = Message::decode(&frame) {
                assert_ne!(entries[0].data.as_ptr(), frame[frame.len() - 3..].as_ptr());
            }
        }
        let mut truncated = samples()[4].encode();
        truncated.pop();
        assert!(Message::decode_shared(&truncated.into()).is_err());
    }

    /// The bytes of every message, pinned to the protocol version: a change to any message's
    /// encoding (a field added, removed, retyped or reordered; a message added or moved) fails
    /// here until `PROTOCOL_VERSION` is bumped with it, so an old peer is told `version` at
    /// `Hello` instead of meeting frames it cannot decode (as happened when `HeadAsk` took an
    /// id without a bump: an older server closed newer clients as malformed).
    #[test]
    fn the_wire_format_changes_only_with_the_protocol_version() {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for m in samples() {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).as_ref(), Ok(&m));
            h.update((bytes.len() as u32).to_le_bytes());
            h.update(&bytes);
        }
        let digest: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (PROTOCOL_VERSION, digest.as_str()),
            (14, "7eb5e46011f19a5680b0a31f26780e55c5b6597828510e50d9f5f8ad77b2f662"),
            "the wire format changed: bump PROTOCOL_VERSION (and say why in docs/design.md's Hello row), \
             then pin the new version and digest here"
        );
    }
}

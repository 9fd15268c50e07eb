//! [`Replica`]: one document in the browser, exported to JavaScript.

use pagesync::journal::{HandleJournal, Journal, MemoryJournal};
use pagesync::protocol::ClientSession;
use pagesync::{ClientDocument, DocId, MutationState, SqlMutation, TimelineKey};
use wasm_bindgen::prelude::*;

use crate::opfs;
use crate::value::{params_from_js, to_js};

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

fn set(obj: &js_sys::Object, key: &str, value: impl Into<JsValue>) {
    // Setting a property on a plain object cannot fail.
    let _ = js_sys::Reflect::set(obj, &JsValue::from_str(key), &value.into());
}

fn pair(code: &str, message: &str) -> js_sys::Object {
    let o = js_sys::Object::new();
    set(&o, "code", code);
    set(&o, "message", message);
    o
}

/// `{ id, localError }` for a submitted mutation.
fn submitted_js(s: pagesync::Submitted) -> JsValue {
    let out = js_sys::Object::new();
    set(&out, "id", s.lsn.get() as f64);
    let local = s.local.err().map(|r| JsValue::from(pair(r.code.as_str(), &r.message)));
    set(&out, "localError", local.unwrap_or(JsValue::NULL));
    out.into()
}

/// True for the error OPFS gives when another worker holds a sync access handle on the file.
fn is_locked(e: &JsValue) -> bool {
    e.dyn_ref::<js_sys::Error>().is_some_and(|e| e.name() == "NoModificationAllowedError")
}

/// The key a document's timeline has in OPFS (`timeline.key`), or `fresh`, written and
/// flushed first when there is none: a timeline never exists without its key. A file shorter
/// than a key is one whose first write did not finish (so no timeline was made with it): it
/// is written again. A longer one is not this format: refused, left as it is. (A timeline
/// made under a key that is gone is refused by the caller.)
fn opfs_key(file: &mut opfs::OpfsFile, fresh: TimelineKey) -> Result<TimelineKey, OpfsError> {
    use pagesync::journal::RandomAccess;
    let io = |e: std::io::Error| OpfsError::Unavailable(JsValue::from_str(&e.to_string()));
    let size = file.size().map_err(io)?;
    if size == TimelineKey::FILE_BYTES as u64 {
        let mut bytes = [0u8; TimelineKey::FILE_BYTES];
        file.read_exact_at(&mut bytes, 0).map_err(io)?;
        return Ok(TimelineKey::from_bytes(bytes));
    }
    if size > TimelineKey::FILE_BYTES as u64 {
        let why = format!(
            "{} holds {size} bytes, not {}: not a timeline key",
            file.name(),
            TimelineKey::FILE_BYTES
        );
        return Err(OpfsError::Replica(why));
    }
    file.truncate(0).map_err(io)?;
    file.write_all_at(&fresh.0, 0).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(fresh)
}

/// Why the OPFS journals did not open: OPFS itself (then memory will do, with a warning), or
/// this replica (a timeline its key does not open: memory would hide its unsynced writes).
enum OpfsError {
    Unavailable(JsValue),
    Replica(String),
}

impl From<JsValue> for OpfsError {
    fn from(e: JsValue) -> Self {
        OpfsError::Unavailable(e)
    }
}

/// The journals of a document in OPFS, under `pagesync/<doc id>/`, its timeline's key, and the
/// file of the mutator definitions it last heard.
async fn opfs_journals(
    doc: DocId,
    fresh: TimelineKey,
) -> Result<(Journals, TimelineKey, opfs::OpfsFile), OpfsError> {
    let dir = doc.to_string();
    let path = ["pagesync", dir.as_str()];
    let mutators = opfs::open_file(&path, "mutators.sql").await?;
    let mut key_file = opfs::open_file(&path, "timeline.key").await?;
    let storage = opfs::open_pair(&path, "storage").await?;
    let timeline = opfs::open_pair(&path, "timeline").await?;
    let outcomes = opfs::open_pair(&path, "outcomes").await?;
    let key = opfs_key(&mut key_file, fresh)?;
    let js = |e: pagesync::journal::JournalError| JsValue::from_str(&e.to_string());
    let storage = HandleJournal::open_or_create(storage, doc.journal_id()).map_err(js)?;
    let timeline = HandleJournal::open_or_create(timeline, key.id().journal_id()).map_err(js)?;
    if timeline.id() != key.id().journal_id() {
        return Err(OpfsError::Replica(format!(
            "the timeline of {doc} in this browser is not the one its key (OPFS pagesync/{doc}/timeline.key) opens, so the server would take none of its writes: made by an older pagesync, or the key was lost; remove this document's OPFS data (its unsynced writes with it) to start again"
        )));
    }
    let outcomes = HandleJournal::open_or_create(outcomes, timeline.id()).map_err(js)?;
    Ok(((Box::new(storage), Box::new(timeline), Box::new(outcomes)), key, mutators))
}

/// A replica's storage, timeline and outcome journals.
type Journals = (Box<dyn Journal>, Box<dyn Journal>, Box<dyn Journal>);

/// The server's mutator definitions as this browser last heard them (OPFS
/// `pagesync/<doc>/mutators.sql`): a replica opened offline runs its calls locally at once, as
/// the native client does with `<data>/<doc>/mutators.sql`. A cache of the server's word,
/// replaced whenever the server sends others; one that does not parse is ignored with a warning.
#[derive(Debug)]
struct MutatorsFile {
    file: opfs::OpfsFile,
    /// The source the file holds now.
    written: String,
}

impl MutatorsFile {
    fn read(file: opfs::OpfsFile) -> std::io::Result<MutatorsFile> {
        use pagesync::journal::RandomAccess;
        let mut bytes = vec![0u8; file.size()? as usize];
        file.read_exact_at(&mut bytes, 0)?;
        Ok(MutatorsFile { file, written: String::from_utf8_lossy(&bytes).into_owned() })
    }

    /// Writes `source` down, when it is not what the file holds.
    fn keep(&mut self, source: &str) -> std::io::Result<()> {
        use pagesync::journal::RandomAccess;
        if self.written == source {
            return Ok(());
        }
        self.file.truncate(0)?;
        self.file.write_all_at(source.as_bytes(), 0)?;
        self.file.flush()?;
        self.written = source.to_owned();
        Ok(())
    }
}

/// One document's local replica and its sync session. See the crate documentation.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Replica {
    session: ClientSession,
    doc: DocId,
    storage_kind: &'static str,
    /// Its token's `sub` claim: the subject its mutator calls name.
    subject: String,
    /// Moves whenever the replica may have changed (a local write, a frame from the server):
    /// subscriptions re-run when it does.
    version: u32,
    /// Where the mutator definitions are kept (OPFS replicas only).
    mutators_file: Option<MutatorsFile>,
    /// `ClientSession::mutator_changes` when they were last written down.
    mutators_seen: u64,
}

#[wasm_bindgen]
impl Replica {
    /// Opens document `doc_id` (32 hex digits). With `persist`, its journals live in OPFS and
    /// survive reloads; without OPFS (not in a worker, or an old browser) they fall back to
    /// memory with a console warning. `timeline_key`: 32 random bytes (a secret: see
    /// `pagesync::TimelineKey`), used only when this browser has no timeline for the document
    /// yet.
    pub async fn open(
        doc_id: String,
        token: String,
        persist: bool,
        timeline_key: Vec<u8>,
    ) -> Result<Replica, JsError> {
        let doc: DocId = doc_id.parse().map_err(|e| js_error(format!("document id {doc_id:?}: {e}")))?;
        let fresh: [u8; 32] =
            timeline_key.try_into().map_err(|_| JsError::new("timeline_key must be 32 random bytes"))?;
        let fresh = TimelineKey::from_bytes(fresh);
        let memory = || -> (Journals, TimelineKey) {
            let timeline_id = fresh.id().journal_id();
            let journals: Journals = (
                Box::new(MemoryJournal::new(doc.journal_id())),
                Box::new(MemoryJournal::new(timeline_id)),
                Box::new(MemoryJournal::new(timeline_id)),
            );
            (journals, fresh)
        };
        let mut mutators_file = None;
        let ((journals, key), storage_kind) = if !persist {
            (memory(), "memory")
        } else {
            match opfs_journals(doc, fresh).await {
                Ok((journals, key, file)) => {
                    mutators_file = Some(file);
                    ((journals, key), "opfs")
                }
                Err(OpfsError::Replica(why)) => return Err(JsError::new(&why)),
                Err(OpfsError::Unavailable(e)) if is_locked(&e) => {
                    return Err(JsError::new(&format!(
                        "document {doc} is open in another tab or worker of this origin (its OPFS files are locked)"
                    )));
                }
                Err(OpfsError::Unavailable(e)) => {
                    let why = e.as_string().unwrap_or_else(|| format!("{e:?}"));
                    web_sys::console::warn_1(&JsValue::from_str(&format!(
                        "pagesync: OPFS is not available ({why}); document {doc} is kept in memory and \
                         unsynced writes are lost on reload"
                    )));
                    (memory(), "memory")
                }
            }
        };
        let (storage, timeline, outcomes) = journals;
        let mut replica =
            ClientDocument::open_with_outcomes(storage, timeline, outcomes).map_err(js_error)?;
        replica.set_timeline_key(key).map_err(js_error)?;
        let mutators_file = match mutators_file.map(MutatorsFile::read).transpose() {
            Ok(file) => file,
            Err(e) => return Err(js_error(format!("OPFS pagesync/{doc}/mutators.sql: {e}"))),
        };
        if let Some(source) = mutators_file.as_ref().map(|f| f.written.as_str()).filter(|s| !s.is_empty()) {
            match pagesync::mutators::Mutators::parse(source) {
                Ok(m) => replica.set_mutators(Some(std::sync::Arc::new(m))).map_err(js_error)?,
                Err(e) => web_sys::console::warn_1(&JsValue::from_str(&format!(
                    "pagesync: OPFS pagesync/{doc}/mutators.sql does not parse ({e}); waiting for the server's"
                ))),
            }
        }
        let subject = pagesync::mutators::token_subject(&token);
        let mut session = ClientSession::new(token);
        session.add_document(doc, replica);
        Ok(Replica { session, doc, storage_kind, subject, version: 0, mutators_file, mutators_seen: 0 })
    }

    /// Uses `token` from now on (`Database.setToken`): said to the server at once on an open
    /// connection, and used by every later one. It must name the subject the replica was
    /// opened with (its pending mutator calls ran as that one).
    #[wasm_bindgen(js_name = setToken)]
    pub fn set_token(&mut self, token: String) -> Result<(), JsError> {
        pagesync::mutators::same_subject(&self.subject, &token).map_err(|why| JsError::new(&why))?;
        self.session.set_token(token);
        // A refusal of the old token is moot: the status changed.
        self.version = self.version.wrapping_add(1);
        Ok(())
    }

    /// `"opfs"` or `"memory"`.
    #[wasm_bindgen(js_name = storageKind)]
    pub fn storage_kind(&self) -> String {
        self.storage_kind.to_owned()
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    fn document(&self) -> &ClientDocument {
        self.session.document(self.doc).expect("BUG: the replica's document is always in its session")
    }

    /// Runs a write locally, at once, and queues it for the server. Returns
    /// `{ id, localError }`: the mutation's id (its timeline LSN) and, when it failed on the
    /// local state, the error the server will most likely give too.
    pub fn exec(&mut self, sql: String, params: JsValue, now_ms: f64, seed: u64) -> Result<JsValue, JsError> {
        let params = params_from_js(&params).map_err(|e| JsError::new(&e))?;
        pagesync::sandbox::require_statement(&sql).map_err(js_error)?;
        let body = SqlMutation::one(sql, params).encode();
        let submitted = self.session.mutate(self.doc, body, now_ms as i64, seed).map_err(js_error)?;
        self.version = self.version.wrapping_add(1);
        Ok(submitted_js(submitted))
    }

    /// Calls the server-defined mutator `name` with `args` (an array): `{ id, localError }` as
    /// `exec` (the local run uses the definitions the server sent; until they came it fails
    /// locally with `no_such_mutator`, and the server decides).
    pub fn call(&mut self, name: String, args: JsValue, now_ms: f64, seed: u64) -> Result<JsValue, JsError> {
        let args = params_from_js(&args).map_err(|e| JsError::new(&e))?;
        let body = pagesync::mutators::Call { name, args, subject: self.subject.clone() }.encode();
        let submitted = self.session.mutate(self.doc, body, now_ms as i64, seed).map_err(js_error)?;
        self.version = self.version.wrapping_add(1);
        Ok(submitted_js(submitted))
    }

    /// Writes down the server's mutator definitions when they arrived (OPFS replicas). A write
    /// that fails only warns: the server sends them again on the next connection.
    fn keep_mutators(&mut self) {
        if self.session.mutator_changes() == self.mutators_seen {
            return;
        }
        self.mutators_seen = self.session.mutator_changes();
        let (Some(file), Some(doc)) = (self.mutators_file.as_mut(), self.session.document(self.doc)) else {
            return;
        };
        let source = doc.mutators().map_or("", |m| m.source());
        if let Err(e) = file.keep(source) {
            let doc = self.doc;
            web_sys::console::warn_1(&JsValue::from_str(&format!(
                "pagesync: cannot write down the mutators of {doc} (OPFS mutators.sql): {e}"
            )));
        }
    }

    /// The version of the server's mutator definitions in force here, `null` before any came.
    pub fn mutators(&self) -> JsValue {
        let version =
            self.session.document(self.doc).and_then(|d| d.mutators().map(|m| m.version().to_owned()));
        version.map_or(JsValue::NULL, |v| JsValue::from_str(&v))
    }

    /// Submits migration `version` (its SQL runs exactly once per document, whichever client
    /// brings it first) unless this replica has it already. Returns `{ id, localError }` as
    /// `exec` does, or `null` when there was nothing to submit.
    pub fn migrate(&mut self, version: u32, sql: String, now_ms: f64, seed: u64) -> Result<JsValue, JsError> {
        let submitted = self
            .session
            .migrate(self.doc, &[(version, sql.as_str())], now_ms as i64, seed)
            .map_err(js_error)?;
        let Some(s) = submitted.into_iter().next() else { return Ok(JsValue::NULL) };
        self.version = self.version.wrapping_add(1);
        Ok(submitted_js(s))
    }

    /// Runs a read-only query on the local state (server state plus pending writes). Rows are
    /// objects keyed by column name.
    pub fn query(&self, sql: String, params: JsValue) -> Result<js_sys::Array, JsError> {
        let params = params_from_js(&params).map_err(|e| JsError::new(&e))?;
        let rows = self.document().query(&sql, &params).map_err(js_error)?;
        let out = js_sys::Array::new();
        for row in &rows.rows {
            let o = js_sys::Object::new();
            for (name, v) in rows.columns.iter().zip(row) {
                set(&o, name, to_js(v));
            }
            out.push(&o);
        }
        Ok(out)
    }

    /// Where mutation `id` stands: `{ state: "pending" | "confirmed" | "rejected", code?, message? }`.
    pub fn state(&self, id: f64) -> Result<JsValue, JsError> {
        let lsn =
            pagesync::journal::Lsn::new(id as u64).ok_or_else(|| JsError::new("mutation ids start at 1"))?;
        let out = js_sys::Object::new();
        match self.document().state(lsn).map_err(js_error)? {
            MutationState::Pending => set(&out, "state", "pending"),
            MutationState::Confirmed => set(&out, "state", "confirmed"),
            MutationState::Rejected(r) => {
                set(&out, "state", "rejected");
                set(&out, "code", r.code.as_str());
                set(&out, "message", r.message);
            }
        }
        Ok(out.into())
    }

    /// `{ pending, confirmed, rejected: [{ id, code, message }], error, connected, caughtUp,
    /// storageKind, confirmedByDigest, digestMismatches }`. `error` is the server's last error for this document or connection.
    pub fn status(&self) -> Result<JsValue, JsError> {
        let doc = self.document();
        let outcomes = doc.outcomes().map_err(js_error)?;
        let out = js_sys::Object::new();
        set(&out, "pending", doc.pending_count() as f64);
        set(&out, "confirmed", outcomes.confirmed as f64);
        let rejected = js_sys::Array::new();
        for (lsn, r) in &outcomes.rejected {
            let o = pair(r.code.as_str(), &r.message);
            set(&o, "id", lsn.get() as f64);
            rejected.push(&o);
        }
        set(&out, "rejected", rejected);
        let status = self.session.status(self.doc).expect("BUG: the document is in its session");
        let error = self.session.shown_error(self.doc).map_or(JsValue::NULL, |(c, m)| pair(c, m).into());
        set(&out, "error", error);
        set(&out, "connected", self.session.is_connected());
        set(&out, "deleted", status.deleted);
        set(&out, "caughtUp", self.session.caught_up(self.doc));
        set(&out, "storageKind", self.storage_kind);
        set(&out, "confirmedByDigest", status.confirms.kept as f64);
        set(&out, "digestMismatches", status.confirms.mismatches as f64);
        Ok(out.into())
    }

    /// Asks the server for its storage head as of now (`HeadAsk`, sent by `pollTransmit`, again
    /// after a second without an answer and on every new subscription); returns the request's
    /// id for `inSync`: then every write the server took before this call is here, not just
    /// those it last reported.
    #[wasm_bindgen(js_name = askHead)]
    pub fn ask_head(&mut self) -> f64 {
        self.session.ask_head(self.doc) as f64
    }

    /// The server's last error for this document, or else for the connection (a refused token,
    /// the connection cap, ...), that ends a wait to sync: `{ code, message }` or `null`. One that
    /// passes on its own (`unavailable`: the client subscribes again) is not. Cheap to poll.
    #[wasm_bindgen(js_name = syncError)]
    pub fn sync_error(&self) -> JsValue {
        self.session.sync_error(self.doc).map_or(JsValue::NULL, |(c, m)| pair(c, m).into())
    }

    /// Whether the replica is in sync as of the head request `ask` (see `askHead`): nothing
    /// pending, the server answered `ask` or a later one, and every entry before that head is
    /// here. Cheap enough to poll.
    #[wasm_bindgen(js_name = inSync)]
    pub fn in_sync(&self, ask: f64) -> bool {
        self.document().pending_count() == 0
            && self.session.head_answered(self.doc) as f64 >= ask
            && self.session.caught_up(self.doc)
    }

    /// The server's state held here as a `.sqlite` file (pending writes are not in it).
    pub fn export(&self) -> Result<Vec<u8>, JsError> {
        self.document().export().map_err(js_error)
    }

    /// The WebSocket to `url` is open.
    pub fn connected(&mut self, now_ms: f64, url: &str) {
        self.session.set_home_url(url);
        self.session.connected(now_ms as i64);
    }

    /// The WebSocket closed.
    pub fn disconnected(&mut self) {
        self.session.disconnected();
    }

    /// Sends `value` (JSON text) to everyone else with the document open: presence, never
    /// stored.
    pub fn broadcast(&mut self, value: &str) -> Result<(), JsError> {
        self.session.broadcast(self.doc, value.as_bytes().to_vec()).map_err(js_error)
    }

    /// The other clients with the document open: `[{ id, subject, timeline, value }]`, `value`
    /// being the text each broadcast last (`null`: none yet).
    pub fn presence(&self) -> js_sys::Array {
        let out = js_sys::Array::new();
        for p in self.session.presence(self.doc) {
            let o = js_sys::Object::new();
            set(&o, "id", p.id as f64);
            set(&o, "subject", p.subject.as_str());
            set(&o, "timeline", p.timeline.to_string().as_str());
            let value: JsValue = if p.value.is_empty() {
                JsValue::NULL
            } else {
                String::from_utf8_lossy(&p.value).as_ref().into()
            };
            set(&o, "value", value);
            out.push(&o);
        }
        out
    }

    /// Bumped whenever presence changed (a peer came, went or broadcast).
    #[wasm_bindgen(js_name = presenceVersion)]
    pub fn presence_version(&self) -> f64 {
        self.session.presence_changes() as f64
    }

    /// The server refused the connection for what it is (a wrong or expired token, another
    /// protocol version): the worker keeps backing off rather than reconnecting at once.
    #[wasm_bindgen(js_name = refusedForGood)]
    pub fn refused_for_good(&self) -> bool {
        self.session.refused_for_good()
    }

    /// The code of the server's last error for the document (`unavailable`, ...), if any.
    #[wasm_bindgen(js_name = errorCode)]
    pub fn error_code(&self) -> Option<String> {
        self.session.status(self.doc)?.error.map(|(code, _)| code)
    }

    /// Where a `Redirect` sent the document (the server that holds its lease), once: the
    /// worker connects there instead, and that server is home from then on.
    #[wasm_bindgen(js_name = takeRedirect)]
    pub fn take_redirect(&mut self) -> Option<String> {
        let url = self.session.route_of(self.doc)?.clone()?;
        self.session.set_home_url(&url);
        Some(url)
    }

    /// One binary frame from the server.
    pub fn receive(&mut self, now_ms: f64, frame: &[u8]) -> Result<(), JsError> {
        let mismatches = self.session.digest_mismatches();
        let result = self.session.handle_frame(now_ms as i64, frame).map_err(js_error);
        if self.session.digest_mismatches() > mismatches {
            // Loudly: it means two replicas ran the same mutations to different pages.
            let why = self.session.status(self.doc).and_then(|s| s.error).map(|(_, m)| m).unwrap_or_default();
            web_sys::console::error_1(
                &format!("pagesync: a confirmation by digest did not match: {why}").into(),
            );
        }
        self.version = self.version.wrapping_add(1);
        self.keep_mutators();
        result
    }

    /// The frames to send now.
    #[wasm_bindgen(js_name = pollTransmit)]
    pub fn poll_transmit(&mut self) -> js_sys::Array {
        let out = js_sys::Array::new();
        while let Some(msg) = self.session.poll_transmit() {
            out.push(&js_sys::Uint8Array::from(&msg.encode()[..]));
        }
        out
    }

    /// `true` when the replica's state changed (a rebase that had failed ran now).
    #[wasm_bindgen(js_name = handleTimeout)]
    pub fn handle_timeout(&mut self, now_ms: f64) -> bool {
        let changed = self.session.handle_timeout(now_ms as i64);
        if changed {
            self.version = self.version.wrapping_add(1);
        }
        changed
    }

    /// When to call `handleTimeout` next (milliseconds, same clock as `now_ms`), if at all.
    #[wasm_bindgen(js_name = pollTimeout)]
    pub fn poll_timeout(&self) -> Option<f64> {
        self.session.poll_timeout().map(|t| t as f64)
    }
}

//! The object-store backend: one immutable object per appended batch, on S3 (`s3://bucket/prefix`)
//! or on a local directory with the same semantics (`file:///dir`, for tests and single hosts).
//!
//! Layout under a journal's key prefix (byte diagrams in `docs/design.md`):
//! - `JOURNAL`: the identity marker (magic, version, journal id, crc32c), created once with
//!   `PutMode::Create`.
//! - `TRIM`: the trim point (magic, `trimmed_through`, crc32c), overwritten by `remove_prefix`.
//! - `<first LSN, 20 digits>.batch`: one object per `append_batch`: a 40-byte header (magic,
//!   journal id, first LSN, entry count, crc32c) and then the entries as codec frames.
//!
//! Fencing: a batch object is created with `PutMode::Create`, so of two writers that both try
//! LSN n exactly one succeeds. The other gets [`JournalError::Fenced`] and the journal refuses
//! every later append: a writer that lost LSN n no longer knows the document's state.
//!
//! Crash model: a put either happened or did not; S3 has no torn objects. A put whose outcome
//! is unknown (it failed after the object store's own bounded retries) leaves the journal
//! *uncertain* about that LSN: the next append first asks whether the object exists. Absent, the
//! append goes ahead; present, the earlier write landed after all although the caller was told
//! it failed, so the journal is poisoned and must be reopened (which re-reads the truth).
//! `remove_prefix` writes `TRIM` before deleting objects; objects left behind are ignored on open
//! and deleted by the next trim.
//!
//! The trait is synchronous, so calls block on the given tokio runtime handle. They must not be
//! made from inside that runtime's asynchronous context (the server calls from its hub thread).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::codec::{self, FRAME_HEADER_BYTES};
use crate::{Journal, JournalError, JournalId, Lsn, LsnRange, Result};

const MARKER_KEY: &str = "JOURNAL";
const TRIM_KEY: &str = "TRIM";
const BATCH_SUFFIX: &str = ".batch";
const MARKER_MAGIC: &[u8; 16] = b"PAGESYNC-OBJJRNL";
const FORMAT_VERSION: u32 = 1;
/// magic 16 | version 4 | journal id 16 | crc32c 4
const MARKER_BYTES: usize = 40;
const TRIM_MAGIC: &[u8; 8] = b"PGSJTRIM";
/// magic 8 | trimmed_through 8 | crc32c 4
const TRIM_BYTES: usize = 20;
const BATCH_MAGIC: &[u8; 8] = b"PGSJOBJ\x01";
/// magic 8 | journal id 16 | first LSN 8 | count 4 | crc32c 4
pub const BATCH_HEADER_BYTES: usize = 40;

/// Decoded batches kept in memory by default, across all journals of one backend: 64 MiB. A
/// batch is fetched once and then served from here; the page index only needs one pass over the
/// history, so a cold open downloads each object once.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Request and byte counters of one backend, for metrics.
#[derive(Debug, Default)]
pub struct ObjectStats {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub deletes: AtomicU64,
    pub bytes_put: AtomicU64,
    pub bytes_got: AtomicU64,
    pub errors: AtomicU64,
}

/// An object listed by `ObjectBackend::list_objects`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its name below the listed prefix.
    pub name: String,
    /// Changes whenever the object is written again (its ETag, time and size).
    pub version: String,
    pub size: u64,
    /// When the store last wrote it, by the store's clock (ms since the Unix epoch).
    pub modified_ms: i64,
}

/// One batch object, verified, with the offsets of its payloads.
#[derive(Debug)]
struct Batch {
    bytes: Vec<u8>,
    /// (offset, len) of each payload in `bytes`.
    payloads: Vec<(usize, usize)>,
}

impl Batch {
    fn payload(&self, i: usize) -> &[u8] {
        let (off, len) = self.payloads[i];
        &self.bytes[off..off + len]
    }
}

#[derive(Debug)]
struct Cache {
    lru: lru::LruCache<(JournalId, u64), Arc<Batch>>,
    bytes: usize,
    max_bytes: usize,
}

impl Cache {
    fn get(&mut self, key: (JournalId, u64)) -> Option<Arc<Batch>> {
        self.lru.get(&key).cloned()
    }

    fn insert(&mut self, key: (JournalId, u64), batch: Arc<Batch>) {
        self.bytes += batch.bytes.len();
        if let Some(old) = self.lru.put(key, batch) {
            self.bytes -= old.bytes.len();
        }
        while self.bytes > self.max_bytes && self.lru.len() > 1 {
            match self.lru.pop_lru() {
                Some((_, b)) => self.bytes -= b.bytes.len(),
                None => break,
            }
        }
    }

    fn remove(&mut self, key: (JournalId, u64)) {
        if let Some(b) = self.lru.pop(&key) {
            self.bytes -= b.bytes.len();
        }
    }
}

/// Why a store failed `ObjectBackend::check`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreProblem {
    /// It answered no, and will until its configuration changes.
    #[error("{0}")]
    Refused(String),
    /// It did not answer, or failed in a way that may pass.
    #[error("{0}")]
    Silent(String),
}

/// What S3 (and its look-alikes) answer when a request is refused for good: the bucket does
/// not exist, or the credentials are unknown, wrong or not allowed. The object store reports
/// them as generic errors carrying the response.
const REFUSALS: [&str; 8] = [
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "AuthorizationHeaderMalformed",
    "403 Forbidden",
    "404 Not Found",
];

/// An object store, a key prefix and a runtime: makes [`ObjectJournal`]s.
#[derive(Clone, Debug)]
pub struct ObjectBackend {
    store: Arc<dyn ObjectStore>,
    root: Path,
    rt: tokio::runtime::Handle,
    cache: Arc<Mutex<Cache>>,
    stats: Arc<ObjectStats>,
    url: String,
}

fn backend_err(journal: JournalId, what: String) -> JournalError {
    JournalError::Backend { journal, message: one_line(&what) }
}

/// The store's answer on one line (S3's carries an XML body whose declaration ends a line).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `e` is "not found" because the bucket is not there (S3 answers 404 for both), not
/// the object: the store is gone, which is no answer about the object.
fn no_bucket(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && e.to_string().contains("NoSuchBucket")
}

impl ObjectBackend {
    /// `s3://bucket/prefix` (endpoint, region and credentials from the standard `AWS_*`
    /// variables; an `http://` endpoint is allowed without TLS) or `file:///dir`.
    pub fn from_url(url: &str, rt: tokio::runtime::Handle) -> std::result::Result<ObjectBackend, String> {
        let (store, root): (Arc<dyn ObjectStore>, String) = if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{url:?} names no bucket: use s3://BUCKET/PREFIX"));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT"));
            if endpoint.is_ok_and(|e| e.starts_with("http://")) {
                b = b.with_allow_http(true);
            }
            let retry = object_store::RetryConfig {
                max_retries: 5,
                retry_timeout: std::time::Duration::from_secs(30),
                ..Default::default()
            };
            let s3 =
                b.with_retry(retry).build().map_err(|e| format!("cannot configure S3 for {url}: {e}"))?;
            (Arc::new(s3), prefix.to_owned())
        } else if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| format!("cannot use {dir} as an object store: {e}"))?
                .with_fsync(true);
            (Arc::new(fs), String::new())
        } else {
            return Err(format!(
                "unsupported object store URL {url:?}: use s3://BUCKET/PREFIX or file:///DIR"
            ));
        };
        Ok(ObjectBackend::new(store, &root, rt, url))
    }

    pub fn new(
        store: Arc<dyn ObjectStore>,
        root: &str,
        rt: tokio::runtime::Handle,
        url: &str,
    ) -> ObjectBackend {
        let cache = Cache { lru: lru::LruCache::unbounded(), bytes: 0, max_bytes: DEFAULT_CACHE_BYTES };
        ObjectBackend {
            store,
            root: Path::from(root),
            rt,
            cache: Arc::new(Mutex::new(cache)),
            stats: Arc::new(ObjectStats::default()),
            url: url.to_owned(),
        }
    }

    /// Whether the store answers, asked once at a server's start: the first key of one LIST
    /// of the prefix. `Refused` when it answered no in a way that will not pass by itself (no
    /// such bucket, credentials refused, access denied): someone must fix the configuration.
    /// `Silent` when it did not answer within `wait`, or failed in a way that may pass.
    /// Blocking, like every call here.
    pub fn check(&self, wait: std::time::Duration) -> std::result::Result<(), StoreProblem> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let first = self.rt.block_on(async {
            tokio::time::timeout(wait, async { self.store.list(Some(&self.root)).next().await }).await
        });
        let failed = match first {
            Ok(None | Some(Ok(_))) => return Ok(()),
            Ok(Some(Err(e))) => e,
            Err(_) => {
                return Err(StoreProblem::Silent(format!("no answer from {} within {wait:?}", self.url)));
            }
        };
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut text = one_line(&failed.to_string());
        // Without credentials in the environment the store asks the instance metadata service;
        // off a cloud instance that fails in ways that name only its address.
        let no_credentials = text.contains("169.254.169.254");
        if no_credentials {
            text.push_str(
                " (no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance role provides them)",
            );
        }
        let refused = no_credentials
            || matches!(
                failed,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotFound { .. }
            )
            || REFUSALS.iter().any(|r| text.contains(r));
        let what = format!("LIST of {} failed: {text}", self.url);
        Err(if refused { StoreProblem::Refused(what) } else { StoreProblem::Silent(what) })
    }

    /// Bounds the shared batch cache.
    pub fn with_cache_bytes(self, max_bytes: usize) -> ObjectBackend {
        self.cache.lock().expect("BUG: cache lock poisoned").max_bytes = max_bytes;
        self
    }

    pub fn stats(&self) -> &Arc<ObjectStats> {
        &self.stats
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn dir(&self, rel: &str) -> Path {
        rel.split('/').filter(|p| !p.is_empty()).fold(self.root.clone(), |p, part| p.join(part))
    }

    /// Opens the journal at `rel` (a `/`-separated key prefix below the backend's root),
    /// creating it when nothing is there yet.
    pub fn open_or_create(&self, rel: &str, id: JournalId) -> Result<ObjectJournal> {
        ObjectJournal::open(self.clone(), self.dir(rel), id)
    }

    /// Whether a journal was ever created at `rel` (its marker exists).
    pub fn exists(&self, rel: &str, id: JournalId) -> Result<bool> {
        Ok(self.get(id, &self.dir(rel).join(MARKER_KEY))?.is_some())
    }

    /// The names of the "directories" directly below `rel` (one LIST with a delimiter).
    pub fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir(rel);
        let listed = self.rt.block_on(self.store.list_with_delimiter(Some(&dir))).map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            backend_err(JournalId::from_u128(0), format!("LIST {dir} failed: {e}"))
        })?;
        Ok(listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_owned)).collect())
    }

    /// Writes a small object at `rel` (beside the journals: cluster records), replacing what
    /// was there.
    pub fn put_object(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let key = self.dir(rel);
        self.put(&key, bytes, PutMode::Overwrite)
            .map_err(|e| backend_err(JournalId::from_u128(0), format!("PUT {key} failed: {e}")))
    }

    /// Creates a small object at `rel` only if nothing is there (`PutMode::Create`): `false`
    /// when another writer created it first. Of many racing creators exactly one gets `true`.
    pub fn create_object(&self, rel: &str, bytes: Vec<u8>) -> Result<bool> {
        self.create_object_within(rel, bytes, None)
    }

    /// `create_object`, given up after `within` (with the store's own retries inside it). A
    /// create given up on may still land later: its outcome is unknown.
    pub fn create_object_within(
        &self,
        rel: &str,
        bytes: Vec<u8>,
        within: Option<std::time::Duration>,
    ) -> Result<bool> {
        let key = self.dir(rel);
        match self.put_within(&key, bytes, PutMode::Create, within) {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(backend_err(JournalId::from_u128(0), format!("PUT {key} (create) failed: {e}"))),
        }
    }

    /// Reads the small object at `rel`; `None` if there is none.
    pub fn read_object(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.get(JournalId::from_u128(0), &self.dir(rel))
    }

    /// Deletes the object at `rel` (nothing there is not an error).
    pub fn delete_object(&self, rel: &str) -> Result<()> {
        self.delete(JournalId::from_u128(0), &self.dir(rel))
    }

    /// Deletes the objects at `rels` (S3: one request per 1,000); those already gone are not
    /// an error.
    pub fn delete_objects(&self, rels: &[String]) -> Result<()> {
        if rels.is_empty() {
            return Ok(());
        }
        self.stats.deletes.fetch_add(rels.len().div_ceil(1000) as u64, Ordering::Relaxed);
        let paths: Vec<object_store::Result<Path>> = rels.iter().map(|r| Ok(self.dir(r))).collect();
        let stream = futures_util::stream::iter(paths).boxed();
        let results: Vec<object_store::Result<Path>> =
            self.rt.block_on(self.store.delete_stream(stream).collect());
        for r in results {
            match r {
                Ok(_) => {}
                Err(e @ object_store::Error::NotFound { .. }) if !no_bucket(&e) => {}
                Err(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let why = format!("DELETE below {} failed: {e}", self.root);
                    return Err(backend_err(JournalId::from_u128(0), why));
                }
            }
        }
        Ok(())
    }

    /// The objects below `rel` (with `recursive`, at any depth; else directly below it), named
    /// by their path below `rel`, with what tells one version from the next (one LIST, or one
    /// per 1,000 objects).
    pub fn list_objects(&self, rel: &str, recursive: bool) -> Result<Vec<ObjectInfo>> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir(rel);
        let listed = self.rt.block_on(self.store.list(Some(&dir)).try_collect::<Vec<_>>());
        let metas = listed.map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            backend_err(JournalId::from_u128(0), format!("LIST {dir} failed: {e}"))
        })?;
        let depth = dir.parts().count();
        Ok(metas
            .into_iter()
            .filter(|m| recursive || m.location.parts().count() == depth + 1)
            .map(|m| {
                let parts: Vec<String> =
                    m.location.parts().skip(depth).map(|p| p.as_ref().to_owned()).collect();
                let (tag, micros) = (m.e_tag.unwrap_or_default(), m.last_modified.timestamp_micros());
                ObjectInfo {
                    name: parts.join("/"),
                    version: format!("{tag}/{micros}/{}", m.size),
                    size: m.size,
                    modified_ms: m.last_modified.timestamp_millis(),
                }
            })
            .collect())
    }

    fn get(&self, journal: JournalId, key: &Path) -> Result<Option<Vec<u8>>> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let got = self.rt.block_on(async { self.store.get(key).await?.bytes().await });
        match got {
            Ok(b) => {
                self.stats.bytes_got.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b.to_vec()))
            }
            Err(e @ object_store::Error::NotFound { .. }) if !no_bucket(&e) => Ok(None),
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(backend_err(journal, format!("GET {key} failed: {e}")))
            }
        }
    }

    fn put(&self, key: &Path, bytes: Vec<u8>, mode: PutMode) -> object_store::Result<()> {
        self.put_within(key, bytes, mode, None)
    }

    fn put_within(
        &self,
        key: &Path,
        bytes: Vec<u8>,
        mode: PutMode,
        within: Option<std::time::Duration>,
    ) -> object_store::Result<()> {
        self.stats.puts.fetch_add(1, Ordering::Relaxed);
        let len = bytes.len() as u64;
        let opts = PutOptions { mode, ..Default::default() };
        let put = self.store.put_opts(key, PutPayload::from(bytes), opts);
        let res = match within {
            None => self.rt.block_on(put),
            Some(d) => self.rt.block_on(async { tokio::time::timeout(d, put).await }).unwrap_or_else(|_| {
                Err(object_store::Error::Generic {
                    store: "pagesync",
                    source: format!("no answer within {d:?}: the write may still land").into(),
                })
            }),
        };
        match &res {
            Ok(_) => {
                self.stats.bytes_put.fetch_add(len, Ordering::Relaxed);
            }
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(_) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        res.map(|_| ())
    }

    fn delete(&self, journal: JournalId, key: &Path) -> Result<()> {
        self.stats.deletes.fetch_add(1, Ordering::Relaxed);
        match self.rt.block_on(self.store.delete(key)) {
            Ok(()) => Ok(()),
            Err(e @ object_store::Error::NotFound { .. }) if !no_bucket(&e) => Ok(()),
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(backend_err(journal, format!("DELETE {key} failed: {e}")))
            }
        }
    }

    fn list(&self, journal: JournalId, dir: &Path) -> Result<Vec<String>> {
        self.stats.lists.fetch_add(1, Ordering::Relaxed);
        let listed = self.rt.block_on(self.store.list(Some(dir)).try_collect::<Vec<_>>());
        let metas = listed.map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            backend_err(journal, format!("LIST {dir} failed: {e}"))
        })?;
        let depth = dir.parts().count();
        Ok(metas
            .into_iter()
            .filter(|m| m.location.parts().count() == depth + 1)
            .filter_map(|m| m.location.filename().map(str::to_owned))
            .collect())
    }
}

fn crc(b: &[u8]) -> [u8; 4] {
    crc32c::crc32c(b).to_le_bytes()
}

fn marker_bytes(id: JournalId) -> Vec<u8> {
    let mut b = Vec::with_capacity(MARKER_BYTES);
    b.extend_from_slice(MARKER_MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(id.as_bytes());
    let c = crc(&b);
    b.extend_from_slice(&c);
    b
}

fn batch_key(dir: &Path, first: u64) -> Path {
    dir.clone().join(format!("{first:020}{BATCH_SUFFIX}"))
}

/// A journal in an object store. See the module documentation.
#[derive(Debug)]
pub struct ObjectJournal {
    id: JournalId,
    backend: ObjectBackend,
    dir: Path,
    /// First LSN of every batch object holding readable entries, ascending.
    batches: BTreeSet<u64>,
    range: LsnRange,
    trimmed_through: u64,
    /// Set once another writer won an LSN, or a write landed that the caller was told failed.
    poisoned: Option<String>,
    /// An append whose put failed with an unknown outcome, at this LSN.
    uncertain: Option<u64>,
}

impl ObjectJournal {
    fn open(backend: ObjectBackend, dir: Path, id: JournalId) -> Result<ObjectJournal> {
        let names = backend.list(id, &dir)?;
        let location = format!("{}/{dir}", backend.url.trim_end_matches('/'));
        let foreign = |reason: String| JournalError::Foreign { path: location.clone().into(), reason };
        let mut firsts = BTreeSet::new();
        for name in &names {
            if let Some(n) = name.strip_suffix(BATCH_SUFFIX) {
                let first: u64 = n.parse().map_err(|_| foreign(format!("unexpected object {name}")))?;
                if first == 0 {
                    return Err(foreign(format!("unexpected object {name}")));
                }
                firsts.insert(first);
            } else if name != MARKER_KEY && name != TRIM_KEY {
                return Err(foreign(format!("unexpected object {name}")));
            }
        }
        let marker_key = dir.clone().join(MARKER_KEY);
        let marker = match backend.get(id, &marker_key)? {
            Some(m) => m,
            None if !firsts.is_empty() => {
                return Err(foreign("batch objects but no JOURNAL marker".into()));
            }
            None => match backend.put(&marker_key, marker_bytes(id), PutMode::Create) {
                Ok(()) => marker_bytes(id),
                // Another writer created it first: read theirs.
                Err(object_store::Error::AlreadyExists { .. }) => {
                    backend.get(id, &marker_key)?.ok_or_else(|| foreign("JOURNAL vanished".into()))?
                }
                Err(e) => return Err(backend_err(id, format!("PUT {marker_key} failed: {e}"))),
            },
        };
        if marker.len() != MARKER_BYTES
            || &marker[..16] != MARKER_MAGIC
            || marker[36..40] != crc(&marker[..36])
        {
            return Err(foreign("JOURNAL marker is damaged or of another format".into()));
        }
        let version = u32::from_le_bytes(marker[16..20].try_into().expect("BUG: 4 bytes"));
        if version != FORMAT_VERSION {
            return Err(foreign(format!("format version {version}, this build reads {FORMAT_VERSION}")));
        }
        if marker[20..36] != id.as_bytes()[..] {
            return Err(foreign(format!("it belongs to another journal than {id}")));
        }
        let trimmed_through = match backend.get(id, &dir.clone().join(TRIM_KEY))? {
            None => 0,
            Some(t) if t.len() == TRIM_BYTES && &t[..8] == TRIM_MAGIC && t[16..20] == crc(&t[..16]) => {
                u64::from_le_bytes(t[8..16].try_into().expect("BUG: 8 bytes"))
            }
            Some(_) => return Err(foreign("TRIM marker is damaged".into())),
        };
        let mut j = ObjectJournal {
            id,
            backend,
            dir,
            batches: firsts,
            range: LsnRange::new_empty(),
            trimmed_through,
            poisoned: None,
            uncertain: None,
        };
        let next = match j.batches.last().copied() {
            Some(last) => last + j.fetch(last)?.payloads.len() as u64,
            None => trimmed_through + 1,
        };
        // Batches wholly at or below the trim point were left by an interrupted trim.
        let ends: Vec<(u64, u64)> = j.batch_ends(next);
        for (first, end) in ends {
            if end <= trimmed_through {
                j.batches.remove(&first);
            }
        }
        let first = j.batches.first().map_or(next, |f| (*f).max(trimmed_through + 1));
        let next = Lsn::new(next.max(trimmed_through + 1)).expect("BUG: at least 1");
        j.range = match Lsn::new(first) {
            Some(f) if f < next => {
                LsnRange::inclusive(f, Lsn::new(next.get() - 1).expect("BUG: next > f >= 1"))
            }
            _ => LsnRange::empty_at(next),
        };
        Ok(j)
    }

    /// (first, last LSN) of every batch, given the journal's next LSN.
    fn batch_ends(&self, next: u64) -> Vec<(u64, u64)> {
        let firsts: Vec<u64> = self.batches.iter().copied().collect();
        firsts.iter().enumerate().map(|(i, f)| (*f, firsts.get(i + 1).copied().unwrap_or(next) - 1)).collect()
    }

    pub fn backend(&self) -> &ObjectBackend {
        &self.backend
    }

    fn corrupt(&self, lsn: u64, key: &Path, reason: String) -> JournalError {
        match Lsn::new(lsn) {
            Some(lsn) => JournalError::Corrupt {
                journal: self.id,
                location: format!("{}/{key}", self.backend.url.trim_end_matches('/')),
                lsn,
                reason,
            },
            None => JournalError::CorruptSegment { journal: self.id, location: key.to_string(), reason },
        }
    }

    /// The batch whose first LSN is `first`, from the cache or the store, verified.
    fn fetch(&self, first: u64) -> Result<Arc<Batch>> {
        let cache_key = (self.id, first);
        if let Some(b) = self.backend.cache.lock().expect("BUG: cache lock poisoned").get(cache_key) {
            return Ok(b);
        }
        let key = batch_key(&self.dir, first);
        let bytes = self
            .backend
            .get(self.id, &key)?
            .ok_or_else(|| self.corrupt(first, &key, "the batch object is missing".into()))?;
        let batch = Arc::new(self.decode(first, &key, bytes)?);
        self.backend.cache.lock().expect("BUG: cache lock poisoned").insert(cache_key, batch.clone());
        Ok(batch)
    }

    fn decode(&self, first: u64, key: &Path, bytes: Vec<u8>) -> Result<Batch> {
        let h = bytes
            .get(..BATCH_HEADER_BYTES)
            .ok_or_else(|| self.corrupt(first, key, "truncated header".into()))?;
        if &h[..8] != BATCH_MAGIC || h[36..40] != crc(&h[..36]) {
            return Err(self.corrupt(first, key, "bad batch header".into()));
        }
        if h[8..24] != self.id.as_bytes()[..] {
            return Err(self.corrupt(first, key, "the batch belongs to another journal".into()));
        }
        let hdr_first = u64::from_le_bytes(h[24..32].try_into().expect("BUG: 8 bytes"));
        if hdr_first != first {
            return Err(self.corrupt(first, key, format!("the header says first LSN {hdr_first}")));
        }
        let count = u32::from_le_bytes(h[32..36].try_into().expect("BUG: 4 bytes")) as u64;
        let mut payloads = Vec::with_capacity(count as usize);
        let mut off = BATCH_HEADER_BYTES;
        for lsn in first..first + count {
            let expected = Lsn::new(lsn).expect("BUG: first >= 1");
            let payload = codec::decode_frame(&bytes[off..], expected)
                .map_err(|e| self.corrupt(lsn, key, e.to_string()))?;
            payloads.push((off + FRAME_HEADER_BYTES, payload.len()));
            off += codec::frame_len(payload.len());
        }
        if off != bytes.len() {
            return Err(self.corrupt(first + count, key, "bytes after the last frame".into()));
        }
        Ok(Batch { bytes, payloads })
    }

    /// The batch holding `lsn` (which must be in range) and the entry's index in it.
    fn locate(&self, lsn: Lsn) -> Result<(Arc<Batch>, usize)> {
        let first = *self
            .batches
            .range(..=lsn.get())
            .next_back()
            .ok_or_else(|| backend_err(self.id, format!("no batch object holds LSN {lsn}")))?;
        let batch = self.fetch(first)?;
        let expected_end = self.batches.range(first + 1..).next().copied().unwrap_or(self.range.next().get());
        if first + batch.payloads.len() as u64 != expected_end {
            let key = batch_key(&self.dir, first);
            let why =
                format!("holds {} entries, the next batch starts at {expected_end}", batch.payloads.len());
            return Err(self.corrupt(first, &key, why));
        }
        Ok((batch, (lsn.get() - first) as usize))
    }

    fn check_writable(&mut self) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(JournalError::Fenced { journal: self.id, message: why.clone() });
        }
        if let Some(lsn) = self.uncertain {
            let key = batch_key(&self.dir, lsn);
            if self.backend.get(self.id, &key)?.is_some() {
                let why = format!(
                    "the write of LSN {lsn} was reported failed but landed; reopen the journal to re-read it"
                );
                self.poisoned = Some(why.clone());
                return Err(JournalError::Fenced { journal: self.id, message: why });
            }
            self.uncertain = None;
        }
        Ok(())
    }
}

impl Journal for ObjectJournal {
    fn id(&self) -> JournalId {
        self.id
    }

    fn range(&self) -> LsnRange {
        self.range
    }

    fn append_batch(&mut self, payloads: &[&[u8]]) -> Result<LsnRange> {
        for p in payloads {
            crate::check_entry_len(self.id, p)?;
        }
        self.check_writable()?;
        let first = self.range.next();
        let batch = LsnRange::from_count(first, payloads.len() as u64);
        if payloads.is_empty() {
            return Ok(batch);
        }
        let total: usize = payloads.iter().map(|p| codec::frame_len(p.len())).sum();
        let mut bytes = Vec::with_capacity(BATCH_HEADER_BYTES + total);
        bytes.extend_from_slice(BATCH_MAGIC);
        bytes.extend_from_slice(self.id.as_bytes());
        bytes.extend_from_slice(&first.get().to_le_bytes());
        bytes.extend_from_slice(&(payloads.len() as u32).to_le_bytes());
        let c = crc(&bytes);
        bytes.extend_from_slice(&c);
        let starts = codec::encode_frames(&mut bytes, first, payloads);
        let offsets: Vec<(usize, usize)> =
            starts.iter().zip(payloads).map(|(at, p)| (at + FRAME_HEADER_BYTES, p.len())).collect();
        let key = batch_key(&self.dir, first.get());
        match self.backend.put(&key, bytes.clone(), PutMode::Create) {
            Ok(()) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                let why = format!(
                    "LSN {first} was already written by another writer: the document is owned by another \
                     server, and this one stops writing to it"
                );
                self.poisoned = Some(why.clone());
                return Err(JournalError::Fenced { journal: self.id, message: why });
            }
            Err(e) => {
                self.uncertain = Some(first.get());
                return Err(backend_err(self.id, format!("PUT {key} failed, nothing was acknowledged: {e}")));
            }
        }
        let cached = Arc::new(Batch { bytes, payloads: offsets });
        self.backend.cache.lock().expect("BUG: cache lock poisoned").insert((self.id, first.get()), cached);
        self.batches.insert(first.get());
        self.range = self.range.extend(payloads.len() as u64);
        Ok(batch)
    }

    fn read(&self, lsn: Lsn) -> Result<Vec<u8>> {
        if !self.range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range: self.range });
        }
        let (batch, i) = self.locate(lsn)?;
        Ok(batch.payload(i).to_vec())
    }

    fn read_into(&self, lsn: Lsn, out: &mut Vec<u8>) -> Result<()> {
        if !self.range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range: self.range });
        }
        let (batch, i) = self.locate(lsn)?;
        out.extend_from_slice(batch.payload(i));
        Ok(())
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> Result<()> {
        if !self.range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range: self.range });
        }
        let (batch, i) = self.locate(lsn)?;
        let payload = batch.payload(i);
        let part = offset.checked_add(buf.len()).and_then(|end| payload.get(offset..end));
        buf.copy_from_slice(part.ok_or_else(|| crate::part_out_of_bounds(self.id, lsn, payload.len()))?);
        Ok(())
    }

    fn remove_prefix(&mut self, up_to: Lsn) -> Result<()> {
        let target = up_to.get();
        if target <= self.trimmed_through {
            return Ok(());
        }
        // A fenced writer rewrites nothing, the trim marker included.
        self.check_writable()?;
        let mut t = Vec::with_capacity(TRIM_BYTES);
        t.extend_from_slice(TRIM_MAGIC);
        t.extend_from_slice(&target.to_le_bytes());
        let c = crc(&t);
        t.extend_from_slice(&c);
        let trim_key = self.dir.clone().join(TRIM_KEY);
        self.backend
            .put(&trim_key, t, PutMode::Overwrite)
            .map_err(|e| backend_err(self.id, format!("PUT {trim_key} failed: {e}")))?;
        self.trimmed_through = target;
        let next = self.range.next().max(up_to.next());
        self.range = self.range.remove_through(up_to);
        // Trimmed with `TRIM`: a batch that would not delete is ignored on open, and the next
        // trim deletes it.
        for (first, end) in self.batch_ends(next.get()) {
            if end <= target && self.backend.delete(self.id, &batch_key(&self.dir, first)).is_ok() {
                self.backend.cache.lock().expect("BUG: cache lock poisoned").remove((self.id, first));
                self.batches.remove(&first);
            }
        }
        Ok(())
    }
}

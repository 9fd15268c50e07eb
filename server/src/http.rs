//! One TCP connection: HTTP (`/healthz`, `/metrics`, export, static files) or a websocket at
//! `/v1/sync`, on the same port.
//!
//! Every step has a deadline and a bound, so a silent or slow peer costs a bounded time and
//! memory: the request head (`HEAD_TIMEOUT`, `MAX_REQUEST_HEAD_BYTES`) is read, not peeked, and
//! handed to the websocket handshake if the route is `/v1/sync`; the handshake
//! (`HANDSHAKE_TIMEOUT`); the first message, which must be `Hello` (`HELLO_TIMEOUT`). Only then
//! does a websocket take one of the `--max-connections` slots (`Admission`). Once in, frames are
//! read only as fast as the hub handles them (`Inbound`), pings find dead peers, and what the
//! hub queues for the peer is reported to the session as its backlog (see `hub.rs`).
//!
//! With an auth secret, `/metrics` needs a token with the metrics scope and export a token that
//! may read the document (a bearer header, or `?token=` for browsers); `/healthz` stays open.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pagesync::protocol::{ExportError, Message, PRESSURE_IDLE_MS, codes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Hub, Metrics};

/// Largest HTTP request head (request line and headers); a longer one gets 431.
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 << 10;

/// How long a new connection may take to send its whole request head: long enough for any
/// real client on a slow link, short enough that a slowloris peer holds a half-open slot for
/// seconds, not forever.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the websocket handshake's answer may take to write.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a new websocket may take to send `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A websocket ping goes out this often; a peer silent for `DEAD_PEER_TIMEOUT` (no frame, no
/// pong) is closed.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
pub const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a write in progress when the hub closes its connection may still take.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often a closed connection's writer looks whether its socket still takes bytes.
const CLOSE_POLL: Duration = Duration::from_millis(100);

/// What the reader and the writer of a websocket see of its peer: when it last sent a frame
/// or pong (milliseconds since `started`), and when its socket last took bytes
/// (`crate::mono_ms`).
struct Seen {
    last_seen: Arc<AtomicI64>,
    took_bytes_at: Arc<AtomicI64>,
    started: tokio::time::Instant,
}

/// Small frames that carry no message of their own (pings, pongs, and fragments of a message
/// under `MIN_FREE_FRAGMENT_BYTES` that do not end it) a peer may send per `PING_INTERVAL`, as
/// a bucket that holds this many and refills at this rate; past it the connection is closed.
/// Each ping makes the websocket queue a pong, which a peer that never reads would let pile up
/// without end, and empty fragments cost parsing without ever reaching the session's bounds; a
/// keepalive needs a few.
pub const MAX_CONTROL_FRAMES_PER_INTERVAL: u32 = 64;

/// The largest first message, before a connection said `Hello` (which carries a token and
/// nothing more): 64 KiB. A larger one closes the connection: without credentials, a socket
/// cannot make the server hold a frame's worth of bytes.
pub const MAX_HELLO_BYTES: u64 = 64 << 10;

/// The longest one message may take to arrive, from its first frame to its last: a peer that
/// starts a message and never ends it (sending pings meanwhile) would hold its bytes for as
/// long as the connection lasts. At `MAX_UPLOAD_FRAME_BYTES` this is about 11 KiB/s; long
/// enough too for the server's own backpressure (a message's first frame may be read while
/// the one before waits for the hub).
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(120);

/// A fragment of a message this large or larger is not counted against
/// `MAX_CONTROL_FRAMES_PER_INTERVAL`: it costs the peer about what it costs the server, as an
/// unfragmented message does.
pub const MIN_FREE_FRAGMENT_BYTES: u64 = 1 << 10;

/// The longest one message may take to leave; past it the peer is not reading and the
/// connection is closed (the session stops sending to it long before: see
/// `MAX_SEND_BACKLOG_BYTES`).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of frames one connection may have waiting for the hub: one largest frame and a
/// little more. Past it, the connection is not read until the hub catches up.
fn inbound_bytes_per_connection(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_add(1 << 20)
}

/// Bytes of frames all connections together may have waiting for the hub: 256 MiB, or one
/// largest frame if that is more.
pub fn inbound_bytes_total(max_frame_bytes: usize) -> usize {
    (256usize << 20).max(inbound_bytes_per_connection(max_frame_bytes))
}

/// Bytes of messages still arriving, across all connections (`Admission::arriving`): half of
/// `inbound_bytes_total`, since the websocket holds about two bytes for each one counted (its
/// read buffer and the message it builds), or one largest frame if that is more.
pub fn arriving_bytes_total(max_frame_bytes: usize) -> usize {
    (inbound_bytes_total(max_frame_bytes) / 2).max(max_frame_bytes)
}

/// Connections that have not yet said `Hello` (reading their head, handshaking), served at
/// once. They have their own cap so that silent sockets cannot take the `--max-connections`
/// slots of real clients, and at the cap the *oldest* is closed to make room: a real client
/// gets through its handshake in milliseconds, while silent sockets age out first.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 1_024;

/// The connections that have not said `Hello` yet, oldest first.
#[derive(Debug)]
pub struct Pending {
    slots: std::sync::Mutex<std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>>,
    next: std::sync::atomic::AtomicU64,
    max: usize,
}

/// A pending connection's place; leaves the set on drop. `evicted` resolves when an newer
/// connection needed the place.
#[derive(Debug)]
pub struct PendingSlot {
    id: u64,
    set: Arc<Pending>,
    evicted: tokio::sync::oneshot::Receiver<()>,
}

impl Pending {
    pub fn new(max: usize) -> Arc<Pending> {
        Arc::new(Pending { slots: Default::default(), next: Default::default(), max: max.max(1) })
    }

    /// A place for a new connection; at the cap, the oldest pending one is evicted (returned
    /// as `true`).
    pub fn admit(self: &Arc<Self>) -> (PendingSlot, bool) {
        let (tx, evicted) = tokio::sync::oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().expect("BUG: lock poisoned");
        let full = slots.len() >= self.max;
        if full {
            slots.pop_first(); // dropping the sender wakes the oldest with `evicted`
        }
        slots.insert(id, tx);
        (PendingSlot { id, set: self.clone(), evicted }, full)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.set.slots.lock().expect("BUG: lock poisoned").remove(&self.id);
    }
}

/// The slots a connection may take: a pending one at accept, a full one after `Hello`.
#[derive(Clone, Debug)]
pub struct Admission {
    pub pending: Arc<Pending>,
    pub connections: Arc<Semaphore>,
    /// Bytes of frames waiting for the hub, across all connections.
    pub inbound: Arc<Semaphore>,
    /// Bytes of messages still arriving (read, held by the websocket until their last frame),
    /// across all connections: `arriving_bytes_total`. A connection whose next bytes do not
    /// fit is closed, so peers that start messages and never end them cannot exhaust memory.
    pub arriving: Arc<Semaphore>,
}

/// What a connection may be routed to.
pub(crate) struct Routes {
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    pub store: crate::Store,
    pub max_frame_bytes: usize,
    pub web_root: Option<PathBuf>,
    pub auth_secret: Option<Arc<Vec<u8>>>,
    pub admission: Admission,
}

/// A parsed request head.
struct Request {
    method: String,
    path: String,
    /// After `?`, as sent (empty when there was none).
    query: String,
    token: Option<String>,
    /// It asks for a websocket (`Upgrade: websocket`).
    websocket: bool,
    /// Its `Sec-WebSocket-Key` and `Sec-WebSocket-Version`, checked before the handshake so
    /// that a bad one gets an answer saying what is wrong, not a closed socket.
    ws_key: bool,
    ws_version: Option<String>,
    /// Its `Connection` header names `upgrade`, and its request line says HTTP/1.1 (a
    /// websocket handshake needs both, RFC 6455 4.1).
    ws_connection: bool,
    http11: bool,
    /// Its `Host` and `Origin` headers, as sent; `twice`: either came more than once.
    host: Option<String>,
    origin: Option<String>,
    twice: bool,
}

/// Serves one connection. Until it said `Hello` (or, for plain HTTP, until it is answered) it
/// holds a pending slot and is closed if a newer connection needs the slot.
pub(crate) async fn serve_connection(stream: TcpStream, routes: Routes, mut slot: PendingSlot) {
    let admitted = tokio::select! {
        _ = &mut slot.evicted => return,
        admitted = route(stream, &routes) => admitted,
    };
    drop(slot);
    if let Some((ws, hello)) = admitted {
        serve_websocket(ws, hello, routes).await;
    }
}

type Socket = tokio_tungstenite::WebSocketStream<Prefixed>;

/// Reads the head and answers it; for `/v1/sync`, returns the websocket and its `Hello`.
async fn route(mut stream: TcpStream, routes: &Routes) -> Option<(Socket, Vec<u8>)> {
    let mut head = Vec::new();
    match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut head)).await {
        Ok(Ok(())) => {}
        Ok(Err(HeadError::TooLarge)) => {
            let why = "request head too large\n";
            respond(stream, "431 Request Header Fields Too Large", "text/plain", why).await;
            return None;
        }
        Ok(Err(HeadError::Closed)) => return None,
        // A TLS client (`wss://`, `https://`) at a plain server: refused at once, so it fails
        // now with a TLS error instead of waiting out the head deadline.
        Ok(Err(HeadError::Tls)) => {
            let why = "this server speaks plain HTTP and ws://, not TLS\n";
            respond(stream, "400 Bad Request", "text/plain", why).await;
            return None;
        }
        // A socket that never sent a byte gets no answer: closing is cheaper, and thousands of
        // them timing out together should cost the server as little as possible.
        Err(_) if head.is_empty() => return None,
        Err(_) => {
            let why = format!("the request head must arrive within {} s\n", HEAD_TIMEOUT.as_secs());
            respond(stream, "408 Request Timeout", "text/plain", why).await;
            return None;
        }
    };
    let Some(req) = parse_head(&head) else {
        respond(stream, "400 Bad Request", "text/plain", "malformed request line\n").await;
        return None;
    };
    if routes.auth_secret.is_none()
        && let Some(why) = off_loopback(&req)
    {
        respond(stream, "403 Forbidden", "text/plain", format!("{why}\n")).await;
        return None;
    }
    // Each route's methods (every GET route takes HEAD too); the others get 405 naming them.
    let allowed: &[&str] = match req.path.as_str() {
        p if p.starts_with("/v1/docs/") && p.ends_with("/history") => &["GET", "HEAD", "OPTIONS"],
        p if p.starts_with("/v1/docs/") && p.ends_with("/export") => &["GET", "HEAD"],
        p if p.starts_with("/v1/docs/") => &["GET", "HEAD", "DELETE"],
        _ => &["GET", "HEAD"],
    };
    if !allowed.contains(&req.method.as_str()) {
        let allow = allowed.join(", ");
        let why = format!("{} takes {allow}, not {}\n", req.path, req.method);
        respond_with(stream, "405 Method Not Allowed", &[("allow", &allow)], "text/plain", why).await;
        return None;
    }
    // The routes that take no parameter but a token refuse any other: one they would ignore
    // is a request they would answer differently from what was asked.
    let plain = match req.path.as_str() {
        "/healthz" => Some("health takes none"),
        "/metrics" => Some("metrics take none"),
        "/v1/sync" => Some("a sync client says its document in messages, not the URL"),
        _ => None,
    };
    if let Some(Err(why)) = plain.map(|instead| only_token(&req.query, instead)) {
        respond(stream, "400 Bad Request", "text/plain", why).await;
        return None;
    }
    // A websocket handshake is a GET (RFC 6455, 4.1); a HEAD is answered as the GET would be.
    let upgrade = req.websocket && req.method == "GET";
    let stream = Reply { stream, head_only: req.method == "HEAD" };
    match req.path.as_str() {
        "/v1/sync" if upgrade && req.ws_version.as_deref() != Some("13") => {
            let why = "pagesync speaks websocket version 13 (Sec-WebSocket-Version: 13)\n";
            let headers = [("sec-websocket-version", "13"), ("upgrade", "websocket")];
            respond_with(stream, "426 Upgrade Required", &headers, "text/plain", why).await
        }
        "/v1/sync" if upgrade && !req.ws_key => {
            let why = "a websocket handshake needs a Sec-WebSocket-Key header\n";
            respond(stream, "400 Bad Request", "text/plain", why).await
        }
        "/v1/sync" if upgrade && !req.ws_connection => {
            let why = "a websocket handshake needs a Connection: Upgrade header\n";
            respond(stream, "400 Bad Request", "text/plain", why).await
        }
        "/v1/sync" if upgrade && !req.http11 => {
            let why = "a websocket handshake is an HTTP/1.1 request\n";
            respond(stream, "400 Bad Request", "text/plain", why).await
        }
        "/v1/sync" if upgrade => {
            let skip = head_end(&head).unwrap_or(head.len());
            let guard = FrameGuard::after(skip, routes.metrics.clone(), routes.admission.arriving.clone());
            let took_bytes_at = Arc::new(AtomicI64::new(0));
            let inner = stream.stream;
            return handshake(Prefixed { head, at: 0, inner, guard, took_bytes_at }, routes).await;
        }
        // A browser or `curl` that found the endpoint: say what it is rather than hang up.
        "/v1/sync" => {
            let why = "this is pagesync's sync endpoint, a websocket: connect a pagesync client to ws:// (or \
                       wss://) on this path\n";
            respond_with(stream, "426 Upgrade Required", &[("upgrade", "websocket")], "text/plain", why).await
        }
        "/healthz" => respond(stream, "200 OK", "text/plain", HEALTHY).await,
        "/metrics" => match authorize_metrics(routes, &req) {
            Ok(()) => respond(stream, "200 OK", "text/plain; version=0.0.4", routes.metrics.render()).await,
            Err((status, why)) => respond(stream, status, "text/plain", why).await,
        },
        p if p.starts_with("/v1/docs/") && req.method == "DELETE" => delete(stream, routes, &req).await,
        // A page on another origin asks first whether it may send its token.
        p if p.starts_with("/v1/docs/") && p.ends_with("/history") && req.method == "OPTIONS" => {
            let cors = [
                ("access-control-allow-origin", "*"),
                ("access-control-allow-methods", "GET"),
                ("access-control-allow-headers", "authorization"),
                ("access-control-max-age", "600"),
            ];
            respond_with(stream, "204 No Content", &cors, "text/plain", "").await
        }
        p if p.starts_with("/v1/docs/") && p.ends_with("/history") => history(stream, routes, &req).await,
        p if p.starts_with("/v1/docs/") => export(stream, routes, &req).await,
        p => match &routes.web_root {
            Some(root) => static_file(stream, root, p).await,
            None => {
                let routes = "routes: /v1/sync (websocket), /healthz, /metrics, /v1/docs/{id}/export, /v1/docs/{id}/history\n";
                respond(stream, "404 Not Found", "text/plain", routes).await
            }
        },
    }
    None
}

enum HeadError {
    Closed,
    TooLarge,
    /// The first bytes are a TLS handshake record.
    Tls,
}

/// Reads the request head into `head`, through its blank line (lines may end in a bare LF, as
/// RFC 9112 lets a server accept). A head longer than `MAX_REQUEST_HEAD_BYTES` is refused
/// however it arrives.
async fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) -> Result<(), HeadError> {
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let searched = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if head.starts_with(&[0x16, 0x03]) {
            return Err(HeadError::Tls);
        }
        let end = head_end(&head[searched..]).map(|e| searched + e);
        match end {
            Some(end) if end <= MAX_REQUEST_HEAD_BYTES => return Ok(()),
            Some(_) => return Err(HeadError::TooLarge),
            None if head.len() > MAX_REQUEST_HEAD_BYTES => return Err(HeadError::TooLarge),
            None => {}
        }
    }
}

/// Where a request head ends (just past its blank line), if it has.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let lf = bytes.iter().position(|&b| b == b'\n')?;
    let mut at = lf;
    loop {
        // `at` is a line feed: the line after it is empty if the next byte is a line feed, or
        // a carriage return and then one.
        match bytes.get(at + 1..) {
            Some([b'\n', ..]) => return Some(at + 2),
            Some([b'\r', b'\n', ..]) => return Some(at + 3),
            _ => {}
        }
        at = at + 1 + bytes[at + 1..].iter().position(|&b| b == b'\n')?;
    }
}

fn parse_head(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(&head[..head_end(head).unwrap_or(head.len())]).ok()?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let mut parts = lines.next()?.split_whitespace();
    let (method, target) = (parts.next()?, parts.next()?);
    let http11 = parts.next().is_some_and(|v| v.eq_ignore_ascii_case("HTTP/1.1"));
    // The absolute form (`GET http://host/path`), which a server must accept (RFC 9112,
    // 3.2.2): its authority stands for the `Host` header.
    let scheme = ["http://", "https://"]
        .into_iter()
        .find(|s| target.get(..s.len()).is_some_and(|t| t.eq_ignore_ascii_case(s)));
    let (absolute_host, target) = match scheme {
        Some(scheme) => {
            let rest = &target[scheme.len()..];
            let at = rest.find(['/', '?']).unwrap_or(rest.len());
            let path = match &rest[at..] {
                p if p.starts_with('/') => p.to_owned(),
                p => format!("/{p}"),
            };
            (Some(rest[..at].to_owned()), std::borrow::Cow::Owned(path))
        }
        None => (None, std::borrow::Cow::Borrowed(target)),
    };
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut token = query.split('&').find_map(|kv| kv.strip_prefix("token=")).map(str::to_owned);
    let (mut websocket, mut ws_key, mut ws_version, mut ws_connection) = (false, false, None, false);
    let (mut host, mut origin, mut twice) = (None, None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("authorization")
            && let Some((scheme, t)) = value.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            // The scheme's name is case-insensitive (RFC 9110, 11.1).
            token = Some(t.trim().to_owned());
        } else if name.eq_ignore_ascii_case("upgrade") {
            websocket |= value.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            ws_connection |= value.split(',').any(|p| p.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            ws_key = !value.is_empty();
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            ws_version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("host") {
            twice |= host.replace(value.to_owned()).is_some();
        } else if name.eq_ignore_ascii_case("origin") {
            twice |= origin.replace(value.to_owned()).is_some();
        }
    }
    if absolute_host.is_some() {
        host = absolute_host;
    }
    let (method, path, query) = (method.to_owned(), path.to_owned(), query.to_owned());
    Some(Request {
        method,
        path,
        query,
        token,
        websocket,
        ws_key,
        ws_version,
        ws_connection,
        http11,
        host,
        origin,
        twice,
    })
}

/// Why a server without an auth secret refuses `req`, if it does. Such a server listens on
/// loopback only, and everything it holds is open to whoever reaches it: so only local
/// programs and pages on a loopback origin may. A web page elsewhere that the user opened
/// could otherwise read and write every document through the user's browser (a websocket is
/// not held to the same-origin policy, and a cross-origin `fetch` of a GET is sent), and a
/// name that an attacker's DNS points at 127.0.0.1 would reach it as that page's own origin
/// (DNS rebinding): hence the `Origin` and the `Host` are checked.
fn off_loopback(req: &Request) -> Option<String> {
    if req.twice {
        return Some("a request with two Host or two Origin headers: which one counts is a guess".into());
    }
    if let Some(host) = req.host.as_deref().filter(|h| !loopback_authority(h)) {
        return Some(format!(
            "this server has no auth secret and answers only requests addressed to a loopback name (localhost, 127.0.0.1, [::1]), not {:?}: give it --auth-secret-file to serve other names",
            clip(host)
        ));
    }
    let origin = req.origin.as_deref()?;
    let authority = ["http://", "https://"].iter().find_map(|scheme| {
        origin.get(..scheme.len()).filter(|s| s.eq_ignore_ascii_case(scheme)).map(|_| &origin[scheme.len()..])
    });
    if authority.is_some_and(loopback_authority) {
        return None;
    }
    Some(format!(
        "this server has no auth secret and serves only pages on a loopback origin (http://localhost:PORT, http://127.0.0.1:PORT), not {:?}: give it --auth-secret-file to serve other origins",
        clip(origin)
    ))
}

/// Whether `authority` (`host[:port]`) names this machine's loopback: `localhost` (or a name
/// under it, RFC 6761), `127.0.0.0/8` or `[::1]`.
fn loopback_authority(authority: &str) -> bool {
    if authority.contains('@') {
        // A user part: some parsers take what follows it for the host.
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        },
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

type Refusal = (&'static str, String);

fn verify(routes: &Routes, req: &Request) -> Result<Option<crate::auth::Claims>, Refusal> {
    let Some(secret) = &routes.auth_secret else { return Ok(None) };
    let now_ms = crate::wall_ms();
    let token = req.token.as_deref().unwrap_or("");
    crate::auth::verify_claims(secret, token, now_ms)
        .map(Some)
        .map_err(|why| ("401 Unauthorized", format!("{why}\n")))
}

fn authorize_metrics(routes: &Routes, req: &Request) -> Result<(), Refusal> {
    match verify(routes, req)? {
        None => Ok(()),
        Some(c) if c.metrics => Ok(()),
        Some(_) => Err((
            "403 Forbidden",
            "this token has no metrics scope: mint one with `pagesync-server token --metrics`\n".into(),
        )),
    }
}

/// Serves a file below `root` (`/` is `index.html`). Paths with `..` or hidden components are
/// refused, and a link in the directory is not followed out of it, so nothing outside `root`
/// is reachable.
async fn static_file(stream: Reply, root: &Path, path: &str) {
    let rel = if path.ends_with('/') { format!("{path}index.html") } else { path.to_owned() };
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    if parts.iter().any(|p| p.starts_with('.') || p.contains('\\')) {
        return respond(stream, "400 Bad Request", "text/plain", "bad path\n").await;
    }
    let file = parts.iter().fold(root.to_path_buf(), |dir, p| dir.join(p));
    let content_type = match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    let Some((opened, len)) = open_below(root, &file).await else {
        return respond(stream, "404 Not Found", "text/plain", format!("no file {path}\n")).await;
    };
    let head = answer_head("200 OK", &[], content_type, usize::try_from(len).unwrap_or(usize::MAX));
    send_file(stream, &head, opened, len).await
}

/// `file` opened, with its length, if it is a regular file whose real path lies below `root`'s:
/// a link in the directory to elsewhere (a key, `/etc/passwd`) is not followed out of it, and
/// a FIFO or a device is never opened (opening a FIFO waits for a writer, holding the request).
async fn open_below(root: &Path, file: &Path) -> Option<(tokio::fs::File, u64)> {
    let root = tokio::fs::canonicalize(root).await.ok()?;
    let real = tokio::fs::canonicalize(file).await.ok()?;
    if !real.starts_with(&root) || !tokio::fs::metadata(&real).await.ok()?.is_file() {
        return None;
    }
    // Should it change between the looks above and the open: a link now at the last component
    // is not followed, a FIFO now there is not waited on, and what was opened is looked at.
    let opened = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&real)
        .await
        .ok()?;
    let meta = opened.metadata().await.ok()?;
    meta.is_file().then_some((opened, meta.len()))
}

/// `send` for a file: its bytes go out as they are read, never held whole, so many requests
/// for a large file do not hold as many copies of it. A file that grew since `len` was taken
/// is cut at that length; one that shrank ends the answer early (the connection closes).
async fn send_file(reply: Reply, head: &str, file: tokio::fs::File, len: u64) {
    let Reply { mut stream, head_only } = reply;
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            tokio::io::copy(&mut file.take(len), &mut stream).await?;
        }
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(answer_deadline(len), write).await;
}

async fn export(stream: Reply, routes: &Routes, req: &Request) {
    let doc = match doc_of_path(&req.path, "/export", "export is GET /v1/docs/{id}/export\n") {
        Ok(d) => d,
        Err((status, why)) => return respond(stream, status, "text/plain", why).await,
    };
    // An export answers the current state: a parameter it would ignore (`at=` for a past point)
    // is refused rather than answered with something the asker did not ask for.
    let past = "a past point is `pagesync-server export --doc ID --at lsn:N|TIME FILE`, beside the server";
    if let Err(why) = only_token(&req.query, past) {
        return respond(stream, "400 Bad Request", "text/plain", why).await;
    }
    let grant = match verify(routes, req) {
        Ok(claims) => claims.map(|c| crate::auth::grant_of(&c)),
        Err((status, why)) => return respond(stream, status, "text/plain", why).await,
    };
    match grant {
        Some(Err(why)) => return respond(stream, "403 Forbidden", "text/plain", format!("{why}\n")).await,
        Some(Ok(g)) if !g.allows(doc) => {
            let why = format!("your token does not grant access to document {doc}\n");
            return respond(stream, "403 Forbidden", "text/plain", why).await;
        }
        _ => {}
    }
    // Blocking (S3 requests wait on the runtime): off the async workers.
    let store = routes.store.clone();
    match tokio::task::spawn_blocking(move || store.exists(doc)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            return respond(stream, "404 Not Found", "text/plain", format!("no document {doc}\n")).await;
        }
        Ok(Err(pagesync::Error::Deleted)) => {
            let why = format!("document {doc} was deleted\n");
            return respond(stream, "404 Not Found", "text/plain", why).await;
        }
        Ok(Err(e)) => return store_failed(stream, "exporting", doc, Ok(e)).await,
        Err(e) => return store_failed(stream, "exporting", doc, Err(e)).await,
    }
    match routes.hub.export(doc).await {
        Ok(bytes) => respond(stream, "200 OK", "application/vnd.sqlite3", bytes).await,
        // Another server of the cluster holds it: the same request there.
        Err(ExportError::Moved { owner }) => redirect(stream, &owner, req, doc).await,
        Err(ExportError::NotFound) => {
            respond(stream, "404 Not Found", "text/plain", format!("no document {doc}\n")).await
        }
        Err(e @ ExportError::Unavailable(_)) => {
            respond(stream, "503 Service Unavailable", "text/plain", format!("{e}\n")).await
        }
        Err(e) => respond(stream, "500 Internal Server Error", "text/plain", format!("{e}\n")).await,
    }
}

/// Answers a failure of the server's own storage, or of the task that asked it: `503` when it
/// may pass, `500` when not. The client hears its kind (`Error::public`); the log gets the
/// whole of it (paths, buckets, endpoints are not the client's to see).
async fn store_failed(
    stream: Reply,
    doing: &str,
    doc: pagesync::DocId,
    failure: Result<pagesync::Error, tokio::task::JoinError>,
) {
    let (status, public, detail) = match &failure {
        Ok(e) => {
            let passes = e.is_transient_storage() || matches!(e, pagesync::Error::Unavailable(_));
            let status = if passes { "503 Service Unavailable" } else { "500 Internal Server Error" };
            (status, e.public(), e.to_string())
        }
        Err(e) => {
            let public = format!("an internal error {}", pagesync::protocol::SEE_THE_LOG);
            ("500 Internal Server Error", public, e.to_string())
        }
    };
    tracing::warn!(%doc, "{doing} {doc} failed: {detail}");
    respond(stream, status, "text/plain", format!("{doing} {doc} failed: {public}\n")).await
}

/// The document `/v1/docs/{id}{suffix}` names: `404` with `usage` for a path that is not one,
/// `400` for an id that does not parse.
fn doc_of_path(path: &str, suffix: &str, usage: &str) -> Result<pagesync::DocId, Refusal> {
    let id = path.strip_prefix("/v1/docs/").and_then(|rest| rest.strip_suffix(suffix));
    let Some(id) = id.filter(|id| !id.is_empty() && !id.contains('/')) else {
        return Err(("404 Not Found", usage.to_owned()));
    };
    id.parse().map_err(|e| ("400 Bad Request", format!("{e}\n")))
}

/// How long `GET /v1/docs/{id}/history` waits for its page (an open, a read).
pub const HISTORY_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET /v1/docs/{id}/history?since=TIME&after=CURSOR&limit=N`: a page of the document's
/// history as JSON (see `pagesync::history`). Asked of the session like a websocket client
/// asks (`Hello` with the request's token, then `ReadHistory`), so the same grant, bounds and
/// cluster placement apply: a read grant for the document (an admin one with
/// `--history-admin-only`); another server's document is a `307` there.
async fn history(stream: Reply, routes: &Routes, req: &Request) {
    let usage = "history is GET /v1/docs/{id}/history?since=TIME&after=CURSOR&limit=N\n";
    let doc = match doc_of_path(&req.path, "/history", usage) {
        Ok(d) => d,
        Err((status, why)) => return respond(stream, status, "text/plain", why).await,
    };
    let query = match history_query(&req.query) {
        Ok(q) => q,
        Err(why) => return respond(stream, "400 Bad Request", "text/plain", format!("{why}\n")).await,
    };
    let hub = &routes.hub;
    let (conn, mut out) = hub.connect(None);
    // Disconnected however this ends, also when the request is dropped (its pending slot
    // given to a newer connection).
    let _conn = Disconnect(hub.clone(), conn);
    let answer = async {
        let hello = Message::Hello {
            version: pagesync::protocol::PROTOCOL_VERSION,
            token: req.token.clone().unwrap_or_default(),
        };
        for msg in [hello, Message::ReadHistory { doc, id: 1, query }] {
            let bytes = msg.encode();
            let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            let mine = Arc::new(Semaphore::new(n as usize)).acquire_many_owned(n).await;
            let all = routes.admission.inbound.clone().acquire_many_owned(n).await;
            let (Ok(mine), Ok(all)) = (mine, all) else { return None };
            hub.frame(conn, bytes, (mine, all));
        }
        while let Some(msg) = out.recv().await {
            if let m @ (Message::History { .. } | Message::Redirect { .. } | Message::Error { .. }) = msg {
                return Some(m);
            }
        }
        None
    };
    let answer = tokio::time::timeout(HISTORY_TIMEOUT, answer).await;
    let cors = [("access-control-allow-origin", "*")];
    match answer {
        Ok(Some(Message::History { page, .. })) => {
            respond_with(stream, "200 OK", &cors, "application/json", page.to_json(doc).to_string()).await
        }
        Ok(Some(Message::Redirect { url, .. })) => redirect(stream, &url, req, doc).await,
        Ok(Some(Message::Error { code, message, .. })) => {
            let status = match code.as_str() {
                codes::UNAUTHORIZED => "401 Unauthorized",
                codes::FORBIDDEN => "403 Forbidden",
                codes::NOT_FOUND | codes::DELETED => "404 Not Found",
                codes::LIMIT => "429 Too Many Requests",
                // It may pass (`storage`: a read the server retries): ask again.
                c if codes::passes(c) => "503 Service Unavailable",
                _ => "500 Internal Server Error",
            };
            respond_with(stream, status, &cors, "text/plain", format!("{code}: {message}\n")).await
        }
        Ok(_) => {
            respond(stream, "503 Service Unavailable", "text/plain", "the server is shutting down\n").await
        }
        Err(_) => {
            let why = format!("no history within {} s\n", HISTORY_TIMEOUT.as_secs());
            respond(stream, "504 Gateway Timeout", "text/plain", why).await
        }
    }
}

/// A query value with its `%XX` escapes decoded; `None` if it is not UTF-8 or an escape is
/// broken.
fn percent_decode(v: &str) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut bytes = v.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Disconnects a hub connection when dropped.
struct Disconnect(Hub, pagesync::protocol::ConnId);

impl Drop for Disconnect {
    fn drop(&mut self) {
        self.0.disconnect(self.1);
    }
}

/// Refuses any query parameter but `token`, naming it and saying what to do instead.
fn only_token(query: &str, instead: &str) -> Result<(), String> {
    if query.split('&').filter(|kv| kv.starts_with("token=")).count() > 1 {
        return Err("token= is given twice\n".into());
    }
    let unknown = query
        .split('&')
        .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
        .find(|k| !k.is_empty() && *k != "token");
    match unknown {
        Some(k) => Err(format!("unknown parameter {:?}: this route takes only token=; {instead}\n", clip(k))),
        None => Ok(()),
    }
}

/// At most 64 characters of what a client sent, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `since=TIME&after=CURSOR&limit=N`, each optional.
fn history_query(query: &str) -> Result<pagesync::history::HistoryQuery, String> {
    let mut q = pagesync::history::HistoryQuery::default();
    let mut seen = Vec::new();
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        // Which of two would count is a guess: neither.
        if seen.contains(&k) {
            return Err(format!("{:?} is given twice", clip(k)));
        }
        seen.push(k);
        let v = percent_decode(v).ok_or_else(|| format!("{k}: not a valid percent-encoded value"))?;
        match k {
            "since" => q.since_ms = Some(pagesync::history::parse_time(&v)?),
            "after" => q.after = Some(v.parse()?),
            "limit" => q.limit = v.parse().map_err(|_| format!("limit={v:?}: expected a count"))?,
            "token" => {}
            _ => return Err(format!("unknown parameter {:?}: since, after, limit", clip(k))),
        }
    }
    Ok(q)
}

/// `DELETE /v1/docs/{id}`: deletes the document for everyone (a token with the `admin` claim
/// for it, when the server has a secret). Its tombstone first, so nobody opens or creates it
/// again; then its subscribers are told `deleted`; then its storage goes.
async fn delete(stream: Reply, routes: &Routes, req: &Request) {
    let doc = match doc_of_path(&req.path, "", "delete is DELETE /v1/docs/{id}\n") {
        Ok(d) => d,
        Err((status, why)) => return respond(stream, status, "text/plain", why).await,
    };
    if let Err(why) = only_token(&req.query, "delete takes none") {
        return respond(stream, "400 Bad Request", "text/plain", why).await;
    }
    match verify(routes, req) {
        Err((status, why)) => return respond(stream, status, "text/plain", why).await,
        Ok(Some(claims)) => {
            let allowed = crate::auth::grant_of(&claims).is_ok_and(|g| g.allows(doc)) && claims.admin;
            if !allowed {
                let why =
                    format!("deleting {doc} needs a token with the admin claim for it (token --admin)\n");
                return respond(stream, "403 Forbidden", "text/plain", why).await;
            }
        }
        Ok(None) => {}
    }
    // In a cluster the server that holds the document deletes it (and tells its clients).
    let cluster = routes.metrics.cluster.lock().expect("BUG: metrics lock poisoned").clone();
    if let Some(cluster) = cluster {
        match tokio::task::spawn_blocking(move || cluster.place(doc)).await {
            Ok(Ok(_)) | Ok(Err(pagesync::Error::Deleted)) => {}
            Ok(Err(pagesync::Error::Moved { owner })) => return redirect(stream, &owner, req, doc).await,
            Ok(Err(e)) => return store_failed(stream, "deleting", doc, Ok(e)).await,
            Err(e) => return store_failed(stream, "deleting", doc, Err(e)).await,
        }
    }
    let now_ms = crate::wall_ms();
    let store = routes.store.clone();
    match tokio::task::spawn_blocking(move || store.mark_deleted(doc, now_ms)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            return respond(stream, "404 Not Found", "text/plain", format!("no document {doc}\n")).await;
        }
        Ok(Err(e)) => return store_failed(stream, "deleting", doc, Ok(e)).await,
        Err(e) => return store_failed(stream, "deleting", doc, Err(e)).await,
    }
    // A step out on a job finishes first: nothing is written after the storage is gone.
    if !routes.hub.close_deleted(doc, Duration::from_secs(60)).await {
        let why = format!("{doc} is deleted, but its storage is still in use: ask again to remove it\n");
        return respond(stream, "503 Service Unavailable", "text/plain", why).await;
    }
    let store = routes.store.clone();
    match tokio::task::spawn_blocking(move || store.delete_storage(doc)).await {
        Ok(Ok(())) => respond(stream, "200 OK", "text/plain", format!("deleted {doc}\n")).await,
        // The tombstone is written: asking again removes what is left (503 when it may pass).
        Ok(Err(e)) => store_failed(stream, "removing the storage of deleted document", doc, Ok(e)).await,
        Err(e) => store_failed(stream, "removing the storage of deleted document", doc, Err(e)).await,
    }
}

/// Another server of the cluster holds `doc`: `307` to the same request there.
async fn redirect(stream: Reply, owner: &str, req: &Request, doc: pagesync::DocId) {
    let Some(base) = http_base(owner) else {
        let why = format!("document {doc} is served by {owner}\n");
        return respond(stream, "502 Bad Gateway", "text/plain", why).await;
    };
    let query = if req.query.is_empty() { String::new() } else { format!("?{}", req.query) };
    // Printable ASCII only: nothing in a header line can end it.
    let location: String =
        format!("{base}{}{query}", req.path).chars().filter(|c| c.is_ascii_graphic()).collect();
    let body = format!("document {doc} is served by {base}: {location}\n");
    respond_with(stream, "307 Temporary Redirect", &[("location", &location)], "text/plain", body).await
}

/// `ws://host:port/v1/sync` -> `http://host:port` (and `wss` -> `https`).
fn http_base(sync_url: &str) -> Option<String> {
    let (scheme, rest) = match sync_url.split_once("://")? {
        ("ws", rest) => ("http", rest),
        ("wss", rest) => ("https", rest),
        _ => return None,
    };
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}"))
}

/// Answers and closes. The request head has been read already.
async fn respond(stream: impl Into<Reply>, status: &str, content_type: &str, body: impl AsRef<[u8]>) {
    respond_with(stream, status, &[], content_type, body).await
}

/// `respond`, with more header lines.
async fn respond_with(
    stream: impl Into<Reply>,
    status: &str,
    headers: &[(&str, &str)],
    content_type: &str,
    body: impl AsRef<[u8]>,
) {
    let body = body.as_ref();
    send(stream, &answer_head(status, headers, content_type, body.len()), body).await
}

/// What `GET /healthz` answers.
const HEALTHY: &str = "ok\n";

/// The head of an answer whose body is `len` bytes.
fn answer_head(status: &str, headers: &[(&str, &str)], content_type: &str, len: usize) -> String {
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    format!(
        "HTTP/1.1 {status}\r\n{extra}content-type: {content_type}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    )
}

/// Where an answer goes: the connection, and whether the request was a `HEAD`, which gets the
/// head a `GET` would have, with its length, and no body (RFC 9110, 9.3.2).
struct Reply {
    stream: TcpStream,
    head_only: bool,
}

impl From<TcpStream> for Reply {
    fn from(stream: TcpStream) -> Reply {
        Reply { stream, head_only: false }
    }
}

/// Writes an answer and closes, within a deadline.
async fn send(reply: impl Into<Reply>, head: &str, body: &[u8]) {
    let Reply { mut stream, head_only } = reply.into();
    let body = if head_only { &[][..] } else { body };
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(answer_deadline(body.len() as u64), write).await;
}

/// How long an answer of `len` bytes may take to write: a peer that does not read it does not
/// hold the connection. The body's size at a slow 64 KiB/s, plus the head deadline.
fn answer_deadline(len: u64) -> Duration {
    HEAD_TIMEOUT + Duration::from_secs(len >> 16)
}

/// The websocket's configuration: incoming messages up to `max_frame_bytes` (what the server
/// sends is not limited by it), small buffers so an idle connection costs little (they grow
/// while a large frame passes).
pub fn websocket_config(max_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 << 10)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes))
}

fn millis_since(start: tokio::time::Instant) -> i64 {
    start.elapsed().as_millis() as i64
}

/// The websocket handshake, then the first message, which must be `Hello`, each in time.
async fn handshake(stream: Prefixed, routes: &Routes) -> Option<(Socket, Vec<u8>)> {
    let config = websocket_config(routes.max_frame_bytes);
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_async_with_config(stream, Some(config)),
    );
    let mut ws = match accepted.await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!("websocket handshake failed: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!("websocket handshake timed out");
            return None;
        }
    };
    match tokio::time::timeout(HELLO_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(WsMessage::Binary(b)))) if matches!(Message::decode(&b), Ok(Message::Hello { .. })) => {
            // In: its messages may be as large as a frame may.
            ws.get_mut().guard.max_message = routes.max_frame_bytes as u64;
            Some((ws, b.to_vec()))
        }
        Ok(Some(Ok(WsMessage::Close(_)) | Err(_)) | None) => None,
        // A message that does not decode is said as that, not as one that is not a Hello.
        Ok(Some(Ok(WsMessage::Binary(b)))) => {
            let (code, why) = match Message::decode(&b) {
                Err(e) => (
                    codes::MALFORMED,
                    format!("the first message must be Hello, and this one does not decode: {e}"),
                ),
                Ok(_) => (codes::NOT_HELLO, "the first message must be Hello".to_owned()),
            };
            refuse(ws, code, &why).await;
            None
        }
        Ok(Some(Ok(_))) => {
            refuse(ws, codes::NOT_HELLO, "the first message must be Hello").await;
            None
        }
        Err(_) => {
            let why = format!("no Hello within {} s", HELLO_TIMEOUT.as_secs());
            refuse(ws, codes::NOT_HELLO, &why).await;
            None
        }
    }
}

/// A websocket that said `Hello`: it takes a `--max-connections` slot, or is refused.
async fn serve_websocket(ws: Socket, hello: Vec<u8>, routes: Routes) {
    let Routes { hub, metrics, max_frame_bytes, admission, .. } = routes;
    let Ok(slot) = admission.connections.clone().try_acquire_owned() else {
        metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("refusing a websocket: every --max-connections slot is taken");
        let why = "the server is at its connection limit (--max-connections); retry later";
        return refuse(ws, codes::LIMIT, why).await;
    };
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    let took_bytes_at = ws.get_ref().took_bytes_at.clone();
    let (conn, outgoing) = hub.connect(Some(took_bytes_at.clone()));
    let (sink, mut incoming) = ws.split();
    let started = tokio::time::Instant::now();
    let last_seen = Arc::new(AtomicI64::new(0));
    let seen = Seen { last_seen: last_seen.clone(), took_bytes_at, started };
    let mut writer = tokio::spawn(write_loop(sink, outgoing, metrics.clone(), seen));
    let per_conn = Arc::new(Semaphore::new(inbound_bytes_per_connection(max_frame_bytes)));
    let mut frame = Some(hello);
    loop {
        let next = match frame.take() {
            Some(b) => Some(Ok(WsMessage::Binary(b.into()))),
            // The writer ends when the server closes the connection or the peer is dead or
            // does not read: then the reading stops too, and the socket is dropped.
            None => tokio::select! {
                _ = &mut writer => break,
                next = incoming.next() => next,
            },
        };
        let bytes = match next {
            Some(Ok(WsMessage::Binary(b))) => b.to_vec(),
            Some(Ok(WsMessage::Text(t))) => t.as_bytes().to_vec(), // not a frame: the session says so
            Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {
                // A ping or a pong (`Prefixed` bounds how many).
                last_seen.store(millis_since(started), Ordering::Relaxed);
                continue;
            }
        };
        last_seen.store(millis_since(started), Ordering::Relaxed);
        metrics.frames_in.fetch_add(1, Ordering::Relaxed);
        metrics.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        // Backpressure: the next frame is read only when this one fits what may wait.
        let n = u32::try_from(bytes.len().max(1)).unwrap_or(u32::MAX);
        let (Ok(mine), Ok(all)) = (
            per_conn.clone().acquire_many_owned(n).await,
            admission.inbound.clone().acquire_many_owned(n).await,
        ) else {
            break;
        };
        hub.frame(conn, bytes, (mine, all));
    }
    hub.disconnect(conn);
    writer.abort();
    drop(slot);
    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
}

/// Sends an `Error` frame and closes: for a connection that never got in.
async fn refuse(mut ws: Socket, code: &str, why: &str) {
    let msg = Message::Error { doc: None, code: code.into(), message: why.into() };
    let send = async {
        ws.send(WsMessage::Binary(msg.encode().into())).await?;
        ws.close(None).await
    };
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, send).await;
}

/// Writes what the hub queued, pings every `PING_INTERVAL`, and closes a peer that has been
/// silent for `DEAD_PEER_TIMEOUT`. Every write has `SEND_TIMEOUT`, and `CLOSE_GRACE` once the
/// hub is done with the connection.
async fn write_loop(
    mut sink: futures_util::stream::SplitSink<Socket, WsMessage>,
    mut outgoing: crate::hub::ConnReceiver,
    metrics: Arc<Metrics>,
    seen: Seen,
) {
    let Seen { last_seen, took_bytes_at, started } = seen;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dead_at = |seen_ms: i64| started + Duration::from_millis(seen_ms.max(0) as u64) + DEAD_PEER_TIMEOUT;
    let dead = tokio::time::sleep_until(dead_at(0));
    tokio::pin!(dead);
    loop {
        let message = tokio::select! {
            message = outgoing.recv() => {
                let Some(message) = message else { break };
                let frame = message.encode();
                metrics.frames_out.fetch_add(1, Ordering::Relaxed);
                metrics.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
                WsMessage::Binary(frame.into())
            }
            _ = ping.tick() => WsMessage::Ping(Vec::new().into()),
            _ = &mut dead => {
                let at = dead_at(last_seen.load(Ordering::Relaxed));
                if at <= tokio::time::Instant::now() {
                    tracing::debug!("closing a websocket silent for {DEAD_PEER_TIMEOUT:?}");
                    break;
                }
                dead.as_mut().reset(at);
                continue;
            }
        };
        let len = if let WsMessage::Binary(b) = &message { b.len() } else { 0 };
        // A peer that does not take one message within the deadline is not reading. Once the
        // hub is done with the connection, what it still has to say (a last error) gets
        // `CLOSE_GRACE`, not the whole deadline: a closed peer's message is not kept.
        // A peer whose socket has taken nothing for `PRESSURE_IDLE_MS` takes no last words
        // either: what is held for it is let go within `CLOSE_POLL`.
        let abandoned = async {
            outgoing.closed().await;
            let until = tokio::time::Instant::now() + CLOSE_GRACE;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(CLOSE_POLL).await;
                if crate::mono_ms() - took_bytes_at.load(Ordering::Relaxed) >= PRESSURE_IDLE_MS {
                    break;
                }
            }
        };
        let sent = tokio::select! {
            biased;
            sent = tokio::time::timeout(SEND_TIMEOUT, sink.send(message)) => matches!(sent, Ok(Ok(()))),
            _ = abandoned => false,
        };
        if len > 0 {
            outgoing.written(len);
        }
        if !sent {
            return;
        }
    }
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, sink.close()).await; // the server closed it
}

/// A TCP stream whose first bytes (the request head, already read) are served again: the
/// websocket handshake reads the head it needs from here. Every byte read passes its
/// `FrameGuard`; when the socket last took bytes to send is noted (`crate::mono_ms`) for the
/// session (`ServerSession::set_send_progress`).
pub(crate) struct Prefixed {
    head: Vec<u8>,
    at: usize,
    inner: TcpStream,
    guard: FrameGuard,
    took_bytes_at: Arc<AtomicI64>,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new(); // give the memory back
                self.at = 0;
            }
        } else {
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        }
        Poll::Ready(self.guard.scan(&buf.filled()[before..]))
    }
}

/// Reads the websocket frames' headers as their bytes arrive (the websocket itself does not
/// say how many frames made a message) and ends the stream when the peer sends more small
/// frames without a message of their own than `MAX_CONTROL_FRAMES_PER_INTERVAL` allows.
pub(crate) struct FrameGuard {
    /// Bytes still to pass before the first frame: the HTTP request head.
    skip: u64,
    /// Bytes of the current frame's payload still to pass.
    payload: u64,
    header: [u8; 14],
    have: usize,
    /// The bucket of small frames: how many it holds, as of when.
    tokens: f64,
    as_of: std::time::Instant,
    metrics: Arc<Metrics>,
    /// The largest message: `MAX_HELLO_BYTES` until `Hello`, a frame's bound after.
    max_message: u64,
    /// The message arriving: its data frames' lengths so far, when its first frame came,
    /// whether the frame passing is one of its data frames and whether that one ends it.
    message: u64,
    message_since: Option<std::time::Instant>,
    data: bool,
    ends: bool,
    /// Its bytes read so far, held in `Admission::arriving` until its last frame has passed.
    arriving: Arc<Semaphore>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl FrameGuard {
    fn after(head: usize, metrics: Arc<Metrics>, arriving: Arc<Semaphore>) -> FrameGuard {
        let tokens = f64::from(MAX_CONTROL_FRAMES_PER_INTERVAL);
        let as_of = std::time::Instant::now();
        FrameGuard {
            skip: head as u64,
            payload: 0,
            header: [0; 14],
            have: 0,
            tokens,
            as_of,
            metrics,
            max_message: MAX_HELLO_BYTES,
            message: 0,
            message_since: None,
            data: false,
            ends: false,
            arriving,
            held: None,
        }
    }

    fn scan(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while let Some(&byte) = bytes.first() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len() as u64);
                self.skip -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            if self.payload > 0 {
                let n = self.payload.min(bytes.len() as u64);
                self.payload -= n;
                bytes = &bytes[n as usize..];
                if self.data {
                    self.hold(n)?;
                    self.in_time()?;
                }
                if self.payload == 0 {
                    self.frame_passed();
                }
                continue;
            }
            self.header[self.have] = byte;
            self.have += 1;
            bytes = &bytes[1..];
            let [first, second, ..] = self.header;
            let lengths = match second & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let masks = if second & 0x80 != 0 { 4 } else { 0 };
            if self.have < 2 || self.have < 2 + lengths + masks {
                continue;
            }
            let length = match lengths {
                0 => u64::from(second & 0x7f),
                n => self.header[2..2 + n].iter().fold(0, |acc, &b| acc << 8 | u64::from(b)),
            };
            (self.have, self.payload) = (0, length);
            let (ends_message, opcode) = (first & 0x80 != 0, first & 0x0f);
            let control = opcode >= 8;
            let small_fragment = !control && !ends_message && length < MIN_FREE_FRAGMENT_BYTES;
            if control || small_fragment {
                self.spend()?;
            }
            self.in_time()?;
            (self.data, self.ends) = (!control, ends_message);
            if self.data {
                self.message = self.message.saturating_add(length);
                self.message_since.get_or_insert_with(std::time::Instant::now);
                if self.message > self.max_message {
                    let why = format!("a message of over {} bytes, past this one's bound", self.max_message);
                    return Err(self.refuse(why));
                }
            }
            if length == 0 {
                self.frame_passed();
            }
        }
        Ok(())
    }

    /// Fails once the message arriving has taken longer than `MESSAGE_TIMEOUT` (looked at as
    /// its bytes or the frames between them come: a peer silent for long is closed as dead).
    fn in_time(&self) -> std::io::Result<()> {
        match self.message_since {
            Some(since) if since.elapsed() > MESSAGE_TIMEOUT => {
                let why = format!("a message took longer than {} s to arrive", MESSAGE_TIMEOUT.as_secs());
                Err(self.refuse(why))
            }
            _ => Ok(()),
        }
    }

    /// Holds `n` more bytes of the message arriving, or fails when every connection's together
    /// are at their bound.
    fn hold(&mut self, n: u64) -> std::io::Result<()> {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let Ok(more) = self.arriving.clone().try_acquire_many_owned(n) else {
            let why = "the server holds as many bytes of unfinished messages as it may".to_owned();
            return Err(self.refuse(why));
        };
        match &mut self.held {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
        Ok(())
    }

    /// A frame's payload has passed: if it ended its message, the message's bytes are let go
    /// (the websocket hands the message on, where `inbound` counts it).
    fn frame_passed(&mut self) {
        if self.data && self.ends {
            (self.message, self.message_since, self.held) = (0, None, None);
        }
    }

    fn refuse(&self, why: String) -> std::io::Error {
        tracing::debug!("closing a websocket: {why}");
        std::io::Error::other(why)
    }

    /// Takes one small frame from the bucket, or fails when it is empty.
    fn spend(&mut self) -> std::io::Result<()> {
        let most = f64::from(MAX_CONTROL_FRAMES_PER_INTERVAL);
        let now = std::time::Instant::now();
        let refill = most * now.duration_since(self.as_of).as_secs_f64() / PING_INTERVAL.as_secs_f64();
        (self.tokens, self.as_of) = ((self.tokens + refill).min(most), now);
        if self.tokens < 1.0 {
            tracing::debug!("closing a websocket that sent more than {most} pings, pongs or small fragments");
            self.metrics.control_floods.fetch_add(1, Ordering::Relaxed);
            return Err(std::io::Error::other("too many small websocket frames"));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let wrote = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        if matches!(wrote, Ok(n) if n > 0) {
            self.took_bytes_at.store(crate::mono_ms(), Ordering::Relaxed);
        }
        Poll::Ready(wrote)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

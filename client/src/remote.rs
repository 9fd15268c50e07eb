//! Queries before a download ends (see `pagesync::remote`): the pages a query needs are
//! fetched over a connection of their own.
//!
//! The fetch runs on the thread that runs the query, blocking, over a plain websocket that
//! is not the driver's: the driver's task may be waiting for the session lock the query
//! holds, and a runtime with one thread may be the one blocked. So a fetch depends on nothing
//! but the server.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use pagesync::journal::Lsn;
use pagesync::protocol::{MAX_FRAME_BYTES, Message, PROTOCOL_VERSION, PageMap};
use pagesync::{DocId, remote::PageSource};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::stream::MaybeTlsStream;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, WebSocket};

/// How long a fetch waits for the server: connecting, or for an answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// After a failed fetch, queries stay on the local replica this long before trying the server
/// again, so an offline client is not slowed by a connection attempt per query.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A blocking socket whose reads and writes end by `deadline` (the handshakes') while it is set,
/// and within `FETCH_TIMEOUT` each after.
pub(crate) struct Bounded {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Bounded {
    /// How long the next read or write may wait, while the deadline is set.
    fn left(&self) -> std::io::Result<Option<Duration>> {
        let Some(deadline) = self.deadline else { return Ok(None) };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the handshakes took too long"));
        }
        Ok(Some(left))
    }

    /// Past the handshakes: each read and write waits at most `FETCH_TIMEOUT`.
    fn settle(&mut self) -> std::io::Result<()> {
        self.deadline = None;
        self.tcp.set_read_timeout(Some(FETCH_TIMEOUT))?;
        self.tcp.set_write_timeout(Some(FETCH_TIMEOUT))
    }
}

impl std::io::Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(left) = self.left()? {
            self.tcp.set_read_timeout(Some(left))?;
        }
        self.tcp.read(buf)
    }
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(left) = self.left()? {
            self.tcp.set_write_timeout(Some(left))?;
        }
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// One blocking connection for page requests, opened on first use and again after a failure.
pub(crate) struct Fetcher {
    url: String,
    token: String,
    ws: Option<WebSocket<MaybeTlsStream<Bounded>>>,
    next_id: u64,
    /// The error the server answered the last request with, and its document, unless it was
    /// about the request's size or range (`limit`, `out_of_range`): see `Fetcher::refusal`.
    refused: Option<(DocId, String, String)>,
    /// Where the server said the last request's document is served, if it redirected it.
    redirect: Option<(DocId, String)>,
}

impl Fetcher {
    pub(crate) fn new(url: &str, token: &str) -> Fetcher {
        Fetcher {
            url: url.to_owned(),
            token: token.to_owned(),
            ws: None,
            next_id: 0,
            refused: None,
            redirect: None,
        }
    }

    /// Asks with `token` from now on, on a new connection.
    pub(crate) fn set_token(&mut self, token: &str) {
        self.token = token.to_owned();
        self.ws = None;
    }

    /// Where the last request's answer said `doc` is served, if it redirected it (taken).
    pub(crate) fn take_redirect(&mut self, doc: DocId) -> Option<String> {
        self.redirect.take().filter(|(of, _)| *of == doc).map(|(_, url)| url)
    }

    /// Why the server refused `doc` to the last request, if it did: `(code, message)`
    /// (`unauthorized`, `forbidden`, `not_found`, `deleted`, or one that may pass, such as
    /// `unavailable` or `storage`).
    pub(crate) fn refusal(&self, doc: DocId) -> Option<(String, String)> {
        let (of, code, message) = self.refused.clone()?;
        (of == doc).then_some((code, message))
    }

    /// Asks the server at `url` from now on (a document's route): a new connection if it is
    /// not the one open.
    pub(crate) fn use_url(&mut self, url: &str) {
        if self.url != url {
            self.url = url.to_owned();
            self.ws = None;
        }
    }

    fn connect(&mut self) -> Result<&mut WebSocket<MaybeTlsStream<Bounded>>, String> {
        if self.ws.is_none() {
            let (host, port) = crate::tls::host_port(&self.url)?;
            let addrs =
                (host.as_str(), port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?;
            let mut why = format!("{host} has no address");
            let mut tcp = None;
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, FETCH_TIMEOUT) {
                    Ok(stream) => {
                        tcp = Some(stream);
                        break;
                    }
                    Err(e) => why = format!("cannot connect to {} ({addr}): {e}", self.url),
                }
            }
            let tcp = tcp.ok_or(why)?;
            let _ = tcp.set_nodelay(true);
            // The TLS and websocket handshakes end by one deadline, however the peer dribbles.
            let stream = Bounded { tcp, deadline: Some(Instant::now() + FETCH_TIMEOUT) };
            let config = WebSocketConfig::default()
                .max_message_size(Some(MAX_FRAME_BYTES))
                .max_frame_size(Some(MAX_FRAME_BYTES));
            let tls = crate::tls::config_for(&self.url)?.map(tungstenite::Connector::Rustls);
            let (mut ws, _) =
                tungstenite::client_tls_with_config(self.url.as_str(), stream, Some(config), tls)
                    .map_err(|e| format!("websocket handshake with {} failed: {e}", self.url))?;
            let settled = match ws.get_mut() {
                MaybeTlsStream::Plain(s) => s.settle(),
                MaybeTlsStream::Rustls(s) => s.sock.settle(),
                _ => return Err("BUG: a stream of another kind".into()),
            };
            settled.map_err(|e| e.to_string())?;
            let hello = Message::Hello { version: PROTOCOL_VERSION, token: self.token.clone() };
            ws.send(WsMessage::Binary(hello.encode().into())).map_err(|e| e.to_string())?;
            self.ws = Some(ws);
        }
        Ok(self.ws.as_mut().expect("BUG: connected above"))
    }

    /// Sends `ask` (a `MapPages`, `ReadPages` or `ReadHistory` with a fresh id) and waits for its answer; an
    /// error for the document, or for the connection, is the answer too. Any failure closes
    /// the connection: the next request opens a new one.
    fn ask(&mut self, doc: DocId, make: impl Fn(u64) -> Message) -> Result<Message, String> {
        // A connection idle for long may have been closed by the server (a silent peer is
        // closed after 45 s): a failure on one that was already open is tried once more on a
        // new one.
        let mut retry = self.ws.is_some();
        self.refused = None;
        loop {
            self.next_id += 1;
            let id = self.next_id;
            match self.exchange(doc, make(id), id) {
                Ok(answer) => return answer,
                Err(why) => {
                    self.ws = None;
                    if !retry {
                        return Err(why);
                    }
                    retry = false;
                }
            }
        }
    }

    /// The server's answer (`Err` inside: its error for the request), or why the connection
    /// failed (`Err` outside).
    fn exchange(&mut self, doc: DocId, ask: Message, id: u64) -> Result<Result<Message, String>, String> {
        let ws = self.connect()?;
        ws.send(WsMessage::Binary(ask.encode().into()))
            .map_err(|e| format!("sending a page request: {e}"))?;
        let deadline = Instant::now() + FETCH_TIMEOUT;
        while Instant::now() < deadline {
            let frame = match ws.read().map_err(|e| format!("waiting for pages: {e}"))? {
                WsMessage::Binary(b) => b,
                WsMessage::Close(_) => return Err("the server closed the page connection".into()),
                _ => continue,
            };
            match Message::decode(&frame).map_err(|e| e.to_string())? {
                Message::PageMap { doc: d, id: i, .. }
                | Message::Pages { doc: d, id: i, .. }
                | Message::History { doc: d, id: i, .. }
                    if d != doc || i != id =>
                {
                    continue; // the answer to an earlier request that timed out
                }
                m @ (Message::PageMap { .. } | Message::Pages { .. } | Message::History { .. }) => {
                    return Ok(Ok(m));
                }
                Message::Error { doc: None, code, message } => {
                    let why = format!("{code}: {message}");
                    self.note_refusal(doc, code, message);
                    return Err(why);
                }
                Message::Error { doc: Some(d), code, message } if d == doc => {
                    let why = format!("{code}: {message}");
                    self.note_refusal(doc, code, message);
                    return Ok(Err(why));
                }
                // Its server is another: the driver's connection learns it too, and the next
                // query asks there.
                Message::Redirect { doc: d, url } if d == doc => {
                    let why = format!("document {doc} is served by {url}");
                    self.redirect = Some((doc, url));
                    return Ok(Err(why));
                }
                _ => continue,
            }
        }
        Err(format!("no answer from the server within {FETCH_TIMEOUT:?}"))
    }

    fn note_refusal(&mut self, doc: DocId, code: String, message: String) {
        use pagesync::protocol::codes;
        if code != codes::LIMIT && code != codes::OUT_OF_RANGE {
            self.refused = Some((doc, code, message));
        }
    }

    /// A page of `doc`'s history, as the server lists it.
    pub(crate) fn history(
        &mut self,
        doc: DocId,
        query: pagesync::history::HistoryQuery,
    ) -> Result<pagesync::history::HistoryPage, String> {
        match self.ask(doc, |id| Message::ReadHistory { doc, id, query })? {
            Message::History { page, .. } => Ok(page),
            other => Err(format!("expected a history page, got {other:?}")),
        }
    }

    /// Where each page of `doc`'s committed state lives, as the server says now.
    pub(crate) fn map(&mut self, doc: DocId) -> Result<PageMap, String> {
        match self.ask(doc, |id| Message::MapPages { doc, id })? {
            Message::PageMap { map, .. } => Ok(map),
            other => Err(format!("expected a page map, got {other:?}")),
        }
    }
}

/// A snapshot's page source: `ReadPages` over a client's fetcher.
pub(crate) struct Source {
    pub(crate) fetcher: std::sync::Arc<std::sync::Mutex<Fetcher>>,
    pub(crate) doc: DocId,
    /// The server the map came from.
    pub(crate) url: String,
}

impl PageSource for Source {
    fn read(&mut self, lsn: Lsn, offset: u32, buf: &mut [u8]) -> Result<(), String> {
        let pages = u32::try_from(buf.len() / pagesync::page::PAGE_SIZE).map_err(|e| e.to_string())?;
        let doc = self.doc;
        let mut fetcher = self.fetcher.lock().expect("BUG: lock poisoned");
        fetcher.use_url(&self.url);
        match fetcher.ask(doc, |id| Message::ReadPages { doc, id, lsn, offset, pages })? {
            // Exactly the bytes asked for, or nothing.
            Message::Pages { lsn: l, offset: o, data, .. }
                if l == lsn && o == offset && data.len() == buf.len() =>
            {
                buf.copy_from_slice(&data);
                Ok(())
            }
            Message::Pages { lsn: l, offset: o, data, .. } => Err(format!(
                "asked for {} bytes of entry {lsn} at {offset}, the server sent {} of entry {l} at {o}",
                buf.len(),
                data.len()
            )),
            other => Err(format!("expected pages, got {other:?}")),
        }
    }
}

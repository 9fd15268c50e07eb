//! One TCP connection: HTTP (`/healthz`, `/metrics`) or a websocket at `/v1/sync`, on the same
//! port. The request line is peeked, not consumed, so the websocket handshake sees it whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{Hub, Metrics};

/// Largest HTTP request head read for the plain routes; anything longer is refused.
const MAX_REQUEST_HEAD_BYTES: usize = 16 << 10;

/// How long a new connection may take to send its request line.
const REQUEST_LINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a connection may be routed to.
pub struct Routes {
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    pub store: crate::Store,
    pub max_frame_bytes: usize,
    pub web_root: Option<PathBuf>,
}

pub async fn serve_connection(stream: TcpStream, routes: Routes) {
    let Routes { hub, metrics, store, max_frame_bytes, web_root } = routes;
    let Some(line) = peek_request_line(&stream).await else { return };
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    match path.as_str() {
        "/v1/sync" => serve_websocket(stream, hub, metrics, max_frame_bytes).await,
        "/healthz" => respond(stream, "200 OK", "text/plain", "ok\n").await,
        "/metrics" => respond(stream, "200 OK", "text/plain; version=0.0.4", metrics.render()).await,
        p if p.starts_with("/v1/docs/") && p.ends_with("/export") => export(stream, hub, store, p).await,
        p => match web_root {
            Some(root) => static_file(stream, &root, p).await,
            None => {
                let routes = "routes: /v1/sync (websocket), /healthz, /metrics, /v1/docs/{id}/export\n";
                respond(stream, "404 Not Found", "text/plain", routes).await
            }
        },
    }
}

/// Serves a file below `root` (`/` is `index.html`). Paths with `..` or hidden components are
/// refused, so nothing outside `root` is reachable.
async fn static_file(stream: TcpStream, root: &Path, path: &str) {
    let path = path.split(['?', '#']).next().unwrap_or("/");
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
    match tokio::fs::read(&file).await {
        Ok(body) => respond(stream, "200 OK", content_type, body).await,
        Err(_) => respond(stream, "404 Not Found", "text/plain", format!("no file {path}\n")).await,
    }
}

/// Peeks (does not consume) until the request line is complete: a client may send it in
/// several segments. `None` when the peer closes, errs, or takes longer than
/// `REQUEST_LINE_TIMEOUT` for its first line.
async fn peek_request_line(stream: &TcpStream) -> Option<String> {
    let mut head = [0u8; 512];
    let deadline = tokio::time::Instant::now() + REQUEST_LINE_TIMEOUT;
    loop {
        let n = stream.peek(&mut head).await.ok().filter(|n| *n > 0)?;
        if head[..n].windows(2).any(|w| w == b"\r\n") || n == head.len() {
            return Some(String::from_utf8_lossy(&head[..n]).into_owned());
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

async fn export(stream: TcpStream, hub: Hub, store: crate::Store, path: &str) {
    let id = &path["/v1/docs/".len()..path.len() - "/export".len()];
    let doc: pagesync::DocId = match id.parse() {
        Ok(d) => d,
        Err(e) => return respond(stream, "400 Bad Request", "text/plain", format!("{e}\n")).await,
    };
    // Blocking (S3 requests wait on the runtime): off the async workers.
    match tokio::task::spawn_blocking(move || store.exists(doc)).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            return respond(stream, "404 Not Found", "text/plain", format!("no document {doc}\n")).await;
        }
        Ok(Err(e)) => {
            return respond(stream, "503 Service Unavailable", "text/plain", format!("{e}\n")).await;
        }
        Err(e) => return respond(stream, "500 Internal Server Error", "text/plain", format!("{e}\n")).await,
    }
    match hub.export(doc).await {
        Ok(bytes) => respond(stream, "200 OK", "application/vnd.sqlite3", bytes).await,
        Err(e) => respond(stream, "500 Internal Server Error", "text/plain", format!("{e}\n")).await,
    }
}

async fn respond(mut stream: TcpStream, status: &str, content_type: &str, body: impl AsRef<[u8]>) {
    let body = body.as_ref();
    // Read the request head before answering, so the client is not reset mid-send.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_HEAD_BYTES {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

async fn serve_websocket(stream: TcpStream, hub: Hub, metrics: Arc<Metrics>, max_frame_bytes: usize) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_frame_bytes))
        .max_frame_size(Some(max_frame_bytes));
    let ws = match tokio_tungstenite::accept_async_with_config(stream, Some(config)).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!("websocket handshake failed: {e}");
            return;
        }
    };
    metrics.connections_total.fetch_add(1, Ordering::Relaxed);
    metrics.connections_open.fetch_add(1, Ordering::Relaxed);
    let (conn, mut outgoing) = hub.connect();
    let (mut sink, mut incoming) = ws.split();
    let writer_metrics = metrics.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            writer_metrics.frames_out.fetch_add(1, Ordering::Relaxed);
            writer_metrics.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
            if sink.send(WsMessage::Binary(frame.into())).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await; // the server closed this connection
    });
    while let Some(msg) = incoming.next().await {
        let bytes = match msg {
            Ok(WsMessage::Binary(b)) => b.to_vec(),
            Ok(WsMessage::Text(t)) => t.as_bytes().to_vec(), // not a frame: the session says so
            Ok(WsMessage::Close(_)) | Err(_) => break,
            Ok(_) => continue, // ping / pong
        };
        metrics.frames_in.fetch_add(1, Ordering::Relaxed);
        metrics.bytes_in.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        hub.frame(conn, bytes);
    }
    hub.disconnect(conn);
    writer.abort();
    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
}

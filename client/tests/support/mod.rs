//! What the client's tests against a real server share.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::runtime::Runtime;
use tokio::sync::oneshot::Sender;
use tokio::task::JoinHandle;

use pagesync_server::{Metrics, ServerConfig, Store, serve};

/// A real server with file journals under `dir`: its runtime, address, stop signal and task.
pub fn start_server(
    dir: &std::path::Path,
) -> (Runtime, SocketAddr, Sender<()>, JoinHandle<anyhow::Result<()>>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = ServerConfig::new(addr, Store::Files(dir.join("server")));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(serve(listener, cfg, Arc::new(Metrics::default()), async move {
        let _ = stopped.await;
    }));
    (rt, addr, stop, server)
}

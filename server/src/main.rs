//! `pagesync-server`: serve documents over websockets, journals on local disk.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use pagesync_server::{DEFAULT_MAX_CONNECTIONS, Metrics, ServerConfig, parse_journal_url, serve};

#[derive(Parser, Debug)]
#[command(name = "pagesync-server", about = "Serve pagesync documents over websockets (ws://HOST/v1/sync)")]
struct Args {
    /// Address to listen on. Only loopback addresses are allowed until token auth lands.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Where documents are kept: file://DIR.
    #[arg(long, default_value = "file://./pagesync-data")]
    journal: String,
    /// Connections served at once; more are refused.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {}: token auth is not built yet, so pagesync-server only serves loopback addresses",
            args.listen
        );
    }
    let root = parse_journal_url(&args.journal)?;
    let cfg = ServerConfig { listen: args.listen, root: root.clone(), max_connections: args.max_connections };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(
        "pagesync-server listening on ws://{}/v1/sync, documents in {} (no auth: loopback only)",
        listener.local_addr()?,
        root.display()
    );
    let shutdown = async {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("BUG: cannot install the SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down: applying what is queued");
    };
    serve(listener, cfg, Arc::new(Metrics::default()), shutdown).await
}

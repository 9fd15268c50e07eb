//! `pagesync-server`: serve documents over websockets, journals on local disk.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pagesync_server::{DEFAULT_MAX_CONNECTIONS, Metrics, ServerConfig, auth, parse_journal_url, serve};

#[derive(Parser, Debug)]
#[command(name = "pagesync-server", about = "Serve pagesync documents over websockets (ws://HOST/v1/sync)")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Address to listen on. Without --auth-secret-file only loopback addresses are allowed.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Where documents are kept: file://DIR.
    #[arg(long, default_value = "file://./pagesync-data")]
    journal: String,
    /// Connections served at once; more are refused.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// File holding the HS256 secret (at least 32 bytes). Every client then needs a token.
    #[arg(long, global = true)]
    auth_secret_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print a token for clients: `token --doc ID|PREFIX* [--write] --ttl 1h`.
    Token {
        /// A document id, or a hex prefix followed by `*` (`*` alone: every document).
        #[arg(long)]
        doc: String,
        /// Allow writes (default: read-only).
        #[arg(long)]
        write: bool,
        /// Lifetime: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let secret = args.auth_secret_file.as_deref().map(auth::load_secret).transpose()?;
    if let Some(Cmd::Token { doc, write, ttl }) = &args.command {
        let secret =
            secret.ok_or_else(|| anyhow::anyhow!("token needs --auth-secret-file (the server's secret)"))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let claims = auth::Claims { doc: doc.clone(), write: *write, exp: now + auth::parse_ttl(ttl)? };
        println!("{}", auth::mint(&secret, &claims));
        return Ok(());
    }
    if secret.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without auth: pass --auth-secret-file, or listen on a loopback address",
            args.listen
        );
    }
    let root = parse_journal_url(&args.journal)?;
    let auth_note = if secret.is_some() { "tokens required" } else { "no auth: loopback only" };
    let cfg = ServerConfig {
        listen: args.listen,
        root: root.clone(),
        max_connections: args.max_connections,
        auth_secret: secret,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(
        "pagesync-server listening on ws://{}/v1/sync, documents in {} ({auth_note})",
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

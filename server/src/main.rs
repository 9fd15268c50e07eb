//! `pagesync-server`: serve documents over websockets, journals on local disk or S3.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pagesync_server::{
    DEFAULT_IDLE_CLOSE_MS, DEFAULT_MAX_CONNECTIONS, Limits, Metrics, ServerConfig, Store, auth, serve,
};

#[derive(Parser, Debug)]
#[command(name = "pagesync-server", about = "Serve pagesync documents over websockets (ws://HOST/v1/sync)")]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Address to listen on. Without --auth-secret-file only loopback addresses are allowed.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Where documents are kept: file://DIR, s3://BUCKET/PREFIX (endpoint, region and
    /// credentials from the AWS_* environment), or object+file:///DIR.
    #[arg(long, global = true, default_value = "file://./pagesync-data")]
    journal: String,
    /// Connections served at once; more are refused.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Largest websocket message accepted; a larger one closes its connection with an error.
    #[arg(long, default_value_t = pagesync::protocol::MAX_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Largest mutation accepted; a larger one is rejected (at most 1 MiB).
    #[arg(long, default_value_t = pagesync::mutation::MAX_MUTATION_BYTES, value_parser = mutation_limit)]
    max_mutation_bytes: usize,
    /// Largest database a document may grow to, in bytes; a mutation that would grow it
    /// further is rejected with `doc_full` (the document stays usable). Default: no limit.
    #[arg(long)]
    max_doc_bytes: Option<u64>,
    /// Group commit: a document steps this long after its first queued mutation arrived.
    /// Default: 0 for file://, 100 for s3:// (fewer, larger puts).
    #[arg(long)]
    commit_interval_ms: Option<i64>,
    /// Seconds before a document nobody subscribes to is closed.
    #[arg(long, default_value_t = DEFAULT_IDLE_CLOSE_MS / 1000)]
    idle_close_secs: i64,
    /// Serve this directory as static files on the paths the server does not own (the browser
    /// demo: `--web target/web` after `scripts/build-web`).
    #[arg(long)]
    web: Option<std::path::PathBuf>,
    /// File holding the HS256 secret (at least 32 bytes). Every client then needs a token.
    #[arg(long, global = true)]
    auth_secret_file: Option<std::path::PathBuf>,
}

fn mutation_limit(s: &str) -> Result<usize, String> {
    let max = pagesync::mutation::MAX_MUTATION_BYTES;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a byte count from 1 to {max}")),
    }
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
    /// Check every document (or one) in --journal: every checksum, a replay of every entry,
    /// and SQLite's integrity_check. Changes nothing; exits non-zero on any fault.
    Verify {
        /// Only this document.
        #[arg(long)]
        doc: Option<String>,
    },
}

/// `verify`: one line per document, then a summary. Returns the number of faults.
fn verify(journal: &str, doc: Option<&str>, rt: tokio::runtime::Handle) -> anyhow::Result<usize> {
    let store = Store::parse(journal, rt)?;
    let docs = match doc {
        Some(d) => vec![d.parse().map_err(|e| anyhow::anyhow!("--doc {d:?}: {e}"))?],
        None => pagesync_server::ops::list_documents(&store)?,
    };
    let mut faults = 0;
    for doc in &docs {
        match pagesync_server::ops::verify_document(&store, *doc) {
            Ok(v) => println!(
                "ok     {doc}  entries {} ({}), {} pages, integrity ok",
                v.range,
                v.range.len(),
                v.pages
            ),
            Err(why) => {
                faults += 1;
                println!("FAULT  {doc}  {why}");
            }
        }
    }
    println!(
        "verified {} documents in {}: {} ok, {faults} faulty",
        docs.len(),
        store.describe(),
        docs.len() - faults
    );
    Ok(faults)
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
    if let Some(Cmd::Verify { doc }) = &args.command {
        let journal = args.journal.clone();
        let doc = doc.clone();
        let rt = tokio::runtime::Handle::current();
        // Blocking work (object stores block on the runtime): off the async workers.
        let faults = tokio::task::spawn_blocking(move || verify(&journal, doc.as_deref(), rt)).await??;
        if faults > 0 {
            std::process::exit(1);
        }
        return Ok(());
    }
    if secret.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without auth: pass --auth-secret-file, or listen on a loopback address",
            args.listen
        );
    }
    let store = Store::parse(&args.journal, tokio::runtime::Handle::current())?;
    let auth_note = if secret.is_some() { "tokens required" } else { "no auth: loopback only" };
    let where_ = store.describe();
    let cfg = ServerConfig {
        limits: Limits {
            max_connections: args.max_connections,
            max_frame_bytes: args.max_frame_bytes,
            max_mutation_bytes: args.max_mutation_bytes,
            max_doc_bytes: args.max_doc_bytes,
        },
        auth_secret: secret,
        commit_interval_ms: args.commit_interval_ms,
        idle_close_ms: args.idle_close_secs.saturating_mul(1000),
        web_root: args.web.clone(),
        ..ServerConfig::new(args.listen, store)
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(
        "pagesync-server listening on ws://{}/v1/sync, documents in {where_} ({auth_note})",
        listener.local_addr()?,
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

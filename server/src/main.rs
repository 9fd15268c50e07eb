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
#[command(
    name = "pagesync-server",
    version,
    about = "Serve pagesync documents over websockets (ws://HOST/v1/sync)"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Address to listen on (HOST:PORT; a name such as localhost is resolved). Without
    /// --auth-secret-file only loopback addresses are allowed.
    #[arg(long, default_value = "127.0.0.1:8787", value_parser = listen_address)]
    listen: SocketAddr,
    /// Where documents are kept: file://DIR, s3://BUCKET/PREFIX (endpoint, region and
    /// credentials from the AWS_* environment), or object+file:///DIR.
    #[arg(long, global = true, default_value = "file://./pagesync-data")]
    journal: String,
    /// Connections served at once; more are refused.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Documents open at once, over every client; a request that would open one more is
    /// answered `limit` (each open document holds file descriptors). 0: half the open-file
    /// limit less a reserve for HTTP, at least 1,000.
    #[arg(long, default_value_t = 0)]
    max_open_docs: usize,
    /// Largest websocket message accepted from a client; a larger one closes its connection.
    /// The default is the largest a client sends (a batch of mutations); what the server sends
    /// may be larger (up to a 64 MiB storage entry), and clients accept that.
    #[arg(long, default_value_t = pagesync::protocol::MAX_UPLOAD_FRAME_BYTES)]
    max_frame_bytes: usize,
    /// Largest mutation accepted; a larger one is rejected (at most 1 MiB).
    #[arg(long, default_value_t = pagesync::mutation::MAX_MUTATION_BYTES, value_parser = mutation_limit)]
    max_mutation_bytes: usize,
    /// Largest database a document may grow to, in bytes; a mutation that would grow it
    /// further is rejected with `doc_full` (the document stays usable). Default: no limit.
    #[arg(long)]
    max_doc_bytes: Option<u64>,
    /// SQLite VM instructions one mutation may run; past it the mutation is rejected with
    /// `too_expensive`. Clients check the default budget optimistically; the server decides.
    #[arg(long, default_value_t = pagesync::sandbox::DEFAULT_MAX_VM_STEPS)]
    max_mutation_vm_steps: u64,
    /// Bytes one mutation may add to its document; past it: `too_big`.
    #[arg(long, default_value_t = pagesync::sandbox::DEFAULT_MAX_ADDED_BYTES)]
    max_mutation_added_bytes: u64,
    /// Bytes of temp files (sorts, statement journals) one mutation may hold; past it: `too_big`.
    #[arg(long, default_value_t = pagesync::sandbox::DEFAULT_MAX_TEMP_BYTES)]
    max_mutation_temp_bytes: u64,
    /// The largest string or blob a statement may make; past it: `too_big`. From 4096 (a
    /// page: pagesync's own schema needs more than a few hundred bytes) to 1,000,000,000
    /// (SQLite's own bound).
    #[arg(long, default_value_t = pagesync::sandbox::DEFAULT_MAX_VALUE_BYTES,
          value_parser = clap::value_parser!(u32).range(4_096..=1_000_000_000))]
    max_value_bytes: u32,
    /// CPU time one mutation may take, in ms; past it: `too_expensive` (the instruction budget
    /// is the bound clients check too; this one catches instructions that each work through
    /// a large value). 0: no bound. Clients stop their own runs at 2,000: above it, what the
    /// server takes they run to its pages instead.
    #[arg(long, default_value_t = pagesync::sandbox::DEFAULT_MAX_MUTATION_CPU.as_millis() as u64)]
    max_mutation_cpu_ms: u64,
    /// Group commit: a document steps this long after its first queued mutation arrived, at
    /// most 10,000 (a client waits that long for every write). Default: 0 for file://, 100
    /// for s3:// (fewer, larger puts).
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=10_000))]
    commit_interval_ms: Option<i64>,
    /// Seconds before a document nobody subscribes to is closed (1 to 86,400).
    #[arg(long, default_value_t = DEFAULT_IDLE_CLOSE_MS / 1000,
          value_parser = clap::value_parser!(i64).range(1..=86_400))]
    idle_close_secs: i64,
    /// Serve this directory as static files on the paths the server does not own (the browser
    /// demo: `--web target/web` after `scripts/build-web`).
    #[arg(long)]
    web: Option<std::path::PathBuf>,
    /// History kept for point-in-time restore (`restore`, `export --at`): 90s, 30m, 12h, 7d.
    /// Older entries are folded into a checkpoint.
    #[arg(long, default_value = "7d")]
    retention: String,
    /// A document writes a checkpoint (every page once more) when the entries since the last
    /// one hold this many bytes, or its own size if that is larger.
    #[arg(long, default_value_t = pagesync::Compaction::default().checkpoint_after_bytes)]
    checkpoint_after_bytes: u64,
    /// File holding the HS256 secret (at least 32 bytes). Every client then needs a token.
    #[arg(long, global = true)]
    auth_secret_file: Option<std::path::PathBuf>,
    /// Serve as one of many servers over the --journal bucket, reached by clients at this URL
    /// (ws://HOST:PORT): each document is served by one server at a time (its lease holder),
    /// and the others redirect its clients there. Needs s3:// (or object+file://).
    #[arg(long)]
    advertise: Option<String>,
    /// With --advertise: how long a server that stopped renewing its membership keeps its
    /// documents before others take them over (it stops writing them after two thirds of it).
    #[arg(long, default_value_t = pagesync_server::cluster::DEFAULT_LEASE_MS)]
    lease_ms: u64,
    /// Show a document's history (`GET /v1/docs/{id}/history`, `pagesync history`) only to
    /// tokens with the admin claim (`token --admin`); by default a read grant is enough.
    #[arg(long)]
    history_admin_only: bool,
    /// Keep every document's history (who sent each mutation, when, its outcome and SQL): one
    /// more durable append per step (an fsync on files, a PUT on S3). `off` records nothing.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    history: String,
    /// Server-defined mutators: a file of `-- mutator: NAME(ARGS)` blocks, for every document,
    /// or `PREFIX=FILE` for the documents whose id starts with PREFIX (repeatable; the longest
    /// prefix wins). Sent to clients; SIGHUP reloads them. See `pagesync::mutators`.
    #[arg(long)]
    mutators: Vec<String>,
}

/// `HOST:PORT`, the host an address or a name (its first IPv4 address, else its first).
fn listen_address(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> =
        s.to_socket_addrs().map_err(|e| format!("expected HOST:PORT (127.0.0.1:8787): {e}"))?.collect();
    // IPv4 first: `localhost` is often ::1 first, where a client's default 127.0.0.1 would not
    // reach the server.
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| format!("{s} has no address"))
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
        /// A document id, or a hex prefix followed by `*` (`*` alone: every document). Without
        /// it the token grants no document (for `--metrics` alone).
        #[arg(long, required_unless_present = "metrics")]
        doc: Option<String>,
        /// Allow writes (default: read-only).
        #[arg(long)]
        write: bool,
        /// Allow reading `/metrics`.
        #[arg(long)]
        metrics: bool,
        /// Lifetime: 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Who the token is for (the `sub` claim): shown to other clients in presence.
        #[arg(long)]
        sub: Option<String>,
        /// May delete the documents it names (`DELETE /v1/docs/{id}`).
        #[arg(long)]
        admin: bool,
        /// Mutators it may call, comma separated, or `*` for every one (see --mutators).
        /// Without --write these are all it may send: no raw SQL.
        #[arg(long)]
        call: Option<String>,
    },
    /// Check every document (or one) in --journal: every checksum, a replay of every entry,
    /// and SQLite's integrity_check. Changes nothing; exits non-zero on any fault.
    Verify {
        /// Only this document.
        #[arg(long)]
        doc: Option<String>,
    },
    /// Write a document as of a point in its history as a plain .sqlite file.
    Export {
        #[arg(long)]
        doc: String,
        /// lsn:N, or an RFC 3339 time (2026-11-24T09:30:00Z). Default: the newest entry.
        #[arg(long)]
        at: Option<String>,
        /// The file to write.
        out: std::path::PathBuf,
    },
    /// Bring back a document as it was at a point in its history: into a new document
    /// (--to), or into itself (--in-place; clients follow). Stop the server first.
    Restore {
        #[arg(long)]
        doc: String,
        /// lsn:N, or an RFC 3339 time (2026-11-24T09:30:00Z).
        #[arg(long)]
        at: String,
        /// The new document's id.
        #[arg(long, conflicts_with = "in_place", required_unless_present = "in_place")]
        to: Option<String>,
        /// Restore the document itself; asks to confirm unless --yes.
        #[arg(long)]
        in_place: bool,
        /// Do not ask before restoring in place.
        #[arg(long)]
        yes: bool,
    },
    /// Delete a document for good: its tombstone (so no client re-creates it), then its
    /// storage. With a server running, use `DELETE /v1/docs/{id}` instead (it tells the
    /// clients); on file:// this refuses while a server holds the store.
    Delete {
        #[arg(long)]
        doc: String,
        /// Do not ask first.
        #[arg(long)]
        yes: bool,
    },
    /// List a document's mutations: who sent each (the token's sub), when the client made it,
    /// when the server received and applied it, the storage entry, the outcome, the SQL.
    /// Works beside a running server.
    History {
        #[arg(long)]
        doc: String,
        /// Only those applied at or after this time: ms since the Unix epoch, or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        /// Continue after this cursor (a listing's `next`).
        #[arg(long)]
        after: Option<String>,
        /// At most this many (default: all).
        #[arg(long)]
        limit: Option<u32>,
        /// One JSON object: {"doc": ID, "records": [...], "next": CURSOR or null}.
        #[arg(long)]
        json: bool,
    },
    /// List the servers of the cluster on --journal (their records in the bucket) and the
    /// documents whose lease each holds.
    Cluster,
}

fn parse_doc(s: &str) -> anyhow::Result<pagesync::DocId> {
    s.parse().map_err(|e| anyhow::anyhow!("--doc {s:?}: {e}"))
}

fn parse_at(s: &str) -> anyhow::Result<pagesync_server::ops::At> {
    s.parse().map_err(|e: String| anyhow::anyhow!("--at {e}"))
}

use pagesync_server::wall_ms as now_ms;

/// `export`, `restore`, `delete` and `cluster`, which work on the store without a server.
/// Blocking.
fn offline(journal: &str, cmd: &Cmd, rt: tokio::runtime::Handle) -> anyhow::Result<()> {
    use pagesync_server::ops::{self, At, RestoreTo};
    let store = Store::parse(journal, rt)?;
    match cmd {
        Cmd::Export { doc, at, out } => {
            let at = at.as_deref().map_or(Ok(At::Time(i64::MAX)), parse_at)?;
            let (lsn, bytes) = ops::export_at(&store, parse_doc(doc)?, at).map_err(anyhow::Error::msg)?;
            std::fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {} ({} bytes) as of entry {lsn}", out.display(), bytes.len());
        }
        Cmd::Restore { doc, at, to, in_place, yes } => {
            let (doc, at) = (parse_doc(doc)?, parse_at(at)?);
            let to = match to {
                Some(new) => RestoreTo::New(parse_doc(new)?),
                None => {
                    if !*in_place {
                        anyhow::bail!("restore needs --to NEW_ID or --in-place");
                    }
                    if !yes && !confirm(doc)? {
                        anyhow::bail!("not confirmed: nothing was changed");
                    }
                    RestoreTo::InPlace
                }
            };
            // In place rewrites a document a server may be serving, and a new one is one a
            // client of a running server may be creating at the same moment (both wrote it,
            // and the document was left unreadable): on files, not while a server runs.
            // A mistyped store is not created, with a lock in it.
            if let Store::Files(root) = &store
                && !root.is_dir()
            {
                anyhow::bail!("no store at {}: nothing to restore", store.describe());
            }
            let _lock = pagesync_server::store_lock(&store)?;
            let r = ops::restore(&store, doc, at, to, now_ms()).map_err(anyhow::Error::msg)?;
            println!(
                "restored {doc} as of entry {} into {}: {} pages, entries {}",
                r.from, r.doc, r.pages, r.range
            );
        }
        Cmd::Delete { doc, yes } => {
            let doc = parse_doc(doc)?;
            // What is not there is named before anything is asked or written (a mistyped
            // store is not created, with a lock in it), and a store that fails says so.
            if let Store::Files(root) = &store
                && !root.is_dir()
            {
                anyhow::bail!("no store at {}: nothing to delete", store.describe());
            }
            match store.exists(doc) {
                Ok(true) | Err(pagesync::Error::Deleted) => {}
                Ok(false) => anyhow::bail!("no document {doc} in {}", store.describe()),
                Err(e) => return Err(e.into()),
            }
            let _lock = pagesync_server::store_lock(&store)?;
            if !yes && !confirm_delete(doc)? {
                anyhow::bail!("not confirmed: nothing was deleted");
            }
            if !store.mark_deleted(doc, now_ms())? {
                anyhow::bail!("no document {doc} in {}", store.describe());
            }
            store.delete_storage(doc)?;
            println!(
                "deleted {doc}: its storage is gone, and a tombstone keeps clients from creating it again"
            );
        }
        Cmd::Cluster => {
            let Store::Objects(backend) = &store else {
                anyhow::bail!("a cluster lives in an object store: pass --journal s3://BUCKET/PREFIX");
            };
            let view = pagesync_server::cluster::view(backend)?;
            let (gone, live): (Vec<_>, Vec<_>) = view.members.iter().partition(|m| m.dead);
            println!("{} servers in {} ({} gone):", live.len(), store.describe(), gone.len());
            for m in &live {
                let owns = view.held_by(&m.id).len();
                let url = m.url.as_deref().unwrap_or("(no record)");
                let age = m.age_ms as f64 / 1000.0;
                println!("  {}  {url}  last beat {age:.1} s ago  holds {owns} leases", m.id);
            }
            println!("{} document leases:", view.leases.len());
            for (doc, epoch, holder) in &view.leases {
                let state = match view.members.iter().find(|m| m.id == *holder) {
                    Some(m) if !m.dead => "",
                    _ => "  (its server is gone: the next client's server takes it over)",
                };
                println!("  {doc}  epoch {epoch}  held by {holder}{state}");
            }
        }
        Cmd::History { doc, since, after, limit, json } => {
            let doc = parse_doc(doc)?;
            let query = pagesync::history::HistoryQuery::parse(since.as_deref(), after.as_deref())
                .map_err(anyhow::Error::msg)?;
            let mut pager = pagesync::history::Pager::new(query, *limit);
            while let Some(q) = pager.next_query() {
                pager.take(ops::read_history(&store, doc, &q).map_err(anyhow::Error::msg)?);
            }
            let page = pager.finish();
            if *json {
                println!("{}", page.to_json(doc));
            } else {
                print!("{page}");
            }
        }
        Cmd::Token { .. } | Cmd::Verify { .. } => unreachable!("BUG: handled before"),
    }
    Ok(())
}

/// Files a server needs besides its connections: pending connections and open journals.
fn http_reserve() -> usize {
    pagesync_server::http::DEFAULT_MAX_PENDING_CONNECTIONS + 256
}

/// The documents a server may hold open within `files` descriptors: two descriptors a
/// document (its storage journal's segment and its history's) of what the HTTP reserve leaves,
/// and at least `MIN_OPEN_DOCS` (a low open-file limit is warned about at start).
fn open_docs_within(files: usize) -> usize {
    (files.saturating_sub(http_reserve()) / 2).max(MIN_OPEN_DOCS)
}

/// The least `--max-open-docs` defaults to, whatever the open-file limit.
const MIN_OPEN_DOCS: usize = 1_000;

/// Asks on the terminal before a deletion.
fn confirm_delete(doc: pagesync::DocId) -> anyhow::Result<bool> {
    use std::io::BufRead;
    eprintln!("This deletes document {doc} for every client, for good.\nType the document id to confirm:");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == doc.to_string())
}

/// Asks on the terminal before an in-place restore.
fn confirm(doc: pagesync::DocId) -> anyhow::Result<bool> {
    use std::io::BufRead;
    eprintln!(
        "This rewrites document {doc} for every client. The server must be stopped.\nType the document id to confirm:"
    );
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == doc.to_string())
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

/// Refuses settings the server could not serve with: it would start, and every client would
/// only time out.
fn check_settings(args: &Args) -> anyhow::Result<()> {
    let upload = pagesync::protocol::MAX_UPLOAD_FRAME_BYTES;
    if args.max_frame_bytes < upload {
        anyhow::bail!(
            "--max-frame-bytes {} is below {upload}, the largest message a client sends (a batch of mutations): clients would be cut off and never sync",
            args.max_frame_bytes
        );
    }
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections 0 would refuse every client");
    }
    if args.max_mutation_bytes == 0 {
        anyhow::bail!("--max-mutation-bytes 0 would reject every mutation");
    }
    if let Some(web) = &args.web
        && !web.is_dir()
    {
        anyhow::bail!("--web {}: not a directory", web.display());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    // Frames of storage are the server's large buffers: each is given back when freed. Set
    // before any other thread runs.
    #[cfg(unix)]
    pagesync::journal::map_large_allocations(4 << 20);
    // Before SQLite starts: the bound on what one mutation makes SQLite hold.
    if !pagesync::install_memory_meter() {
        eprintln!("error: SQLite started before its allocator could be metered");
        return std::process::ExitCode::FAILURE;
    }
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(serve_main()),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve_main() -> std::process::ExitCode {
    // Colours only on a terminal: a log written to a file or a collector has no escape codes.
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    // The error and its causes on one line, without a backtrace (even under RUST_BACKTRACE):
    // it is an operator's answer, not a bug report.
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let secret = args.auth_secret_file.as_deref().map(auth::load_secret).transpose()?;
    if let Some(Cmd::Token { doc, write, metrics, ttl, sub, admin, call }) = &args.command {
        let secret =
            secret.ok_or_else(|| anyhow::anyhow!("token needs --auth-secret-file (the server's secret)"))?;
        if call.is_some() && sub.as_deref().is_none_or(str::is_empty) {
            anyhow::bail!(
                "--call needs --sub: mutators bind the caller's subject, and tokens without one would all be the same caller"
            );
        }
        if let Some(sub) = sub {
            auth::check_subject(sub).map_err(|e| anyhow::anyhow!("--sub: {e}"))?;
        }
        if let Some(doc) = doc {
            // A token that could never open anything is a typo, not a token.
            auth::check_doc_claim(doc).map_err(|e| anyhow::anyhow!("--doc {doc:?}: {e}"))?;
        }
        let ttl = auth::parse_ttl(ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
        if ttl == 0 {
            anyhow::bail!("--ttl: a token that lives 0 seconds is expired already");
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
        let claims = auth::Claims {
            doc: doc.clone().unwrap_or_else(|| auth::NO_DOC.into()),
            write: *write,
            exp: now.saturating_add(ttl),
            metrics: *metrics,
            sub: sub.clone(),
            admin: *admin,
            call: call
                .as_ref()
                .map(|c| c.split(',').map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect()),
        };
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
    if let Some(
        cmd @ (Cmd::Export { .. }
        | Cmd::Restore { .. }
        | Cmd::Cluster
        | Cmd::Delete { .. }
        | Cmd::History { .. }),
    ) = args.command
    {
        let (journal, rt) = (args.journal.clone(), tokio::runtime::Handle::current());
        return tokio::task::spawn_blocking(move || offline(&journal, &cmd, rt)).await?;
    }
    check_settings(&args)?;
    if secret.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without auth: pass --auth-secret-file, or listen on a loopback address",
            args.listen
        );
    }
    let files = pagesync_server::raise_open_file_limit();
    if let Some(n) = files.filter(|n| (*n as usize) < args.max_connections + http_reserve()) {
        tracing::warn!(
            "the open-file limit is {n}, below --max-connections ({}) plus what pending connections and journals need",
            args.max_connections
        );
    }
    let max_open_docs = match (args.max_open_docs, files) {
        (0, Some(files)) => open_docs_within(files as usize),
        (0, None) => usize::MAX,
        (n, _) => n,
    };
    if max_open_docs != usize::MAX {
        tracing::info!("at most {max_open_docs} documents open at once (--max-open-docs)");
    }
    let store = Store::parse(&args.journal, tokio::runtime::Handle::current())?;
    let cfg = ServerConfig {
        limits: Limits {
            max_connections: args.max_connections,
            max_frame_bytes: args.max_frame_bytes,
            max_mutation_bytes: args.max_mutation_bytes,
            max_doc_bytes: args.max_doc_bytes,
            max_mutation_cpu: (args.max_mutation_cpu_ms > 0)
                .then(|| std::time::Duration::from_millis(args.max_mutation_cpu_ms)),
            budget: pagesync::Budget {
                max_vm_steps: args.max_mutation_vm_steps,
                max_added_bytes: args.max_mutation_added_bytes,
                max_temp_bytes: args.max_mutation_temp_bytes,
                max_value_bytes: args.max_value_bytes,
            },
            max_open_docs,
        },
        auth_secret: secret,
        commit_interval_ms: args.commit_interval_ms,
        idle_close_ms: args.idle_close_secs.saturating_mul(1000),
        web_root: args.web.clone(),
        cluster: args
            .advertise
            .clone()
            .map(|advertise| pagesync_server::ClusterConfig { advertise, lease_ms: args.lease_ms }),
        history_needs_admin: args.history_admin_only,
        keep_history: args.history == "on",
        mutators: match args.mutators.is_empty() {
            true => None,
            false => Some(Arc::new(pagesync_server::MutatorRegistry::load(&args.mutators)?)),
        },
        compaction: Some(pagesync::Compaction {
            checkpoint_after_bytes: args.checkpoint_after_bytes,
            retention_ms: auth::parse_ttl(&args.retention)
                .map_err(|e| anyhow::anyhow!("--retention: {e}"))?
                .saturating_mul(1000),
        }),
        ..ServerConfig::new(args.listen, store)
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
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

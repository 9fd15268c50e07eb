//! `pagesync`: the command-line client. Works offline; `sync` pushes and waits.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pagesync::{DocId, MutationState, Value};
use pagesync_client::{Client, ClientError, OpenOptions};

// `println!` and `print!` that end the process quietly when what reads the output has gone
// (`pagesync status | head`): Rust ignores SIGPIPE, and the std macros panic then. (SIGPIPE
// is not restored instead: TLS writes use `writev`, which would then kill the client when a
// server closes a `wss://` connection.)
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    }};
}

macro_rules! print {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($t)*) {
            stdout_failed(e)
        }
    }};
}

// `eprintln!` and `eprint!` that carry on when stderr has gone (`pagesync ... 2>&1 | head -c
// 10`): the std macros panic then, and there is nobody left to tell.
macro_rules! eprintln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

macro_rules! eprint {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing the output: {e}");
    std::process::exit(1)
}

#[derive(Parser, Debug)]
#[command(name = "pagesync", version, about = "Local SQLite that syncs with a pagesync server")]
struct Args {
    /// Server websocket URL; several servers of one cluster may be given, separated by
    /// commas (the next is tried when one cannot be reached).
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8787/v1/sync")]
    server: String,
    /// Where local replicas live.
    #[arg(long, global = true, default_value = "./pagesync-client-data")]
    data: PathBuf,
    /// Document id: 32 hex digits or a UUID.
    #[arg(long, global = true)]
    doc: Option<String>,
    /// Access token (or PAGESYNC_TOKEN).
    #[arg(long, global = true, env = "PAGESYNC_TOKEN", default_value = "")]
    token: String,
    /// How long to wait for the server, in milliseconds.
    #[arg(long, global = true, default_value_t = 3_000)]
    timeout_ms: u64,
    /// How long to wait while another process has this replica open (a `repl`, another
    /// `exec`) before failing with its pid and command.
    #[arg(long, global = true, default_value_t = 10_000)]
    wait_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a write locally and push it (it stays queued if the server is unreachable).
    Exec {
        sql: String,
        /// Parameters ?1, ?2, ...: `null`; an integer or a real when it reads back exactly as
        /// typed (`7`, `1.5`; not `007` or `1e3`, which are text); text otherwise, or in
        /// single quotes (`'7'`).
        #[arg(allow_negative_numbers = true)]
        params: Vec<String>,
        /// Do not wait for the server.
        #[arg(long)]
        offline: bool,
    },
    /// Call a server-defined mutator (see `pagesync-server --mutators`): NAME, then its
    /// arguments (as `exec` reads its parameters). Runs locally at once, then on the server,
    /// which decides; exits non-zero when the server rejects it (with the app's message).
    Call {
        name: String,
        #[arg(allow_negative_numbers = true)]
        args: Vec<String>,
        /// Do not wait for the server.
        #[arg(long)]
        offline: bool,
    },
    /// Run a read-only query on the local replica (after a short sync).
    Query {
        sql: String,
        /// Parameters ?1, ?2, ..., as `exec` reads them.
        #[arg(allow_negative_numbers = true)]
        params: Vec<String>,
        /// Print the rows as a JSON array of objects, keys in the query's column order.
        #[arg(long, conflicts_with = "json_rows")]
        json: bool,
        /// Print `{"columns": [...], "rows": [[...], ...]}` (also keeps duplicate column names).
        #[arg(long)]
        json_rows: bool,
        /// Query the local replica as it is, without asking the server.
        #[arg(long)]
        offline: bool,
    },
    /// Pending, confirmed and rejected counts, with the server's message for each rejection.
    Status,
    /// Push local writes and wait until the server confirmed them; non-zero exit on timeout.
    Sync,
    /// Sync, then write the document to FILE as a plain .sqlite file.
    Export { file: PathBuf },
    /// Send TEXT to everyone else with the document open (presence; nothing is stored), then
    /// stay for --stay-ms so they see it (they see this client leave when it exits).
    Broadcast {
        text: String,
        /// How long to stay after sending, in milliseconds (the others see this client leave
        /// when it exits).
        #[arg(long, default_value_t = 0)]
        stay_ms: u64,
    },
    /// Who else has the document open: one line per peer (id, subject, last broadcast), or
    /// `--json`; with `--watch`, a new listing whenever it changes, until interrupted.
    Presence {
        /// Print a JSON array of `{"id", "subject", "timeline", "value"}`.
        #[arg(long)]
        json: bool,
        /// Print a new listing whenever it changes, until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// The document's history, from the server: every mutation with who sent it, when it was
    /// made, received and applied, its outcome and its SQL, oldest first.
    History {
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
    /// Remove the local replica of --doc (after the server deleted it, or to start over); its
    /// pending writes go with it.
    Forget,
    /// Interactive SQL. Statements end with `;`. Reads (SELECT, WITH, PRAGMA, EXPLAIN, VALUES)
    /// run on the local replica; anything else is a write, applied locally at once and synced
    /// in the background. `.status`, `.sync` and `.quit` do what they say.
    Repl,
}

/// Whether a statement only reads: those run as queries, everything else as a mutation.
fn is_read(sql: &str) -> bool {
    let first = sql.trim_start().split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("");
    ["select", "with", "pragma", "explain", "values"].iter().any(|k| first.eq_ignore_ascii_case(k))
}

fn print_rows(rows: &pagesync::Rows) {
    println!("{}", rows.columns.join("\t"));
    for row in &rows.rows {
        println!("{}", row.iter().map(to_tsv).collect::<Vec<_>>().join("\t"));
    }
}

fn print_status(doc: &pagesync_client::Document) -> anyhow::Result<()> {
    let st = doc.status();
    let outcomes = doc.outcomes()?;
    println!("pending\t{}", st.pending);
    println!("confirmed\t{}", outcomes.confirmed);
    println!("rejected\t{}", outcomes.rejected.len());
    for (lsn, r) in outcomes.rejected {
        println!("rejected {lsn}\t{}\t{}", r.code, tsv_text(&r.message));
    }
    if st.deleted {
        println!("deleted\tthe server deleted this document; `pagesync forget` removes the local replica");
    } else if let Some((code, message)) = st.error {
        let whose =
            if code == pagesync::protocol::codes::LOCAL_STORAGE { "local error" } else { "server error" };
        println!("{whose}\t{code}\t{}", tsv_text(&message));
    }
    Ok(())
}

/// Whether the server refused in a way that stays until something changes (a wrong path,
/// refused credentials, an error that does not pass): a script must hear it. Unreachable,
/// slow or `limit` (a server at its connection limit says "retry later") is not.
fn refused_for_good(e: &pagesync_client::ClientError) -> bool {
    match e {
        pagesync_client::ClientError::Refused(_) => true,
        pagesync_client::ClientError::Server { code, .. } => refused_code(code),
        _ => false,
    }
}

/// Whether a server error's code is a refusal that waiting will not change. This replica's
/// own disk failing (`local_storage`) is not the server's refusal: the commands that sync say
/// it as what it is (`ClientError::LocalStorage`).
fn refused_code(code: &str) -> bool {
    use pagesync::protocol::codes;
    !codes::passes(code) && code != codes::LIMIT && code != codes::LOCAL_STORAGE
}

/// Waits, looking every 5 ms, until `done` says so or `within` has passed; whether it did.
async fn wait_until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done()
}

/// What a refusal says, without "the server reported" after "the server refused".
fn why_refused(e: &pagesync_client::ClientError) -> String {
    match e {
        pagesync_client::ClientError::Server { code, message } => format!("{code}: {message}"),
        e => e.to_string(),
    }
}

/// After a write: waits for the server (unless `offline`) and says what became of it.
async fn settle(
    doc: &pagesync_client::Document,
    done: pagesync::Submitted,
    offline: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    if let Err(r) = &done.local {
        eprintln!("warning: failed locally ({r}); queued for the server, which decides");
    }
    if !offline && let Err(e) = sync_shown(doc, timeout).await {
        // Unreachable or slow, it is pending and goes up later: success. Refused (a wrong
        // path, refused credentials, an error that does not pass), it stays queued too, but
        // nothing will send it until something changes: a script must hear that.
        if refused_for_good(&e) {
            eprintln!(
                "mutation {} is queued locally, but the server refused it: {}",
                done.lsn,
                why_refused(&e)
            );
            return Ok(ExitCode::FAILURE);
        }
        if let pagesync_client::ClientError::LocalStorage(why) = &e {
            // Durable here and queued, but this replica's disk stops it syncing: a script
            // must hear that too.
            eprintln!("mutation {} is queued locally, but the replica cannot sync: {why}", done.lsn);
            return Ok(ExitCode::FAILURE);
        }
        eprintln!("mutation {} is pending: {e}", done.lsn);
        return Ok(ExitCode::SUCCESS);
    }
    match doc.state(done.lsn)? {
        MutationState::Rejected(r) => {
            eprintln!("mutation {} rejected by the server: {r}", done.lsn);
            Ok(ExitCode::FAILURE)
        }
        state => {
            println!("mutation {}: {}", done.lsn, format!("{state:?}").to_lowercase());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A replica that holds nothing yet would run a write on an empty database ("no such
/// table"): it first takes what the server has, when the server answers within a second (the
/// write goes in either way).
async fn catch_up_if_empty(client: &Client, doc: &pagesync_client::Document, timeout: Duration) {
    if doc.status().storage_next == pagesync::journal::Lsn::FIRST
        && wait_until(timeout.min(Duration::from_secs(1)), || client.is_connected()).await
    {
        let _ = doc.sync(timeout).await;
    }
}

async fn repl(doc: &pagesync_client::Document, timeout: Duration) -> anyhow::Result<ExitCode> {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stmt = String::new();
    eprintln!("pagesync repl on {}: end statements with ';', .status, .sync, .quit", doc.id());
    while let Some(line) = lines.next_line().await? {
        let trimmed = line.trim();
        if stmt.is_empty() && trimmed.starts_with('.') {
            match trimmed {
                ".quit" | ".exit" => break,
                ".status" => print_status(doc)?,
                ".sync" => match doc.sync(timeout).await {
                    Ok(()) => println!("synced"),
                    Err(e) => println!("error: {e}"),
                },
                other => println!("error: unknown command {other} (.status, .sync, .quit)"),
            }
            continue;
        }
        stmt.push_str(&line);
        stmt.push('\n');
        if trimmed.ends_with(';') {
            run_statement(doc, &std::mem::take(&mut stmt));
        }
    }
    // Input that ends without a last `;` (a pipe, a file): its statement runs too.
    if !stmt.trim().is_empty() {
        run_statement(doc, &stmt);
    }
    // Leave only once the writes reached the server, when it is reachable.
    if let Err(e) = doc.sync(timeout).await {
        eprintln!("leaving with writes pending: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// One statement of the repl: a read runs on the replica, anything else is a write.
fn run_statement(doc: &pagesync_client::Document, sql: &str) {
    if is_read(sql) {
        match doc.query(sql, &[]) {
            Ok(rows) => return print_rows(&rows),
            // `WITH ... INSERT` begins as a read does: SQLite says it writes, so it is a write.
            Err(ClientError::Core(pagesync::Error::NotReadOnly { .. })) => {}
            Err(e) => return println!("error: {e}"),
        }
    }
    match doc.execute(sql, vec![]) {
        Ok(done) => match &done.local {
            Ok(()) => println!("mutation {}: applied locally, syncing", done.lsn),
            Err(r) => println!("mutation {}: failed locally ({r}); the server decides", done.lsn),
        },
        Err(e) => println!("error: {e}"),
    }
}

/// `doc.sync`, drawing a progress bar on stderr for a sync that takes a while: when stderr is a
/// terminal, or always with `PAGESYNC_PROGRESS=1`.
async fn sync_shown(
    doc: &pagesync_client::Document,
    timeout: Duration,
) -> Result<(), pagesync_client::ClientError> {
    use std::io::{IsTerminal, Write};
    let forced = std::env::var_os("PAGESYNC_PROGRESS").is_some_and(|v| v == "1");
    if !forced && !std::io::stderr().is_terminal() {
        return doc.sync(timeout).await;
    }
    let start = std::time::Instant::now();
    let mut drawn = false;
    let result = doc
        .sync_with_progress(timeout, |p| {
            if !forced && start.elapsed() < Duration::from_millis(250) {
                return;
            }
            eprint!("\r{}", progress_bar(p));
            let _ = std::io::stderr().flush();
            drawn = true;
        })
        .await;
    if drawn {
        eprintln!();
    }
    result
}

/// `syncing [##########----------] 512/1024 entries, 3 writes pending`
fn progress_bar(p: pagesync_client::SyncProgress) -> String {
    const WIDTH: u64 = 30;
    if p.server_entries == 0 {
        return format!("syncing: waiting for the server, {} writes pending ", p.pending);
    }
    let filled = (p.entries * WIDTH / p.server_entries).min(WIDTH);
    let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '-' }).collect();
    format!("syncing [{bar}] {}/{} entries, {} writes pending ", p.entries, p.server_entries, p.pending)
}

/// A parameter as typed: `null` is NULL; a number only when it is written in plain digits and
/// reads back exactly as typed (`7`, `-3`, `1.5`, `2.0`, `0.00005`), so nothing typed is
/// changed on the way (`007`, `+1`, `1e3`, `1.10`, `NaN` or a number too large for 64 bits
/// stay text); anything in single quotes is text without them (`'7'`, `'null'`).
fn parse_param(p: &str) -> Value {
    if let Some(text) = p.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Value::Text(text.to_owned());
    }
    if p == "null" {
        return Value::Null;
    }
    if let Ok(i) = p.parse::<i64>()
        && i.to_string() == p
    {
        return Value::Integer(i);
    }
    // Plain digits with one point (no exponent, no sign but a leading minus), and what the
    // value prints as (`Display` never uses an exponent) is what was typed, or that and ".0".
    let digits = p.strip_prefix('-').unwrap_or(p);
    let plain = digits.split_once('.').is_some_and(|(whole, fraction)| {
        !whole.is_empty()
            && !fraction.is_empty()
            && whole.bytes().chain(fraction.bytes()).all(|b| b.is_ascii_digit())
    });
    if plain
        && let Ok(f) = p.parse::<f64>()
        && f.is_finite()
        && (f.to_string() == p || format!("{f}.0") == p)
    {
        return Value::Real(f);
    }
    Value::Text(p.to_owned())
}

/// `[{"col": value, ...}, ...]` with keys in column order (serde_json's map would sort them).
fn json_objects(rows: &pagesync::Rows) -> String {
    let objects: Vec<String> = rows
        .rows
        .iter()
        .map(|row| {
            let fields: Vec<String> = rows
                .columns
                .iter()
                .zip(row)
                .map(|(c, v)| format!("{}:{}", serde_json::Value::from(c.as_str()), v.to_json()))
                .collect();
            format!("{{{}}}", fields.join(","))
        })
        .collect();
    format!("[{}]", objects.join(","))
}

fn json_table(rows: &pagesync::Rows) -> String {
    let table = serde_json::json!({
        "columns": rows.columns,
        "rows": rows.rows.iter().map(|r| r.iter().map(Value::to_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
    });
    table.to_string()
}

fn to_tsv(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(t) => tsv_text(t),
        Value::Blob(b) => format!("x'{}'", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    }
}

/// Text as one TSV field: its tabs and line breaks escaped (a message of several lines stays
/// on its row).
fn tsv_text(t: &str) -> String {
    t.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n").replace('\r', "\\r")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let doc_text =
        args.doc.clone().ok_or_else(|| anyhow::anyhow!("--doc ID is required (32 hex digits or a UUID)"))?;
    let doc_id: DocId = doc_text
        .parse()
        .map_err(|_| anyhow::anyhow!("--doc {doc_text:?} is not a document id (32 hex digits or a UUID)"))?;
    if let Command::Forget = args.command {
        // Like a command that opens the replica, it waits --wait-ms for another holder.
        let wait = Duration::from_millis(args.wait_ms);
        return Ok(match pagesync_client::forget_wait(&args.data, doc_id, wait).await? {
            true => {
                println!("forgot {doc_id}: its local replica is gone");
                ExitCode::SUCCESS
            }
            false => {
                eprintln!("no local replica of {doc_id} in {}", args.data.display());
                ExitCode::FAILURE
            }
        });
    }
    let client = Client::connect(&args.server, &args.token, &args.data)?;
    if let Command::History { since, after, limit, json } = &args.command {
        // Read from the server alone: no replica is opened, and nothing is created.
        let query = pagesync::history::HistoryQuery::parse(since.as_deref(), after.as_deref())
            .map_err(anyhow::Error::msg)?;
        let mut pager = pagesync::history::Pager::new(query, *limit);
        while let Some(q) = pager.next_query() {
            pager.take(client.history(doc_id, q).await?);
        }
        let page = pager.finish();
        if *json {
            println!("{}", page.to_json(doc_id));
        } else {
            print!("{page}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Only a command that writes creates the document on the server: a read, a status or an
    // export of a mistyped id is told `not_found`.
    let create = matches!(args.command, Command::Exec { .. } | Command::Call { .. } | Command::Repl);
    let options = OpenOptions { create, wait: Duration::from_millis(args.wait_ms) };
    let new_replica = !args.data.join(doc_id.to_string()).exists();
    let doc = client.open_with(doc_id, options).await?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let done = command(args.command, &client, &doc, timeout).await;
    // A replica made by this command for a document the server refused (a mistyped id, one
    // outside the token) holds nothing: it goes, so a typo leaves no trace here either.
    // (A query's page requests may hear `not_found` before the subscription does.)
    let refused = doc.status().error.is_some_and(|(code, _)| refused_code(&code))
        || done.as_ref().err().and_then(|e| e.downcast_ref::<ClientError>()).is_some_and(refused_for_good);
    if new_replica && refused {
        let _ = client.discard_if_empty(doc_id);
    }
    done
}

/// Runs a command that needs the document's replica.
async fn command(
    command: Command,
    client: &Client,
    doc: &pagesync_client::Document,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Exec { sql, params, offline } => {
            pagesync::sandbox::require_statement(&sql)?;
            if !offline {
                catch_up_if_empty(client, doc, timeout).await;
            }
            let done = doc.execute(&sql, params.iter().map(|p| parse_param(p)).collect())?;
            settle(doc, done, offline, timeout).await
        }
        Command::Call { name, args, offline } => {
            if !offline {
                // The definitions come with the subscription: a first call waits for them.
                wait_until(timeout, || doc.mutators().is_some()).await;
            }
            let done = doc.call(&name, args.iter().map(|p| parse_param(p)).collect())?;
            settle(doc, done, offline, timeout).await
        }
        Command::Query { sql, params, json, json_rows, offline } => {
            if !offline && doc.status().holds_nothing() {
                // A replica that holds nothing yet: the query reads the server's state (pages
                // fetched on demand) rather than waiting for the whole document to download.
                if !wait_until(timeout, || client.is_connected()).await {
                    // Nothing here to show and no server to ask: say why, rather than what
                    // SQLite makes of an empty database ("no such table").
                    let why = match doc.sync(Duration::ZERO).await {
                        Err(e) => e.to_string(),
                        Ok(()) => "not connected".to_owned(),
                    };
                    anyhow::bail!(
                        "the local replica of {} holds nothing yet, and the server cannot be reached: {why} (--offline queries the empty replica)",
                        doc.id()
                    );
                }
            } else if !offline && let Err(e) = sync_shown(doc, timeout).await {
                eprintln!("warning: showing local data: {e}");
            }
            let rows = doc.query(&sql, &params.iter().map(|p| parse_param(p)).collect::<Vec<_>>())?;
            if json {
                println!("{}", json_objects(&rows));
            } else if json_rows {
                println!("{}", json_table(&rows));
            } else {
                print_rows(&rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let synced = doc.sync(timeout.min(Duration::from_secs(1))).await;
            print_status(doc)?;
            // What the replica holds is printed either way; a refusal also fails the command,
            // and an unreachable server is said (the counts are then this replica's alone).
            match synced {
                Err(e) if refused_for_good(&e) => {
                    eprintln!("error: the server refused: {}", why_refused(&e));
                    Ok(ExitCode::FAILURE)
                }
                Err(pagesync_client::ClientError::LocalStorage(why)) => {
                    eprintln!("error: this replica cannot sync: {why}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("warning: not synced with the server, showing this replica as it is: {e}");
                    Ok(ExitCode::SUCCESS)
                }
                Ok(()) => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Export { file } => {
            if let Err(e) = sync_shown(doc, timeout).await {
                if refused_for_good(&e) && doc.status().holds_nothing() {
                    // Nothing here to write, and the server will not say more.
                    eprintln!("error: the server refused: {}", why_refused(&e));
                    return Ok(ExitCode::FAILURE);
                }
                eprintln!("warning: exporting the local replica as last synced: {e}");
            }
            let bytes = doc.export(&file).with_context(|| format!("writing {}", file.display()))?;
            println!("wrote {} ({bytes} bytes)", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Repl => {
            catch_up_if_empty(client, doc, timeout).await;
            repl(doc, timeout).await
        }
        Command::Forget => unreachable!("BUG: handled before connecting"),
        Command::History { .. } => unreachable!("BUG: handled before opening"),
        Command::Broadcast { text, stay_ms } => {
            doc.broadcast(&text)?;
            let deadline = tokio::time::Instant::now() + timeout;
            while !doc.broadcast_sent() {
                if let Some((code, message)) = doc.status().error.filter(|(code, _)| refused_code(code)) {
                    eprintln!("error: the server refused: {code}: {message}");
                    return Ok(ExitCode::FAILURE);
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!(
                        "error: the broadcast was not sent within {timeout:?} (is the server reachable?)"
                    );
                    return Ok(ExitCode::FAILURE);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(stay_ms)).await;
            println!("broadcast sent");
            Ok(ExitCode::SUCCESS)
        }
        Command::Presence { json, watch } => {
            if let Err(e) = doc.sync(timeout).await {
                if refused_for_good(&e) {
                    eprintln!("error: the server refused: {}", why_refused(&e));
                    return Ok(ExitCode::FAILURE);
                }
                eprintln!("warning: {e}");
            }
            let mut peers = doc.subscribe_presence();
            loop {
                // A refusal while watching (the token's exp, the document deleted) ends the
                // watch: the listing would otherwise stand still, looking current.
                let refused = async {
                    loop {
                        if let Some(error) = doc.status().error.filter(|(code, _)| refused_code(code)) {
                            return error;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                let now = tokio::select! {
                    now = peers.next() => now,
                    (code, message) = refused, if watch => {
                        eprintln!("error: the server refused: {code}: {message}");
                        return Ok(ExitCode::FAILURE);
                    }
                };
                if json {
                    let list: Vec<serde_json::Value> = now
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "id": p.id,
                                "subject": p.subject,
                                "timeline": p.timeline.to_string(),
                                "value": String::from_utf8_lossy(&p.value),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(list));
                } else {
                    println!("{} here", now.len());
                    for p in &now {
                        let subject = if p.subject.is_empty() { "-" } else { &p.subject };
                        println!("{}\t{subject}\t{}", p.id, String::from_utf8_lossy(&p.value));
                    }
                }
                if !watch {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        Command::Sync => match sync_shown(doc, timeout).await {
            Ok(()) => {
                println!("synced");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter is a number only when it reads back exactly as typed: nothing typed is
    /// changed on the way (a phone number's leading zero, a version's trailing one).
    #[test]
    fn parameters_keep_what_was_typed() {
        for (typed, want) in [
            ("7", Value::Integer(7)),
            ("-3", Value::Integer(-3)),
            ("1.5", Value::Real(1.5)),
            ("2.0", Value::Real(2.0)),
            ("0.00005", Value::Real(0.00005)),
            ("-0.5", Value::Real(-0.5)),
            ("null", Value::Null),
            ("'7'", Value::Text("7".into())),
            ("'null'", Value::Text("null".into())),
            ("''", Value::Text(String::new())),
        ] {
            assert_eq!(parse_param(typed), want, "{typed}");
        }
        for text in [
            "007",
            "+1",
            "1e3",
            "1e-5",
            "1e16",
            "1.10",
            "inf",
            "NaN",
            "12345678901234567890",
            "-0",
            "1.",
            ".5",
            "'",
            "x",
            "3.14159265358979323846",
        ] {
            assert_eq!(parse_param(text), Value::Text(text.into()), "{text}");
        }
    }

    #[test]
    fn a_tsv_field_stays_on_its_row() {
        assert_eq!(tsv_text("a\tb\nc\\d\re"), "a\\tb\\nc\\\\d\\re");
    }
}

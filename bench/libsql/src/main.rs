//! The libsql peer of pagesync's local-write benchmark: `N` single-row inserts, each its own
//! transaction, on a local file in WAL mode with `synchronous = FULL` (the same durability as
//! the stock SQLite peer). Prints the microseconds per write on stdout.
#![forbid(unsafe_code)]

use std::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().ok_or("usage: pagesync-bench-libsql N DIR")?.parse()?;
    let dir = std::path::PathBuf::from(args.next().ok_or("usage: pagesync-bench-libsql N DIR")?);
    let db = libsql::Builder::new_local(dir.join("libsql.db")).build().await?;
    let conn = db.connect()?;
    conn.query("PRAGMA journal_mode = WAL", ()).await?;
    conn.execute("PRAGMA synchronous = FULL", ()).await?;
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", ()).await?;
    let row = |i: u64| format!("row {i} {}", "x".repeat(40));
    let start = Instant::now();
    for i in 0..n {
        conn.execute("INSERT INTO t(v) VALUES (?1)", [row(i)]).await?;
    }
    let micros = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    let count: u64 = conn.query("SELECT count(*) FROM t", ()).await?.next().await?.ok_or("no row")?.get(0)?;
    if count != n {
        return Err(format!("wrote {n} rows, found {count}").into());
    }
    println!("{micros}");
    Ok(())
}

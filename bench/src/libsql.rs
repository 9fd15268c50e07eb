//! libsql against pagesync on the local-write workload of `core`: single-row writes, each
//! durable (libsql: one-row transactions, WAL, `synchronous = FULL`). libsql links its own
//! SQLite, which cannot share a binary or a Cargo resolve with rusqlite's, so it lives in its
//! own package (`bench/libsql`, with its own lockfile); this group builds it with cargo and
//! runs it once per repetition, interleaved with pagesync.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Config;
use crate::report::{Better, Pair, interleave};

pub fn run(cfg: &Config) -> Vec<Pair> {
    let bin = build();
    let n = crate::core::local_writes(cfg);
    let peer = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let out =
            Command::new(&bin).arg(n.to_string()).arg(dir.path()).output().expect("run the libsql peer");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the libsql peer failed: {}", String::from_utf8_lossy(&out.stderr));
        text.trim().parse::<f64>().unwrap_or_else(|_| panic!("the libsql peer printed {text:?}"))
    };
    let (ours, theirs) = interleave(cfg.reps, || crate::core::local_write_micros(n), peer);
    vec![Pair::new(
        "libsql",
        "local single-row write",
        "us/write",
        Better::Lower,
        ours,
        "libsql 0.10 (core), WAL, synchronous=FULL, 1-row txn",
        theirs,
        None,
    )]
}

/// Builds `bench/libsql` (locked) into `target/libsql` and returns its binary.
fn build() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = here.join("..").join("target").join("libsql");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--locked", "--quiet", "--manifest-path"])
        .arg(here.join("libsql").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("run cargo to build the libsql peer");
    assert!(status.success(), "building bench/libsql failed (see above)");
    target.join("release").join("pagesync-bench-libsql")
}

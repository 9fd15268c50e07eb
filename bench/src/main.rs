//! `pagesync-bench`: side-by-side benchmarks. `cargo run --release -p pagesync-bench -- all`
//! writes `BENCHMARKS.md` and `bench/results.json`; `-- NAME` runs one group; `--quick` runs a
//! short smoke version of everything (CI uses it; its figures are not checked).
#![forbid(unsafe_code)]

mod bulk;
mod chart;
mod cluster;
mod core;
mod history;
mod journal;
mod libsql;
mod many;
mod mutators;
mod net;
mod presence;
#[path = "../../server/tests/support/probe.rs"]
mod probe;
mod report;
mod s3;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use report::{Machine, Pair, Report};

/// Settings shared by every benchmark group.
#[derive(Debug, Clone)]
pub struct Config {
    pub quick: bool,
    /// Interleaved repetitions of each pair.
    pub reps: usize,
    /// Charts the groups collect while they run; written to `bench/charts/`.
    pub charts: std::cell::RefCell<Vec<chart::Chart>>,
}

/// The runtime the network groups run in: two workers, as many as the machines have cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// A `pagesync-server` in this process on a free loopback port, configured by `tweak`: its
/// address, its metrics, and the sender that stops it.
pub async fn serve_here(
    store: pagesync_server::Store,
    tweak: impl FnOnce(&mut pagesync_server::ServerConfig),
) -> (std::net::SocketAddr, std::sync::Arc<pagesync_server::Metrics>, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut cfg = pagesync_server::ServerConfig::new(addr, store);
    tweak(&mut cfg);
    let metrics = std::sync::Arc::new(pagesync_server::Metrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(pagesync_server::serve(listener, cfg, metrics.clone(), async move {
        let _ = stopped.await;
    }));
    (addr, metrics, stop)
}

type Group = (&'static str, fn(&Config) -> Vec<Pair>);

const GROUPS: &[Group] = &[
    ("journal", journal::run),
    ("core", core::run),
    ("libsql", libsql::run),
    ("sync", sync::run),
    ("net", net::run),
    ("many", many::run),
    ("bulk", bulk::run),
    ("s3", s3::run),
    ("cluster", cluster::run),
    ("presence", presence::run),
    ("history", history::run),
    ("mutators", mutators::run),
];

fn usage() -> String {
    let names: Vec<&str> = GROUPS.iter().map(|(n, _)| *n).collect();
    format!("usage: pagesync-bench [--quick] [--out DIR] all|{}", names.join("|"))
}

fn main() -> ExitCode {
    if let Some(spec) = std::env::var_os(cluster::CLUSTER_ENV) {
        cluster::serve_child(&spec.to_string_lossy());
        return ExitCode::SUCCESS;
    }
    if let Some(dir) = std::env::var_os(many::SERVE_ENV) {
        many::serve_child(&dir.to_string_lossy());
        return ExitCode::SUCCESS;
    }
    if std::env::var_os(many::BARE_WS_ENV).is_some() {
        many::bare_ws_child();
        return ExitCode::SUCCESS;
    }
    if let Some(docs) = std::env::var_os(many::PEER_ENV) {
        many::peer_child(&docs.to_string_lossy());
        return ExitCode::SUCCESS;
    }
    let mut quick = false;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut which = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => match args.next() {
                Some(dir) => out = PathBuf::from(dir),
                None => return fail(&usage()),
            },
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            name if which.is_none() => which = Some(name.to_owned()),
            _ => return fail(&usage()),
        }
    }
    let which = which.unwrap_or_else(|| "all".into());
    let selected: Vec<&Group> = GROUPS.iter().filter(|(n, _)| which == "all" || *n == which).collect();
    if selected.is_empty() {
        return fail(&format!("unknown benchmark {which:?}\n{}", usage()));
    }
    let cfg = Config { quick, reps: if quick { 3 } else { 7 }, charts: Default::default() };
    let mut pairs = Vec::new();
    for (name, run) in selected {
        eprintln!("running {name} ...");
        pairs.extend(run(&cfg));
    }
    let charts = cfg.charts.take();
    let chart_links = charts.iter().map(|c| (c.name.clone(), c.title.clone())).collect();
    let report = Report { machine: Machine::detect(), quick, pairs, charts: chart_links };
    let md = report.markdown();
    print!("{md}");
    let json = serde_json::to_string_pretty(&report).expect("BUG: the report serializes");
    let _ = std::fs::create_dir_all(out.join("bench").join("charts"));
    let mut writes = vec![(out.join("BENCHMARKS.md"), md), (out.join("bench").join("results.json"), json)];
    for c in &charts {
        writes.push((out.join("bench").join("charts").join(format!("{}.svg", c.name)), c.svg()));
    }
    for (path, text) in writes {
        if let Err(e) = std::fs::write(&path, text) {
            return fail(&format!("cannot write {}: {e}", path.display()));
        }
    }
    ExitCode::SUCCESS
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("{msg}");
    ExitCode::FAILURE
}
